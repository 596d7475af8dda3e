package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"snapfs/bench/internal/images"
	"snapfs/internal/units"
)

// imagesVersion changes whenever the images the harness makes change, so
// that old ones in -work are not reused.
const imagesVersion = "1"

// denseChain makes (or reuses) the dense chain of cases a-c and returns the
// path of its top layer. Layer i writes the i-th slice of the disk and a
// quarter slice on each side, over the layers below: every byte of the
// result is data, and a third of each layer is shadowed by the next.
func (b *bench) denseChain() (string, error) {
	cfg := b.cfg
	dir := filepath.Join(cfg.work, fmt.Sprintf("dense-%dx%d", cfg.layers, cfg.size))
	top := filepath.Join(dir, fmt.Sprintf("layer%d.qcow2", cfg.layers-1))
	b.inputs = nil
	for i := 0; i < cfg.layers; i++ {
		b.inputs = append([]string{filepath.Join(dir, fmt.Sprintf("layer%d.qcow2", i))}, b.inputs...)
	}
	if images.Reusable(dir, imagesVersion) {
		return top, nil
	}
	fmt.Fprintf(b.out, "making a dense chain of %d layers, %s, in %s ...\n", cfg.layers, units.FormatSize(cfg.size), dir)
	defer b.took(time.Now())
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	slice := cfg.size / int64(cfg.layers) &^ (64<<10 - 1)
	for i := 0; i < cfg.layers; i++ {
		name := fmt.Sprintf("layer%d.qcow2", i)
		args := []string{"create", "-q", "-f", "qcow2"}
		if i > 0 {
			args = append(args, "-b", fmt.Sprintf("layer%d.qcow2", i-1), "-F", "qcow2")
		}
		if err := images.Tool(dir, "qemu-img", append(args, name, fmt.Sprint(cfg.size))...); err != nil {
			return "", err
		}
		start := max(int64(i)*slice-slice/4, 0)
		end := min(int64(i+1)*slice+slice/4, cfg.size)
		if i == cfg.layers-1 {
			end = cfg.size
		}
		pattern, err := images.WritePattern(dir, fmt.Sprintf("pattern%d", i), uint64(i))
		if err != nil {
			return "", err
		}
		if err := images.WriteRange(dir, name, pattern, start, end-start); err != nil {
			return "", err
		}
		os.Remove(pattern)
	}
	return top, images.MarkDone(dir, imagesVersion)
}

// sparseImage makes (or reuses) a qcow2 image of the given virtual size
// holding data bytes in 64 runs spread evenly over it.
func (b *bench) sparseImage(virtual, data int64) (string, error) {
	dir := filepath.Join(b.cfg.work, fmt.Sprintf("sparse-%d-%d", virtual, data))
	img := filepath.Join(dir, "sparse.qcow2")
	if images.Reusable(dir, imagesVersion) {
		return img, nil
	}
	fmt.Fprintf(b.out, "making a sparse image, %s virtual with %s of data, in %s ...\n", units.FormatSize(virtual), units.FormatSize(data), dir)
	defer b.took(time.Now())
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if err := images.Tool(dir, "qemu-img", "create", "-q", "-f", "qcow2", "sparse.qcow2", fmt.Sprint(virtual)); err != nil {
		return "", err
	}
	pattern, err := images.WritePattern(dir, "pattern", 99)
	if err != nil {
		return "", err
	}
	const runs = 64
	runLen := max(data/runs&^(64<<10-1), 64<<10)
	stride := virtual / runs &^ (64<<10 - 1)
	for i := int64(0); i < runs; i++ {
		if err := images.WriteRange(dir, "sparse.qcow2", pattern, i*stride, runLen); err != nil {
			return "", err
		}
	}
	os.Remove(pattern)
	return img, images.MarkDone(dir, imagesVersion)
}

// sparseCase is case d: a raw export of a huge sparse image must take the
// time of its data. The same data is exported from an image of
// -sparse-virtual and from one of -sparse-small; the two times should be
// about equal.
func (b *bench) sparseCase() error {
	cfg := b.cfg
	times := map[string][2]float64{}
	sizes := []int64{cfg.sparseVirtual, cfg.sparseSmall}
	var imgs []string
	for _, virtual := range sizes {
		img, err := b.sparseImage(virtual, cfg.sparseData)
		if err != nil {
			return err
		}
		imgs = append(imgs, img)
	}
	b.header(fmt.Sprintf("sparse raw export: %s of data in %s virtual, then in %s virtual",
		units.FormatSize(cfg.sparseData), units.FormatSize(cfg.sparseVirtual), units.FormatSize(cfg.sparseSmall)))
	for i, virtual := range sizes {
		img := imgs[i]
		b.inputs = []string{img}
		out := filepath.Join(cfg.work, "sparse-out.raw")
		s, err := b.measure(command{b.snapfs, []string{"convert", "-O", "raw", img, out}}, b.inputs, out, cfg.sparseData)
		if err != nil {
			return err
		}
		q, err := b.measure(command{"qemu-img", []string{"convert", "-O", "raw", img, out}}, b.inputs, out, cfg.sparseData)
		if err != nil {
			return err
		}
		b.pair(fmt.Sprintf("d. raw, %s virtual", units.FormatSize(virtual)), s, q)
		for tool, x := range map[string]sample{"snapfs": s, "qemu-img": q} {
			t := times[tool]
			t[i] = x.time.Seconds()
			times[tool] = t
		}
	}
	for _, tool := range []string{"snapfs", "qemu-img"} {
		t := times[tool]
		fmt.Fprintf(b.out, "  d. %s: time for %s virtual / time for %s virtual = %.2f (1.00: time follows the data, not the virtual size)\n",
			tool, units.FormatSize(cfg.sparseVirtual), units.FormatSize(cfg.sparseSmall), t[0]/t[1])
	}
	return nil
}

// took reports how long making images took.
func (b *bench) took(start time.Time) {
	fmt.Fprintf(b.out, "  made in %.1f s\n", time.Since(start).Seconds())
}
