package fs

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/imgfs/imgfs/control"
)

// opState is the running or last operation of one image directory, what
// its `status` file shows. ctl and snapshots/ record into it. Safe for
// concurrent use.
type opState struct {
	// run serialises the operations of one image: a second ctl write
	// waits until the first is done, so status describes one at a time.
	run sync.Mutex

	mu sync.Mutex // guards the fields below; never held across an operation
	// op is the command word ("resize", ...), "" before the first one.
	op, state, err string
	// percent is the progress, 0 to 100.
	percent float64
}

// Operation states as the status file spells them.
const (
	stateRunning = "running"
	stateDone    = "done"
	stateFailed  = "failed"
)

// begin takes the image's operation slot and records op as running.
// end must follow.
func (s *opState) begin(op string) {
	s.run.Lock()
	s.mu.Lock()
	s.op, s.state, s.err, s.percent = op, stateRunning, "", 0
	s.mu.Unlock()
}

// end records the outcome of the operation begun last and frees the slot.
func (s *opState) end(err error) {
	s.mu.Lock()
	if err != nil {
		s.state, s.err = stateFailed, err.Error()
	} else {
		s.state, s.percent = stateDone, 100
	}
	s.mu.Unlock()
	s.run.Unlock()
}

// progress is the control.Progress that feeds the running operation's
// percentage.
func (s *opState) progress() control.Progress {
	return func(done, total int64) {
		if total <= 0 {
			return
		}
		p := min(100, max(0, 100*float64(done)/float64(total)))
		s.mu.Lock()
		s.percent = p
		s.mu.Unlock()
	}
}

// addPercent adds to the progress a step already in percent, as rebase reports
// it (a step per compared range, each worth 100/pieces).
func (s *opState) addPercent(p float64) {
	s.mu.Lock()
	s.percent = min(100, s.percent+p)
	s.mu.Unlock()
}

// statusDoc is the JSON of the status file. Progress is a json.Number so
// that it always has two decimals ("progress": 42.00).
type statusDoc struct {
	Operation string      `json:"operation"`
	State     string      `json:"state"`
	Progress  json.Number `json:"progress"`
	Error     string      `json:"error"`
}

// text renders the status file: the JSON object and a newline. Before
// any operation the state is "idle" and the operation empty.
func (s *opState) text() []byte {
	s.mu.Lock()
	doc := statusDoc{Operation: s.op, State: s.state, Error: s.err,
		Progress: json.Number(fmt.Sprintf("%.2f", s.percent))}
	s.mu.Unlock()
	if doc.State == "" {
		doc.State = "idle"
	}
	b, _ := json.Marshal(doc) // a struct of strings always marshals
	return append(b, '\n')
}

// statusNode is the read-only `status` file. Its text is taken when it
// is opened; getattr reports the size the next open will see, and the
// file is read with direct I/O so that no stale page is served.
type statusNode struct {
	gofs.Inode
	dir *imageDir
	st  *opState
}

var (
	_ gofs.NodeGetattrer = (*statusNode)(nil)
	_ gofs.NodeOpener    = (*statusNode)(nil)
)

func (n *statusNode) Getattr(ctx context.Context, _ gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fillAttr(len(n.st.text()), &out.Attr)
	return 0
}

func (n *statusNode) fillAttr(size int, a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | 0o444
	a.Size = uint64(size)
	key, err := statFile(n.dir.path)
	if err != nil {
		key = n.dir.key
	}
	setHostAttr(a, key)
}

func (n *statusNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EACCES
	}
	return &reportHandle{content: n.st.text()}, fuse.FOPEN_DIRECT_IO, 0
}
