//go:build linux

package guest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/errdefs"
)

// hostBackend runs exec requests as ordinary child processes of the test,
// each in its own process group, as berth-init does in the guest.
type hostBackend struct {
	mu      sync.Mutex
	started []int // pids
	signals []int
}

type hostProc struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	out, err *os.File
	waited   chan struct{}
}

func (b *hostBackend) Start(req *ExecRequest) (ExecProcess, error) {
	if req.Workdir != "" {
		if fi, err := os.Stat(req.Workdir); err != nil || !fi.IsDir() {
			return nil, &ExecError{Kind: ExecInvalid, Message: "workdir " + req.Workdir + " does not exist"}
		}
	}
	cmd := exec.Command(req.Args[0], req.Args[1:]...)
	cmd.Dir = req.Workdir
	cmd.Env = append(os.Environ(), req.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p := &hostProc{cmd: cmd, waited: make(chan struct{})}
	var err error
	if req.Stdin {
		if p.stdin, err = cmd.StdinPipe(); err != nil {
			return nil, err
		}
	}
	outR, outW, _ := os.Pipe()
	errR, errW, _ := os.Pipe()
	cmd.Stdout, cmd.Stderr = outW, errW
	if err := cmd.Start(); err != nil {
		return nil, &ExecError{Kind: ExecInvalid, Message: err.Error()}
	}
	outW.Close()
	errW.Close()
	p.out, p.err = outR, errR
	b.mu.Lock()
	b.started = append(b.started, cmd.Process.Pid)
	b.mu.Unlock()
	return p, nil
}

func (b *hostBackend) SignalMain(sig int) error {
	if sig == int(syscall.SIGSTOP) {
		return &ExecError{Kind: ExecConflict, Message: "refused for the test"}
	}
	b.mu.Lock()
	b.signals = append(b.signals, sig)
	b.mu.Unlock()
	return nil
}

func (p *hostProc) Stdin() io.WriteCloser {
	if p.stdin == nil {
		return nil
	}
	return p.stdin
}
func (p *hostProc) Stdout() io.Reader { return p.out }
func (p *hostProc) Stderr() io.Reader { return p.err }
func (p *hostProc) Wait() (int, int) {
	defer close(p.waited)
	_ = p.cmd.Wait()
	ws := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if ws.Signaled() {
		return ExitCodeForSignal(int(ws.Signal())), int(ws.Signal())
	}
	return ws.ExitStatus(), 0
}
func (p *hostProc) Signal(sig int) error           { return p.cmd.Process.Signal(syscall.Signal(sig)) }
func (p *hostProc) Resize(rows, cols uint16) error { return nil }
func (p *hostProc) Kill()                          { _ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) }
func (p *hostProc) Release() {
	p.out.Close()
	p.err.Close()
}

// pair serves one connection over a socket pair and dials it.
type pair struct {
	srv    *ExecServer
	be     *hostBackend
	client *ExecClient
	served chan error
	guest  net.Conn
}

func newPair(t *testing.T) *pair {
	t.Helper()
	be := &hostBackend{}
	return newPairWith(t, be, be)
}

// newPairWith serves backend, whose exec'd processes host starts.
func newPairWith(t *testing.T, backend ExecBackend, host *hostBackend) *pair {
	t.Helper()
	hostEnd, guestEnd := socketPair(t)
	p := &pair{be: host, served: make(chan error, 1), guest: guestEnd}
	p.srv = NewExecServer(backend, t.Logf)
	go func() { p.served <- p.srv.Serve(guestEnd, guestEnd) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := DialExec(ctx, hostEnd)
	if err != nil {
		t.Fatalf("DialExec: %v", err)
	}
	p.client = c
	t.Cleanup(func() {
		c.Close()
		guestEnd.Close()
		<-p.served
		p.srv.Wait()
		p.checkNoneLeft(t)
	})
	return p
}

// checkNoneLeft fails when a process started by the backend still runs.
func (p *pair) checkNoneLeft(t *testing.T) {
	t.Helper()
	p.be.mu.Lock()
	defer p.be.mu.Unlock()
	for _, pid := range p.be.started {
		// The test reaped its children through cmd.Wait: a pid that still
		// answers is a leftover (or, rarely, reused; the marker check in
		// the VM tests is the strict one).
		if err := syscall.Kill(pid, 0); err == nil {
			if data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); !strings.Contains(string(data), ") Z") {
				t.Errorf("process %d still runs after its session ended", pid)
			}
		}
	}
}

func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "exec-channel")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type result struct {
	stdout, stderr string
	code, sig      int
}

func run(t *testing.T, s *ExecSession) result {
	t.Helper()
	var out, errb bytes.Buffer
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.Copy(&out, s.Stdout()) })
	wg.Go(func() { _, _ = io.Copy(&errb, s.Stderr()) })
	code, sig, err := s.Wait(ctxT(t))
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	wg.Wait()
	return result{out.String(), errb.String(), code, sig}
}

func TestExecFrameEncoding(t *testing.T) {
	var buf bytes.Buffer
	buf.Write(encodeFrame(frameStdout, 7, []byte("hello")))
	buf.Write(encodeFrame(frameExit, 7, nil))
	f, err := readFrame(&buf)
	if err != nil || f.typ != frameStdout || f.sid != 7 || string(f.data) != "hello" {
		t.Fatalf("first frame = %+v, %v", f, err)
	}
	if f, err = readFrame(&buf); err != nil || f.typ != frameExit || len(f.data) != 0 {
		t.Fatalf("second frame = %+v, %v", f, err)
	}
	if _, err := readFrame(&buf); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
	for name, raw := range map[string][]byte{
		"type zero":    appendHeader(nil, 0, 1, 0),
		"unknown type": appendHeader(nil, frameMax+1, 1, 0),
		"too long":     appendHeader(nil, frameStdin, 1, MaxExecPayload+1),
	} {
		if _, err := readFrame(bytes.NewReader(raw)); !errors.Is(err, ErrBadFrame) {
			t.Errorf("%s: %v, want ErrBadFrame", name, err)
		}
	}
	trunc := encodeFrame(frameStdin, 1, []byte("abcdef"))[:execHeaderLen+3]
	if _, err := readFrame(bytes.NewReader(trunc)); err != io.ErrUnexpectedEOF {
		t.Errorf("truncated payload: %v, want io.ErrUnexpectedEOF", err)
	}
	if len(encodeFrame(frameStdout, 1, make([]byte, MaxExecPayload))) != MaxExecFrame {
		t.Errorf("a full frame is not MaxExecFrame bytes")
	}
}

func TestExecOutputAndExit(t *testing.T) {
	p := newPair(t)
	s, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r := run(t, s); r != (result{"out\n", "err\n", 3, 0}) {
		t.Errorf("result = %+v", r)
	}
	s, err = p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"sh", "-c", "kill -TERM $$"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r := run(t, s); r.code != 143 || r.sig != int(syscall.SIGTERM) {
		t.Errorf("killed by TERM: %+v, want 143 and signal 15", r)
	}
}

func TestExecRefusals(t *testing.T) {
	p := newPair(t)
	_, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"true"}, Workdir: "/does/not/exist"})
	var ee *ExecError
	if !errors.As(err, &ee) || !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("missing workdir: %v, want an ExecError of class invalid argument", err)
	}
	if _, err := p.client.Exec(ctxT(t), &ExecRequest{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("no command: %v, want invalid argument", err)
	}
	if err := p.client.SignalMain(ctxT(t), int(syscall.SIGSTOP)); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("refused signal: %v, want conflict", err)
	}
	if err := p.client.SignalMain(ctxT(t), int(syscall.SIGHUP)); err != nil {
		t.Errorf("signal: %v", err)
	}
	p.be.mu.Lock()
	got := fmt.Sprint(p.be.signals)
	p.be.mu.Unlock()
	if got != fmt.Sprint([]int{int(syscall.SIGHUP)}) {
		t.Errorf("signals delivered to the main process = %s, want [1]", got)
	}
	if n := p.srv.Sessions(); n != 0 {
		t.Errorf("%d sessions open after refusals", n)
	}
}

func TestExecStdinLarge(t *testing.T) {
	p := newPair(t)
	s, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"sha256sum"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := bytes.Repeat([]byte("0123456789abcdef"), 4*ExecWindow/16+3) // 4 windows and a bit
	go func() {
		if _, err := s.Stdin().Write(data); err != nil {
			t.Errorf("write stdin: %v", err)
		}
		s.Stdin().Close()
	}()
	r := run(t, s)
	if want := fmt.Sprintf("%x  -\n", sha256.Sum256(data)); r.stdout != want || r.code != 0 {
		t.Errorf("sha256sum of stdin = %+v, want %q", r, want)
	}
}

func TestExecManySessions(t *testing.T) {
	p := newPair(t)
	baseline := runtime.NumGoroutine()
	const n = 64
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			s, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"sh", "-c", fmt.Sprintf("echo s%d; echo e%d >&2; exit %d", i, i, i%100)}})
			if err != nil {
				t.Errorf("session %d: %v", i, err)
				return
			}
			defer s.Close()
			if r := run(t, s); r != (result{fmt.Sprintf("s%d\n", i), fmt.Sprintf("e%d\n", i), i % 100, 0}) {
				t.Errorf("session %d: %+v", i, r)
			}
		})
	}
	wg.Wait()
	// Close does not wait for the server to drop the session.
	for deadline := time.Now().Add(10 * time.Second); p.srv.Sessions() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions open in the server after all were closed", p.srv.Sessions())
		}
	}
	// Every session's goroutines, on both sides, are gone.
	p.srv.Wait()
	for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > baseline; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after %d sessions ended, %d before:\n%s", runtime.NumGoroutine(), n, baseline, buf[:runtime.Stack(buf, true)])
		}
	}
	if k := p.client.Sessions(); k != 0 {
		t.Errorf("%d sessions registered in the client after all were closed", k)
	}
}

// A session whose output nobody reads holds back its own process only:
// the others run to their end, and neither side buffers more than a window.
func TestExecBackpressure(t *testing.T) {
	p := newPair(t)
	const total = 8 * ExecWindow
	slow, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"head", "-c", fmt.Sprint(total), "/dev/zero"}})
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	// Give the slow session time to fill its window (nothing asserts on
	// timing: the check is that it is bounded, however long we wait).
	time.Sleep(300 * time.Millisecond)
	for i := range 5 {
		s, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"echo", fmt.Sprint(i)}})
		if err != nil {
			t.Fatal(err)
		}
		if r := run(t, s); r.stdout != fmt.Sprintf("%d\n", i) {
			t.Errorf("session next to a stalled one: %+v", r)
		}
		s.Close()
	}
	slow.mu.Lock()
	buffered := slow.out[0].buf.Len()
	slow.mu.Unlock()
	if buffered > ExecWindow {
		t.Errorf("host buffers %d bytes of an unread session, more than the window %d", buffered, ExecWindow)
	}
	select {
	case <-slow.exited:
		t.Errorf("the unread session's process ended: it wrote %d bytes with nobody reading", total)
	default:
	}
	// Reading lets it finish, with every byte.
	n, err := io.Copy(io.Discard, slow.Stdout())
	if err != nil || n != total {
		t.Errorf("read %d bytes (%v), want %d", n, err, total)
	}
	if code, _, err := slow.Wait(ctxT(t)); code != 0 || err != nil {
		t.Errorf("slow session end: %d, %v", code, err)
	}
}

func TestExecCloseKillsGroup(t *testing.T) {
	p := newPair(t)
	s, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"sh", "-c", "sleep 1000 & echo $!; wait"}})
	if err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 32)
	n, err := s.Stdout().Read(line)
	if err != nil {
		t.Fatal(err)
	}
	var child int
	fmt.Sscan(string(line[:n]), &child)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	code, sig, err := s.Wait(ctxT(t))
	if err != nil || sig != int(syscall.SIGKILL) || code != 137 {
		t.Errorf("Wait after Close = %d %d %v, want 137 by SIGKILL", code, sig, err)
	}
	waitGone(t, child)
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// waitGone waits until pid is gone or a zombie (its parent, the shell,
// was killed too, so init may not have reaped it yet).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(data), ") Z") {
			return
		}
	}
	t.Errorf("process %d of a closed session still runs", pid)
}

// The host going away ends every session: the server kills them and
// Serve returns; a session of the host's side fails instead of hanging.
func TestExecHostGone(t *testing.T) {
	p := newPair(t)
	s, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"sh", "-c", "echo $$; exec sleep 1000"}})
	if err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 32)
	n, _ := s.Stdout().Read(line)
	var pid int
	fmt.Sscan(string(line[:n]), &pid)
	p.client.Close()
	if _, _, err := s.Wait(ctxT(t)); !errors.Is(err, ErrExecChannelClosed) {
		t.Errorf("Wait on a closed channel: %v, want ErrExecChannelClosed", err)
	}
	if _, err := io.ReadAll(s.Stdout()); !errors.Is(err, ErrExecChannelClosed) {
		t.Errorf("read on a closed channel: %v", err)
	}
	waitGone(t, pid)
}

// A frame that breaks the protocol ends the connection's sessions; a new
// hello (a new host connection) is served afresh on the same stream.
func TestExecBadFrameResync(t *testing.T) {
	host, guestEnd := socketPair(t)
	srv := NewExecServer(&hostBackend{}, t.Logf)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(guestEnd, guestEnd) }()
	defer func() {
		host.Close()
		<-served
		guestEnd.Close()
		srv.Wait()
	}()
	host.SetDeadline(time.Now().Add(30 * time.Second))
	send := func(typ byte, sid uint32, data []byte) {
		if _, err := host.Write(encodeFrame(typ, sid, data)); err != nil {
			t.Fatal(err)
		}
	}
	// until reads frames up to one of type typ.
	until := func(typ byte) frame {
		for {
			f, err := readFrame(host)
			if err != nil {
				t.Fatalf("waiting for frame type %d: %v", typ, err)
			}
			if f.typ == typ {
				return f
			}
		}
	}
	open := func(sid uint32) {
		send(frameOpen, sid, []byte(`{"args":["sleep","1000"]}`))
		if f := until(frameStarted); f.sid != sid {
			t.Fatalf("started session %d, want %d", f.sid, sid)
		}
	}
	// Garbage before the hello is skipped.
	host.Write([]byte("leftover of an earlier connection"))
	send(frameHello, 0, helloPayload())
	until(frameHello)
	open(1)
	if n := srv.Sessions(); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
	// A frame type only the guest sends.
	send(frameExit, 1, make([]byte, 8))
	for deadline := time.Now().Add(10 * time.Second); srv.Sessions() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions survive a bad frame", srv.Sessions())
		}
	}
	// Frames before the next hello are ignored, then it is served again,
	// and session 1 is a new one.
	send(frameOpen, 2, []byte(`{"args":["true"]}`))
	send(frameHello, 0, helloPayload())
	until(frameHello)
	open(1)
	// A hello without berth's magic is a bad frame as well.
	send(frameHello, 0, []byte("not berth's magic"))
	for deadline := time.Now().Add(10 * time.Second); srv.Sessions() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions survive a bad hello", srv.Sessions())
		}
	}
}

// A host that sends stdin past its window breaks the protocol: the
// server ends the connection's sessions instead of buffering without
// bound.
func TestExecStdinPastWindow(t *testing.T) {
	host, guestEnd := socketPair(t)
	srv := NewExecServer(&hostBackend{}, t.Logf)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(guestEnd, guestEnd) }()
	defer func() {
		host.Close()
		<-served
		guestEnd.Close()
		srv.Wait()
	}()
	host.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := host.Write(encodeFrame(frameHello, 0, helloPayload())); err != nil {
		t.Fatal(err)
	}
	for f, err := readFrame(host); f.typ != frameHello; f, err = readFrame(host) {
		if err != nil {
			t.Fatal(err)
		}
	}
	// A process that never reads its stdin.
	host.Write(encodeFrame(frameOpen, 1, []byte(`{"args":["sleep","1000"],"stdin":true}`)))
	for f, err := readFrame(host); f.typ != frameStarted; f, err = readFrame(host) {
		if err != nil {
			t.Fatal(err)
		}
	}
	chunk := make([]byte, MaxExecPayload)
	go func() {
		for sent := 0; sent <= 2*ExecWindow; sent += len(chunk) {
			if _, err := host.Write(encodeFrame(frameStdin, 1, chunk)); err != nil {
				return
			}
		}
	}()
	// The session ends: its exit (killed) may or may not reach the host
	// before the server stops sending for it; the server forgets it.
	for deadline := time.Now().Add(10 * time.Second); srv.Sessions() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a session whose host overran its stdin window is still open")
		}
	}
}

// A host that died in the middle of a frame leaves the server waiting for
// its rest; the next host's connection still gets through at once.
func TestExecReconnectAfterPartialFrame(t *testing.T) {
	host, guestEnd := socketPair(t)
	srv := NewExecServer(&hostBackend{}, t.Logf)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(guestEnd, guestEnd) }()
	defer func() {
		host.Close()
		<-served
		guestEnd.Close()
		srv.Wait()
	}()
	first, err := DialExec(ctxT(t), &detachable{Conn: host})
	if err != nil {
		t.Fatal(err)
	}
	s, err := first.Exec(ctxT(t), &ExecRequest{Args: []string{"sleep", "1000"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	// The first host stops reading; a stdin frame announces 1000 bytes and
	// sends 10; then the host is gone (without the stream ending).
	first.fail(ErrExecChannelClosed)
	frame := encodeFrame(frameStdin, s.id, make([]byte, 1000))
	if _, err := host.Write(frame[:execHeaderLen+10]); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	second, err := DialExec(ctx, &detachable{Conn: host})
	if err != nil {
		t.Fatalf("a new connection after a partial frame: %v", err)
	}
	defer second.Close()
	s2, err := second.Exec(ctxT(t), &ExecRequest{Args: []string{"echo", "again"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if r := run(t, s2); r.stdout != "again\n" {
		t.Errorf("session on the new connection: %+v", r)
	}
	if n := srv.Sessions(); n > 1 {
		t.Errorf("%d sessions open: the first connection's survived", n)
	}
}

// detachable is a host's end of the stream that can be let go without
// closing the stream: a host that vanishes while the guest keeps the
// stream (as a virtio-serial port outlives its host connections).
type detachable struct {
	net.Conn
	mu      sync.Mutex
	closed  bool
	reading sync.WaitGroup
}

func (d *detachable) Read(p []byte) (int, error) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return 0, io.EOF
	}
	d.reading.Add(1)
	d.mu.Unlock()
	defer d.reading.Done()
	return d.Conn.Read(p)
}

// Close stops this host's reads and leaves the stream open.
func (d *detachable) Close() error {
	d.mu.Lock()
	already := d.closed
	d.closed = true
	d.mu.Unlock()
	if already {
		return nil
	}
	d.Conn.SetReadDeadline(time.Now())
	d.reading.Wait()
	d.Conn.SetReadDeadline(time.Time{})
	return nil
}
