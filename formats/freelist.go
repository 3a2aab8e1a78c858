package formats

import "runtime"

// FreeList keeps a bounded number of idle objects for reuse. Unlike a
// sync.Pool it keeps them across garbage collections: a compressor costs
// hundreds of KiB to build, and convert -c allocates enough to collect
// many times a second, so a sync.Pool rebuilt compressors over and over
// and the garbage they made drove the next collection.
type FreeList[T any] struct {
	idle  chan T
	build func() T
}

// NewFreeList returns a free list of up to n idle objects that builds
// new objects with build. n == 0 keeps two per CPU, enough for objects
// held only while computing (compressors); buffers held across I/O need
// as many as there are requests in flight.
func NewFreeList[T any](n int, build func() T) *FreeList[T] {
	if n == 0 {
		n = 2 * runtime.NumCPU()
	}
	return &FreeList[T]{idle: make(chan T, n), build: build}
}

// Get returns an idle object, or a new one when none is idle.
func (l *FreeList[T]) Get() T {
	select {
	case v := <-l.idle:
		return v
	default:
		return l.build()
	}
}

// Put returns v for reuse; beyond the list's capacity it is dropped.
func (l *FreeList[T]) Put(v T) {
	select {
	case l.idle <- v:
	default:
	}
}
