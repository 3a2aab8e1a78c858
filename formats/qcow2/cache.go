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
	// zeroOnDisk has bit i set while segment i of the table (see
	// Layout.tableSegment) has never been written and reads as zeroes
	// on disk: a new table beyond the end of the file.
	zeroOnDisk uint64
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
		if _, err := c.evict(); err != nil {
			return nil, err
		}
	}
	t := &cachedTable{offset: offset, data: data, dirty: dirty}
	c.entries[offset] = c.lru.PushFront(t)
	return t, nil
}

// evict removes the least recently used entry, writing it back first
// when dirty, and returns its buffer.
func (c *tableCache) evict() ([]byte, error) {
	el := c.lru.Back()
	t := el.Value.(*cachedTable)
	if t.dirty {
		if err := c.writeback(t); err != nil {
			return nil, err
		}
	}
	c.lru.Remove(el)
	delete(c.entries, t.offset)
	return t.data, nil
}

// spare makes room for one more entry and returns an n-byte buffer for
// it: the evicted entry's when the cache is full, so that a walk over
// more tables than the cache holds reuses the cache's memory instead of
// allocating a table per miss (560 MB for a 16 TiB image with a table
// per 512 MiB). A walk in L1 order (walking) needs each table once, so
// it reuses buffers as soon as the cache holds walkTables rather than
// growing it (and the process) to its maximum. The contents are stale.
// Because of this reuse, a *cachedTable and its data are valid only
// until the next spare on the same cache.
func (c *tableCache) spare(n int, walking bool) ([]byte, error) {
	if c.lru.Len() < c.max && (!walking || c.lru.Len() < walkTables) {
		return make([]byte, n), nil
	}
	buf, err := c.evict()
	if err != nil {
		return nil, err
	}
	if len(buf) != n {
		buf = make([]byte, n)
	}
	return buf, nil
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

// readaheadTables is how many allocated L2 tables a walk in L1 order
// keeps asked for ahead of the one it reads (2 MiB with 64 KiB
// clusters).
const readaheadTables = 32

// walkTables is how many tables a walk in L1 order keeps cached: twice
// those it reads ahead.
const walkTables = 2 * readaheadTables

// tableReadahead keeps the kernel reading the L2 tables that a walk in
// L1 order (map, check, convert, compare) will need next. Without it a
// cold walk over an image with thousands of scattered tables waits for
// the disk once per table. Misses that do not follow each other in L1
// order (random I/O) ask for nothing.
type tableReadahead struct {
	// last is the L1 index of the last miss (valid once walked is set),
	// next the first index not asked for yet, and mark the index from
	// which a miss asks for more (half way through those asked for).
	last, next, mark int64
	walked           bool
}

// miss is called when the L2 table of L1 index i is not cached; entry
// returns L1 entry j of the n the table has, and ask is given the host
// offset of each table to read ahead. It reports whether the miss
// follows the previous one in L1 order.
func (r *tableReadahead) miss(n int64, entry func(j int64) uint64, i int64, ask func(off uint64)) bool {
	seq := r.walked && i > r.last && !allocatedBetween(entry, r.last, i)
	r.last, r.walked = i, true
	if !seq {
		r.next, r.mark = i+1, i+1 // start over; ask once the walk goes on
		return false
	}
	if i < r.mark {
		return true
	}
	r.mark = n
	found := 0
	j := i + 1
	for ; j < n && found < readaheadTables; j++ {
		off := entry(j) & OffsetMask
		if off == 0 {
			continue
		}
		if found++; found == readaheadTables/2 {
			r.mark = j
		}
		if j >= r.next {
			ask(off)
		}
	}
	r.next = j
	return true
}

// allocatedBetween reports whether an L1 entry strictly between a and b
// has a table; far apart counts as yes (not a walk, and no long scan).
func allocatedBetween(entry func(j int64) uint64, a, b int64) bool {
	if b-a > 4096 {
		return true
	}
	for j := a + 1; j < b; j++ {
		if entry(j)&OffsetMask != 0 {
			return true
		}
	}
	return false
}
