package main

import (
	"bytes"
	"io"
	"testing"
)

func TestParseFlags(t *testing.T) {
	cfg, err := parseFlags([]string{"-size", "256M", "-chain-size", "64M", "-layers", "4", "-runs", "1", "-keep=false"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.size != 256<<20 || cfg.chainSize != 64<<20 || cfg.depth != 4 || cfg.runs != 1 || len(cfg.cases) != 3 {
		t.Errorf("parsed %+v", cfg)
	}
	for _, bad := range [][]string{
		{"-size", "3M"},                        // not whole objects
		{"-chain-size", "16M", "-layers", "8"}, // fewer objects than clones
		{"-runs", "0"},
		{"-mkdirs", "1"},
		{"-cases", "3"}, // case 3 needs case 1's image
		{"-cases", "4"},
		{"extra"},
	} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
}

// TestData checks that the generated data is the same for a seed, differs
// between seeds, and holds no zero run that RBD would store as a hole.
func TestData(t *testing.T) {
	read := func(seed uint64) []byte {
		b, err := io.ReadAll(io.LimitReader(newData(seed), 1<<20))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a, b := read(1), read(2)
	if !bytes.Equal(a, read(1)) || bytes.Equal(a, b) {
		t.Errorf("data is not deterministic per seed")
	}
	if bytes.Contains(a, make([]byte, 4096)) {
		t.Errorf("data holds a zero block")
	}
}
