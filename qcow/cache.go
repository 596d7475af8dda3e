package qcow

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// DefaultCacheBytes is the size of the cache a Chain makes for itself when
// Options.Cache is nil.
const DefaultCacheBytes = 64 << 20

// Cache keeps L2 tables (raw, and parsed into runs for lookups) and
// decompressed clusters, bounded in bytes and evicting the least recently
// used. It is safe for concurrent use and may be
// shared by many chains: entries are keyed by a layer identity unique to the
// process, or, for immutable files, to their content (OpenImmutableFile).
type Cache struct {
	maxBytes int64

	mu      sync.Mutex // protects the fields below
	bytes   int64
	entries map[cacheKey]*list.Element
	lru     list.List // of *cacheEntry, most recent at the front
	// sharedIDs are the layer identities of immutable files by content.
	sharedIDs map[contentKey]uint64
}

type cacheKey struct {
	layer  uint64
	offset int64
	kind   uint8 // cacheL2, cacheCluster, cacheRefblock or cacheL2Map
}

const (
	cacheL2 uint8 = iota
	cacheCluster
	cacheRefblock
	cacheL2Map
)

type cacheEntry struct {
	key   cacheKey
	value any
	size  int64
}

// NewCache returns a cache that holds at most maxBytes of data.
func NewCache(maxBytes int64) *Cache {
	return &Cache{maxBytes: maxBytes, entries: make(map[cacheKey]*list.Element)}
}

// get returns the cached bytes for key, or nil. The bytes must not be
// modified.
func (c *Cache) get(key cacheKey) []byte {
	b, _ := c.getValue(key).([]byte)
	return b
}

// put stores data under key, evicting old entries to stay within bounds.
// Data larger than the whole cache is not kept.
func (c *Cache) put(key cacheKey, data []byte) { c.putValue(key, data, int64(len(data))) }

// getValue returns the value cached under key, or nil. It must not be
// modified.
func (c *Cache) getValue(key cacheKey) any {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		c.lru.MoveToFront(el)
		return el.Value.(*cacheEntry).value
	}
	return nil
}

// putValue stores value, which takes size bytes, under key, as put does.
func (c *Cache) putValue(key cacheKey, value any, size int64) {
	if size > c.maxBytes {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		c.lru.MoveToFront(el)
		return
	}
	for c.bytes+size > c.maxBytes {
		oldest := c.lru.Back()
		e := oldest.Value.(*cacheEntry)
		c.lru.Remove(oldest)
		delete(c.entries, e.key)
		c.bytes -= e.size
	}
	c.entries[key] = c.lru.PushFront(&cacheEntry{key: key, value: value, size: size})
	c.bytes += size
}

// layerIDs gives every opened layer a process-unique cache identity.
var layerIDs atomic.Uint64

// maxSharedIDs bounds the identities a Cache remembers for immutable files
// (see OpenImmutableFile): past it they are forgotten, and the entries of
// the files' old identities age out of the cache.
const maxSharedIDs = 4096

// layerID returns the cache identity of a layer opened on f: the one every
// layer on the same immutable content shares in this cache, or a new one.
func (c *Cache) layerID(f File) uint64 {
	k, ok := f.(keyed)
	if !ok || k.contentKey() == (contentKey{}) {
		return layerIDs.Add(1)
	}
	key := k.contentKey()
	c.mu.Lock()
	defer c.mu.Unlock()
	if id, ok := c.sharedIDs[key]; ok {
		return id
	}
	if c.sharedIDs == nil || len(c.sharedIDs) >= maxSharedIDs {
		c.sharedIDs = make(map[contentKey]uint64)
	}
	id := layerIDs.Add(1)
	c.sharedIDs[key] = id
	return id
}
