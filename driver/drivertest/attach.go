package drivertest

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// runAttach runs the attach cases when the driver implements
// driver.Attacher; Run calls it.
func (s *suite) runAttach(t *testing.T) {
	if _, ok := s.d.(driver.Attacher); !ok {
		return
	}
	t.Run("AttachTerminalShell", s.attachShell)
	t.Run("AttachReplayOnce", s.attachReplay)
	t.Run("AttachDetachAndReattach", s.attachReattach)
	t.Run("AttachStdinPipe", s.attachStdinPipe)
	t.Run("AttachResize", s.attachResize)
	t.Run("AttachSlowClient", s.attachSlowClient)
	t.Run("AttachErrors", s.attachErrors)
}

// RunAttach runs only the attach cases (the driver must implement
// driver.Attacher).
func RunAttach(t *testing.T, h Harness) {
	h = h.defaults()
	d := h.New(t)
	if _, ok := d.(driver.Attacher); !ok {
		t.Fatalf("driver %s does not implement driver.Attacher", d.Name())
	}
	s := &suite{h: h, d: d}
	s.runAttach(t)
}

func (s *suite) attacher() driver.Attacher { return s.d.(driver.Attacher) }

// interactive starts a task on a terminal (tty) or with a stdin pipe.
func (s *suite) interactive(t *testing.T, tty bool, args ...string) *driver.TaskConfig {
	t.Helper()
	cfg := s.task(t, args...)
	cfg.Stdin, cfg.TTY = true, tty
	s.start(t, s.d, cfg)
	return cfg
}

// attach attaches to id and closes the session when the test ends.
func (s *suite) attach(t *testing.T, id string, opts driver.AttachOptions) driver.AttachSession {
	t.Helper()
	sess, err := s.attacher().Attach(s.ctx(t, 0), id, opts)
	if err != nil {
		t.Fatalf("Attach(%+v): %v", opts, err)
	}
	t.Cleanup(func() {
		if err := sess.Close(); err != nil {
			t.Errorf("Close of the attach session: %v", err)
		}
	})
	return sess
}

// readAll reads r to its end, failing the test if it does not end within
// the slack.
func (s *suite) readAll(t *testing.T, r io.Reader, seen *bytes.Buffer) {
	t.Helper()
	done := make(chan error, 1)
	var buf bytes.Buffer
	go func() {
		_, err := io.Copy(&buf, r)
		done <- err
	}()
	select {
	case err := <-done:
		seen.Write(buf.Bytes())
		if err != nil {
			t.Errorf("output ended with %v, want end of file", err)
		}
	case <-time.After(s.h.Slack):
		t.Fatalf("output did not end within %v after the task ended", s.h.Slack)
	}
}

// A shell on the task's terminal: typed input runs, its output comes
// back through the terminal and the log, and the exit code is the shell's.
func (s *suite) attachShell(t *testing.T) {
	cfg := s.interactive(t, true, "sh")
	sess := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true})
	if sess.Stderr() != nil {
		t.Error("Stderr() is not nil on a terminal")
	}
	out := s.pump(t, sess.Stdout())
	// The quotes tell the command's output from the terminal's echo of it.
	if _, err := io.WriteString(sess.Stdin(), "test -t 0 && test -t 1 && echo is-a-'tty'; echo hel'lo' from-the-shell; exit 7\n"); err != nil {
		t.Fatalf("write to the terminal: %v", err)
	}
	var seen bytes.Buffer
	s.readUntil(t, out, &seen, "hello from-the-shell")
	s.readAll(t, out, &seen)
	if !strings.Contains(seen.String(), "is-a-tty") {
		t.Errorf("terminal output %q: the shell's stdin and stdout are not a terminal", seen.String())
	}
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 7 {
		t.Errorf("exit = %+v, want 7 from the shell", res)
	}
	if log := ReadLog(t, cfg, driver.StdoutLog); !strings.Contains(log, "hello from-the-shell") {
		t.Errorf("stdout log %q lacks the terminal's output", log)
	}
}

// Replay starts with what the task printed before the attach, exactly
// once, and goes on with the live output.
func (s *suite) attachReplay(t *testing.T) {
	cfg := s.interactive(t, true, "sh", "-c", "echo before-'attach'; read x; echo got-$x")
	s.waitOutputContains(t, cfg, "before-attach")
	sess := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
	out := s.pump(t, sess.Stdout())
	var seen bytes.Buffer
	s.readUntil(t, out, &seen, "before-attach")
	if _, err := io.WriteString(sess.Stdin(), "abc\n"); err != nil {
		t.Fatalf("write to the terminal: %v", err)
	}
	s.readUntil(t, out, &seen, "got-abc")
	s.readAll(t, out, &seen)
	if n := strings.Count(seen.String(), "before-attach"); n != 1 {
		t.Errorf("replayed output %q has the earlier line %d times, want once", seen.String(), n)
	}
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 0 {
		t.Errorf("exit = %+v, want 0", res)
	}
}

// Two sessions see the same output; detaching one leaves the task
// running, and a later attach without replay sees only what follows.
func (s *suite) attachReattach(t *testing.T) {
	cfg := s.interactive(t, true, "sh", "-c", "read a; echo A-is-$a; read b; echo B-is-$b")
	first := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true})
	watcher := s.attach(t, cfg.ID, driver.AttachOptions{})
	if watcher.Stdin() != nil {
		t.Error("Stdin() is not nil without AttachOptions.Stdin")
	}
	out1, outW := s.pump(t, first.Stdout()), s.pump(t, watcher.Stdout())
	if _, err := io.WriteString(first.Stdin(), "x\n"); err != nil {
		t.Fatalf("write to the terminal: %v", err)
	}
	var seen1, seenW bytes.Buffer
	s.readUntil(t, out1, &seen1, "A-is-x")
	s.readUntil(t, outW, &seenW, "A-is-x")
	if err := first.Close(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	if st, err := s.d.Inspect(s.ctx(t, 0), cfg.ID); err != nil || st.State != driver.TaskRunning {
		t.Fatalf("task after a detach: %+v, %v; want it running", st, err)
	}
	second := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true})
	out2 := s.pump(t, second.Stdout())
	if _, err := io.WriteString(second.Stdin(), "y\n"); err != nil {
		t.Fatalf("write to the terminal after a reattach: %v", err)
	}
	var seen2 bytes.Buffer
	s.readUntil(t, out2, &seen2, "B-is-y")
	s.readAll(t, out2, &seen2)
	s.readUntil(t, outW, &seenW, "B-is-y")
	if strings.Contains(seen2.String(), "A-is-x") {
		t.Errorf("an attach without replay saw earlier output: %q", seen2.String())
	}
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 0 {
		t.Errorf("exit = %+v, want 0", res)
	}
}

// Without a terminal, stdin is a pipe: closing it gives the task end of
// file, and stdout and stderr stay apart.
func (s *suite) attachStdinPipe(t *testing.T) {
	cfg := s.interactive(t, false, "sh", "-c", "cat; echo cat-ended; echo to-stderr >&2")
	sess := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true})
	if sess.Stderr() == nil {
		t.Fatal("Stderr() is nil without a terminal")
	}
	out, errOut := s.pump(t, sess.Stdout()), s.pump(t, sess.Stderr())
	if _, err := io.WriteString(sess.Stdin(), "line one\n"); err != nil {
		t.Fatalf("write stdin: %v", err)
	}
	var seen, seenErr bytes.Buffer
	s.readUntil(t, out, &seen, "line one\n")
	if err := sess.Stdin().Close(); err != nil {
		t.Fatalf("close stdin: %v", err)
	}
	s.readAll(t, out, &seen)
	s.readAll(t, errOut, &seenErr)
	if seen.String() != "line one\ncat-ended\n" || seenErr.String() != "to-stderr\n" {
		t.Errorf("stdout %q stderr %q, want the input echoed, then cat-ended; and to-stderr", seen.String(), seenErr.String())
	}
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 0 {
		t.Errorf("exit = %+v, want 0", res)
	}
	if log := ReadLog(t, cfg, driver.StdoutLog); log != "line one\ncat-ended\n" {
		t.Errorf("stdout log %q", log)
	}
}

// An attach with a size resizes the terminal; Resize changes it again.
func (s *suite) attachResize(t *testing.T) {
	cfg := s.interactive(t, true, "sh", "-c", "read x; stty size; read x; stty size")
	sess := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true, Size: &driver.TermSize{Rows: 31, Cols: 101}})
	out := s.pump(t, sess.Stdout())
	var seen bytes.Buffer
	if _, err := io.WriteString(sess.Stdin(), "\n"); err != nil {
		t.Fatal(err)
	}
	s.readUntil(t, out, &seen, "31 101")
	if err := sess.Resize(driver.TermSize{Rows: 42, Cols: 123}); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	if _, err := io.WriteString(sess.Stdin(), "\n"); err != nil {
		t.Fatal(err)
	}
	s.readUntil(t, out, &seen, "42 123")
	s.wait(t, s.d, cfg.ID, 0)
}

// A client that never reads does not hold the task back: it writes far
// more than any buffer and ends, and the log has all of it.
func (s *suite) attachSlowClient(t *testing.T) {
	const lines = 40000 // 40000 lines of 100 bytes: 4 MB
	cfg := s.interactive(t, false, "sh", "-c",
		"read x; yes 012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678 | head -n 40000; echo all-written")
	sess := s.attach(t, cfg.ID, driver.AttachOptions{Stdin: true})
	if _, err := io.WriteString(sess.Stdin(), "go\n"); err != nil {
		t.Fatal(err)
	}
	// The session's output is never read.
	res := s.wait(t, s.d, cfg.ID, 2*time.Minute)
	if res.ExitCode != 0 {
		t.Errorf("exit = %+v, want 0", res)
	}
	log := ReadLog(t, cfg, driver.StdoutLog)
	if n := strings.Count(log, "\n"); n != lines+1 || !strings.HasSuffix(log, "all-written\n") {
		t.Errorf("stdout log has %d lines (ends %q), want %d and all-written", n, log[max(0, len(log)-40):], lines+1)
	}
	// Its output ends, one way or the other, once the task ended.
	_, err := io.Copy(io.Discard, s.pump(t, sess.Stdout()))
	if err != nil && !errors.Is(err, driver.ErrAttachSlow) {
		t.Errorf("the slow session's output ended with %v, want end of file or ErrAttachSlow", err)
	}
}

func (s *suite) attachErrors(t *testing.T) {
	if _, err := s.attacher().Attach(s.ctx(t, 0), NewID("dt-missing"), driver.AttachOptions{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Attach to an unknown task: %v, want ErrNotFound", err)
	}
	if _, err := s.attacher().Attach(s.ctx(t, 0), "../escape", driver.AttachOptions{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Attach with an invalid id: %v, want ErrInvalidArgument", err)
	}
	cfg := s.running(t) // started without Stdin
	if sess, err := s.attacher().Attach(s.ctx(t, 0), cfg.ID, driver.AttachOptions{Stdin: true}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		if sess != nil {
			sess.Close()
		}
		t.Errorf("Attach with stdin to a task without stdin: %v, want ErrInvalidArgument", err)
	}
	// Output only is fine on any running task.
	sess := s.attach(t, cfg.ID, driver.AttachOptions{})
	if sess.Stdin() != nil {
		t.Error("Stdin() is not nil without AttachOptions.Stdin")
	}
	ended := s.task(t, "true")
	s.start(t, s.d, ended)
	s.wait(t, s.d, ended.ID, 0)
	if sess, err := s.attacher().Attach(s.ctx(t, 0), ended.ID, driver.AttachOptions{}); !errors.Is(err, errdefs.ErrConflict) {
		if sess != nil {
			sess.Close()
		}
		t.Errorf("Attach to an exited task: %v, want ErrConflict", err)
	}
}

// waitOutputContains waits until the task's stdout log contains marker.
func (s *suite) waitOutputContains(t *testing.T, cfg *driver.TaskConfig, marker string) {
	t.Helper()
	deadline := time.Now().Add(s.h.Slack)
	for time.Now().Before(deadline) {
		if strings.Contains(ReadLog(t, cfg, driver.StdoutLog), marker) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("workload did not print %q within %v; stdout %q", marker, s.h.Slack, ReadLog(t, cfg, driver.StdoutLog))
}
