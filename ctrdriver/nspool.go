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
	// made counts the namespaces the pool kept.
	made int
}

func newNSPool() *nsPool { return &nsPool{ns: map[idMap]*os.File{}} }

// get returns a file of m's namespace the caller owns (and closes): the
// pool's, duplicated, or a new one when the pool has none (kept for the
// next start of the range).
func (p *nsPool) get(m idMap) (*os.File, error) {
	if f, ok, err := p.dup(m); ok || err != nil {
		return f, err
	}
	f, err := usernsFile(m)
	if err != nil {
		return nil, err
	}
	if !p.put(m, f) {
		return f, nil // not kept: the caller has the only file
	}
	if kept, ok, err := p.dup(m); ok || err != nil {
		return kept, err
	}
	return usernsFile(m) // evicted at once by other starts' namespaces
}

// dup returns a duplicate of the pool's file of m's namespace, if it has one.
func (p *nsPool) dup(m idMap) (*os.File, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f, ok := p.ns[m]
	if !ok {
		return nil, false, nil
	}
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, false, err
	}
	return os.NewFile(uintptr(fd), f.Name()), true, nil
}

// put keeps f as m's namespace, evicting the oldest beyond nsKept, and
// reports whether it did: a pool that is closed, or has the namespace
// already, keeps nothing, and f stays the caller's.
func (p *nsPool) put(m idMap, f *os.File) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.ns[m]; ok || p.closed {
		return false
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
	return true
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
			if !p.put(m, f) {
				f.Close()
			}
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
