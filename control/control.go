// Package control implements qemu-img's operations (info, map, check,
// compare, convert, create, ...) on top of formats. Each operation takes
// an options struct and returns a result that renders itself as
// qemu-img's human text or JSON, so the command line and the mount print
// the same bytes. Nothing here prints or exits.
package control

// Progress is told how far a long operation has come: done out of total
// units of work. A nil Progress is allowed and ignored.
type Progress func(done, total int64)

func (p Progress) report(done, total int64) {
	if p != nil {
		p(done, total)
	}
}
