package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"snapfs/internal/units"
)

// writeJSON prints v as indented JSON followed by a newline: the --json
// output of every command, stable enough for scripts and jq.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// progress draws a one-line progress bar on stderr while a long operation
// runs. It draws only when stderr is a terminal, so scripts, pipes and logs
// never get control characters; elsewhere every method does nothing.
type progress struct {
	label string
	w     io.Writer // nil when stderr is not a terminal
	start time.Time

	mu   sync.Mutex // protects the fields below: Update may come from any goroutine
	last time.Time  // when the bar was last drawn
	done bool       // Finish was called: draw no more
}

// newProgress returns a progress bar labelled label (usually the output file).
func newProgress(label string) *progress {
	p := &progress{label: label, start: time.Now()}
	if isTerminal(os.Stderr) {
		p.w = os.Stderr
	}
	return p
}

// Update redraws the bar for done of total bytes. Redraws are limited to
// ten a second: a terminal that scrolls slower than the copy would slow the
// copy down.
func (p *progress) Update(done, total int64) {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if p.done || (now.Sub(p.last) < 100*time.Millisecond && done < total) {
		return
	}
	p.last = now
	fmt.Fprint(p.w, "\r"+progressLine(p.label, done, total, now.Sub(p.start))+"\x1b[K")
}

// Finish erases the bar, leaving the terminal as it was.
func (p *progress) Finish() {
	if p == nil || p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.done {
		p.done = true
		fmt.Fprint(p.w, "\r\x1b[K")
	}
}

// progressLine renders one state of the bar:
// "out.raw [#########...........]  45%  922 MiB / 2 GiB  350 MiB/s".
func progressLine(label string, done, total int64, elapsed time.Duration) string {
	const width = 30
	frac := 1.0
	if total > 0 {
		frac = min(max(float64(done)/float64(total), 0), 1)
	}
	filled := int(frac * width)
	bar := strings.Repeat("#", filled) + strings.Repeat(".", width-filled)
	line := fmt.Sprintf("%s [%s] %3d%%  %s / %s", label, bar, int(frac*100), units.FormatSize(done), units.FormatSize(total))
	if secs := elapsed.Seconds(); secs > 0.5 {
		line += fmt.Sprintf("  %s/s", units.FormatSize(int64(float64(done)/secs)))
	}
	return line
}
