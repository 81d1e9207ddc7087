package ctrdriver

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// nsAhead is how many user namespaces are kept made ahead of the
// allocations that will need them, and nsKept how many are kept at most:
// making one costs a start a process (a fork that stops at its exec),
// about 2 ms, which the pool moves off the start path.
const (
	nsAhead = 2
	nsKept  = 16
)

// nsPool keeps the user namespaces the id-mapped mounts of the next
// containers need: one per id range, made in the background for the ranges
// allocation gives next (allocation rotates through the ranges, so the next
// ones are known), and kept for the ranges in use (a start mounts the image
// and each volume through its range's namespace). A namespace is only a
// mapping, the same for every task of its range: nothing of a task is in
// it, and sharing it between tasks of one range shares nothing else.
type nsPool struct {
	mu      sync.Mutex
	ns      map[idMap]*os.File
	order   []idMap // insertion order, for eviction
	filling bool
	closed  bool
	// made counts namespaces made, for tests.
	made int
}

func newNSPool() *nsPool { return &nsPool{ns: map[idMap]*os.File{}} }

// get returns a file of m's namespace the caller owns (and closes): the
// pool's, duplicated, or a new one when the pool has none.
func (p *nsPool) get(m idMap) (*os.File, error) {
	p.mu.Lock()
	f, ok := p.ns[m]
	if ok {
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		p.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return os.NewFile(uintptr(fd), f.Name()), nil
	}
	p.mu.Unlock()
	f, err := usernsFile(m)
	if err != nil {
		return nil, err
	}
	p.put(m, f)
	return p.get(m)
}

// put keeps f as m's namespace, evicting the oldest beyond nsKept.
func (p *nsPool) put(m idMap, f *os.File) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.ns[m]; ok || p.closed {
		f.Close()
		return
	}
	p.made++
	p.ns[m] = f
	p.order = append(p.order, m)
	for len(p.order) > nsKept {
		old := p.order[0]
		p.order = p.order[1:]
		if f := p.ns[old]; f != nil {
			f.Close()
			delete(p.ns, old)
		}
	}
}

// prepare makes the namespaces of next in the background (one filler at a
// time; a filler that finds them made does nothing).
func (p *nsPool) prepare(next []idMap) {
	p.mu.Lock()
	if p.filling || p.closed {
		p.mu.Unlock()
		return
	}
	var missing []idMap
	for _, m := range next {
		if _, ok := p.ns[m]; !ok {
			missing = append(missing, m)
		}
	}
	if len(missing) == 0 {
		p.mu.Unlock()
		return
	}
	p.filling = true
	p.mu.Unlock()
	go func() {
		defer func() {
			p.mu.Lock()
			p.filling = false
			p.mu.Unlock()
		}()
		for _, m := range missing {
			f, err := usernsFile(m)
			if err != nil {
				return // the start that needs it makes it, and says why
			}
			p.put(m, f)
		}
	}()
}

// close releases every namespace; later gets make their own.
func (p *nsPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for m, f := range p.ns {
		f.Close()
		delete(p.ns, m)
	}
	p.order = nil
}
