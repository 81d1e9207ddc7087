package ctrdriver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/supervisor/monitor"
)

// attachWait bounds each wait of these tests for output: a failure
// report, never a pass criterion.
const attachWait = 30 * time.Second

// attachTask starts a container with the given command, stdin and
// terminal.
func attachTask(t *testing.T, stdin, tty bool, args ...string) (*Driver, *driver.TaskConfig) {
	t.Helper()
	return startUserNSTask(t, "dta", func(cfg *driver.TaskConfig) { cfg.Stdin, cfg.TTY = stdin, tty }, args...)
}

func attach(t *testing.T, d *Driver, id string, opts driver.AttachOptions) driver.AttachSession {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), attachWait)
	defer cancel()
	s, err := d.Attach(ctx, id, opts)
	if err != nil {
		t.Fatalf("Attach %s %+v: %v", id, opts, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// collector reads a stream in the background.
type collector struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	err  error
	done chan struct{}
}

func collect(r io.Reader) *collector {
	c := &collector{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		b := make([]byte, 32<<10)
		for {
			n, err := r.Read(b)
			c.mu.Lock()
			c.buf.Write(b[:n])
			if err != nil {
				c.err = err
			}
			c.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return c
}

func (c *collector) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// waitFor waits until the output holds want n times.
func (c *collector) waitFor(t *testing.T, want string, n int) string {
	t.Helper()
	deadline := time.Now().Add(attachWait)
	for {
		out := c.String()
		if strings.Count(out, want) >= n {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("output never held %q %d times; it is %q", want, n, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// end waits for the stream's end and returns its error (io.EOF: a
// clean end).
func (c *collector) end(t *testing.T) error {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(attachWait):
		t.Fatalf("stream did not end; output %q", c.String())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func waitExit(t *testing.T, d *Driver, id string) *driver.ExitResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), attachWait)
	defer cancel()
	res, err := d.Wait(ctx, id)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	return res
}

func write(t *testing.T, w io.Writer, s string) {
	t.Helper()
	if _, err := io.WriteString(w, s); err != nil {
		t.Fatalf("write %q: %v", s, err)
	}
}

// A shell on a terminal: the attached client's input reaches it, its
// output comes back through the terminal (and lands in stdout.log), and
// its exit code is the task's.
func TestAttachTTYShell(t *testing.T) {
	d, cfg := attachTask(t, true, true, "sh")
	s := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true})
	if s.Stderr() != nil {
		t.Error("a terminal session has a Stderr")
	}
	out := collect(s.Stdout())
	// The quotes tell the shell's output from the terminal's echo of
	// the command line.
	write(t, s.Stdin(), "tty; echo he''llo; exit 7\n")
	out.waitFor(t, "hello", 1)
	if res := waitExit(t, d, cfg.ID); res.ExitCode != 7 {
		t.Errorf("exit code %d, want 7 (%+v)", res.ExitCode, res)
	}
	if err := out.end(t); err != io.EOF {
		t.Errorf("Stdout ended with %v, want EOF", err)
	}
	if got := out.String(); !strings.Contains(got, "/dev/pts/") {
		t.Errorf("tty says no terminal: %q", got)
	}
	log, err := os.ReadFile(filepath.Join(cfg.LogDir, "stdout.log"))
	if err != nil || !strings.Contains(string(log), "hello") || !strings.Contains(string(log), "/dev/pts/") {
		t.Errorf("stdout.log lacks the terminal's output: %q, %v", log, err)
	}
}

// Replay sends what the task printed before the attach, exactly once,
// followed by the live output; closing stdin on a terminal is its end
// of file (cat ends).
func TestAttachReplayAndStdinEOFOnTerminal(t *testing.T) {
	d, cfg := attachTask(t, true, true, "sh", "-c", "echo before-attach; exec cat")
	waitLog(t, cfg, "before-attach")
	s := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
	out := collect(s.Stdout())
	write(t, s.Stdin(), "live-line\n")
	// The terminal echoes the line, and cat prints it again.
	got := out.waitFor(t, "live-line", 2)
	if n := strings.Count(got, "before-attach"); n != 1 {
		t.Errorf("the replay holds the earlier output %d times, want once: %q", n, got)
	}
	if i, j := strings.Index(got, "before-attach"), strings.Index(got, "live-line"); i > j {
		t.Errorf("replay after live output: %q", got)
	}
	if err := s.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	if res := waitExit(t, d, cfg.ID); res.ExitCode != 0 {
		t.Errorf("cat ended with %+v after stdin's end, want exit 0", res)
	}
	if err := out.end(t); err != io.EOF {
		t.Errorf("Stdout ended with %v, want EOF", err)
	}
}

// Without a terminal, stdin is a pipe: closing it is the process's end
// of file; stdout and stderr come apart; replay carries both.
func TestAttachStdinPipe(t *testing.T) {
	d, cfg := attachTask(t, true, false, "sh", "-c", "echo early-out; echo early-err >&2; cat; echo cat-ended")
	waitLog(t, cfg, "early-out")
	s := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
	if s.Stderr() == nil {
		t.Fatal("a session without a terminal has no Stderr")
	}
	out, errs := collect(s.Stdout()), collect(s.Stderr())
	errs.waitFor(t, "early-err", 1)
	write(t, s.Stdin(), "piped")
	out.waitFor(t, "piped", 1)
	if err := s.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	if res := waitExit(t, d, cfg.ID); res.ExitCode != 0 {
		t.Errorf("exit %+v, want 0", res)
	}
	if err := out.end(t); err != io.EOF {
		t.Errorf("Stdout ended with %v, want EOF", err)
	}
	if err := errs.end(t); err != io.EOF {
		t.Errorf("Stderr ended with %v, want EOF", err)
	}
	if got, want := out.String(), "early-out\npipedcat-ended\n"; got != want {
		t.Errorf("stdout %q, want %q", got, want)
	}
	if got := errs.String(); got != "early-err\n" {
		t.Errorf("stderr %q, want the early line once", got)
	}
}

// waitLog waits until the task's stdout.log holds want.
func waitLog(t *testing.T, cfg *driver.TaskConfig, want string) {
	t.Helper()
	deadline := time.Now().Add(attachWait)
	for {
		data, _ := os.ReadFile(filepath.Join(cfg.LogDir, "stdout.log"))
		if strings.Contains(string(data), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stdout.log never held %q: %q", want, data)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Two sessions at once both see the output; one that detaches leaves the
// task running (its stdin open), and a later attach works.
func TestAttachSessionsComeAndGo(t *testing.T) {
	d, cfg := attachTask(t, true, false, "sh", "-c", `while read l; do echo "got:$l"; done; echo bye`)
	a := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true})
	b := attach(t, d, cfg.ID, driver.AttachOptions{})
	if b.Stdin() != nil {
		t.Error("a session without Stdin has a Stdin")
	}
	aOut, bOut := collect(a.Stdout()), collect(b.Stdout())
	write(t, a.Stdin(), "one\n")
	aOut.waitFor(t, "got:one", 1)
	bOut.waitFor(t, "got:one", 1)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := aOut.end(t); err != io.EOF {
		t.Errorf("a closed session's Stdout ended with %v, want EOF", err)
	}
	if st, err := d.Inspect(context.Background(), cfg.ID); err != nil || st.State != driver.TaskRunning {
		t.Fatalf("after a detach the task is %+v, %v", st, err)
	}
	c := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true})
	cOut := collect(c.Stdout())
	write(t, c.Stdin(), "two\n")
	cOut.waitFor(t, "got:two", 1)
	bOut.waitFor(t, "got:two", 1)
	if err := c.Stdin().Close(); err != nil {
		t.Fatal(err)
	}
	if res := waitExit(t, d, cfg.ID); res.ExitCode != 0 {
		t.Errorf("exit %+v", res)
	}
	for _, o := range []*collector{bOut, cOut} {
		if err := o.end(t); err != io.EOF {
			t.Errorf("Stdout ended with %v, want EOF", err)
		}
		if !strings.HasSuffix(o.String(), "bye\n") {
			t.Errorf("output %q lacks the last line", o.String())
		}
	}
	if got := bOut.String(); got != "got:one\ngot:two\nbye\n" {
		t.Errorf("the session attached throughout saw %q", got)
	}
}

// A client that never reads is dropped (ErrAttachSlow); the task writes
// its megabytes and ends as if nobody were attached, and the log has
// every byte.
func TestAttachStalledClientDoesNotBlockTask(t *testing.T) {
	const size = 8 << 20
	d, cfg := attachTask(t, true, false, "sh", "-c", "read go; head -c 8388608 /dev/zero | tr '\\0' a; echo END")
	stalled := attach(t, d, cfg.ID, driver.AttachOptions{})
	trigger := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true})
	write(t, trigger.Stdin(), "go\n")
	trigger.Close()
	if res := waitExit(t, d, cfg.ID); res.ExitCode != 0 {
		t.Fatalf("exit %+v", res)
	}
	log, err := os.ReadFile(filepath.Join(cfg.LogDir, "stdout.log"))
	if err != nil {
		t.Fatal(err)
	}
	if len(log) != size+len("END\n") || strings.Count(string(log), "a") != size || !strings.HasSuffix(string(log), "END\n") {
		t.Errorf("stdout.log has %d bytes, want %d a's and END", len(log), size)
	}
	n, err := io.Copy(io.Discard, stalled.Stdout())
	if !errors.Is(err, driver.ErrAttachSlow) {
		t.Errorf("the stalled session's Stdout ended with %v after %d bytes, want ErrAttachSlow", err, n)
	}
	if n >= size {
		t.Errorf("the stalled session got all %d bytes: it was never behind", n)
	}
}

// Resize, and the size given on attach, change the terminal's size as
// the workload sees it.
func TestAttachResize(t *testing.T) {
	d, cfg := attachTask(t, true, true, "sh")
	s := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true, Size: &driver.TermSize{Rows: 30, Cols: 100}})
	out := collect(s.Stdout())
	write(t, s.Stdin(), "stty size\n")
	out.waitFor(t, "30 100", 1)
	if err := s.Resize(driver.TermSize{Rows: 50, Cols: 132}); err != nil {
		t.Fatal(err)
	}
	write(t, s.Stdin(), "stty size\n")
	out.waitFor(t, "50 132", 1)
	write(t, s.Stdin(), "exit 0\n")
	waitExit(t, d, cfg.ID)
}

// A task started before the agent restarted is attached through the
// recovered driver: its monitor held the terminal all along.
func TestAttachAfterRecover(t *testing.T) {
	d, cfg := attachTask(t, true, true, "sh")
	first := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true})
	write(t, first.Stdin(), "echo before-re''start\n")
	collect(first.Stdout()).waitFor(t, "before-restart", 1)
	d2 := newUserNSDriver(t, d.opts.Root, Options{})
	if err := d2.Recover(context.Background(), &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	s := attach(t, d2, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
	out := collect(s.Stdout())
	out.waitFor(t, "before-restart", 1)
	write(t, s.Stdin(), "echo after-re''start; exit 3\n")
	out.waitFor(t, "after-restart", 1)
	if res := waitExit(t, d2, cfg.ID); res.ExitCode != 3 {
		t.Errorf("exit %+v, want 3", res)
	}
}

// Attach says clearly what it cannot do: an unknown task, stdin a task
// does not have, a task that ended, a monitor from before attach.
func TestAttachRefusals(t *testing.T) {
	d, cfg := attachTask(t, false, false, "sh", "-c", "sleep 600")
	ctx := context.Background()
	if _, err := d.Attach(ctx, "dta-unknown", driver.AttachOptions{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown task: %v, want ErrNotFound", err)
	}
	if _, err := d.Attach(ctx, cfg.ID, driver.AttachOptions{Stdin: true}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("stdin of a task without: %v, want ErrInvalidArgument", err)
	}
	// A monitor of protocol 2 serves no socket; a new agent recovers it.
	dir := d.taskDir(cfg.ID)
	var rec monitor.PidRecord
	if err := fileutil.ReadJSON(filepath.Join(dir, monitor.PidFile), &rec); err != nil {
		t.Fatal(err)
	}
	rec.Version = 2
	if err := fileutil.ReplaceJSON(filepath.Join(dir, monitor.PidFile), rec); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, monitor.AttachSocket)); err != nil {
		t.Fatal(err)
	}
	d2 := newUserNSDriver(t, d.opts.Root, Options{})
	if err := d2.Recover(ctx, &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	_, err := d2.Attach(ctx, cfg.ID, driver.AttachOptions{})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "protocol 2") {
		t.Errorf("a protocol 2 monitor: %v, want ErrFailedPrecondition naming the protocol", err)
	}
	if err := d2.Stop(ctx, cfg.ID, time.Second); err != nil {
		t.Fatal(err)
	}
	waitExit(t, d2, cfg.ID)
	if _, err := d2.Attach(ctx, cfg.ID, driver.AttachOptions{}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("an ended task: %v, want ErrConflict", err)
	}
}

// 50 attach/detach cycles leave the agent's side no descriptor or
// goroutine more.
func TestAttachLeaksNothing(t *testing.T) {
	d, cfg := attachTask(t, true, true, "sh")
	cycle := func() {
		s := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true, Replay: true})
		out := collect(s.Stdout())
		write(t, s.Stdin(), "echo cyc''le\n")
		out.waitFor(t, "cycle", 1)
		s.Close()
		out.end(t)
	}
	cycle() // lazily made things (the dialer's, the poller's) exist now
	tk, err := d.sup.Get(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	monFds := fmt.Sprintf("/proc/%d/fd", tk.Monitor().Pid)
	fds, goroutines, mfds := countFds(t, "/proc/self/fd"), runtime.NumGoroutine(), countFds(t, monFds)
	for range 50 {
		cycle()
	}
	deadline := time.Now().Add(attachWait)
	for {
		nf, ng, nm := countFds(t, "/proc/self/fd"), runtime.NumGoroutine(), countFds(t, monFds)
		if nf <= fds && ng <= goroutines && nm <= mfds {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 50 attach cycles: %d fds (was %d), %d goroutines (was %d); the monitor %d fds (was %d)", nf, fds, ng, goroutines, nm, mfds)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st, err := d.Inspect(context.Background(), cfg.ID); err != nil || st.State != driver.TaskRunning {
		t.Errorf("after the cycles the task is %+v, %v", st, err)
	}
}

func countFds(t *testing.T, dir string) int {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// A monitor killed under an attached session ends the session with an
// error, not a hang and not a clean end of file; the task is reported
// ended and nothing of it is left.
func TestAttachMonitorKilled(t *testing.T) {
	d, cfg := attachTask(t, true, true, "sh")
	s := attach(t, d, cfg.ID, driver.AttachOptions{Stdin: true})
	out := collect(s.Stdout())
	write(t, s.Stdin(), "echo up''and''running\n")
	out.waitFor(t, "upandrunning", 1)
	tk, err := d.sup.Get(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(tk.Monitor().Pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := out.end(t); err == nil || err == io.EOF {
		t.Errorf("Stdout ended with %v after the monitor was killed, want an error", err)
	}
	if res := waitExit(t, d, cfg.ID); res.Err == "" {
		t.Errorf("exit %+v: want the monitor's death reported", res)
	}
	if _, err := d.Attach(context.Background(), cfg.ID, driver.AttachOptions{}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("attach after the end: %v, want ErrConflict", err)
	}
}

// A terminal's output rotates in stdout.log like any output: nothing of
// it is lost to the rotation, and stderr.log stays empty.
func TestAttachTerminalOutputRotates(t *testing.T) {
	d, cfg := startUserNSTask(t, "dta", func(cfg *driver.TaskConfig) {
		cfg.TTY = true
		cfg.Logs = driver.LogLimits{MaxBytes: 16 << 10, MaxFiles: 3}
	}, "sh", "-c", "i=0; while [ $i -lt 1500 ]; do echo line-$i-0123456789012345678901234567890123456789; i=$((i+1)); done")
	if res := waitExit(t, d, cfg.ID); res.ExitCode != 0 {
		t.Fatalf("exit %+v", res)
	}
	var all string
	for _, name := range []string{"stdout.log.3", "stdout.log.2", "stdout.log.1", "stdout.log"} {
		data, err := os.ReadFile(filepath.Join(cfg.LogDir, name))
		if err != nil {
			t.Fatalf("%s: %v (the terminal's ~80 KB should have rotated it)", name, err)
		}
		if len(data) > 16<<10 {
			t.Errorf("%s has %d bytes, over the 16 KiB limit", name, len(data))
		}
		all += string(data)
	}
	// The newest lines are all there, in order (the oldest file may have
	// gone with a fourth rotation).
	for i := 1000; i < 1500; i++ {
		line := fmt.Sprintf("line-%d-0123456789012345678901234567890123456789\r\n", i)
		if !strings.Contains(all, line) {
			t.Fatalf("the rotated logs lack %q", line)
		}
	}
	if data, _ := os.ReadFile(filepath.Join(cfg.LogDir, "stderr.log")); len(data) != 0 {
		t.Errorf("stderr.log of a terminal task: %q", data)
	}
}
