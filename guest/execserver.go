package guest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/berthd/berth/internal/attachio"
)

// ExecBackend starts processes for the exec server: berth-init's own in
// the guest, ordinary child processes in tests.
type ExecBackend interface {
	// Start starts req's process in its own process group. An *ExecError
	// says why it could not; nothing runs then.
	Start(req *ExecRequest) (ExecProcess, error)
	// SignalMain delivers sig to the workload's main process.
	SignalMain(sig int) error
}

// ExecProcess is a process started by an ExecBackend.
type ExecProcess interface {
	// Stdin is nil unless the request asked for it. Close gives the
	// process end of file (on a terminal: the EOF character).
	Stdin() io.WriteCloser
	// Stdout is the process's output (the terminal's with TTY). Reads end
	// with an error once every writer is gone.
	Stdout() io.Reader
	// Stderr is nil with TTY.
	Stderr() io.Reader
	// Wait blocks until the process ended: exit code, or 128+signal and
	// the signal.
	Wait() (code, sig int)
	Signal(sig int) error
	Resize(rows, cols uint16) error
	// Kill sends SIGKILL to the process's group.
	Kill()
	// Release closes what the process's streams hold, once nothing reads
	// or writes them any more.
	Release()
}

// ExecServer is berth-init's side of the exec channel.
type ExecServer struct {
	backend ExecBackend
	logf    func(format string, args ...any)

	// gen counts connections: frames of a session of an earlier one are
	// dropped, never sent on a later one.
	gen atomic.Uint64
	wmu sync.Mutex // one frame at a time
	w   io.Writer

	mu       sync.Mutex
	sessions map[uint32]*srvSession
	// wg counts the goroutines of every session, ended or not.
	wg sync.WaitGroup
}

// NewExecServer returns a server that starts processes with backend.
func NewExecServer(backend ExecBackend, logf func(format string, args ...any)) *ExecServer {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	return &ExecServer{backend: backend, logf: logf, sessions: map[uint32]*srvSession{}}
}

// Serve serves one stream until it fails and returns why (io.EOF when
// the host went away). Every session is killed before it returns: a
// session lives no longer than the host's connection. A frame that breaks
// the protocol ends the connection's sessions too, and Serve goes on
// looking for the next hello.
func (s *ExecServer) Serve(r io.Reader, w io.Writer) error {
	s.wmu.Lock()
	s.w = w
	s.wmu.Unlock()
	br := bufio.NewReaderSize(r, MaxExecFrame)
	defer s.reset()
	for {
		if err := s.awaitHello(br); err != nil {
			return err
		}
		err := s.serveFrames(br)
		s.reset()
		if !errors.Is(err, ErrBadFrame) {
			return err
		}
		s.logf("exec channel: %v; ending its sessions and waiting for a new hello", err)
	}
}

// awaitHello discards input up to and including a valid hello, answers
// it and starts a new connection.
func (s *ExecServer) awaitHello(br *bufio.Reader) error {
	window := make([]byte, 0, len(helloPattern))
	for {
		b, err := br.ReadByte()
		if err != nil {
			return err
		}
		if len(window) == len(helloPattern) {
			copy(window, window[1:])
			window = window[:len(window)-1]
		}
		window = append(window, b)
		if !bytes.Equal(window, helloPattern) {
			continue
		}
		var v [4]byte
		if _, err := io.ReadFull(br, v[:]); err != nil {
			return err
		}
		if err := checkHello(append(append([]byte(nil), execMagic...), v[:]...)); err != nil {
			s.logf("exec channel: %v", err)
			window = window[:0]
			continue
		}
		s.reset()
		return s.write(0, frameHello, 0, helloPayload())
	}
}

func (s *ExecServer) serveFrames(br *bufio.Reader) error {
	for {
		f, err := readFrame(br)
		if err != nil {
			return err
		}
		if err := s.handle(f); err != nil {
			return err
		}
	}
}

// write sends one frame of connection gen (0: the current one).
func (s *ExecServer) write(gen uint64, typ byte, sid uint32, data []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if gen != 0 && gen != s.gen.Load() {
		return errStaleSession
	}
	_, err := s.w.Write(encodeFrame(typ, sid, data))
	return err
}

var errStaleSession = errors.New("exec session of an earlier connection")

func (s *ExecServer) fail(sid uint32, kind ExecErrorKind, format string, args ...any) error {
	data, _ := json.Marshal(&ExecError{Kind: kind, Message: fmt.Sprintf(format, args...)})
	return s.write(0, frameFailed, sid, data)
}

// reset ends the current connection: every session's process group is
// killed, and nothing more of them is sent.
func (s *ExecServer) reset() {
	s.gen.Add(1)
	s.mu.Lock()
	old := s.sessions
	s.sessions = map[uint32]*srvSession{}
	s.mu.Unlock()
	for _, ss := range old {
		ss.close()
	}
}

// Sessions is how many sessions the current connection has open.
func (s *ExecServer) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// Wait waits until the goroutines of every ended session are gone (tests).
func (s *ExecServer) Wait() { s.wg.Wait() }

func (s *ExecServer) session(sid uint32) *srvSession {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions[sid]
}

// handle acts on one frame. Frames of sessions that are gone are
// dropped: the host may still send some after the process ended.
func (s *ExecServer) handle(f frame) error {
	switch f.typ {
	case frameHello:
		// A new host connected before this side saw the old one go.
		if err := checkHello(f.data); err != nil {
			return err
		}
		s.reset()
		return s.write(0, frameHello, 0, helloPayload())
	case frameOpen:
		return s.open(f)
	case frameAttach:
		return s.attach(f)
	case frameSignalMain:
		if len(f.data) != 4 {
			return fmt.Errorf("%w: signal payload of %d bytes", ErrBadFrame, len(f.data))
		}
		if err := s.backend.SignalMain(int(binary.BigEndian.Uint32(f.data))); err != nil {
			var ee *ExecError
			if !errors.As(err, &ee) {
				ee = &ExecError{Kind: ExecInternal, Message: err.Error()}
			}
			return s.fail(f.sid, ee.Kind, "%s", ee.Message)
		}
		return s.write(0, frameDone, f.sid, nil)
	case frameStdin, frameStdinEOF, frameResize, frameSignal, frameClose, frameWindow:
	default:
		return fmt.Errorf("%w: type %d is not sent to the guest", ErrBadFrame, f.typ)
	}
	ss := s.session(f.sid)
	if ss == nil {
		return nil
	}
	switch f.typ {
	case frameStdin:
		return ss.stdinData(f.data)
	case frameStdinEOF:
		ss.mu.Lock()
		ss.stdinEOF, ss.hostEOF = true, true
		ss.cond.Broadcast()
		ss.mu.Unlock()
	case frameResize:
		if len(f.data) != 4 {
			return fmt.Errorf("%w: resize payload of %d bytes", ErrBadFrame, len(f.data))
		}
		if err := ss.proc.Resize(binary.BigEndian.Uint16(f.data), binary.BigEndian.Uint16(f.data[2:])); err != nil {
			s.logf("exec session %d: resize: %v", f.sid, err)
		}
	case frameSignal:
		if len(f.data) != 4 {
			return fmt.Errorf("%w: signal payload of %d bytes", ErrBadFrame, len(f.data))
		}
		if err := ss.proc.Signal(int(binary.BigEndian.Uint32(f.data))); err != nil {
			s.logf("exec session %d: signal: %v", f.sid, err)
		}
	case frameClose:
		s.mu.Lock()
		delete(s.sessions, f.sid)
		s.mu.Unlock()
		ss.close()
	case frameWindow:
		stream, inc, ok := parseWindow(f.data)
		if !ok || (stream != streamStdout && stream != streamStderr) {
			return fmt.Errorf("%w: window frame %x", ErrBadFrame, f.data)
		}
		ss.mu.Lock()
		ss.credit[stream] += inc
		if ss.credit[stream] > ExecWindow {
			ss.mu.Unlock()
			return fmt.Errorf("%w: window of session %d grown past %d", ErrBadFrame, f.sid, ExecWindow)
		}
		ss.cond.Broadcast()
		ss.mu.Unlock()
	}
	return nil
}

func (s *ExecServer) open(f frame) error {
	var req ExecRequest
	if err := json.Unmarshal(f.data, &req); err != nil {
		return s.fail(f.sid, ExecInvalid, "exec request: %v", err)
	}
	if len(req.Args) == 0 || req.Args[0] == "" {
		return s.fail(f.sid, ExecInvalid, "exec request: a command is required")
	}
	return s.startSession(f.sid, false, func() (ExecProcess, error) { return s.backend.Start(&req) })
}

// attach starts an attach session: berth-init's backend connects it to
// the workload's main process (see Console).
func (s *ExecServer) attach(f frame) error {
	var req AttachRequest
	if err := json.Unmarshal(f.data, &req); err != nil {
		return s.fail(f.sid, ExecInvalid, "attach request: %v", err)
	}
	ab, ok := s.backend.(AttachBackend)
	if !ok {
		return s.fail(f.sid, ExecConflict, "this workload's main process cannot be attached to")
	}
	return s.startSession(f.sid, true, func() (ExecProcess, error) { return ab.Attach(&req) })
}

// startSession starts session sid's process with start and its streams.
func (s *ExecServer) startSession(sid uint32, attach bool, start func() (ExecProcess, error)) error {
	s.mu.Lock()
	_, dup := s.sessions[sid]
	n := len(s.sessions)
	s.mu.Unlock()
	switch {
	case sid == 0 || dup:
		return s.fail(sid, ExecInvalid, "exec session id %d is in use", sid)
	case n >= MaxExecSessions:
		return s.fail(sid, ExecExhausted, "%d exec sessions are open, at most %d", n, MaxExecSessions)
	}
	proc, err := start()
	if err != nil {
		var ee *ExecError
		if !errors.As(err, &ee) {
			ee = &ExecError{Kind: ExecInternal, Message: err.Error()}
		}
		return s.fail(sid, ee.Kind, "%s", ee.Message)
	}
	ss := &srvSession{s: s, id: sid, gen: s.gen.Load(), proc: proc, attach: attach}
	ss.cond = sync.NewCond(&ss.mu)
	ss.credit[streamStdout], ss.credit[streamStderr] = ExecWindow, ExecWindow
	s.mu.Lock()
	s.sessions[sid] = ss
	s.mu.Unlock()
	// Started goes out before any output of the process.
	if err := s.write(ss.gen, frameStarted, sid, nil); err != nil && !errors.Is(err, errStaleSession) {
		ss.close()
		ss.run()
		return err
	}
	ss.run()
	if e, ok := proc.(interface{ onEnd(func(*ExecError)) }); ok {
		e.onEnd(ss.ended)
	}
	return nil
}

// srvSession is one exec'd process in berth-init.
type srvSession struct {
	s    *ExecServer
	id   uint32
	gen  uint64
	proc ExecProcess
	// attach: an attach session (see Console). Closing it detaches; its
	// process's input is shared, so only the host's end of input closes
	// it, and what the host sent before is written even after a detach.
	attach bool

	mu       sync.Mutex
	cond     *sync.Cond
	credit   [3]int // by stream: what may still be sent before a window frame
	stdin    bytes.Buffer
	stdinEOF bool
	hostEOF  bool // the host sent stdin-eof
	closed   bool // the host closed it or went away
	endSent  bool // the ended frame is sent
}

// run starts the session's goroutines: one per output stream, one for
// stdin, one waiting for the process. Release runs after all of them.
func (ss *srvSession) run() {
	var wg sync.WaitGroup
	pump := func(r io.Reader, stream, typ byte) {
		if r != nil {
			wg.Go(func() { ss.pump(r, stream, typ) })
		}
	}
	pump(ss.proc.Stdout(), streamStdout, frameStdout)
	pump(ss.proc.Stderr(), streamStderr, frameStderr)
	if in := ss.proc.Stdin(); in != nil {
		wg.Go(func() { ss.feed(in) })
	}
	wg.Go(func() {
		code, sig := ss.proc.Wait()
		if d, ok := ss.proc.(interface{ isDetached() bool }); ok && d.isDetached() {
			// A detached attach session: the process runs on.
			ss.mu.Lock()
			ss.stdinEOF = true
			ss.cond.Broadcast()
			ss.mu.Unlock()
			return
		}
		var b [8]byte
		binary.BigEndian.PutUint32(b[:4], uint32(int32(code)))
		binary.BigEndian.PutUint32(b[4:], uint32(sig))
		_ = ss.s.write(ss.gen, frameExit, ss.id, b[:])
		// The process is gone: nobody reads its stdin any more.
		ss.mu.Lock()
		ss.stdinEOF = true
		ss.cond.Broadcast()
		ss.mu.Unlock()
	})
	ss.s.wg.Go(func() {
		wg.Wait()
		ss.proc.Release()
	})
}

// close kills the session's process group and stops sending its frames.
func (ss *srvSession) close() {
	ss.mu.Lock()
	ss.closed = true
	ss.cond.Broadcast()
	ss.mu.Unlock()
	ss.proc.Kill()
}

// pump sends one output stream within the host's window. Once the session
// is closed it still drains the stream, so no writer blocks on it.
func (ss *srvSession) pump(r io.Reader, stream, typ byte) {
	// Small while the stream trickles (most sessions), a frame's worth
	// once it streams: berth-init's memory per session stays small.
	buf := make([]byte, 4<<10)
	for {
		ss.mu.Lock()
		for ss.credit[stream] == 0 && !ss.closed {
			ss.cond.Wait()
		}
		n := min(ss.credit[stream], len(buf))
		if ss.closed {
			n = len(buf)
		}
		ss.mu.Unlock()
		n, err := r.Read(buf[:n])
		if n > 0 {
			ss.mu.Lock()
			closed := ss.closed
			ss.credit[stream] -= n
			ss.mu.Unlock()
			if !closed {
				_ = ss.s.write(ss.gen, typ, ss.id, buf[:n])
			}
			if n == len(buf) && len(buf) < MaxExecPayload {
				buf = make([]byte, min(2*len(buf), MaxExecPayload))
			}
		}
		if err != nil {
			if errors.Is(err, attachio.ErrSlow) {
				ss.ended(&ExecError{Kind: ExecSlow, Message: attachio.ErrSlow.Error()})
			} else {
				_ = ss.s.write(ss.gen, typ, ss.id, nil) // end of stream
			}
			if e, ok := r.(interface{ streamEnded() }); ok {
				e.streamEnded()
			}
			return
		}
	}
}

// ended tells the host that berth-init ended the session (once), and
// forgets it: the host's close that follows finds nothing to do.
func (ss *srvSession) ended(why *ExecError) {
	ss.mu.Lock()
	already := ss.endSent
	ss.endSent = true
	ss.mu.Unlock()
	if already {
		return
	}
	data, _ := json.Marshal(why)
	_ = ss.s.write(ss.gen, frameEnded, ss.id, data)
	ss.s.mu.Lock()
	if ss.s.sessions[ss.id] == ss {
		delete(ss.s.sessions, ss.id)
	}
	ss.s.mu.Unlock()
	ss.close()
}

// stdinData queues data from the host. Data nobody will read any more is
// dropped, and its room granted back at once so the host never waits.
func (ss *srvSession) stdinData(data []byte) error {
	ss.mu.Lock()
	if ss.stdin.Len()+len(data) > ExecWindow {
		ss.mu.Unlock()
		return fmt.Errorf("%w: session %d sent stdin beyond its window", ErrBadFrame, ss.id)
	}
	drop := ss.stdinEOF || ss.closed
	if !drop {
		ss.stdin.Write(data)
		ss.cond.Broadcast()
	}
	ss.mu.Unlock()
	if drop && len(data) > 0 {
		_ = ss.s.write(ss.gen, frameWindow, ss.id, windowPayload(streamStdin, len(data)))
	}
	return nil
}

// feed writes queued stdin to the process and grants the host the room
// it freed.
func (ss *srvSession) feed(in io.WriteCloser) {
	defer func() {
		ss.mu.Lock()
		hostEOF := ss.hostEOF
		ss.mu.Unlock()
		if !ss.attach || hostEOF {
			in.Close()
		}
	}()
	var buf []byte
	for {
		ss.mu.Lock()
		for ss.stdin.Len() == 0 && !ss.stdinEOF && !ss.closed {
			ss.cond.Wait()
		}
		if ss.stdin.Len() == 0 || (ss.closed && !ss.attach) {
			ss.mu.Unlock()
			return
		}
		if want := min(ss.stdin.Len(), MaxExecPayload); len(buf) < want {
			buf = make([]byte, want)
		}
		n, _ := ss.stdin.Read(buf)
		ss.mu.Unlock()
		if _, err := in.Write(buf[:n]); err != nil {
			// The process closed its stdin: drop the rest, as a pipe would.
			ss.mu.Lock()
			ss.stdinEOF = true
			n += ss.stdin.Len()
			ss.stdin.Reset()
			ss.mu.Unlock()
			_ = ss.s.write(ss.gen, frameWindow, ss.id, windowPayload(streamStdin, n))
			return
		}
		_ = ss.s.write(ss.gen, frameWindow, ss.id, windowPayload(streamStdin, n))
	}
}
