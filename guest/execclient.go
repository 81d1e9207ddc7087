package guest

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"
)

// ExecCloseWait bounds how long ExecSession.Close waits for berth-init to
// report the killed process's end.
const ExecCloseWait = 10 * time.Second

// ExecSendTimeout bounds one frame's write: a guest that stops reading
// its port for that long fails the connection (its sessions end with an
// error) instead of wedging every sender, Close included, behind it. A
// variable for tests.
var ExecSendTimeout = 30 * time.Second

// ErrExecChannelClosed ends the sessions of a connection that is gone.
var ErrExecChannelClosed = errors.New("the exec channel to berth-init closed")

// ExecClient is the host's side of one exec channel connection, shared by
// every session into the guest.
type ExecClient struct {
	rwc io.ReadWriteCloser
	wmu sync.Mutex

	mu       sync.Mutex
	sessions map[uint32]*ExecSession
	next     uint32
	err      error
	done     chan struct{}
}

// DialExec opens a connection over rwc: it sends the hello and waits,
// within ctx, for berth-init's. It closes rwc when that fails.
func DialExec(ctx context.Context, rwc io.ReadWriteCloser) (*ExecClient, error) {
	c := &ExecClient{rwc: rwc, sessions: map[uint32]*ExecSession{}, done: make(chan struct{})}
	stop := context.AfterFunc(ctx, func() { rwc.Close() })
	err := c.handshake()
	if !stop() || err != nil {
		rwc.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("no answer from berth-init on the exec channel: %w", ctx.Err())
		}
		return nil, fmt.Errorf("exec channel handshake: %w", err)
	}
	go c.readLoop()
	return c, nil
}

func (c *ExecClient) handshake() error {
	// A frame's worth of zero bytes first: a previous host that died in
	// the middle of a frame left berth-init waiting for its rest; the
	// zeros complete it and then read as a frame of type 0, which breaks
	// the protocol, so berth-init resets and looks for the hello. One
	// that was already looking for it skips them.
	c.wmu.Lock()
	_, err := c.rwc.Write(make([]byte, MaxExecFrame))
	c.wmu.Unlock()
	if err != nil {
		return err
	}
	if err := c.send(frameHello, 0, helloPayload()); err != nil {
		return err
	}
	for {
		// Frames before the answer are what a previous connection left in
		// the guest's queue.
		f, err := readFrame(c.rwc)
		if err != nil {
			return err
		}
		if f.typ == frameHello {
			return checkHello(f.data)
		}
	}
}

func (c *ExecClient) send(typ byte, sid uint32, data []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.Err(); err != nil {
		return err
	}
	// Closing the connection is what unblocks a write of any transport.
	stall := time.AfterFunc(ExecSendTimeout, func() {
		c.fail(fmt.Errorf("%w: berth-init read nothing of a frame for %s", ErrExecChannelClosed, ExecSendTimeout))
	})
	_, err := c.rwc.Write(encodeFrame(typ, sid, data))
	stall.Stop()
	return err
}

// Done is closed when the connection is gone; Err says why.
func (c *ExecClient) Done() <-chan struct{} { return c.done }

// Err is why the connection ended, nil while it works.
func (c *ExecClient) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Sessions is how many sessions (and pending requests) are open.
func (c *ExecClient) Sessions() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sessions)
}

// Close ends the connection; berth-init kills every session's process.
func (c *ExecClient) Close() error {
	c.fail(ErrExecChannelClosed)
	return nil
}

func (c *ExecClient) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	sessions := c.sessions
	c.sessions = map[uint32]*ExecSession{}
	c.mu.Unlock()
	c.rwc.Close()
	close(c.done)
	for _, s := range sessions {
		s.fail(err)
	}
}

func (c *ExecClient) readLoop() {
	// A bug in handling one frame must not take the agent down: the
	// connection fails instead (its sessions end with the error) and the
	// VM's exec reconnects on the next request.
	defer func() {
		if v := recover(); v != nil {
			slog.Error("exec channel: frame handling panicked; failing the connection", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			c.fail(fmt.Errorf("%w: internal error handling a frame: %v", ErrExecChannelClosed, v))
		}
	}()
	for {
		f, err := readFrame(c.rwc)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = ErrExecChannelClosed
			}
			c.fail(fmt.Errorf("%w: %w", ErrExecChannelClosed, err))
			return
		}
		c.mu.Lock()
		s := c.sessions[f.sid]
		c.mu.Unlock()
		if s == nil {
			continue // a session closed meanwhile
		}
		if err := s.handle(f); err != nil {
			c.fail(err)
			return
		}
	}
}

// register allocates a session id.
func (c *ExecClient) register(s *ExecSession) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	if len(c.sessions) >= MaxExecSessions {
		return &ExecError{Kind: ExecExhausted, Message: fmt.Sprintf("%d exec sessions are open, at most %d", len(c.sessions), MaxExecSessions)}
	}
	for {
		c.next++
		if _, used := c.sessions[c.next]; c.next != 0 && !used {
			break
		}
	}
	s.id = c.next
	c.sessions[s.id] = s
	return nil
}

func (c *ExecClient) forget(id uint32) {
	c.mu.Lock()
	delete(c.sessions, id)
	c.mu.Unlock()
}

func newSession(c *ExecClient, req *ExecRequest) *ExecSession {
	s := &ExecSession{c: c, reply: make(chan error, 1), exited: make(chan struct{}), ended: make(chan struct{}), stdinCredit: ExecWindow}
	if req != nil {
		s.tty = req.TTY
	}
	s.cond = sync.NewCond(&s.mu)
	s.out[0] = &execOutput{s: s, stream: streamStdout}
	s.out[1] = &execOutput{s: s, stream: streamStderr}
	for _, o := range s.out {
		o.cond = sync.NewCond(&s.mu)
	}
	return s
}

// request sends a frame that berth-init answers and waits for the answer.
func (c *ExecClient) request(ctx context.Context, s *ExecSession, typ byte, data []byte) error {
	if err := c.register(s); err != nil {
		return err
	}
	if err := c.send(typ, s.id, data); err != nil {
		c.fail(fmt.Errorf("%w: %w", ErrExecChannelClosed, err))
		return c.Err()
	}
	select {
	case err := <-s.reply:
		return err
	case <-ctx.Done():
		// Whatever berth-init does with it, the session is abandoned.
		_ = c.send(frameClose, s.id, nil)
		c.forget(s.id)
		return ctx.Err()
	}
}

// Exec starts req in the guest. ctx bounds the start only.
func (c *ExecClient) Exec(ctx context.Context, req *ExecRequest) (*ExecSession, error) {
	data, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if len(data) > MaxExecPayload {
		return nil, &ExecError{Kind: ExecInvalid, Message: fmt.Sprintf("exec request of %d bytes, at most %d", len(data), MaxExecPayload)}
	}
	s := newSession(c, req)
	if err := c.request(ctx, s, frameOpen, data); err != nil {
		c.forget(s.id)
		return nil, err
	}
	return s, nil
}

// Attach attaches a session to the workload's main process (see Console).
// tty says the process runs on a terminal: the session's Stderr is then
// empty. ctx bounds the attach only. The session's Close detaches, and
// its output ends (io.EOF) after the last of the main process's; a session
// berth-init ended because it fell behind fails with an error that
// matches attachio.ErrSlow.
func (c *ExecClient) Attach(ctx context.Context, req *AttachRequest, tty bool) (*ExecSession, error) {
	data, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	s := newSession(c, &ExecRequest{TTY: tty})
	s.attach = true
	if err := c.request(ctx, s, frameAttach, data); err != nil {
		c.forget(s.id)
		return nil, err
	}
	return s, nil
}

// SignalMain delivers sig to the workload's main process.
func (c *ExecClient) SignalMain(ctx context.Context, sig int) error {
	s := newSession(c, nil)
	defer c.forget(s.id)
	return c.request(ctx, s, frameSignalMain, u32(uint32(sig)))
}

// ExecSession is one process started through an ExecClient.
type ExecSession struct {
	c      *ExecClient
	id     uint32
	tty    bool
	attach bool       // an attach session: Close detaches
	reply  chan error // the answer to open, attach or signal-main

	mu          sync.Mutex
	cond        *sync.Cond // stdin credit
	stdinCredit int
	stdinClosed bool
	out         [2]*execOutput
	exited      chan struct{} // the exit frame arrived
	code, sig   int
	ended       chan struct{} // exited, or the connection failed
	err         error         // why the session failed
	closed      bool
}

// handle applies one frame of this session (reader goroutine).
func (s *ExecSession) handle(f frame) error {
	switch f.typ {
	case frameStarted, frameDone:
		s.answer(nil)
	case frameFailed:
		var ee ExecError
		if err := json.Unmarshal(f.data, &ee); err != nil {
			ee = ExecError{Kind: ExecInternal, Message: "undecodable refusal: " + string(f.data)}
		}
		s.answer(&ee)
	case frameStdout, frameStderr:
		o := s.out[0]
		if f.typ == frameStderr {
			o = s.out[1]
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.err != nil {
			return nil // berth-init ended the session: nothing follows
		}
		if len(f.data) == 0 {
			o.eof = true
		} else if o.buf.Len()+len(f.data) > ExecWindow {
			return fmt.Errorf("%w: berth-init sent session %d output beyond its window", ErrBadFrame, s.id)
		} else {
			o.buf.Write(f.data)
		}
		o.cond.Broadcast()
	case frameWindow:
		stream, inc, ok := parseWindow(f.data)
		if !ok || stream != streamStdin {
			return fmt.Errorf("%w: window frame %x from the guest", ErrBadFrame, f.data)
		}
		s.mu.Lock()
		s.stdinCredit += inc
		s.cond.Broadcast()
		s.mu.Unlock()
	case frameEnded:
		ee := &ExecError{}
		if err := json.Unmarshal(f.data, ee); err != nil {
			ee = &ExecError{Kind: ExecInternal, Message: "undecodable end of session: " + string(f.data)}
		}
		s.fail(ee)
		s.c.forget(s.id)
	case frameExit:
		if len(f.data) != 8 {
			return fmt.Errorf("%w: exit payload of %d bytes", ErrBadFrame, len(f.data))
		}
		s.mu.Lock()
		// The connection may have failed since the read loop looked this
		// session up (Close of the client, a failed send): ended is then
		// closed already, and a late exit is dropped: Wait reports the
		// failure.
		if !isClosed(s.exited) && !isClosed(s.ended) {
			s.code = int(int32(binary.BigEndian.Uint32(f.data)))
			s.sig = int(binary.BigEndian.Uint32(f.data[4:]))
			close(s.exited)
			close(s.ended)
		}
		s.cond.Broadcast()
		s.mu.Unlock()
	default:
		return fmt.Errorf("%w: type %d is not sent to the host", ErrBadFrame, f.typ)
	}
	return nil
}

func (s *ExecSession) answer(err error) {
	select {
	case s.reply <- err:
	default:
	}
}

// fail ends the session because the connection is gone.
func (s *ExecSession) fail(err error) {
	s.answer(err)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = err
	}
	if !isClosed(s.ended) {
		close(s.ended)
	}
	s.cond.Broadcast()
	for _, o := range s.out {
		o.cond.Broadcast()
	}
}

// Stdin is the process's standard input. Writes wait for room in the
// guest (the window), not for the process to read.
func (s *ExecSession) Stdin() io.WriteCloser { return execStdin{s} }

// Stdout is the process's output (the terminal's with TTY).
func (s *ExecSession) Stdout() io.Reader { return s.out[0] }

// Stderr is the process's standard error; empty with TTY.
func (s *ExecSession) Stderr() io.Reader { return s.out[1] }

// Resize sets the terminal's size.
func (s *ExecSession) Resize(rows, cols uint16) error {
	if !s.tty {
		return nil
	}
	var b [4]byte
	binary.BigEndian.PutUint16(b[:2], rows)
	binary.BigEndian.PutUint16(b[2:], cols)
	return s.sendLive(frameResize, b[:])
}

// Signal delivers sig to the process.
func (s *ExecSession) Signal(sig int) error { return s.sendLive(frameSignal, u32(uint32(sig))) }

// sendLive sends a frame for a process that has not ended.
func (s *ExecSession) sendLive(typ byte, data []byte) error {
	s.mu.Lock()
	err, closed := s.err, s.closed
	s.mu.Unlock()
	select {
	case <-s.exited:
		return fmt.Errorf("exec session %d: the process has ended", s.id)
	default:
	}
	switch {
	case err != nil:
		return err
	case closed:
		return fmt.Errorf("exec session %d is closed", s.id)
	}
	return s.c.send(typ, s.id, data)
}

// Wait waits for the process's end: its exit code, or 128+signal and the
// signal. A connection that ends first is an error.
func (s *ExecSession) Wait(ctx context.Context) (code, sig int, err error) {
	select {
	case <-s.ended:
	case <-ctx.Done():
		return 0, 0, ctx.Err()
	}
	select {
	case <-s.exited:
		return s.code, s.sig, nil
	default:
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return 0, 0, s.err
}

// Close kills the process group in the guest, waits (bounded by
// ExecCloseWait) for its end and releases the session. Output not read
// yet is discarded.
func (s *ExecSession) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.cond.Broadcast()
	s.mu.Unlock()
	// A detach ends nothing in the guest: there is no end to wait for.
	if err := s.c.send(frameClose, s.id, nil); err == nil && !s.attach {
		select {
		case <-s.ended:
		case <-time.After(ExecCloseWait):
		}
	}
	s.c.forget(s.id)
	s.mu.Lock()
	for _, o := range s.out {
		o.buf = bytes.Buffer{}
		o.cond.Broadcast()
	}
	s.mu.Unlock()
	return nil
}

type execStdin struct{ s *ExecSession }

func (w execStdin) Write(p []byte) (int, error) {
	s := w.s
	written := 0
	for len(p) > 0 {
		s.mu.Lock()
		for s.stdinCredit == 0 && s.err == nil && !s.closed && !s.stdinClosed && !isClosed(s.exited) {
			s.cond.Wait()
		}
		switch {
		case s.err != nil:
			err := s.err
			s.mu.Unlock()
			return written, err
		case s.closed || s.stdinClosed || isClosed(s.exited):
			s.mu.Unlock()
			return written, io.ErrClosedPipe
		}
		n := min(s.stdinCredit, len(p), MaxExecPayload)
		s.stdinCredit -= n
		s.mu.Unlock()
		if err := s.c.send(frameStdin, s.id, p[:n]); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

func (w execStdin) Close() error {
	s := w.s
	s.mu.Lock()
	already := s.stdinClosed
	s.stdinClosed = true
	s.cond.Broadcast()
	s.mu.Unlock()
	if already || isClosed(s.exited) {
		return nil
	}
	return s.c.send(frameStdinEOF, s.id, nil)
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// execOutput is one output stream of a session, buffered up to the window.
type execOutput struct {
	s        *ExecSession
	stream   byte
	cond     *sync.Cond // on s.mu
	buf      bytes.Buffer
	eof      bool
	consumed int // read since the last window frame
}

func (o *execOutput) Read(p []byte) (int, error) {
	s := o.s
	s.mu.Lock()
	for o.buf.Len() == 0 && !o.eof && s.err == nil && !s.closed && !(o.stream == streamStderr && s.tty) {
		o.cond.Wait()
	}
	if o.buf.Len() == 0 {
		defer s.mu.Unlock()
		switch {
		case o.eof || (o.stream == streamStderr && s.tty):
			return 0, io.EOF
		case s.err != nil:
			return 0, s.err
		}
		return 0, fmt.Errorf("exec session %d is closed", s.id)
	}
	n, _ := o.buf.Read(p)
	o.consumed += n
	var grant int
	// Grant in batches: a window frame per quarter window read.
	if o.consumed >= ExecWindow/4 || (o.buf.Len() == 0 && o.consumed > 0 && !o.eof) {
		grant, o.consumed = o.consumed, 0
	}
	closed := s.closed || s.err != nil
	s.mu.Unlock()
	if grant > 0 && !closed {
		_ = s.c.send(frameWindow, s.id, windowPayload(o.stream, grant))
	}
	return n, nil
}
