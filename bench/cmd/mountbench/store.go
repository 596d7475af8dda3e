package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"snapfs/bench/internal/fuseproc"
	"snapfs/bench/internal/images"
	"snapfs/internal/units"
)

// storeVersion changes whenever the recipes below change, so that volumes
// kept from an older run are made again.
const storeVersion = "1"

// stripe is the unit in which case 2 spreads its data over the layers of
// the deep chain: stripe j lives in layer j mod depth, so a sequential read
// visits every layer again and again instead of walking them in order.
const stripe = 1 << 20

// Volumes of the store; the mkdir and import ones are made anew each run.
const (
	mkdirSmallVolume = "mkdir-small"
	mkdirBigVolume   = "mkdir-big"
	importPrefix     = "imported-"
)

// bench holds the state of one benchmark run.
type bench struct {
	ctx    context.Context
	cfg    *config
	snapfs string // absolute path of the binary
	out    io.Writer
	store  string // the store directory
	mnt    string // the mount point
	cold   bool   // the page cache may be dropped
	mount  *fuseproc.Proc

	chain         *snapChain // case 1
	shallow, deep *snapChain // case 2
	importSource  string     // case 4: a dense qcow2 outside the store

	verdicts []string // one line per target, for the summary
}

// snapChain is a snapshot of the store: its layer files and its export.
type snapChain struct {
	volume, snap string
	top          string   // the snapshot's layer file, which qemu-img opens
	layers       []string // every layer file of its chain, top first
}

// export is the path of the snapshot's disk.raw under the mount point.
func (c *snapChain) export(mnt string) string {
	return filepath.Join(mnt, "volumes", c.volume, "snapshots", c.snap, "disk.raw")
}

// sf runs a snapfs command on the store and returns its stdout.
func (b *bench) sf(args ...string) ([]byte, error) {
	return images.Output(b.cfg.work, b.snapfs, append(args, "--store", b.store)...)
}

// volumeInfo is what snapfs volume list --json says of a volume.
type volumeInfo struct {
	Name     string   `json:"name"`
	HeadPath string   `json:"head_path"`
	Chain    []string `json:"chain"`
}

func (b *bench) volumes() (map[string]volumeInfo, error) {
	out, err := b.sf("volume", "list", "--json")
	if err != nil {
		return nil, err
	}
	var list []volumeInfo
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("snapfs volume list --json: %w", err)
	}
	vols := map[string]volumeInfo{}
	for _, v := range list {
		vols[v.Name] = v
	}
	return vols, nil
}

func (b *bench) headPath(volume string) (string, error) {
	vols, err := b.volumes()
	if err != nil {
		return "", err
	}
	v, ok := vols[volume]
	if !ok {
		return "", fmt.Errorf("volume %s is not in the store", volume)
	}
	return v.HeadPath, nil
}

// snapChainOf finds snapshot volume@snap and its chain, which must be
// depth layers deep.
func (b *bench) snapChainOf(volume, snap string, depth int) (*snapChain, error) {
	out, err := b.sf("snapshot", "list", "--json", volume)
	if err != nil {
		return nil, err
	}
	var snaps []struct {
		Name string `json:"name"`
		Path string `json:"path"`
	}
	if err := json.Unmarshal(out, &snaps); err != nil {
		return nil, fmt.Errorf("snapfs snapshot list --json: %w", err)
	}
	c := &snapChain{volume: volume, snap: snap}
	for _, s := range snaps {
		if s.Name == snap {
			c.top = s.Path
		}
	}
	if c.top == "" {
		return nil, fmt.Errorf("snapshot %s@%s is not in the store", volume, snap)
	}
	// The chain as an image reader sees it, from the layer files'
	// backing names, not from the store's metadata.
	out, err = images.Output(b.cfg.work, b.snapfs, "info", "--json", c.top)
	if err != nil {
		return nil, err
	}
	var info struct {
		Chain []struct {
			Name string `json:"name"`
		} `json:"chain"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("snapfs info --json: %w", err)
	}
	for _, l := range info.Chain {
		c.layers = append(c.layers, l.Name)
	}
	if len(c.layers) != depth {
		return nil, fmt.Errorf("snapshot %s@%s is %d layers deep, want %d", volume, snap, len(c.layers), depth)
	}
	return c, nil
}

// prepare makes (or reuses) every volume and image the chosen cases need.
func (b *bench) prepare() error {
	cfg := b.cfg
	if err := os.MkdirAll(filepath.Join(cfg.work, "ready"), 0o755); err != nil {
		return err
	}
	vols, err := b.volumes()
	if err != nil {
		return err
	}
	// What earlier runs imported, and the mkdir volumes with their
	// snapshots, go: case 3 starts from a volume without snapshots.
	for name := range vols {
		if strings.HasPrefix(name, importPrefix) || name == mkdirSmallVolume || name == mkdirBigVolume {
			if _, err := b.sf("volume", "delete", name); err != nil {
				return err
			}
		}
	}
	if strings.Contains(cfg.cases, "1") {
		if b.chain, err = b.denseChain(vols); err != nil {
			return err
		}
	}
	if strings.Contains(cfg.cases, "2") {
		if b.shallow, b.deep, err = b.depthChains(vols); err != nil {
			return err
		}
	}
	if strings.Contains(cfg.cases, "3") {
		for _, v := range []struct {
			name string
			size int64
		}{{mkdirSmallVolume, cfg.mkdirSmall}, {mkdirBigVolume, cfg.mkdirBig}} {
			if err := b.sparseVolume(v.name, v.size, cfg.mkdirData); err != nil {
				return err
			}
		}
	}
	if strings.Contains(cfg.cases, "4") {
		if b.importSource, err = b.denseImage(); err != nil {
			return err
		}
	}
	return nil
}

// reusable says whether volume (or image) key was made by a run with the
// same recipe, and is there still.
func (b *bench) reusable(vols map[string]volumeInfo, key, version string) bool {
	got, err := os.ReadFile(filepath.Join(b.cfg.work, "ready", key))
	if err != nil || string(got) != version {
		return false
	}
	_, ok := vols[key]
	return ok
}

// made records that key was made with version.
func (b *bench) made(key, version string) error {
	return os.WriteFile(filepath.Join(b.cfg.work, "ready", key), []byte(version), 0o644)
}

// took says how long making something took.
func (b *bench) took(start time.Time) {
	fmt.Fprintf(b.out, "  made in %.1f s\n", time.Since(start).Seconds())
}

// fresh deletes volume if the store has it (made by another recipe), and
// creates it empty.
func (b *bench) fresh(vols map[string]volumeInfo, volume string, size int64) error {
	os.Remove(filepath.Join(b.cfg.work, "ready", volume))
	if _, ok := vols[volume]; ok {
		if _, err := b.sf("volume", "delete", volume); err != nil {
			return err
		}
	}
	_, err := b.sf("volume", "create", volume, fmt.Sprint(size))
	return err
}

// patterns makes n pattern files (seeds 0 to n-1) under work/patterns, or
// reuses them.
func (b *bench) patterns(n int) ([]string, error) {
	dir := filepath.Join(b.cfg.work, "patterns")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var paths []string
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("pattern%d", i)
		path := filepath.Join(dir, name)
		if _, err := os.Stat(path); err != nil {
			if path, err = images.WritePattern(dir, name, uint64(i)); err != nil {
				return nil, err
			}
		}
		paths = append(paths, path)
	}
	return paths, nil
}

// denseChain makes (or reuses) volume chainN for case 1: N snapshots, each
// layer written by qemu-io into the head before the snapshot. Layer i
// writes the i-th slice of the disk and a quarter slice on each side (as
// qcowbench's chain): every byte is data, and a third of each layer is
// shadowed by the next.
func (b *bench) denseChain(vols map[string]volumeInfo) (*snapChain, error) {
	cfg := b.cfg
	name := fmt.Sprintf("chain%d", cfg.layers)
	version := fmt.Sprintf("%s size=%d layers=%d", storeVersion, cfg.size, cfg.layers)
	top := fmt.Sprintf("s%d", cfg.layers)
	if b.reusable(vols, name, version) {
		return b.snapChainOf(name, top, cfg.layers)
	}
	fmt.Fprintf(b.out, "making volume %s: %d snapshots over %s of data ...\n", name, cfg.layers, units.FormatSize(cfg.size))
	start := time.Now()
	if err := b.fresh(vols, name, cfg.size); err != nil {
		return nil, err
	}
	patterns, err := b.patterns(cfg.layers)
	if err != nil {
		return nil, err
	}
	slice := cfg.size / int64(cfg.layers) &^ (64<<10 - 1)
	for i := 0; i < cfg.layers; i++ {
		from := max(int64(i)*slice-slice/4, 0)
		to := min(int64(i+1)*slice+slice/4, cfg.size)
		if i == cfg.layers-1 {
			to = cfg.size
		}
		if err := b.writeAndSnapshot(name, fmt.Sprintf("s%d", i+1), images.Write{Pattern: patterns[i], Off: from, Len: to - from}); err != nil {
			return nil, err
		}
	}
	c, err := b.snapChainOf(name, top, cfg.layers)
	if err != nil {
		return nil, err
	}
	b.took(start)
	return c, b.made(name, version)
}

// writeAndSnapshot writes into the head of volume with qemu-io and takes
// snapshot snap.
func (b *bench) writeAndSnapshot(volume, snap string, writes ...images.Write) error {
	if err := b.ctx.Err(); err != nil {
		return err
	}
	head, err := b.headPath(volume)
	if err != nil {
		return err
	}
	if len(writes) > 0 {
		if err := images.WriteRanges(b.cfg.work, head, writes...); err != nil {
			return err
		}
	}
	_, err = b.sf("snapshot", "create", volume, snap)
	return err
}

// depthChains makes (or reuses) the volumes of case 2: depth1, one layer,
// and depthN, N layers, holding the same data. 1 MiB stripe j is written
// with pattern j mod N in both, into layer j mod N of the deep one; the
// patterns differ, so a stripe read from the wrong layer shows.
func (b *bench) depthChains(vols map[string]volumeInfo) (shallow, deep *snapChain, err error) {
	cfg := b.cfg
	stripes := cfg.depthSize / stripe
	size := stripes * stripe
	version := fmt.Sprintf("%s size=%d depth=%d", storeVersion, size, cfg.depth)
	shallowName, deepName := "depth1", fmt.Sprintf("depth%d", cfg.depth)
	deepTop := fmt.Sprintf("s%d", cfg.depth)
	if b.reusable(vols, shallowName, version) && b.reusable(vols, deepName, version) {
		if shallow, err = b.snapChainOf(shallowName, "s1", 1); err != nil {
			return nil, nil, err
		}
		deep, err = b.snapChainOf(deepName, deepTop, cfg.depth)
		return shallow, deep, err
	}
	fmt.Fprintf(b.out, "making volumes %s and %s: %s of data in 1 and %d layers ...\n",
		shallowName, deepName, units.FormatSize(size), cfg.depth)
	start := time.Now()
	patterns, err := b.patterns(cfg.depth)
	if err != nil {
		return nil, nil, err
	}
	layers := make([][]images.Write, cfg.depth)
	var all []images.Write
	for j := int64(0); j < stripes; j++ {
		w := images.Write{Pattern: patterns[j%int64(cfg.depth)], Off: j * stripe, Len: stripe}
		layers[j%int64(cfg.depth)] = append(layers[j%int64(cfg.depth)], w)
		all = append(all, w)
	}
	if err := b.fresh(vols, shallowName, size); err != nil {
		return nil, nil, err
	}
	if err := b.writeAndSnapshot(shallowName, "s1", all...); err != nil {
		return nil, nil, err
	}
	if err := b.fresh(vols, deepName, size); err != nil {
		return nil, nil, err
	}
	for l, writes := range layers {
		if err := b.writeAndSnapshot(deepName, fmt.Sprintf("s%d", l+1), writes...); err != nil {
			return nil, nil, err
		}
	}
	if shallow, err = b.snapChainOf(shallowName, "s1", 1); err != nil {
		return nil, nil, err
	}
	if deep, err = b.snapChainOf(deepName, deepTop, cfg.depth); err != nil {
		return nil, nil, err
	}
	b.took(start)
	if err := b.made(shallowName, version); err != nil {
		return nil, nil, err
	}
	return shallow, deep, b.made(deepName, version)
}

// sparseVolume makes volume anew, of virtual size, with data bytes in 16
// runs spread evenly over it, and no snapshot.
func (b *bench) sparseVolume(volume string, size, data int64) error {
	if _, err := b.sf("volume", "create", volume, fmt.Sprint(size)); err != nil {
		return err
	}
	patterns, err := b.patterns(1)
	if err != nil {
		return err
	}
	const runs = 16
	runLen := max(data/runs&^(64<<10-1), 64<<10)
	gap := size / runs &^ (64<<10 - 1)
	var writes []images.Write
	for i := int64(0); i < runs; i++ {
		writes = append(writes, images.Write{Pattern: patterns[0], Off: i * gap, Len: min(runLen, size-i*gap)})
	}
	head, err := b.headPath(volume)
	if err != nil {
		return err
	}
	return images.WriteRanges(b.cfg.work, head, writes...)
}

// denseImage makes (or reuses) the qcow2 that case 4 imports: -size of
// data, outside the store but in its filesystem.
func (b *bench) denseImage() (string, error) {
	cfg := b.cfg
	img := filepath.Join(cfg.work, "import.qcow2")
	version := fmt.Sprintf("%s size=%d", storeVersion, cfg.size)
	if got, err := os.ReadFile(filepath.Join(cfg.work, "ready", "import.qcow2")); err == nil && string(got) == version {
		if _, err := os.Stat(img); err == nil {
			return img, nil
		}
	}
	fmt.Fprintf(b.out, "making %s: a dense qcow2 of %s ...\n", img, units.FormatSize(cfg.size))
	start := time.Now()
	if err := images.Tool(cfg.work, "qemu-img", "create", "-q", "-f", "qcow2", img, fmt.Sprint(cfg.size)); err != nil {
		return "", err
	}
	patterns, err := b.patterns(1)
	if err != nil {
		return "", err
	}
	if err := images.WriteRange(cfg.work, img, patterns[0], 0, cfg.size); err != nil {
		return "", err
	}
	b.took(start)
	return img, b.made("import.qcow2", version)
}
