package qcow

// clusterClaims records which host clusters of a layer the header, the
// tables and the data of the active L1 use, for Verify: QEMU never gives a
// cluster two of these jobs, and a hostile image that does makes Verify
// cost a walk of the same L2 table per L1 entry naming it, or turns a file
// of kilobytes into a volume of gigabytes (one data cluster named by every
// guest cluster). Compressed clusters may share a host cluster with each
// other (QEMU packs them), with nothing else.
//
// Two bits per host cluster of the file: 2 MiB of memory for a 1 TiB file
// of 64 KiB clusters.
type clusterClaims struct {
	clusterBits uint32
	whole       bitset // metadata and uncompressed data
	compressed  bitset // the clusters compressed data lies in
}

// newClusterClaims returns the claims of a file of fileSize bytes.
func newClusterClaims(clusterBits uint32, fileSize int64) *clusterClaims {
	n := fileSize>>clusterBits + 1
	return &clusterClaims{clusterBits: clusterBits, whole: newBitset(n), compressed: newBitset(n)}
}

// claim takes the clusters of [off, off+size) for what, one job each. Past
// the end of the file there is nothing to share: that part is not
// recorded.
func (c *clusterClaims) claim(what string, off, size int64) error {
	if off < 0 {
		return corruptf("%s at %#x is outside the file", what, uint64(off))
	}
	for i := off >> c.clusterBits; i <= c.last(off, size); i++ {
		if c.whole.has(i) || c.compressed.has(i) {
			return corruptf("%s at %#x uses cluster %#x, which holds something else already", what, off, i<<c.clusterBits)
		}
		c.whole.set(i)
	}
	return nil
}

// claimCompressed takes the clusters of a compressed cluster's data, at
// [off, off+size), which other compressed data may share.
func (c *clusterClaims) claimCompressed(what string, off, size int64) error {
	if off < 0 {
		return corruptf("%s at %#x is outside the file", what, uint64(off))
	}
	for i := off >> c.clusterBits; i <= c.last(off, size); i++ {
		if c.whole.has(i) {
			return corruptf("%s at %#x uses cluster %#x, which holds something else already", what, off, i<<c.clusterBits)
		}
		c.compressed.set(i)
	}
	return nil
}

// last returns the index of the last cluster of [off, off+size) that lies
// in the file, so that a hostile size costs no loop past its end.
func (c *clusterClaims) last(off, size int64) int64 {
	return min((off+size-1)>>c.clusterBits, c.whole.len()-1)
}

// bitset is a fixed set of small non-negative integers.
type bitset []uint64

func newBitset(n int64) bitset { return make(bitset, (n+63)/64) }

// len returns how many integers the set can hold.
func (b bitset) len() int64 { return int64(len(b)) * 64 }

// has reports whether i is in the set; an i outside it is not.
func (b bitset) has(i int64) bool {
	return i >= 0 && i>>6 < int64(len(b)) && b[i>>6]&(1<<(i&63)) != 0
}

// set adds i; an i outside the set is left out.
func (b bitset) set(i int64) {
	if i >= 0 && i>>6 < int64(len(b)) {
		b[i>>6] |= 1 << (i & 63)
	}
}
