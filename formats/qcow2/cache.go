package qcow2

import "container/list"

// tableCache is an LRU cache of cluster-sized metadata tables (L2 tables
// or refcount blocks) keyed by host offset, with write-back of dirty
// entries on eviction. It is not safe for concurrent use: the image's
// metadata lock guards it.
type tableCache struct {
	max     int
	entries map[uint64]*list.Element
	lru     *list.List // front = most recently used; values are *cachedTable
	// writeback stores a dirty table when it is evicted or flushed; the
	// image uses it to keep the crash-safe write order.
	writeback func(t *cachedTable) error
}

// cachedTable is one cached table. data is owned by the cache; callers
// may modify it under the metadata lock and must then call markDirty.
type cachedTable struct {
	offset uint64
	data   []byte
	dirty  bool
}

func newTableCache(max int, writeback func(*cachedTable) error) *tableCache {
	return &tableCache{max: max, entries: map[uint64]*list.Element{}, lru: list.New(), writeback: writeback}
}

// get returns the cached table at offset, or nil.
func (c *tableCache) get(offset uint64) *cachedTable {
	el, ok := c.entries[offset]
	if !ok {
		return nil
	}
	c.lru.MoveToFront(el)
	return el.Value.(*cachedTable)
}

// add inserts a table, evicting (and writing back) the least recently
// used ones beyond the capacity.
func (c *tableCache) add(offset uint64, data []byte, dirty bool) (*cachedTable, error) {
	if t := c.get(offset); t != nil {
		t.data, t.dirty = data, t.dirty || dirty
		return t, nil
	}
	for c.lru.Len() >= c.max {
		el := c.lru.Back()
		t := el.Value.(*cachedTable)
		if t.dirty {
			if err := c.writeback(t); err != nil {
				return nil, err
			}
		}
		c.lru.Remove(el)
		delete(c.entries, t.offset)
	}
	t := &cachedTable{offset: offset, data: data, dirty: dirty}
	c.entries[offset] = c.lru.PushFront(t)
	return t, nil
}

// drop forgets the table at offset without writing it (after the
// cluster was freed).
func (c *tableCache) drop(offset uint64) {
	if el, ok := c.entries[offset]; ok {
		c.lru.Remove(el)
		delete(c.entries, offset)
	}
}

// hasDirty reports whether any entry awaits write-back.
func (c *tableCache) hasDirty() bool {
	for el := c.lru.Front(); el != nil; el = el.Next() {
		if el.Value.(*cachedTable).dirty {
			return true
		}
	}
	return false
}

// flush writes back every dirty entry, in offset order is not needed:
// the caller orders whole caches against each other.
func (c *tableCache) flush() error {
	for el := c.lru.Back(); el != nil; el = el.Prev() {
		t := el.Value.(*cachedTable)
		if t.dirty {
			if err := c.writeback(t); err != nil {
				return err
			}
		}
	}
	return nil
}
