package guest

import (
	"errors"
	"io"
	"sync"
	"time"

	"github.com/berthd/berth/internal/attachio"
)

// AttachReplayMax is how much of each output stream of the workload's main
// process berth-init keeps for an attach with Replay: the newest bytes,
// as much as the driver contract's AttachReplayMax.
const AttachReplayMax = 64 << 10

// AttachBacklog is how much output berth-init holds for one attach
// session's stream beyond what the host's window has taken. A session
// whose host falls further behind is ended (ExecSlow) rather than slow
// down the workload or its log.
const AttachBacklog = ExecWindow

// AttachRequest is what an attach frame asks: a session on the streams of
// the workload's main process (its terminal with Config.TTY).
type AttachRequest struct {
	// Stdin: the session's stdin frames go to the main process's input.
	Stdin bool `json:"stdin,omitempty"`
	// Replay: the session's output starts with the newest AttachReplayMax
	// bytes written before it, each byte once.
	Replay bool `json:"replay,omitempty"`
	// Rows and Cols, when both set, resize the terminal first.
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
}

// AttachBackend is implemented by an ExecBackend whose workload's main
// process can be attached to: the exec server answers attach frames with
// the process Attach returns, an ExecProcess that stands for the session
// (Kill detaches it, Wait returns at the main process's end).
type AttachBackend interface {
	Attach(req *AttachRequest) (ExecProcess, error)
}

// ConsoleOptions describe the main process's streams as berth-init holds
// them.
type ConsoleOptions struct {
	// TTY: the process runs on a terminal; its output is one stream.
	TTY bool
	// Stdin is the process's input as berth-init writes it: the write end
	// of its stdin pipe, or the terminal, whose Close types the
	// end-of-file character. nil when it was started without stdin.
	Stdin io.WriteCloser
	// Resize sets the terminal's size; nil without a terminal.
	Resize func(rows, cols uint16) error
}

// Console is the workload's main process's standard streams, shared by
// every attach session: its output fanned out (never blocking the
// process, see attachio), the newest of it kept for replays, and its
// input, which the sessions write in turn.
type Console struct {
	opts   ConsoleOptions
	out    *attachio.Hub
	errOut *attachio.Hub // nil with a terminal

	// inMu serializes writes to the process's input, and its close
	// behind them.
	inMu sync.Mutex

	mu        sync.Mutex
	inClosed  bool
	ended     chan struct{}
	code, sig int
	procs     map[*consoleProc]struct{}
}

// NewConsole returns a console with no session attached.
func NewConsole(o ConsoleOptions) *Console {
	c := &Console{
		opts:  o,
		out:   attachio.NewHub(AttachReplayMax, AttachBacklog),
		ended: make(chan struct{}),
		procs: map[*consoleProc]struct{}{},
	}
	if !o.TTY {
		c.errOut = attachio.NewHub(AttachReplayMax, AttachBacklog)
	}
	if o.Stdin == nil {
		c.inClosed = true
	}
	return c
}

// Stdout takes the process's output (the terminal's with TTY), as
// berth-init copies it to the stdout port. Writes never block or fail.
func (c *Console) Stdout() io.Writer { return c.out }

// Stderr takes the process's standard error; with a terminal, whatever
// is written to it is dropped.
func (c *Console) Stderr() io.Writer {
	if c.errOut == nil {
		return io.Discard
	}
	return c.errOut
}

// End says the main process ended with code and sig and its output is
// complete: each session sends what it holds, then the end of its
// output; its input takes nothing more; new attaches are refused.
func (c *Console) End(code, sig int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if isClosed(c.ended) {
		return
	}
	c.code, c.sig = code, sig
	c.inClosed = true
	close(c.ended)
	c.out.Close()
	if c.errOut != nil {
		c.errOut.Close()
	}
}

// WaitDrained waits, at most d, until every attached session has handed
// the end of its output to the channel (or was detached), so that the
// guest can power off without cutting a session's last output. It
// reports whether all did.
func (c *Console) WaitDrained(d time.Duration) bool {
	c.mu.Lock()
	procs := make([]*consoleProc, 0, len(c.procs))
	for p := range c.procs {
		procs = append(procs, p)
	}
	c.mu.Unlock()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for _, p := range procs {
		select {
		case <-p.drained:
		case <-p.gone:
		case <-deadline.C:
			return false
		}
	}
	return true
}

// Attached is how many sessions are attached.
func (c *Console) Attached() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.procs)
}

// Attach starts a session; see AttachBackend. It is refused (ExecConflict)
// once the main process ended, and a session with Stdin (ExecInvalid)
// when the process was started without stdin.
func (c *Console) Attach(req *AttachRequest) (ExecProcess, error) {
	if req.Stdin && c.opts.Stdin == nil {
		return nil, &ExecError{Kind: ExecInvalid, Message: "the workload was started without stdin: attach without it"}
	}
	p := &consoleProc{c: c, stdin: req.Stdin, gone: make(chan struct{}), drained: make(chan struct{})}
	c.mu.Lock()
	if isClosed(c.ended) {
		c.mu.Unlock()
		return nil, &ExecError{Kind: ExecConflict, Message: "the workload's main process has ended"}
	}
	// Under c.mu, as End closes the hubs: a session either sees the end
	// or is subscribed before it.
	p.out = c.out.Subscribe(req.Replay)
	p.streams = 1
	if c.errOut != nil {
		p.errOut = c.errOut.Subscribe(req.Replay)
		p.streams = 2
	}
	c.procs[p] = struct{}{}
	c.mu.Unlock()
	if req.Rows > 0 && req.Cols > 0 {
		if err := p.Resize(req.Rows, req.Cols); err != nil {
			p.Kill()
			p.Release()
			return nil, &ExecError{Kind: ExecInternal, Message: "resize the terminal: " + err.Error()}
		}
	}
	return p, nil
}

// write writes p to the process's input, after whatever another session
// is writing.
func (c *Console) write(p []byte) (int, error) {
	c.inMu.Lock()
	defer c.inMu.Unlock()
	c.mu.Lock()
	closed := c.inClosed
	c.mu.Unlock()
	if closed {
		return 0, io.ErrClosedPipe
	}
	return c.opts.Stdin.Write(p)
}

// closeInput ends the process's input for every session: its pipe is
// closed, or its terminal gets the end-of-file character.
func (c *Console) closeInput() error {
	c.inMu.Lock()
	defer c.inMu.Unlock()
	c.mu.Lock()
	closed := c.inClosed
	c.inClosed = true
	c.mu.Unlock()
	if closed {
		return nil
	}
	return c.opts.Stdin.Close()
}

// consoleProc is one attach session, seen by the exec server as a process.
type consoleProc struct {
	c           *Console
	stdin       bool
	out, errOut *attachio.Sub

	mu       sync.Mutex
	detached bool // Kill, or fell behind
	slow     bool
	gone     chan struct{} // closed when detached
	streams  int           // output streams whose end is not sent yet
	drained  chan struct{} // closed when streams reaches 0
}

func (p *consoleProc) Stdin() io.WriteCloser {
	if !p.stdin {
		return nil
	}
	return consoleInput{p.c}
}

func (p *consoleProc) Stdout() io.Reader { return &consoleStream{p: p, sub: p.out} }

func (p *consoleProc) Stderr() io.Reader {
	if p.errOut == nil {
		return nil
	}
	return &consoleStream{p: p, sub: p.errOut}
}

// Wait returns the main process's end, or (-1, 0) at once when the
// session is detached first.
func (p *consoleProc) Wait() (int, int) {
	select {
	case <-p.c.ended:
		select {
		case <-p.gone:
			return -1, 0
		default:
		}
		p.c.mu.Lock()
		defer p.c.mu.Unlock()
		return p.c.code, p.c.sig
	case <-p.gone:
		return -1, 0
	}
}

// isDetached tells the exec server that the session ended by a detach,
// not by the main process's end: it has no exit to report.
func (p *consoleProc) isDetached() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.detached
}

var errAttachSignal = errors.New("an attach session has no process of its own to signal; signal the workload's main process")

func (p *consoleProc) Signal(int) error { return errAttachSignal }

func (p *consoleProc) Resize(rows, cols uint16) error {
	if p.c.opts.Resize == nil || rows == 0 || cols == 0 {
		return nil
	}
	return p.c.opts.Resize(rows, cols)
}

// Kill detaches the session; the main process runs on.
func (p *consoleProc) Kill() { p.detach(false) }

func (p *consoleProc) detach(slow bool) {
	p.mu.Lock()
	if p.detached {
		p.mu.Unlock()
		return
	}
	p.detached, p.slow = true, slow
	close(p.gone)
	p.mu.Unlock()
	p.out.Close()
	if p.errOut != nil {
		p.errOut.Close()
	}
}

// onEnd is called by the exec server once the session runs: end is how
// the session is ended from this side. A session that falls behind is
// ended at once, even while its host's window lets nothing be sent.
func (p *consoleProc) onEnd(end func(*ExecError)) {
	var slow <-chan struct{}
	if p.errOut != nil {
		slow = p.errOut.Slow()
	}
	go func() {
		select {
		case <-p.out.Slow():
		case <-slow:
		case <-p.gone:
			return
		case <-p.drained:
			return
		}
		p.detach(true)
		end(&ExecError{Kind: ExecSlow, Message: attachio.ErrSlow.Error()})
	}()
}

func (p *consoleProc) Release() {
	p.c.mu.Lock()
	delete(p.c.procs, p)
	p.c.mu.Unlock()
}

// consoleStream is one output stream of a session.
type consoleStream struct {
	p     *consoleProc
	sub   *attachio.Sub
	ended bool
}

// Read reads the session's share of the output. Once either stream of the
// session fell behind, both read attachio.ErrSlow.
func (s *consoleStream) Read(b []byte) (int, error) {
	n, err := s.sub.Read(b)
	if err == nil {
		return n, nil
	}
	if errors.Is(err, attachio.ErrSlow) {
		s.p.detach(true)
	}
	s.p.mu.Lock()
	slow := s.p.slow
	s.p.mu.Unlock()
	if slow {
		return n, attachio.ErrSlow
	}
	return n, err
}

// streamEnded is called by the exec server once the end of this stream
// (or the session's ended frame) is written to the channel.
func (s *consoleStream) streamEnded() {
	if s.ended {
		return
	}
	s.ended = true
	p := s.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.streams--; p.streams == 0 {
		close(p.drained)
	}
}

type consoleInput struct{ c *Console }

func (w consoleInput) Write(p []byte) (int, error) { return w.c.write(p) }
func (w consoleInput) Close() error                { return w.c.closeInput() }
