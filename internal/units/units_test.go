package units

import "testing"

func TestCount(t *testing.T) {
	for _, tc := range []struct {
		n    int
		noun string
		want string
	}{
		{0, "layer", "0 layers"},
		{1, "layer", "1 layer"},
		{2, "layer", "2 layers"},
		{1, "open file", "1 open file"},
		{3, "open file", "3 open files"},
		{-1, "layer", "-1 layers"},
	} {
		if got := Count(tc.n, tc.noun); got != tc.want {
			t.Errorf("Count(%d, %q) = %q, want %q", tc.n, tc.noun, got, tc.want)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{512, "512 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{196 << 10, "196 KiB"},
		{1 << 20, "1 MiB"},
		{1536 << 20, "1.5 GiB"},
		{2 << 30, "2 GiB"},
		{100 << 30, "100 GiB"},
		{1 << 40, "1 TiB"},
		{1310720000, "1.22 GiB"},
		{1<<63 - 1, "8 EiB"},
	} {
		if got := FormatSize(tc.n); got != tc.want {
			t.Errorf("FormatSize(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}
