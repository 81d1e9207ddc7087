package monitor

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// clientQueueMax bounds the output queued for one attach client: a
	// client further behind is dropped (FrameSlow) rather than slow the
	// workload, its logs or the other clients.
	clientQueueMax = 1 << 20
	// helloTimeout bounds a client's first frame.
	helloTimeout = 10 * time.Second
	// slowNoticeTimeout bounds the write of FrameSlow to a dropped client
	// (it has to read what it was sent before).
	slowNoticeTimeout = 30 * time.Second
	// flushTimeout bounds how long a monitor whose task ended waits for
	// its clients to take their last output before it exits.
	flushTimeout = 5 * time.Second
)

// chunk is output of one stream; its bytes are never modified once
// published, so the ring and every client share them.
type chunk struct {
	typ  byte // FrameStdout or FrameStderr
	data []byte
}

// stdinSink is the workload's standard input as the monitor holds it.
type stdinSink interface {
	Write(p []byte) (int, error)
	// End gives the workload end of file.
	End() error
}

// hub fans a task's output out to its attach clients and keeps the newest
// AttachReplayMax bytes for replay. Publishing never blocks on a client.
type hub struct {
	tty   bool
	stdin stdinSink // nil: the task has no stdin
	// resize sets the terminal's size (nil without a terminal).
	resize func(rows, cols uint16) error

	mu      sync.Mutex
	ring    []chunk
	ringLen int
	clients map[*client]struct{}
	ended   bool
	writers sync.WaitGroup

	stdinMu     sync.Mutex
	stdinClosed bool
}

type client struct {
	conn   *net.UnixConn
	stdin  bool
	notify chan struct{}
	// Under hub.mu:
	queue  []chunk
	queued int
	slow   bool
	end    bool
	gone   bool
}

func newHub(tty bool, stdin stdinSink, resize func(rows, cols uint16) error) *hub {
	return &hub{tty: tty, stdin: stdin, resize: resize, clients: map[*client]struct{}{}}
}

// publish hands output of one stream to the ring and every client. p is
// copied.
func (h *hub) publish(typ byte, p []byte) {
	if len(p) == 0 {
		return
	}
	c := chunk{typ: typ, data: append([]byte(nil), p...)}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ring = append(h.ring, c)
	h.ringLen += len(c.data)
	for h.ringLen > AttachReplayMax {
		over := h.ringLen - AttachReplayMax
		if over >= len(h.ring[0].data) {
			h.ringLen -= len(h.ring[0].data)
			h.ring[0] = chunk{}
			h.ring = h.ring[1:]
			continue
		}
		h.ring[0].data = h.ring[0].data[over:]
		h.ringLen -= over
	}
	for cl := range h.clients {
		if cl.queued+len(c.data) > clientQueueMax {
			cl.slow, cl.queue, cl.queued = true, nil, 0
			delete(h.clients, cl)
		} else {
			cl.queue = append(cl.queue, c)
			cl.queued += len(c.data)
		}
		wake(cl)
	}
}

func wake(cl *client) {
	select {
	case cl.notify <- struct{}{}:
	default:
	}
}

// tee writes one stream's output to its log and publishes it. A log that
// fails (a full disk) does not stop the stream: the workload must never
// block on its output.
type tee struct {
	h   *hub
	typ byte
	log *cappedLog
}

func (t tee) Write(p []byte) (int, error) {
	_, _ = t.log.Write(p)
	t.h.publish(t.typ, p)
	return len(p), nil
}

// end says the task ended and all its output was published: each client
// gets FrameEnd after its queue, new ones are refused.
func (h *hub) end() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ended = true
	for cl := range h.clients {
		cl.end = true
		delete(h.clients, cl)
		wake(cl)
	}
}

// flush waits, at most flushTimeout, for the clients to take their last
// output, then closes what is left.
func (h *hub) flush() {
	done := make(chan struct{})
	go func() { h.writers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(flushTimeout):
	}
}

// serve accepts attach clients until the listener is closed.
func (h *hub) serve(ln *net.UnixListener) {
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and the like: do not spin.
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go h.handle(conn)
	}
}

// handle reads a client's hello, registers it and relays its input.
func (h *hub) handle(conn *net.UnixConn) {
	_ = conn.SetDeadline(time.Now().Add(helloTimeout))
	typ, payload, err := readFrame(conn)
	var hello AttachHello
	if err == nil && (typ != FrameHello || json.Unmarshal(payload, &hello) != nil) {
		err = fmt.Errorf("the first frame is not a hello")
	}
	if err != nil {
		h.refuse(conn, RefuseBadRequest, err.Error())
		return
	}
	if hello.Stdin && h.stdin == nil {
		h.refuse(conn, RefuseNoStdin, "the task was started without stdin: attach without it, or start the task with stdin")
		return
	}
	if hello.Rows > 0 && hello.Cols > 0 && h.resize != nil {
		_ = h.resize(hello.Rows, hello.Cols)
	}
	cl := &client{conn: conn, stdin: hello.Stdin, notify: make(chan struct{}, 1)}
	h.mu.Lock()
	if h.ended {
		h.mu.Unlock()
		h.refuse(conn, RefuseEnded, "the task has ended")
		return
	}
	// The reply and the replay are queued before any later output,
	// under the lock publish takes: nothing is lost or repeated between
	// them.
	reply, _ := json.Marshal(AttachReply{Version: Version, TTY: h.tty, Stdin: h.stdin != nil})
	cl.queue = append(cl.queue, chunk{typ: FrameReply, data: reply})
	if hello.Replay {
		cl.queue = append(cl.queue, h.ring...)
		cl.queued = h.ringLen
	}
	h.clients[cl] = struct{}{}
	h.writers.Add(1)
	h.mu.Unlock()
	_ = conn.SetDeadline(time.Time{})
	wake(cl)
	go h.write(cl)
	h.read(cl)
}

func (h *hub) refuse(conn *net.UnixConn, reason, msg string) {
	b, _ := json.Marshal(AttachReply{Version: Version, Reason: reason, Error: msg})
	_ = conn.SetDeadline(time.Now().Add(helloTimeout))
	_ = writeFrame(conn, FrameReply, b)
	conn.Close()
}

// write sends a client its queued output, then its end.
func (h *hub) write(cl *client) {
	defer h.writers.Done()
	defer cl.conn.Close()
	for range cl.notify {
		h.mu.Lock()
		queue, slow, end, gone := cl.queue, cl.slow, cl.end, cl.gone
		cl.queue, cl.queued = nil, 0
		h.mu.Unlock()
		if gone {
			return
		}
		for _, c := range queue {
			for off := 0; off < len(c.data); off += outputChunk {
				if err := writeFrame(cl.conn, c.typ, c.data[off:min(off+outputChunk, len(c.data))]); err != nil {
					h.detach(cl)
					return
				}
			}
		}
		// end and slow were read with the queue: nothing is queued
		// after either.
		switch {
		case slow:
			_ = cl.conn.SetWriteDeadline(time.Now().Add(slowNoticeTimeout))
			_ = writeFrame(cl.conn, FrameSlow, nil)
			return
		case end:
			_ = writeFrame(cl.conn, FrameEnd, nil)
			return
		}
	}
}

// read relays a client's input until it leaves.
func (h *hub) read(cl *client) {
	for {
		typ, payload, err := readFrame(cl.conn)
		if err != nil {
			h.detach(cl)
			return
		}
		switch typ {
		case FrameStdin:
			if cl.stdin {
				h.writeStdin(payload)
			}
		case FrameStdinClose:
			if cl.stdin {
				h.endStdin()
			}
		case FrameResize:
			if rows, cols, ok := decodeResize(payload); ok && rows > 0 && cols > 0 && h.resize != nil {
				_ = h.resize(rows, cols)
			}
		}
	}
}

// detach forgets a client that left; its writer ends.
func (h *hub) detach(cl *client) {
	h.mu.Lock()
	delete(h.clients, cl)
	// A client already told it is slow or ended gets that notice still.
	if !cl.slow && !cl.end {
		cl.gone = true
	}
	h.mu.Unlock()
	wake(cl)
	if !cl.slow && !cl.end {
		cl.conn.Close()
	}
}

func (h *hub) writeStdin(p []byte) {
	h.stdinMu.Lock()
	defer h.stdinMu.Unlock()
	if h.stdinClosed {
		return
	}
	// A workload that does not read blocks its writers here, never its
	// output.
	_, _ = h.stdin.Write(p)
}

func (h *hub) endStdin() {
	h.stdinMu.Lock()
	defer h.stdinMu.Unlock()
	if !h.stdinClosed {
		h.stdinClosed = true
		_ = h.stdin.End()
	}
}

// pipeStdin is a pipe's write end as the workload's stdin.
type pipeStdin struct{ f *os.File }

func (p pipeStdin) Write(b []byte) (int, error) { return p.f.Write(b) }
func (p pipeStdin) End() error                  { return p.f.Close() }

// ttyStdin writes to a terminal's master; its end is the terminal's
// end-of-file character (^D), as a user at the terminal types it.
type ttyStdin struct{ f *os.File }

func (t ttyStdin) Write(b []byte) (int, error) { return t.f.Write(b) }
func (t ttyStdin) End() error                  { _, err := t.f.Write([]byte{4}); return err }

// setWinsize resizes the terminal whose master is f.
func setWinsize(f *os.File, rows, cols uint16) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	}); err != nil {
		return err
	}
	return ierr
}
