//go:build linux

package guest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/attachio"
)

// attachBackend is berth-init's backend as the tests see it: exec'd
// processes are the test's children, and the workload's main process is
// one too, its streams held by a Console as berth-init holds them.
type attachBackend struct {
	*hostBackend
	console *Console
}

func (b *attachBackend) Attach(req *AttachRequest) (ExecProcess, error) {
	return b.console.Attach(req)
}

// mainProc is the workload's main process of a test: its output goes to
// log (the stdout and stderr ports) and to the console, as berth-init
// copies it.
type mainProc struct {
	cmd              *exec.Cmd
	console          *Console
	stdout, stderr   bytes.Buffer // what reached the "ports"
	exitCode, signal int
	done             chan struct{} // the console has ended
}

// startMain starts args as the main process; with stdin, its input is a
// pipe the console writes.
func startMain(t *testing.T, stdin bool, args ...string) *mainProc {
	t.Helper()
	m := &mainProc{cmd: exec.Command(args[0], args[1:]...), done: make(chan struct{})}
	opts := ConsoleOptions{}
	var inR *os.File
	if stdin {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		inR, opts.Stdin = r, w
		m.cmd.Stdin = r
	}
	m.console = NewConsole(opts)
	outR, outW, _ := os.Pipe()
	errR, errW, _ := os.Pipe()
	m.cmd.Stdout, m.cmd.Stderr = outW, errW
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	outW.Close()
	errW.Close()
	if inR != nil {
		inR.Close()
	}
	var copied sync.WaitGroup
	copied.Go(func() { _, _ = io.Copy(io.MultiWriter(&m.stdout, m.console.Stdout()), outR) })
	copied.Go(func() { _, _ = io.Copy(io.MultiWriter(&m.stderr, m.console.Stderr()), errR) })
	go func() {
		_ = m.cmd.Wait()
		copied.Wait()
		ws := m.cmd.ProcessState.Sys().(syscall.WaitStatus)
		m.exitCode, m.signal = ws.ExitStatus(), 0
		if ws.Signaled() {
			m.exitCode, m.signal = ExitCodeForSignal(int(ws.Signal())), int(ws.Signal())
		}
		m.console.End(m.exitCode, m.signal)
		if opts.Stdin != nil {
			opts.Stdin.Close()
		}
		close(m.done)
	}()
	t.Cleanup(func() {
		_ = m.cmd.Process.Kill()
		<-m.done
	})
	return m
}

func newAttachPair(t *testing.T, m *Console) *pair {
	be := &hostBackend{}
	return newPairWith(t, &attachBackend{hostBackend: be, console: m}, be)
}

// readUntilT reads r into seen until it holds want.
func readUntilT(t *testing.T, r io.Reader, seen *bytes.Buffer, want string) {
	t.Helper()
	buf := make([]byte, 4096)
	for !strings.Contains(seen.String(), want) {
		n, err := r.Read(buf)
		seen.Write(buf[:n])
		if err != nil && !strings.Contains(seen.String(), want) {
			t.Fatalf("output ended (%v) before %q; got %q", err, want, seen.String())
		}
	}
}

// Two sessions see the same output; input from one reaches the process;
// closing stdin ends it for everyone; each session's output ends with end
// of file after the last byte, and its exit frame carries the code.
func TestAttachPipeFanOutAndEnd(t *testing.T) {
	m := startMain(t, true, "sh", "-c", "cat; echo cat-ended; echo to-stderr >&2; exit 7")
	p := newAttachPair(t, m.console)
	writer, err := p.client.Attach(ctxT(t), &AttachRequest{Stdin: true}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	watcher, err := p.client.Attach(ctxT(t), &AttachRequest{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	if _, err := io.WriteString(writer.Stdin(), "line one\n"); err != nil {
		t.Fatal(err)
	}
	var seen bytes.Buffer
	readUntilT(t, watcher.Stdout(), &seen, "line one\n")
	if err := writer.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	for name, s := range map[string]*ExecSession{"writer": writer, "watcher": watcher} {
		r := run(t, s)
		if name == "watcher" {
			r.stdout = seen.String() + r.stdout
		}
		if r != (result{"line one\ncat-ended\n", "to-stderr\n", 7, 0}) {
			t.Errorf("%s session: %+v", name, r)
		}
	}
	<-m.done
	if m.stdout.String() != "line one\ncat-ended\n" || m.stderr.String() != "to-stderr\n" {
		t.Errorf("ports got stdout %q stderr %q", m.stdout.String(), m.stderr.String())
	}
	// A session's Close after the end is quick and leaves nothing.
	writer.Close()
	watcher.Close()
	for deadline := time.Now().Add(10 * time.Second); p.srv.Sessions() != 0 || m.console.Attached() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d server sessions and %d attached after both closed", p.srv.Sessions(), m.console.Attached())
		}
	}
	// Attaching to a process that ended is a conflict.
	if _, err := p.client.Attach(ctxT(t), &AttachRequest{}, false); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("attach after the end: %v, want ErrConflict", err)
	}
}

// A detach leaves the process and its input alone: input a session sent
// right before its detach is still written, and a later session types to
// the process too.
func TestAttachDetachAndReattach(t *testing.T) {
	m := startMain(t, true, "sh", "-c", "read a; echo A-is-$a; read b; echo B-is-$b")
	p := newAttachPair(t, m.console)
	first, err := p.client.Attach(ctxT(t), &AttachRequest{Stdin: true}, false)
	if err != nil {
		t.Fatal(err)
	}
	// Input sent right before a detach is still delivered.
	if _, err := io.WriteString(first.Stdin(), "x\n"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d >= ExecCloseWait {
		t.Errorf("detach took %v: it waited for an end that a detach does not bring", d)
	}
	if err := first.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := first.Stdout().Read(make([]byte, 10)); err == nil {
		t.Errorf("read after a detach succeeded")
	}
	for deadline := time.Now().Add(10 * time.Second); m.console.Attached() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the detached session is still attached")
		}
	}
	select {
	case <-m.done:
		t.Fatalf("the main process ended at a detach")
	default:
	}
	second, err := p.client.Attach(ctxT(t), &AttachRequest{Stdin: true, Replay: true}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	var seen bytes.Buffer
	readUntilT(t, second.Stdout(), &seen, "A-is-x\n")
	if _, err := io.WriteString(second.Stdin(), "y\n"); err != nil {
		t.Fatal(err)
	}
	if r := run(t, second); r != (result{"B-is-y\n", "", 0, 0}) || seen.String() != "A-is-x\n" {
		t.Errorf("second session: replay %q then %+v", seen.String(), r)
	}
}

// Replay gives the newest AttachReplayMax bytes before the attach, then
// the live output: while the process writes without pause, each session's
// output is a contiguous piece of the whole, none lost or repeated.
func TestAttachReplayExactlyOnce(t *testing.T) {
	c := NewConsole(ConsoleOptions{TTY: true})
	p := newAttachPair(t, c)
	var want bytes.Buffer
	emit := func(s string) {
		want.WriteString(s)
		c.Stdout().Write([]byte(s))
	}
	for i := range 20000 { // far more than the replay keeps
		emit(fmt.Sprintf("early %d\n", i))
	}
	stop := make(chan struct{})
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			emit(fmt.Sprintf("live %d\n", i))
			if i%10 == 0 {
				// Slow enough that a reading session keeps up on a busy
				// machine: it would have to stall for seconds to fall
				// behind by a window and a backlog.
				time.Sleep(time.Millisecond)
			}
		}
	}()
	var sessions []*ExecSession
	var outs []*bytes.Buffer
	var readers sync.WaitGroup
	for i := range 4 {
		s, err := p.client.Attach(ctxT(t), &AttachRequest{Replay: i%2 == 0}, true)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		out := &bytes.Buffer{}
		sessions, outs = append(sessions, s), append(outs, out)
		readers.Go(func() {
			if _, err := io.Copy(out, s.Stdout()); err != nil {
				t.Errorf("session %d: %v", i, err)
			}
			if _, err := io.ReadAll(s.Stderr()); err != nil {
				t.Errorf("session %d: stderr on a terminal: %v", i, err)
			}
		})
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	<-wrote
	c.End(0, 0)
	readers.Wait()
	for i, out := range outs {
		got := out.Bytes()
		if !bytes.HasSuffix(want.Bytes(), got) {
			t.Errorf("session %d read %d bytes that are not the tail of the output", i, len(got))
			continue
		}
		// The piece starts where the session attached: a replaying one
		// AttachReplayMax bytes earlier.
		if i%2 == 0 {
			start := bytes.Index(got, []byte("early"))
			if start < 0 || len(got) < AttachReplayMax {
				t.Errorf("session %d with replay: read %d bytes, starting %q", i, len(got), got[:min(len(got), 40)])
			}
		} else if bytes.Contains(got, []byte("early")) {
			t.Errorf("session %d without replay saw output from before it attached", i)
		}
	}
	if !c.WaitDrained(10 * time.Second) {
		t.Errorf("sessions that read everything are not drained")
	}
}

// A session whose host reads nothing is ended once it falls behind by
// more than the window and the backlog; the process's output never waits
// for it, and a session that reads gets every byte.
func TestAttachSlowSessionEnded(t *testing.T) {
	c := NewConsole(ConsoleOptions{})
	p := newAttachPair(t, c)
	slow, err := p.client.Attach(ctxT(t), &AttachRequest{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	fast, err := p.client.Attach(ctxT(t), &AttachRequest{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer fast.Close()
	var got countingWriter
	read := make(chan error, 1)
	go func() {
		_, err := io.Copy(&got, fast.Stdout())
		read <- err
	}()
	const total = 4*(ExecWindow+AttachBacklog) + 17
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 64)
	written := 0
	for written < total {
		// The reading session keeps within half a window, however slow
		// this machine: it must never be the one that falls behind.
		for int64(written)-got.n.Load() > ExecWindow/2 {
			time.Sleep(time.Millisecond)
		}
		n := min(len(chunk), total-written)
		// Never blocks, never fails: nobody reads the slow session.
		c.Stdout().Write(chunk[:n])
		written += n
	}
	// berth-init ends the slow session as soon as it falls behind, without
	// waiting for its host to read: the server forgets it.
	for deadline := time.Now().Add(10 * time.Second); p.srv.Sessions() != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions in the server; the slow one was not ended", p.srv.Sessions())
		}
	}
	c.Stderr().Write([]byte("err\n"))
	c.End(0, 0)
	if err := <-read; err != nil || got.n.Load() != total {
		t.Errorf("the reading session got %d bytes (%v), want %d", got.n.Load(), err, total)
	}
	n, err := io.Copy(io.Discard, slow.Stdout())
	if !errors.Is(err, attachio.ErrSlow) {
		t.Errorf("the unread session's output ended with %v after %d bytes, want attachio.ErrSlow", err, n)
	}
	if n > ExecWindow {
		t.Errorf("the host buffered %d bytes of the slow session, more than its window", n)
	}
	if _, err := io.ReadAll(slow.Stderr()); !errors.Is(err, attachio.ErrSlow) {
		t.Errorf("its stderr ended with %v, want attachio.ErrSlow too", err)
	}
	if k := p.client.Sessions(); k != 1 {
		t.Errorf("%d sessions registered on the host, want only the reading one", k)
	}
	if !c.WaitDrained(10 * time.Second) {
		t.Errorf("not drained after the reading session read everything and the slow one was ended")
	}
}

// countingWriter counts what is written to it.
type countingWriter struct{ n atomic.Int64 }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}

// Stdin on a process started without it is refused; a server whose
// backend cannot attach refuses attaches; the host going away detaches
// every session and leaves the process running.
func TestAttachRefusalsAndHostGone(t *testing.T) {
	var sizes []string
	c := NewConsole(ConsoleOptions{TTY: true, Resize: func(r, cl uint16) error {
		sizes = append(sizes, fmt.Sprintf("%dx%d", r, cl))
		return nil
	}})
	p := newAttachPair(t, c)
	if _, err := p.client.Attach(ctxT(t), &AttachRequest{Stdin: true}, true); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("attach with stdin to a process without it: %v, want ErrInvalidArgument", err)
	}
	s, err := p.client.Attach(ctxT(t), &AttachRequest{Rows: 31, Cols: 101}, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Resize(42, 123); err != nil {
		t.Fatal(err)
	}
	// The resize is applied by the server's reader; an exec round trip
	// after it orders the check.
	e, err := p.client.Exec(ctxT(t), &ExecRequest{Args: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	run(t, e)
	e.Close()
	if got := strings.Join(sizes, " "); got != "31x101 42x123" {
		t.Errorf("terminal sizes set: %q, want 31x101 42x123", got)
	}
	c.Stdout().Write([]byte("hello"))
	var seen bytes.Buffer
	readUntilT(t, s.Stdout(), &seen, "hello")
	p.client.Close()
	for deadline := time.Now().Add(10 * time.Second); c.Attached() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a session is still attached after the host went away")
		}
	}
	// A backend without attach.
	plain := newPair(t)
	if _, err := plain.client.Attach(ctxT(t), &AttachRequest{}, false); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("attach to a backend that cannot: %v, want ErrConflict", err)
	}
}

// Many attach and detach cycles, with and without stdin, leave no
// session, subscriber or goroutine behind on either side, and the
// process's input open.
func TestAttachCyclesLeaveNothing(t *testing.T) {
	m := startMain(t, true, "cat")
	p := newAttachPair(t, m.console)
	baseline := runtime.NumGoroutine()
	for i := range 100 {
		s, err := p.client.Attach(ctxT(t), &AttachRequest{Stdin: i%2 == 0, Replay: true}, false)
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if i%2 == 0 {
			if _, err := fmt.Fprintf(s.Stdin(), "cycle %d\n", i); err != nil {
				t.Fatalf("cycle %d: %v", i, err)
			}
		}
		var seen bytes.Buffer
		readUntilT(t, s.Stdout(), &seen, fmt.Sprintf("cycle %d\n", i-i%2))
		if err := s.Close(); err != nil {
			t.Fatalf("cycle %d: close: %v", i, err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); p.srv.Sessions() != 0 || m.console.Attached() != 0 || p.client.Sessions() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after 100 detaches: %d server sessions, %d attached, %d host sessions", p.srv.Sessions(), m.console.Attached(), p.client.Sessions())
		}
	}
	for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > baseline; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after 100 detaches, %d before:\n%s", runtime.NumGoroutine(), baseline, buf[:runtime.Stack(buf, true)])
		}
	}
	select {
	case <-m.done:
		t.Fatalf("the main process ended after detaches")
	default:
	}
	if got := m.stdout.String(); !strings.HasSuffix(got, "cycle 98\n") || strings.Count(got, "\n") != 50 {
		t.Errorf("the process's output after the cycles: %d lines ending %q", strings.Count(got, "\n"), got[max(0, len(got)-20):])
	}
}

// BenchmarkConsoleOutput is what berth-init's copy of the main process's
// output pays for the console, per 32 KiB read (its buffer size): the
// replay ring always, and the fan-out to attached sessions, against the
// copy to the port alone (a copy into a reused buffer here).
func BenchmarkConsoleOutput(b *testing.B) {
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 2<<10)
	port := make([]byte, len(chunk))
	b.Run("port-only", func(b *testing.B) {
		b.SetBytes(int64(len(chunk)))
		for b.Loop() {
			copy(port, chunk)
		}
	})
	for _, sessions := range []int{0, 2} {
		b.Run(fmt.Sprintf("console-%d-sessions", sessions), func(b *testing.B) {
			c := NewConsole(ConsoleOptions{})
			var readers sync.WaitGroup
			for range sessions {
				p, err := c.Attach(&AttachRequest{})
				if err != nil {
					b.Fatal(err)
				}
				readers.Go(func() { _, _ = io.Copy(io.Discard, p.Stdout()) })
			}
			b.SetBytes(int64(len(chunk)))
			for b.Loop() {
				copy(port, chunk)
				c.Stdout().Write(chunk)
			}
			c.End(0, 0)
			readers.Wait()
		})
	}
}
