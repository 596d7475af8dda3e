// Package units renders quantities for people: the CLI's listings and
// progress bars, the model's error messages, and the benchmarks' reports,
// which must agree.
package units

import "fmt"

// Count renders n of a noun in English: "1 layer", "2 layers", "0 layers".
// The plural adds an s, which fits every noun snapfs counts.
func Count(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// FormatSize renders a byte count as qemu-img does ("2 GiB", "1.22 GiB",
// "512 B"): three significant digits of the largest binary unit that fits.
func FormatSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(n)
	i := 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.3g %s", v, units[i])
}
