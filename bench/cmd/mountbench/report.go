package main

import (
	"fmt"

	"snapfs/bench/internal/measure"
	"snapfs/internal/units"
)

// tableRow lays out one row of a results table: what, time, MiB/s, peak RSS.
const tableRow = "  %-48s %9s %9s %10s\n"

// header prints the title of a case and the head of its table.
func (b *bench) header(title string) {
	fmt.Fprintf(b.out, "\n%s\n", title)
	fmt.Fprintf(b.out, tableRow, "", "time", "MiB/s", "peak RSS")
}

// title prints the title of a case whose table has its own head.
func (b *bench) title(title string) {
	fmt.Fprintf(b.out, "\n%s\n", title)
}

// row prints one sample.
func (b *bench) row(name string, s sample) {
	fmt.Fprintf(b.out, tableRow, name, fmt.Sprintf("%.2f s", s.time.Seconds()),
		fmt.Sprintf("%.0f", s.throughput()), units.FormatSize(s.rssKB<<10))
}

// pair prints snapfs's sample and its peer's, then their ratios (time and
// RSS: snapfs/peer, lower is better; throughput: snapfs/peer, higher is
// better) and whether snapfs reaches target times the peer's throughput.
func (b *bench) pair(sides []side, s []sample, summary string, target float64) {
	b.row(sides[0].name, s[0])
	b.row(sides[1].name, s[1])
	ratio := s[0].throughput() / s[1].throughput()
	ok := ratio >= target
	fmt.Fprintf(b.out, tableRow+"", "ratio snapfs/peer (time, throughput, RSS)",
		fmt.Sprintf("%.2f", s[0].time.Seconds()/s[1].time.Seconds()), fmt.Sprintf("%.2f", ratio),
		fmt.Sprintf("%.2f", float64(s[0].rssKB)/float64(max(s[1].rssKB, 1))))
	fmt.Fprintf(b.out, "  %-48s throughput %.2f x the peer's (target >= %.2f): %s\n", "", ratio, target, measure.Verdict(ok))
	b.verdicts = append(b.verdicts, fmt.Sprintf("%s: throughput ratio %.2f (target >= %.2f): %s", summary, ratio, target, measure.Verdict(ok)))
}

// summary prints every target and whether it was met.
func (b *bench) summary() {
	fmt.Fprintf(b.out, "\nsummary (issue 3's targets)\n")
	for _, v := range b.verdicts {
		fmt.Fprintf(b.out, "  %s\n", v)
	}
}
