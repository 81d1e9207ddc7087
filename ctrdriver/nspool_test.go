package ctrdriver

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func nsInode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// The namespaces of the ranges given next are made ahead and handed out
// without making another; a caller's file is its own to close; the pool
// keeps a bounded number; after close, starts still get a namespace.
func TestNSPoolMakesAheadAndIsBounded(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making a user namespace mapped to other host ids needs root")
	}
	p := newNSPool()
	slot := func(i uint32) idMap { return idMap{UID: 1<<30 + i*65536, GID: 1<<30 + i*65536, Size: 65536} }
	p.prepare([]idMap{slot(0), slot(1)})
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		made := p.made
		p.mu.Unlock()
		if made == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d namespaces made ahead after 10s, want 2", made)
		}
		time.Sleep(5 * time.Millisecond)
	}
	p.mu.Lock()
	pooled := nsInode(t, p.ns[slot(0)])
	p.mu.Unlock()
	// Twice: the first caller's Close must not close the pool's file.
	for _, what := range []string{"get did not hand out the namespace made ahead", "closing a caller's file closed the pool's"} {
		f, err := p.get(slot(0))
		if err != nil {
			t.Fatal(err)
		}
		if nsInode(t, f) != pooled {
			t.Error(what)
		}
		f.Close()
	}
	if p.made != 2 {
		t.Errorf("%d namespaces made, want the 2 made ahead only", p.made)
	}
	for i := range uint32(nsKept + 3) {
		f, err := p.get(slot(10 + i))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if n := len(p.ns); n > nsKept {
		t.Errorf("the pool keeps %d namespaces, more than %d", n, nsKept)
	}
	p.close()
	after, err := p.get(slot(0))
	if err != nil {
		t.Fatalf("a get after close: %v", err)
	}
	after.Close()
	if len(p.ns) != 0 {
		t.Errorf("a closed pool keeps %d namespaces", len(p.ns))
	}
}
