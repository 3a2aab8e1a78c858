package qcow2

import (
	"math/rand/v2"
	"testing"
)

// TestTableReadahead walks an L1 table with scattered L2 tables the way
// map and check do: from the third table on, every table must have been
// asked for exactly once before its own miss, with at least half the
// window still ahead. Misses in random order ask for nothing, and after
// a jump back the walk starts over.
func TestTableReadahead(t *testing.T) {
	const n = 1000
	l1 := make([]uint64, n)
	var tables []int64
	for j := int64(3); j < n; j += 1 + j%7 {
		l1[j] = uint64(j+1)<<16 | OflagCopied
		tables = append(tables, j)
	}
	entry := func(j int64) uint64 { return l1[j] }
	asked := map[uint64]int{}
	ask := func(off uint64) { asked[off]++ }
	host := func(j int64) uint64 { return l1[j] & OffsetMask }

	var r tableReadahead
	for k, i := range tables {
		if walking := r.miss(n, entry, i, ask); walking != (k > 0) {
			t.Fatalf("miss %d of the walk reported walking=%v", k, walking)
		}
		if k >= 2 && asked[host(i)] != 1 {
			t.Fatalf("table of L1 index %d asked for %d times before its miss, want 1", i, asked[host(i)])
		}
		ahead := 0
		for _, j := range tables[k+1:] {
			if asked[host(j)] > 0 {
				ahead++
			}
		}
		if want := min(readaheadTables/2, len(tables)-k-1); k >= 1 && ahead < want {
			t.Fatalf("at L1 index %d only %d tables asked for ahead, want >= %d", i, ahead, want)
		}
	}
	for off, c := range asked {
		if c != 1 {
			t.Errorf("table at %#x asked for %d times", off, c)
		}
	}
	if len(asked) != len(tables)-2 {
		t.Errorf("%d tables asked for, want %d", len(asked), len(tables)-2)
	}

	clear(asked)
	r.miss(n, entry, tables[0], ask)
	r.miss(n, entry, tables[1], ask)
	if len(asked) != readaheadTables || asked[host(tables[2])] != 1 {
		t.Errorf("walk again after a jump back: %d tables asked for, want %d from L1 index %d on", len(asked), readaheadTables, tables[2])
	}

	clear(asked)
	r = tableReadahead{}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		r.miss(n, entry, tables[rng.IntN(len(tables))], ask)
	}
	if len(asked) > 2*readaheadTables {
		t.Errorf("random misses asked for %d tables", len(asked))
	}
}

// TestZeroEntries counts only whole zero entries, wherever the first
// other one is, stops at the limit and at the table's end, and sees a
// subcluster bitmap in an extended entry.
func TestZeroEntries(t *testing.T) {
	for _, ext := range []bool{false, true} {
		h := &Header{ClusterBits: 16, RefcountOrder: 4}
		if ext {
			h.IncompatibleFeatures = IncompatExtendedL2
		}
		l := NewLayout(h)
		table := make([]byte, l.ClusterSize)
		for p := range l.L2Entries {
			e := L2Entry{Raw: uint64(p+1) << 16}
			if ext && p%2 == 1 {
				e = L2Entry{Bitmap: 1} // unallocated, but not all zero
			}
			l.WriteL2Entry(table, p, e)
			if got := l.zeroEntries(table, 0, l.L2Entries); got != p {
				t.Fatalf("extended=%v: entry %d set: %d zero entries from 0, want %d", ext, p, got, p)
			}
			if got, want := l.zeroEntries(table, p+1, l.L2Entries), l.L2Entries-p-1; got != want {
				t.Fatalf("extended=%v: entry %d set: %d zero entries after it, want %d", ext, p, got, want)
			}
			if got, want := l.zeroEntries(table, 0, 10), min(p, 10); got != want {
				t.Fatalf("extended=%v: entry %d set: %d zero entries up to 10, want %d", ext, p, got, want)
			}
			l.WriteL2Entry(table, p, L2Entry{})
		}
	}
}

// TestTableCacheSpare checks that a full cache hands out the buffer of
// the entry it evicts, written back first when dirty, and that the
// entry is gone; an empty cache allocates.
func TestTableCacheSpare(t *testing.T) {
	var written []uint64
	c := newTableCache(2, func(t *cachedTable) error {
		written = append(written, t.offset)
		t.dirty = false
		return nil
	})
	a := make([]byte, 16)
	if _, err := c.add(1, a, true); err != nil {
		t.Fatal(err)
	}
	if buf, err := c.spare(16, false); err != nil || len(buf) != 16 || &buf[0] == &a[0] {
		t.Fatalf("spare of a cache with room = %p, %v; want a new buffer", buf, err)
	}
	if _, err := c.add(2, make([]byte, 16), false); err != nil {
		t.Fatal(err)
	}
	c.get(2) // 1 is now the least recently used
	buf, err := c.spare(16, false)
	if err != nil {
		t.Fatal(err)
	}
	if &buf[0] != &a[0] {
		t.Errorf("spare of a full cache did not reuse the evicted entry's buffer")
	}
	if len(written) != 1 || written[0] != 1 {
		t.Errorf("written back %v, want [1] (the dirty evicted entry)", written)
	}
	if c.get(1) != nil || c.get(2) == nil {
		t.Errorf("after spare: entry 1 cached %v, entry 2 cached %v; want false, true", c.get(1) != nil, c.get(2) != nil)
	}
}

// TestTableCacheSpareWalking: a walk reuses buffers once the cache holds
// walkTables entries, other loads only when it is full.
func TestTableCacheSpareWalking(t *testing.T) {
	c := newTableCache(walkTables+10, func(*cachedTable) error { return nil })
	bufs := map[*byte]bool{}
	for i := range walkTables {
		b := make([]byte, 16)
		bufs[&b[0]] = true
		if _, err := c.add(uint64(i), b, false); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := c.spare(16, false); err != nil || bufs[&b[0]] {
		t.Fatalf("spare(false) with room reused a buffer (err %v)", err)
	}
	if b, err := c.spare(16, true); err != nil || !bufs[&b[0]] {
		t.Fatalf("spare(true) with %d tables cached did not reuse a buffer (err %v)", walkTables, err)
	}
	if c.lru.Len() != walkTables-1 {
		t.Errorf("%d tables cached after spare(true), want %d", c.lru.Len(), walkTables-1)
	}
}
