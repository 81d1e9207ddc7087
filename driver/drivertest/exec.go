package drivertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// runExec runs the exec and signal cases when the driver implements
// driver.Execer and driver.Signaler; Run calls it.
func (s *suite) runExec(t *testing.T) {
	if _, ok := s.d.(driver.Execer); ok {
		t.Run("ExecOutputAndExitCode", s.execOutput)
		t.Run("ExecEnvWorkdirUser", s.execEnvWorkdirUser)
		t.Run("ExecStdin", s.execStdin)
		t.Run("ExecTTY", s.execTTY)
		t.Run("ExecSignal", s.execSignal)
		t.Run("ExecCloseKillsAll", s.execClose)
		t.Run("ExecNotRunning", s.execNotRunning)
		t.Run("ExecUnknownTask", s.execUnknown)
		t.Run("ExecBadWorkdirOrUser", s.execBadInput)
		t.Run("ExecConcurrent", s.execConcurrent)
	}
	if _, ok := s.d.(driver.Signaler); ok {
		t.Run("SignalMainProcess", s.signalMain)
		t.Run("SignalNotRunning", s.signalNotRunning)
	}
}

// RunExec runs only the exec and signal cases (the driver must implement
// driver.Execer; the signal cases run when it implements driver.Signaler).
func RunExec(t *testing.T, h Harness) {
	h = h.defaults()
	d := h.New(t)
	if _, ok := d.(driver.Execer); !ok {
		t.Fatalf("driver %s does not implement driver.Execer", d.Name())
	}
	s := &suite{h: h, d: d}
	s.runExec(t)
}

func (s *suite) execer() driver.Execer { return s.d.(driver.Execer) }

// running starts a task that runs until destroyed and waits until it runs.
func (s *suite) running(t *testing.T) *driver.TaskConfig {
	t.Helper()
	cfg := s.task(t, "sh", "-c", "echo ready; while true; do sleep 1; done")
	cfg.Env = append(cfg.Env, "TASK_VAR=from-task")
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	return cfg
}

// exec starts a session and closes it when the test ends.
func (s *suite) exec(t *testing.T, id string, cfg *driver.ExecConfig) driver.ExecSession {
	t.Helper()
	sess, err := s.execer().Exec(s.ctx(t, 0), id, cfg)
	if err != nil {
		t.Fatalf("Exec(%v): %v", cfg.Args, err)
	}
	t.Cleanup(func() {
		if err := sess.Close(); err != nil {
			t.Errorf("Close of the session: %v", err)
		}
	})
	return sess
}

// ExecResult is an exec session's output and end.
type ExecResult struct {
	Stdout, Stderr string
	Exit           *driver.ExitResult
}

// Collect reads a session's output to the end and waits for the process,
// within timeout.
func Collect(ctx context.Context, sess driver.ExecSession) (*ExecResult, error) {
	var outBuf, errBuf bytes.Buffer
	var wg sync.WaitGroup
	copyTo := func(dst *bytes.Buffer, r io.Reader) {
		if r != nil {
			wg.Go(func() { _, _ = io.Copy(dst, r) })
		}
	}
	copyTo(&outBuf, sess.Stdout())
	copyTo(&errBuf, sess.Stderr())
	res, err := sess.Wait(ctx)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("output did not end after the process exited: %w", ctx.Err())
	}
	return &ExecResult{Stdout: outBuf.String(), Stderr: errBuf.String(), Exit: res}, nil
}

func (s *suite) collect(t *testing.T, sess driver.ExecSession) *ExecResult {
	t.Helper()
	res, err := Collect(s.ctx(t, 0), sess)
	if err != nil {
		t.Fatalf("exec session: %v", err)
	}
	return res
}

func (s *suite) execOutput(t *testing.T) {
	cfg := s.running(t)
	sess := s.exec(t, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "echo out; echo err >&2; exit 7"}})
	if sess.Stdin() != nil {
		t.Errorf("Stdin() is not nil without ExecConfig.Stdin")
	}
	res := s.collect(t, sess)
	if res.Exit.ExitCode != 7 || res.Exit.Signal != 0 {
		t.Errorf("exit = %+v, want code 7", res.Exit)
	}
	if res.Stdout != "out\n" || res.Stderr != "err\n" {
		t.Errorf("stdout %q stderr %q, want %q and %q", res.Stdout, res.Stderr, "out\n", "err\n")
	}
	// The session ended; the task did not.
	st, err := s.d.Inspect(s.ctx(t, 0), cfg.ID)
	if err != nil || st.State != driver.TaskRunning {
		t.Errorf("task after the exec ended: %+v, %v; want it running", st, err)
	}
}

func (s *suite) execEnvWorkdirUser(t *testing.T) {
	cfg := s.running(t)
	sess := s.exec(t, cfg.ID, &driver.ExecConfig{
		Args:    []string{"sh", "-c", `echo "$TASK_VAR $EXEC_VAR"; pwd; id -u; id -g`},
		Env:     []string{"EXEC_VAR=from-exec"},
		Workdir: "/tmp",
		User:    "1234:2345",
	})
	res := s.collect(t, sess)
	if res.Exit.ExitCode != 0 {
		t.Fatalf("exit = %+v; stderr %q", res.Exit, res.Stderr)
	}
	if want := "from-task from-exec\n/tmp\n1234\n2345\n"; res.Stdout != want {
		t.Errorf("stdout = %q, want %q (task env kept, exec env added, workdir and user applied)", res.Stdout, want)
	}
	// The task's own user and workdir when none is given.
	sess = s.exec(t, cfg.ID, &driver.ExecConfig{Args: []string{"id", "-u"}})
	if res := s.collect(t, sess); res.Stdout != "0\n" {
		t.Errorf("id -u with the task's user = %q, want 0", res.Stdout)
	}
}

func (s *suite) execStdin(t *testing.T) {
	cfg := s.running(t)
	sess := s.exec(t, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "cat; echo done"}, Stdin: true})
	in := sess.Stdin()
	if in == nil {
		t.Fatal("Stdin() is nil with ExecConfig.Stdin")
	}
	go func() {
		_, _ = io.WriteString(in, "line one\n")
		_, _ = io.WriteString(in, "line two\n")
		_ = in.Close()
	}()
	res := s.collect(t, sess)
	if res.Exit.ExitCode != 0 || res.Stdout != "line one\nline two\ndone\n" {
		t.Errorf("exit %+v stdout %q, want stdin echoed to its end, then done", res.Exit, res.Stdout)
	}
}

// readUntil reads r until what was read contains want.
func (s *suite) readUntil(t *testing.T, r io.Reader, seen *bytes.Buffer, want string) {
	t.Helper()
	deadline := time.Now().Add(s.h.Slack)
	buf := make([]byte, 4096)
	for !strings.Contains(seen.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("output %q never contained %q", seen.String(), want)
		}
		n, err := r.Read(buf)
		seen.Write(buf[:n])
		if err != nil {
			if !strings.Contains(seen.String(), want) {
				t.Fatalf("output ended (%v) before %q; got %q", err, want, seen.String())
			}
			return
		}
	}
}

// readerWithDeadline makes reads from the session's stdout fail the test
// instead of hanging when a driver never answers.
func (s *suite) pump(t *testing.T, r io.Reader) io.Reader {
	pr, pw := io.Pipe()
	go func() {
		_, err := io.Copy(pw, r)
		pw.CloseWithError(err)
	}()
	t.Cleanup(func() { pr.Close() })
	return pr
}

func (s *suite) execTTY(t *testing.T) {
	cfg := s.running(t)
	sess := s.exec(t, cfg.ID, &driver.ExecConfig{
		// The size is read after a first line of input: a runtime may
		// size the terminal only once the process runs (runc 1.1 does),
		// but before anyone can type into it.
		Args:  []string{"sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; read x; stty size; read x; stty size; echo err-through-tty >&2; exit 3"},
		Stdin: true, TTY: true,
		Size: driver.TermSize{Rows: 31, Cols: 101},
	})
	if sess.Stderr() != nil {
		t.Errorf("Stderr() is not nil with a terminal")
	}
	out := s.pump(t, sess.Stdout())
	var seen bytes.Buffer
	s.readUntil(t, out, &seen, "is-a-tty")
	if _, err := io.WriteString(sess.Stdin(), "first\n"); err != nil {
		t.Fatalf("write to the terminal: %v", err)
	}
	s.readUntil(t, out, &seen, "31 101")
	if err := sess.Resize(driver.TermSize{Rows: 42, Cols: 123}); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	if _, err := io.WriteString(sess.Stdin(), "go\n"); err != nil {
		t.Fatalf("write to the terminal: %v", err)
	}
	s.readUntil(t, out, &seen, "42 123")
	s.readUntil(t, out, &seen, "err-through-tty")
	rest, _ := io.ReadAll(out)
	seen.Write(rest)
	res, err := sess.Wait(s.ctx(t, 0))
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if res.ExitCode != 3 {
		t.Errorf("exit = %+v, want 3", res)
	}
	// A terminal echoes what was typed and turns \n into \r\n.
	if !strings.Contains(seen.String(), "go\r\n") {
		t.Errorf("terminal output %q has no echo of the input", seen.String())
	}
}

func (s *suite) execSignal(t *testing.T) {
	cfg := s.running(t)
	sess := s.exec(t, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", `trap 'echo got-hup; exit 5' HUP; echo ready; while true; do sleep 0.1; done`}})
	out := s.pump(t, sess.Stdout())
	var seen bytes.Buffer
	s.readUntil(t, out, &seen, "ready\n")
	if err := sess.Signal(syscall.SIGHUP); err != nil {
		t.Fatalf("Signal(HUP): %v", err)
	}
	s.readUntil(t, out, &seen, "got-hup\n")
	res, err := sess.Wait(s.ctx(t, 0))
	if err != nil || res.ExitCode != 5 {
		t.Errorf("Wait after HUP = %+v, %v; want the trap's 5", res, err)
	}

	sess = s.exec(t, cfg.ID, &driver.ExecConfig{Args: []string{"sleep", "1000"}})
	if err := sess.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("Signal(KILL): %v", err)
	}
	res, err = sess.Wait(s.ctx(t, 0))
	if err != nil || res.ExitCode != 137 || res.Signal != int(syscall.SIGKILL) {
		t.Errorf("Wait after KILL = %+v, %v; want code 137 and signal 9", res, err)
	}
}

// psMarker lists the task's processes whose command line has marker, by an
// exec of its own.
func (s *suite) psMarker(t *testing.T, id, marker string) string {
	t.Helper()
	sess := s.exec(t, id, &driver.ExecConfig{Args: []string{"sh", "-c",
		`for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done`}})
	res := s.collect(t, sess)
	var found []string
	for _, line := range strings.Split(res.Stdout, "\n") {
		if strings.Contains(line, marker) {
			found = append(found, line)
		}
	}
	return strings.Join(found, "; ")
}

func (s *suite) execClose(t *testing.T) {
	cfg := s.running(t)
	for _, tty := range []bool{false, true} {
		t.Run(fmt.Sprintf("tty=%v", tty), func(t *testing.T) {
			marker := fmt.Sprintf("%d", 100000+rand.IntN(800000))
			sess, err := s.execer().Exec(s.ctx(t, 0), cfg.ID, &driver.ExecConfig{
				Args:  []string{"sh", "-c", "sleep " + marker + "1 & sleep " + marker + "2 & echo started; wait"},
				Stdin: tty, TTY: tty, Size: driver.TermSize{Rows: 24, Cols: 80},
			})
			if err != nil {
				t.Fatalf("Exec: %v", err)
			}
			var seen bytes.Buffer
			s.readUntil(t, s.pump(t, sess.Stdout()), &seen, "started")
			if got := s.psMarker(t, cfg.ID, "sleep "+marker); got == "" {
				t.Fatalf("the session's processes do not run before Close")
			}
			if err := sess.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if got := s.psMarker(t, cfg.ID, "sleep "+marker); got != "" {
				t.Errorf("processes left after Close: %s", got)
			}
			if err := sess.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
			res, err := sess.Wait(s.ctx(t, 0))
			if err != nil || res.ExitCode == 0 {
				t.Errorf("Wait after Close = %+v, %v; want the killed process's end", res, err)
			}
		})
	}
	st, err := s.d.Inspect(s.ctx(t, 0), cfg.ID)
	if err != nil || st.State != driver.TaskRunning {
		t.Errorf("task after Close of its sessions: %+v, %v; want it running", st, err)
	}
}

func (s *suite) execNotRunning(t *testing.T) {
	cfg := s.task(t, "true")
	s.start(t, s.d, cfg)
	s.wait(t, s.d, cfg.ID, 0)
	sess, err := s.execer().Exec(s.ctx(t, 0), cfg.ID, &driver.ExecConfig{Args: []string{"true"}})
	if !errors.Is(err, errdefs.ErrConflict) {
		if sess != nil {
			sess.Close()
		}
		t.Errorf("Exec into an exited task: %v, want ErrConflict", err)
	}
}

func (s *suite) execUnknown(t *testing.T) {
	sess, err := s.execer().Exec(s.ctx(t, 0), NewID("dt-missing"), &driver.ExecConfig{Args: []string{"true"}})
	if !errors.Is(err, errdefs.ErrNotFound) {
		if sess != nil {
			sess.Close()
		}
		t.Errorf("Exec into an unknown task: %v, want ErrNotFound", err)
	}
	if _, err := s.execer().Exec(s.ctx(t, 0), "../escape", &driver.ExecConfig{Args: []string{"true"}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Exec with an invalid id: %v, want ErrInvalidArgument", err)
	}
}

func (s *suite) execBadInput(t *testing.T) {
	cfg := s.running(t)
	for name, ec := range map[string]*driver.ExecConfig{
		"missing workdir":  {Args: []string{"true"}, Workdir: "/does/not/exist"},
		"relative workdir": {Args: []string{"true"}, Workdir: "tmp"},
		"user name":        {Args: []string{"true"}, User: "nobody"},
		"bad gid":          {Args: []string{"true"}, User: "1:x"},
		"no command":       {},
		"missing command":  {Args: []string{"/no/such/binary"}},
	} {
		sess, err := s.execer().Exec(s.ctx(t, 0), cfg.ID, ec)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			if sess != nil {
				sess.Close()
			}
			t.Errorf("%s: Exec = %v, want ErrInvalidArgument", name, err)
		}
	}
	// The task is untouched and still takes sessions.
	sess := s.exec(t, cfg.ID, &driver.ExecConfig{Args: []string{"true"}})
	if res := s.collect(t, sess); res.Exit.ExitCode != 0 {
		t.Errorf("exec after refused ones = %+v", res.Exit)
	}
}

func (s *suite) execConcurrent(t *testing.T) {
	cfg := s.running(t)
	n := s.h.Parallel
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			sess, err := s.execer().Exec(s.ctx(t, 0), cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", fmt.Sprintf("echo exec-%d; exit %d", i, i)}})
			if err != nil {
				errs[i] = err
				return
			}
			defer sess.Close()
			res, err := Collect(s.ctx(t, 0), sess)
			switch {
			case err != nil:
				errs[i] = err
			case res.Exit.ExitCode != i || res.Stdout != fmt.Sprintf("exec-%d\n", i):
				errs[i] = fmt.Errorf("exit %d stdout %q", res.Exit.ExitCode, res.Stdout)
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("session %d: %v", i, err)
		}
	}
}

func (s *suite) signaler() driver.Signaler { return s.d.(driver.Signaler) }

func (s *suite) signalMain(t *testing.T) {
	cfg := s.task(t, "sh", "-c", `trap 'echo got-hup; exit 9' HUP; echo ready; while true; do sleep 0.1; done`)
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	if err := s.signaler().Signal(s.ctx(t, 0), cfg.ID, syscall.SIGHUP); err != nil {
		t.Fatalf("Signal(HUP): %v", err)
	}
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 9 {
		t.Errorf("exit after HUP = %+v, want the trap's 9", res)
	}
	if got := ReadLog(t, cfg, driver.StdoutLog); got != "ready\ngot-hup\n" {
		t.Errorf("stdout = %q", got)
	}
}

func (s *suite) signalNotRunning(t *testing.T) {
	if err := s.signaler().Signal(s.ctx(t, 0), NewID("dt-missing"), syscall.SIGHUP); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Signal of an unknown task: %v, want ErrNotFound", err)
	}
	cfg := s.task(t, "true")
	s.start(t, s.d, cfg)
	s.wait(t, s.d, cfg.ID, 0)
	if err := s.signaler().Signal(s.ctx(t, 0), cfg.ID, syscall.SIGHUP); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("Signal of an exited task: %v, want ErrConflict", err)
	}
}
