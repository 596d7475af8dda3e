package qcow

import (
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
)

// refcounts reads the refcount structure of a qcow2 layer: a table of
// refcount block offsets, and blocks of 1- to 64-bit counts. Reading data
// never needs it; Verify does.
type refcounts struct {
	l *qcowLayer

	once  sync.Once
	table []uint64 // refcount block offsets
	err   error

	// The block read last, kept so that a walk over many entries of one
	// block reads it once whatever the cache holds. Not safe for
	// concurrent use: one refcounts serves one Verify call.
	lastOff   int64
	lastBlock []byte
}

// load reads the refcount table, bounded by the header checks.
func (r *refcounts) load() error {
	r.once.Do(func() {
		h := r.l.h
		raw := make([]byte, int64(h.refTableClusters)*h.clusterSize())
		if err := readFull(r.l.f, raw, int64(h.refTableOffset)); err != nil {
			r.err = fmt.Errorf("qcow: reading refcount table: %w", err)
			return
		}
		r.table = make([]uint64, len(raw)/8)
		for i := range r.table {
			off := binary.BigEndian.Uint64(raw[i*8:])
			if off&0x1ff != 0 {
				r.err = corruptf("refcount table entry %d has reserved bits set (%#x)", i, off)
				return
			}
			if off%uint64(h.clusterSize()) != 0 {
				r.err = corruptf("refcount block offset %#x is not aligned to a cluster", off)
				return
			}
			r.table[i] = off
		}
	})
	return r.err
}

// get returns the refcount of the host cluster at index.
func (r *refcounts) get(index int64) (uint64, error) {
	if err := r.load(); err != nil {
		return 0, err
	}
	h := r.l.h
	bits := int64(1) << h.refcountOrder
	perBlock := h.clusterSize() * 8 / bits
	t := index / perBlock
	if index < 0 || t >= int64(len(r.table)) || r.table[t] == 0 {
		return 0, nil
	}
	blockOff := int64(r.table[t])
	key := cacheKey{layer: r.l.id, offset: blockOff, kind: cacheRefblock}
	block := r.l.cache.get(key)
	if block == nil && r.lastBlock != nil && r.lastOff == blockOff {
		block = r.lastBlock
	}
	if block == nil {
		if blockOff < 0 || blockOff > r.l.f.Size()-h.clusterSize() {
			return 0, corruptf("refcount block at %#x is past the end of the file", blockOff)
		}
		block = make([]byte, h.clusterSize())
		if err := readFull(r.l.f, block, blockOff); err != nil {
			return 0, fmt.Errorf("qcow: reading refcount block: %w", err)
		}
		r.l.cache.put(key, block)
	}
	r.lastOff, r.lastBlock = blockOff, block
	return refcountAt(block, index%perBlock, uint(bits)), nil
}

// refcountAt decodes entry i of a refcount block with entries of the given
// width, as QEMU packs them: sub-byte widths from the low bits of each byte
// up, wider ones big-endian.
func refcountAt(block []byte, i int64, bits uint) uint64 {
	be := binary.BigEndian
	switch bits {
	case 1, 2, 4:
		perByte := 8 / int64(bits)
		return uint64(block[i/perByte]>>(uint(i%perByte)*bits)) & (1<<bits - 1)
	case 8:
		return uint64(block[i])
	case 16:
		return uint64(be.Uint16(block[i*2:]))
	case 32:
		return uint64(be.Uint32(block[i*4:]))
	case 64:
		return be.Uint64(block[i*8:])
	}
	panic(fmt.Sprintf("BUG: refcount width %d", bits))
}

// Verify checks the top layer's metadata the way qemu-img check would refuse
// it: every L2 table and every data cluster must lie inside the file, be
// aligned, and be counted in the refcounts; and no cluster may have two
// jobs (see clusterClaims). It reads all L2 tables and
// refcount blocks, but no data. It returns an error wrapping ErrCorrupt.
func (c *Chain) Verify(ctx context.Context) error {
	l, ok := c.layers[0].(*qcowLayer)
	if !ok {
		return nil // raw: nothing to check
	}
	h := l.h
	cs := h.clusterSize()
	rc := &refcounts{l: l}
	counted := func(what string, off int64) (uint64, error) {
		if off < 0 || off > l.f.Size()-1 {
			return 0, corruptf("%s at %#x is past the end of the file", what, off)
		}
		n, err := rc.get(off / cs)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return 0, corruptf("%s at %#x has refcount 0", what, off)
		}
		return n, nil
	}
	// copied checks the COPIED flag of an entry naming a cluster of
	// refcount n: set exactly when n is 1, or qemu-img check reports it.
	copied := func(what string, off int64, n uint64, flag bool) error {
		if (n == 1) != flag {
			return corruptf("%s at %#x has refcount %d but its COPIED flag is %v", what, off, n, flag)
		}
		return nil
	}
	claims := newClusterClaims(h.clusterBits, l.f.Size())
	for _, m := range []struct {
		what      string
		off, size int64
	}{
		{"header", 0, int64(h.headerLength)},
		{"L1 table", int64(h.l1Offset), int64(h.l1Size) * 8},
		{"refcount table", int64(h.refTableOffset), int64(h.refTableClusters) * cs},
	} {
		if _, err := counted(m.what, m.off); err != nil {
			return err
		}
		if err := claims.claim(m.what, m.off, max(m.size, 1)); err != nil {
			return err
		}
	}
	if err := rc.load(); err != nil {
		return err
	}
	for i, off := range rc.table {
		if off == 0 {
			continue
		}
		if int64(off) < 0 || int64(off) > l.f.Size()-cs {
			return corruptf("refcount block %d at %#x is past the end of the file", i, off)
		}
		if err := claims.claim(fmt.Sprintf("refcount block %d", i), int64(off), cs); err != nil {
			return err
		}
	}
	entryBytes := h.l2EntryBytes()
	// hostRef is a cluster an L2 entry names, with the entry's flags.
	type hostRef struct {
		off                int64
		copied, compressed bool
	}
	var hosts []hostRef
	for i, e := range l.l1 {
		if err := ctx.Err(); err != nil {
			return err
		}
		// qemu-img check reports these, on any entry.
		if bits := uint64(e) & l1ReservedMask; bits != 0 {
			return corruptf("L1 entry %d has reserved bits set (%#x)", i, bits)
		}
		l2Off := e.l2Offset()
		if l2Off == 0 {
			// qemu-img check reads a table at offset 0 for a COPIED
			// flag alone, and finds the header there.
			if e != 0 {
				return corruptf("L1 entry %d has flags (%#x) but no L2 table", i, uint64(e))
			}
			continue
		}
		what := fmt.Sprintf("L2 table %d", i)
		n, err := counted(what, l2Off)
		if err != nil {
			return err
		}
		if err := copied(what, l2Off, n, uint64(e)&flagCopied != 0); err != nil {
			return err
		}
		// Claimed before it is read: a table named twice is refused
		// before its second walk.
		if err := claims.claim(fmt.Sprintf("L2 table %d", i), l2Off, cs); err != nil {
			return err
		}
		table, err := l.l2Table(l2Off)
		if err != nil {
			return err
		}
		// Sorted, the entries of a table visit each refcount block once,
		// however a hostile table scatters them.
		hosts = hosts[:0]
		for j := int64(0); j < h.l2Entries(); j++ {
			entry := l2Entry(binary.BigEndian.Uint64(table[j*entryBytes:]))
			if err := checkL2Entry(h, entry, int64(i), j); err != nil {
				return err
			}
			var host int64
			switch {
			case entry.compressed():
				var size int64
				host, size = entry.compressedRange(h.clusterBits)
				// qemu-img check reports a range that ends a cluster or
				// more past the end of the file.
				if host+size-l.f.Size() >= cs {
					return corruptf("compressed data at %#x (%d bytes) runs past the end of the file", host, size)
				}
				err = claims.claimCompressed("compressed data", host, size)
			case l.data != l.f:
				continue // data lives in another file
			default:
				host = entry.hostOffset()
				if host%cs != 0 {
					return corruptf("L2 entry %d of table %d has an unaligned offset %#x", j, i, host)
				}
				if host != 0 {
					err = claims.claim("data cluster", host, cs)
				}
			}
			if err != nil {
				return err
			}
			if host != 0 {
				hosts = append(hosts, hostRef{off: host, copied: uint64(entry)&flagCopied != 0, compressed: entry.compressed()})
			}
		}
		slices.SortFunc(hosts, func(a, b hostRef) int { return cmp.Compare(a.off, b.off) })
		for k, host := range hosts {
			n, err := counted("data cluster", host.off)
			if err != nil {
				return err
			}
			// Compressed data may share clusters, but one stream
			// named twice is a cluster of data twice.
			if k > 0 && host.off == hosts[k-1].off {
				return corruptf("L2 table %d names the data at %#x twice", i, host.off)
			}
			if !host.compressed {
				if err := copied("data cluster", host.off, n, host.copied); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// checkL2Entry refuses an entry of L2 table i, at index j, that qemu does
// not read: the store keeps a checked file as a layer that qemu then reads.
func checkL2Entry(h *header, e l2Entry, i, j int64) error {
	if e.compressed() {
		if uint64(e)&flagCopied != 0 {
			return corruptf("L2 entry %d of table %d is compressed with the COPIED flag set", j, i)
		}
		return nil
	}
	if e.zero() && h.version < 3 {
		return corruptf("L2 entry %d of table %d marks a zero cluster, which version 2 images do not have", j, i)
	}
	if bits := uint64(e) & l2ReservedMask; bits != 0 {
		return corruptf("L2 entry %d of table %d has reserved bits set (%#x)", j, i, bits)
	}
	return nil
}
