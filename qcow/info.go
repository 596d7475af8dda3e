package qcow

// LayerInfo describes one layer of a chain, as `snapfs info` shows it.
type LayerInfo struct {
	Name          string         `json:"name"`
	Format        Format         `json:"format"`
	VirtualSize   int64          `json:"virtual_size"`
	FileSize      int64          `json:"file_size"`
	ClusterSize   int64          `json:"cluster_size,omitempty"`
	Version       int            `json:"version,omitempty"`
	Compression   *Compression   `json:"compression_type,omitempty"`
	RefcountBits  int            `json:"refcount_bits,omitempty"`
	Features      []string       `json:"features,omitempty"`
	BackingName   string         `json:"backing_file,omitempty"`
	BackingFormat string         `json:"backing_format,omitempty"`
	DataFile      string         `json:"data_file,omitempty"`
	Snapshots     []SnapshotInfo `json:"snapshots,omitempty"`
	// AllocatedBytes counts the guest bytes this layer holds data for.
	AllocatedBytes int64 `json:"allocated_bytes"`
}

// Info describes a whole chain.
type Info struct {
	VirtualSize int64 `json:"virtual_size"`
	// AllocatedBytes counts the guest bytes that read from data in any
	// layer (not zeros, not holes).
	AllocatedBytes int64       `json:"allocated_bytes"`
	Layers         []LayerInfo `json:"chain"`
}

// Info describes the chain. It walks the allocation map of every layer, so
// it reads metadata but no data.
func (c *Chain) Info() (*Info, error) {
	info := &Info{VirtualSize: c.Size()}
	for _, l := range c.layers {
		li := LayerInfo{Name: l.file().Name(), VirtualSize: l.size(), FileSize: l.file().Size()}
		if ql, ok := l.(*qcowLayer); ok {
			h := ql.h
			comp := h.compression
			li.Format = FormatQcow2
			li.ClusterSize = h.clusterSize()
			li.Version = int(h.version)
			li.Compression = &comp
			li.RefcountBits = 1 << h.refcountOrder
			li.Features = h.featureNames()
			li.BackingName = h.backingName
			li.BackingFormat = h.backingFormat
			li.DataFile = h.dataFile
			li.Snapshots = ql.snapshots
		}
		// This layer alone: a one-layer chain over it.
		own := &Chain{layers: []layer{l}, sizes: []int64{l.size()}}
		var err error
		if li.AllocatedBytes, err = own.dataBytes(); err != nil {
			return nil, err
		}
		info.Layers = append(info.Layers, li)
	}
	var err error
	if info.AllocatedBytes, err = c.dataBytes(); err != nil {
		return nil, err
	}
	return info, nil
}

// dataBytes counts the bytes of the chain that read from data. It walks
// the allocation map without keeping it: a hostile image may map every
// cluster differently from the next.
func (c *Chain) dataBytes() (int64, error) {
	var n int64
	err := c.mapLayer(0, 0, c.Size(), func(e Extent) {
		if e.Kind == Data {
			n += e.Length
		}
	})
	return n, err
}

// featureNames lists the features a qcow2 header has set.
func (h *header) featureNames() []string {
	var names []string
	add := func(set bool, name string) {
		if set {
			names = append(names, name)
		}
	}
	add(h.incompatible&incompatDirty != 0, "dirty")
	add(h.incompatible&incompatCorrupt != 0, "corrupt")
	add(h.incompatible&incompatDataFile != 0, "external_data_file")
	add(h.incompatible&incompatCompression != 0, "compression_type")
	add(h.incompatible&incompatExtendedL2 != 0, "extended_l2")
	add(h.compatible&compatLazyRefcounts != 0, "lazy_refcounts")
	add(h.autoclear&autoclearBitmaps != 0, "bitmaps")
	add(h.autoclear&autoclearRawData != 0, "raw_external_data")
	return names
}
