package formats

import "runtime"

// FreeList keeps idle objects for reuse, a few per CPU. Unlike a
// sync.Pool it keeps them across garbage collections: a compressor costs
// hundreds of KiB to build, and convert -c allocates enough to collect
// many times a second, so a sync.Pool rebuilt compressors over and over
// and the garbage they made drove the next collection.
type FreeList[T any] struct {
	idle  chan T
	build func() T
}

// NewFreeList returns a free list that builds new objects with build.
func NewFreeList[T any](build func() T) *FreeList[T] {
	return &FreeList[T]{idle: make(chan T, 2*runtime.NumCPU()), build: build}
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
