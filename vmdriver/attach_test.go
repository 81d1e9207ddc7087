package vmdriver

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
)

// outputTail reads an attach session's output in the background, so a
// test can wait for a string or the end without blocking forever.
type outputTail struct {
	mu   sync.Mutex
	buf  strings.Builder
	err  error
	done chan struct{}
}

func tailOf(r io.Reader) *outputTail {
	o := &outputTail{done: make(chan struct{})}
	go func() {
		defer close(o.done)
		b := make([]byte, 4096)
		for {
			n, err := r.Read(b)
			o.mu.Lock()
			o.buf.Write(b[:n])
			if err != nil {
				o.err = err
			}
			o.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return o
}

func (o *outputTail) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

// waitFor waits until the output holds want.
func (o *outputTail) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(slack)
	for !strings.Contains(o.String(), want) {
		select {
		case <-o.done:
			if !strings.Contains(o.String(), want) {
				t.Fatalf("output ended (%v) before %q; got %q", o.err, want, o.String())
			}
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the output within %v; got %q", want, slack, o.String())
		}
	}
}

// end waits for the output's end and returns why it ended (io.EOF for
// end of file).
func (o *outputTail) end(t *testing.T) error {
	t.Helper()
	select {
	case <-o.done:
	case <-time.After(slack):
		t.Fatalf("output did not end within %v; got %q", slack, o.String())
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.err
}

func attachT(t *testing.T, d *Driver, id string, opts driver.AttachOptions) driver.AttachSession {
	t.Helper()
	s, err := d.Attach(execCtx(t), id, opts)
	if err != nil {
		t.Fatalf("Attach(%+v): %v", opts, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close of an attach session: %v", err)
		}
	})
	return s
}

// TestAttachTerminal runs a shell on the VM's terminal and goes through
// what `berth run -it` and `berth attach` do with it, in one boot: attach
// while the guest boots, replay (once), a watcher, resize, detach and
// reattach, a restarted agent (a new driver, Recover) attaching to the
// task, stdin closed (cat ends), the exit code through the terminal, and
// the terminal's output in stdout.log.
func TestAttachTerminal(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh")
	cfg.Stdin, cfg.TTY = true, true
	if _, err := d.Start(execCtx(t), cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), cfg.ID); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	})

	// Attached while the guest still boots: the attach waits for
	// berth-init, and replay brings whatever the shell printed first.
	first := attachT(t, d, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true, Size: &driver.TermSize{Rows: 31, Cols: 101}})
	if first.Stderr() != nil {
		t.Errorf("Stderr() is not nil on a terminal")
	}
	out1 := tailOf(first.Stdout())
	// The quotes tell a command's output from the terminal's echo of it.
	if _, err := io.WriteString(first.Stdin(), "test -t 0 && test -t 1 && echo is-a-'tty'; echo term-$TERM; echo mark-'one'; stty size\n"); err != nil {
		t.Fatal(err)
	}
	out1.waitFor(t, "31 101")
	if s := out1.String(); !strings.Contains(s, "is-a-tty") || !strings.Contains(s, "mark-one\r\n") || !strings.Contains(s, "term-xterm\r\n") {
		t.Fatalf("terminal output %q: want is-a-tty, TERM=xterm and mark-one on a terminal", s)
	}
	watcher := attachT(t, d, cfg.ID, driver.AttachOptions{})
	if watcher.Stdin() != nil {
		t.Errorf("Stdin() is not nil without AttachOptions.Stdin")
	}
	outW := tailOf(watcher.Stdout())
	// Detach: the shell runs on.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if err := first.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := out1.end(t); err != io.EOF {
		t.Errorf("output of a closed session ended with %v, want io.EOF", err)
	}
	if st, err := d.Inspect(execCtx(t), cfg.ID); err != nil || st.State != driver.TaskRunning {
		t.Fatalf("after a detach: %+v, %v; want the task running", st, err)
	}

	// Reattach with replay: the earlier output once, then the live one.
	second := attachT(t, d, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
	out2 := tailOf(second.Stdout())
	out2.waitFor(t, "mark-one\r\n")
	if err := second.Resize(driver.TermSize{Rows: 42, Cols: 123}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(second.Stdin(), "stty size; echo mark-'two'\n"); err != nil {
		t.Fatal(err)
	}
	out2.waitFor(t, "mark-two\r\n")
	if s := out2.String(); strings.Count(s, "mark-one\r\n") != 1 || !strings.Contains(s, "42 123") {
		t.Errorf("reattached with replay: %q; want mark-one once and the new size", s)
	}
	outW.waitFor(t, "mark-two\r\n")
	if s := outW.String(); strings.Contains(s, "mark-one") {
		t.Errorf("the watcher attached without replay saw earlier output: %q", s)
	}

	// The old driver is gone (its sessions with it), as when the agent
	// dies: the new one recovers the task and attaches.
	second.Close()
	watcher.Close()
	d.closeExec()
	d2 := newDriver(t, fixtures.root)
	if err := d2.Recover(execCtx(t), &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	third := attachT(t, d2, cfg.ID, driver.AttachOptions{Stdin: true})
	out3 := tailOf(third.Stdout())
	watcher2 := attachT(t, d2, cfg.ID, driver.AttachOptions{})
	outW2 := tailOf(watcher2.Stdout())
	if _, err := io.WriteString(third.Stdin(), "echo cat-'starts'; cat; echo hel'lo'; exit 7\n"); err != nil {
		t.Fatal(err)
	}
	out3.waitFor(t, "cat-starts\r\n")
	if _, err := io.WriteString(third.Stdin(), "abc\n"); err != nil {
		t.Fatal(err)
	}
	out3.waitFor(t, "abc\r\nabc\r\n") // the terminal's echo, then cat's
	// Closing stdin ends cat's input (end of file on the terminal) for
	// every session; the shell goes on to its exit.
	if err := third.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	if err := out3.end(t); err != io.EOF {
		t.Errorf("output ended with %v, want io.EOF at the task's end", err)
	}
	if !strings.Contains(out3.String(), "hello\r\n") {
		t.Errorf("terminal output %q lacks the shell's last output", out3.String())
	}
	if err := outW2.end(t); err != io.EOF || !strings.Contains(outW2.String(), "hello\r\n") {
		t.Errorf("the watcher's output ended with %v: %q", err, outW2.String())
	}
	res, err := d2.Wait(execCtx(t), cfg.ID)
	if err != nil || res.ExitCode != 7 {
		t.Fatalf("exit = %+v, %v; want the shell's 7", res, err)
	}
	log := drivertest.ReadLog(t, cfg, driver.StdoutLog)
	for _, want := range []string{"is-a-tty\r\n", "mark-one\r\n", "42 123\r\n", "abc\r\nabc\r\n", "hello\r\n"} {
		if strings.Count(log, want) != 1 {
			t.Errorf("stdout.log has %q %d times, want once: %q", want, strings.Count(log, want), log)
		}
	}
	if e := drivertest.ReadLog(t, cfg, driver.StderrLog); e != "" {
		t.Errorf("stderr.log of a terminal task: %q, want it empty", e)
	}
	if _, err := d2.Attach(execCtx(t), cfg.ID, driver.AttachOptions{}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("Attach to an ended task: %v, want ErrConflict", err)
	}
}

// A VM started by a berth whose berth-init cannot be attached to (its
// task.json says nothing of attach) is refused with a reason, before
// anything reaches the guest; a whole-disk image cannot have a terminal.
// A session attached when the VM is forced off (a workload that ignores
// SIGTERM, stopped) ends with end of file, as at any end of the task.
func TestAttachRefusalsAndForcedStop(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", "trap '' TERM; echo ready; echo ready-err >&2; while true; do sleep 1; done")
	if _, err := d.Start(execCtx(t), cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), cfg.ID); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	})
	tk, err := d.sup.Get(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	tk.Data.Attach = false
	_, err = d.Attach(execCtx(t), cfg.ID, driver.AttachOptions{})
	tk.Data.Attach = true
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "older berth") {
		t.Errorf("Attach to a VM of an older berth: %v, want ErrConflict naming it", err)
	}
	if _, err := d.Attach(execCtx(t), cfg.ID, driver.AttachOptions{Stdin: true}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Attach with stdin to a task without: %v, want ErrInvalidArgument", err)
	}
	// Output only, without a terminal: stdout and stderr apart.
	s := attachT(t, d, cfg.ID, driver.AttachOptions{Replay: true})
	if s.Stderr() == nil {
		t.Fatalf("Stderr() is nil without a terminal")
	}
	out, errOut := tailOf(s.Stdout()), tailOf(s.Stderr())
	out.waitFor(t, "ready\n")
	errOut.waitFor(t, "ready-err\n")

	// Attach and detach cycles leave nothing on the host.
	goroutines, fds := runtime.NumGoroutine(), hostFDs(t)
	for range 30 {
		c, err := d.Attach(execCtx(t), cfg.ID, driver.AttachOptions{Replay: true})
		if err != nil {
			t.Fatal(err)
		}
		o := tailOf(c.Stderr())
		o.waitFor(t, "ready-err\n")
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := o.end(t); err != io.EOF {
			t.Errorf("stderr after Close: %v, want io.EOF", err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > goroutines || hostFDs(t) > fds; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("after 30 attach cycles the host has %d goroutines (%d before) and %d open files (%d before)",
				runtime.NumGoroutine(), goroutines, hostFDs(t), fds)
			break
		}
	}
	d.execMu.Lock()
	ch := d.execChans[cfg.ID]
	d.execMu.Unlock()
	if n := ch.client.Sessions(); n != 1 {
		t.Errorf("%d sessions registered on the host after the cycles, want the one still attached", n)
	}
	if err := d.Stop(execCtx(t), cfg.ID, 2*time.Second); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if res, err := d.Wait(execCtx(t), cfg.ID); err != nil || res.ExitCode != 137 {
		t.Errorf("a workload that ignores SIGTERM, stopped: %+v, %v; want forced off (137)", res, err)
	}
	for name, o := range map[string]*outputTail{"stdout": out, "stderr": errOut} {
		if err := o.end(t); err != io.EOF {
			t.Errorf("%s of a session attached when the VM was forced off ended with %v, want io.EOF", name, err)
		}
	}

	whole := newTask(t, "true")
	whole.Image = driver.Image{Ref: "test/disk", DiskPath: filepath.Join(t.TempDir(), "disk.qcow2")}
	whole.TTY = true
	if _, err := d.Start(execCtx(t), whole); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "tty") {
		t.Errorf("Start of a whole-disk image with a terminal: %v, want ErrInvalidArgument naming tty", err)
	}
	if _, err := os.Stat(d.taskDir(whole.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused start left its task dir: %v", err)
	}
}

// berth-init keeps as much output for a replay as the contract promises.
func TestAttachReplaySize(t *testing.T) {
	if guest.AttachReplayMax < driver.AttachReplayMax {
		t.Errorf("berth-init keeps %d bytes for a replay, the contract promises %d", guest.AttachReplayMax, driver.AttachReplayMax)
	}
}

// An agent SIGKILLed while attached to a terminal, with input typed: the
// shell runs on, and the restarted agent (a new driver, Recover) attaches
// with a replay that has what the shell printed once, types, and signals
// the shell (berth kill), whose end ends the session's output.
func TestAttachAgentKilled(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh")
	cfg.Stdin, cfg.TTY = true, true
	if _, err := d.Start(execCtx(t), cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), cfg.ID); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	})
	m := marker()
	killedAgent(t, d, cfg.ID, helperEnvMarker+"="+m, helperEnvAttach+"=1")

	d2 := newDriver(t, fixtures.root)
	if err := d2.Recover(execCtx(t), &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	s := attachT(t, d2, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
	out := tailOf(s.Stdout())
	out.waitFor(t, "typed-"+m+"\r\n")
	if _, err := io.WriteString(s.Stdin(), "echo before-'signal'\n"); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, "before-signal\r\n")
	// berth kill reaches the shell on its terminal (an interactive shell
	// ignores TERM, not HUP).
	if err := d2.Signal(execCtx(t), cfg.ID, syscall.SIGHUP); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	if err := out.end(t); err != io.EOF {
		t.Errorf("output ended with %v, want io.EOF", err)
	}
	if n := strings.Count(out.String(), "typed-"+m+"\r\n"); n != 1 {
		t.Errorf("replay after the agent's death has the shell's output %d times, want once: %q", n, out.String())
	}
	if res, err := d2.Wait(execCtx(t), cfg.ID); err != nil || res.ExitCode != 129 || res.Signal != int(syscall.SIGHUP) {
		t.Errorf("exit = %+v, %v; want 129 by SIGHUP", res, err)
	}
	if log := drivertest.ReadLog(t, cfg, driver.StdoutLog); strings.Count(log, "typed-"+m+"\r\n") != 1 {
		t.Errorf("stdout.log %q: want the output typed through the killed agent once", log)
	}
}
