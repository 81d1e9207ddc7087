// Package attachio fans a task's output out to the clients attached to it
// (berth attach, berth run -it), keeping the newest bytes for a replay.
// It never blocks the writer: a client that falls too far behind is
// dropped with ErrSlow. Standard library only, so the container monitor
// and berth-init can use it as well as the agent.
package attachio

import (
	"errors"
	"io"
	"sync"
)

// ErrSlow ends a subscriber that fell more than its backlog behind.
var ErrSlow = errors.New("attach session fell behind the task's output and was detached")

// Hub is one output stream of a task. Write copies into every subscriber
// and the replay ring; Close ends every subscriber (after what it holds).
type Hub struct {
	mu sync.Mutex
	// ring holds the newest bytes, at most max: a circular buffer, so a
	// write into a full ring copies the write only, not the ring.
	ring    []byte
	end     int // where the next byte goes
	held    int // how many bytes ring holds
	max     int
	backlog int
	subs    map[*Sub]struct{}
	closed  bool
}

// NewHub returns a hub that keeps the newest replayMax bytes and lets a
// subscriber hold at most backlog unread bytes.
func NewHub(replayMax, backlog int) *Hub {
	return &Hub{max: replayMax, backlog: backlog, subs: map[*Sub]struct{}{}}
}

// Write never blocks and never fails: the task's output must not wait for
// its watchers.
func (h *Hub) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.max > 0 {
		if h.ring == nil {
			h.ring = make([]byte, h.max)
		}
		q := p
		if len(q) > h.max {
			q = q[len(q)-h.max:]
		}
		n := copy(h.ring[h.end:], q)
		copy(h.ring, q[n:])
		h.end = (h.end + len(q)) % h.max
		h.held = min(h.held+len(q), h.max)
	}
	for s := range h.subs {
		s.push(p, h.backlog)
	}
	return len(p), nil
}

// Subscribe returns a reader of what is written from now on, after the
// replay ring's content when replay is set: no byte is lost or repeated
// between the two. On a closed hub it reads the replay (if asked), then
// end of file.
func (h *Hub) Subscribe(replay bool) *Sub {
	s := &Sub{hub: h, slow: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	h.mu.Lock()
	defer h.mu.Unlock()
	if replay && h.held > 0 {
		start := (h.end - h.held + h.max) % h.max
		if start+h.held <= h.max {
			s.buf = append(s.buf, h.ring[start:start+h.held]...)
		} else {
			s.buf = append(append(s.buf, h.ring[start:]...), h.ring[:h.end]...)
		}
	}
	if h.closed {
		s.eof = true
		return s
	}
	h.subs[s] = struct{}{}
	return s
}

// Close ends the stream: each subscriber reads what it holds, then end of
// file.
func (h *Hub) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for s := range h.subs {
		s.end(nil)
		delete(h.subs, s)
	}
	return nil
}

// Sub is one subscriber's view of a hub.
type Sub struct {
	hub  *Hub
	mu   sync.Mutex
	cond *sync.Cond
	buf  []byte
	eof  bool
	err  error         // ErrSlow, or io.ErrClosedPipe after Close
	slow chan struct{} // closed when dropped with ErrSlow
}

func (s *Sub) push(p []byte, backlog int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil || s.eof {
		return
	}
	if backlog > 0 && len(s.buf)+len(p) > backlog {
		s.buf, s.err = nil, ErrSlow
		close(s.slow)
		delete(s.hub.subs, s) // the hub's lock is held by Write
		s.cond.Broadcast()
		return
	}
	s.buf = append(s.buf, p...)
	s.cond.Broadcast()
}

func (s *Sub) end(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil && s.err == nil {
		s.err, s.buf = err, nil
	}
	s.eof = true
	s.cond.Broadcast()
}

// Read returns buffered output, blocking until there is some; io.EOF once
// the hub closed and everything was read; ErrSlow for a dropped
// subscriber; io.ErrClosedPipe after Close.
func (s *Sub) Read(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.buf) == 0 && s.err == nil && !s.eof {
		s.cond.Wait()
	}
	if s.err != nil {
		return 0, s.err
	}
	if len(s.buf) == 0 {
		return 0, io.EOF
	}
	n := copy(p, s.buf)
	s.buf = s.buf[n:]
	if len(s.buf) == 0 {
		s.buf = nil // let a large backlog go
	}
	return n, nil
}

// Close unsubscribes; a blocked Read returns io.ErrClosedPipe.
func (s *Sub) Close() error {
	s.hub.mu.Lock()
	delete(s.hub.subs, s)
	s.hub.mu.Unlock()
	s.end(io.ErrClosedPipe)
	return nil
}

// Slow is closed when the hub drops the subscriber for falling behind:
// a reader that waits for something else before it reads (room to send
// on, say) learns of it without a Read.
func (s *Sub) Slow() <-chan struct{} { return s.slow }
