package monitor

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/berthd/berth/internal/attachio"
)

const (
	// clientBacklog bounds the output held for one attach client beyond
	// what its socket took: a client further behind is dropped
	// (FrameSlow) rather than slow the workload, its logs or the other
	// clients.
	clientBacklog = 1 << 20
	// helloTimeout bounds a client's first frame.
	helloTimeout = 10 * time.Second
	// slowNoticeTimeout bounds the write of FrameSlow to a dropped client
	// (it has to read what it was sent before).
	slowNoticeTimeout = 30 * time.Second
	// flushTimeout bounds how long a monitor whose task ended waits for
	// its clients to take their last output before it exits.
	flushTimeout = 5 * time.Second
)

// hub is a container's streams as its attach clients see them: each
// output stream fanned out (never blocking the workload, see attachio)
// with its newest AttachReplayMax bytes kept for replay, and its input.
type hub struct {
	tty    bool
	out    *attachio.Hub
	errOut *attachio.Hub // nil with a terminal
	// stdin is the workload's standard input, whose Close is its end of
	// file: a pipe's write end, or a terminal's master as ptyio.Stdin
	// (nil: the task has no stdin).
	stdin io.WriteCloser
	// resize sets the terminal's size (nil without a terminal).
	resize func(rows, cols uint16) error

	mu      sync.Mutex // ended, and subscribing
	ended   bool
	writers sync.WaitGroup

	stdinMu     sync.Mutex
	stdinClosed bool
}

func newHub(tty bool, stdin io.WriteCloser, resize func(rows, cols uint16) error) *hub {
	h := &hub{tty: tty, stdin: stdin, resize: resize, out: attachio.NewHub(AttachReplayMax, clientBacklog)}
	if !tty {
		h.errOut = attachio.NewHub(AttachReplayMax, clientBacklog)
	}
	return h
}

// stream is the hub of output typ (FrameStdout or FrameStderr).
func (h *hub) stream(typ byte) *attachio.Hub {
	if typ == FrameStderr && h.errOut != nil {
		return h.errOut
	}
	return h.out
}

// tee writes one stream's output to its log and its attach clients. A
// log that fails (a full disk) does not stop the stream: the workload
// must never block on its output.
type tee struct {
	out *attachio.Hub
	log *cappedLog
}

func (t tee) Write(p []byte) (int, error) {
	_, _ = t.log.Write(p)
	_, _ = t.out.Write(p)
	return len(p), nil
}

// end says the task ended and all its output was written: each client
// gets FrameEnd after the output it holds; new ones are refused.
func (h *hub) end() {
	h.mu.Lock()
	h.ended = true
	h.mu.Unlock()
	h.out.Close()
	if h.errOut != nil {
		h.errOut.Close()
	}
}

// flush waits, at most flushTimeout, for the clients to take their last
// output.
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

// client is one attached connection.
type client struct {
	conn  *net.UnixConn
	stdin bool
	subs  []clientStream
	wmu   sync.Mutex // frames of the stream pumps
}

type clientStream struct {
	typ byte
	sub *attachio.Sub
}

func (cl *client) send(typ byte, p []byte) error {
	cl.wmu.Lock()
	defer cl.wmu.Unlock()
	return writeFrame(cl.conn, typ, p)
}

// unsubscribe ends the client's streams (its pumps return).
func (cl *client) unsubscribe() {
	for _, s := range cl.subs {
		s.sub.Close()
	}
}

// handle reads a client's hello, subscribes it and relays its input.
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
	cl := &client{conn: conn, stdin: hello.Stdin}
	h.mu.Lock()
	if h.ended {
		h.mu.Unlock()
		h.refuse(conn, RefuseEnded, "the task has ended")
		return
	}
	// Each stream's replay and what follows it come from one
	// subscription: nothing is lost or repeated between them.
	cl.subs = append(cl.subs, clientStream{FrameStdout, h.out.Subscribe(hello.Replay)})
	if h.errOut != nil {
		cl.subs = append(cl.subs, clientStream{FrameStderr, h.errOut.Subscribe(hello.Replay)})
	}
	h.writers.Add(1)
	h.mu.Unlock()
	_ = conn.SetDeadline(time.Time{})
	go h.write(cl)
	h.read(cl)
}

func (h *hub) refuse(conn *net.UnixConn, reason, msg string) {
	b, _ := json.Marshal(AttachReply{Version: Version, Reason: reason, Error: msg})
	_ = conn.SetDeadline(time.Now().Add(helloTimeout))
	_ = writeFrame(conn, FrameReply, b)
	conn.Close()
}

// write sends a client the reply, its streams' output, then FrameEnd
// once every stream ended, or FrameSlow when one fell behind.
func (h *hub) write(cl *client) {
	defer h.writers.Done()
	// Only the write side: what the client sent before it left (input
	// typed right before a detach) is still read, and the reader
	// closes the connection at the client's end.
	defer cl.conn.CloseWrite()
	reply, _ := json.Marshal(AttachReply{Version: Version, TTY: h.tty, Stdin: h.stdin != nil})
	if err := cl.send(FrameReply, reply); err != nil {
		cl.unsubscribe()
		return
	}
	results := make(chan error, len(cl.subs))
	stop := make(chan struct{})
	defer close(stop)
	for _, s := range cl.subs {
		go func() { results <- cl.pump(s) }()
		go func() {
			// A pump may be stuck in a write to a client that reads
			// nothing: once dropped, the client has a bounded time to
			// take what was sent and the notice.
			select {
			case <-s.sub.Slow():
				_ = cl.conn.SetWriteDeadline(time.Now().Add(slowNoticeTimeout))
			case <-stop:
			}
		}()
	}
	var slow, gone bool
	for range cl.subs {
		switch err := <-results; {
		case errors.Is(err, attachio.ErrSlow):
			slow = true
			cl.unsubscribe()
		case err != nil:
			gone = true
			cl.unsubscribe()
		}
	}
	switch {
	case slow:
		_ = cl.send(FrameSlow, nil)
	case !gone:
		_ = cl.send(FrameEnd, nil)
	}
}

// pump copies one stream to the client until the stream ends (nil), the
// client falls behind (attachio.ErrSlow) or leaves.
func (cl *client) pump(s clientStream) error {
	buf := make([]byte, outputChunk)
	for {
		n, err := s.sub.Read(buf)
		if n > 0 {
			if werr := cl.send(s.typ, buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// read relays a client's input until it leaves.
func (h *hub) read(cl *client) {
	for {
		typ, payload, err := readFrame(cl.conn)
		if err != nil {
			// The client left: its streams are done.
			cl.unsubscribe()
			cl.conn.Close()
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
		_ = h.stdin.Close()
	}
}
