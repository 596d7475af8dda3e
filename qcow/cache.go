package qcow

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// DefaultCacheBytes is the size of the cache a Chain makes for itself when
// Options.Cache is nil.
const DefaultCacheBytes = 64 << 20

// Cache keeps L2 tables and decompressed clusters, bounded in bytes and
// evicting the least recently used. It is safe for concurrent use and may be
// shared by many chains: entries are keyed by a layer identity unique to the
// process.
type Cache struct {
	maxBytes int64

	mu      sync.Mutex // protects the fields below
	bytes   int64
	entries map[cacheKey]*list.Element
	lru     list.List // of *cacheEntry, most recent at the front
}

type cacheKey struct {
	layer  uint64
	offset int64
	kind   uint8 // cacheL2, cacheCluster or cacheRefblock
}

const (
	cacheL2 uint8 = iota
	cacheCluster
	cacheRefblock
)

type cacheEntry struct {
	key  cacheKey
	data []byte
}

// NewCache returns a cache that holds at most maxBytes of data.
func NewCache(maxBytes int64) *Cache {
	return &Cache{maxBytes: maxBytes, entries: make(map[cacheKey]*list.Element)}
}

// get returns the cached bytes for key, or nil. The bytes must not be
// modified.
func (c *Cache) get(key cacheKey) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		c.lru.MoveToFront(el)
		return el.Value.(*cacheEntry).data
	}
	return nil
}

// put stores data under key, evicting old entries to stay within bounds.
// Data larger than the whole cache is not kept.
func (c *Cache) put(key cacheKey, data []byte) {
	size := int64(len(data))
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
		c.bytes -= int64(len(e.data))
	}
	c.entries[key] = c.lru.PushFront(&cacheEntry{key: key, data: data})
	c.bytes += size
}

// layerIDs gives every opened layer a process-unique cache identity.
var layerIDs atomic.Uint64

func newLayerID() uint64 { return layerIDs.Add(1) }
