package vmdriver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
)

func execCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	t.Cleanup(cancel)
	return ctx
}

// startRunning starts a VM that runs until destroyed.
func startRunning(t *testing.T, d *Driver) *driver.TaskConfig {
	t.Helper()
	cfg := newTask(t, "sh", "-c", "echo ready; while true; do sleep 1; done")
	cfg.Env = append(cfg.Env, "TASK_VAR=from-task")
	if _, err := d.Start(execCtx(t), cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), cfg.ID); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	})
	return cfg
}

func startExec(t *testing.T, d *Driver, id string, ec *driver.ExecConfig) driver.ExecSession {
	t.Helper()
	s, err := d.Exec(execCtx(t), id, ec)
	if err != nil {
		t.Fatalf("Exec(%q): %v", ec.Args, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func collect(t *testing.T, s driver.ExecSession) *drivertest.ExecResult {
	t.Helper()
	res, err := drivertest.Collect(execCtx(t), s)
	if err != nil {
		t.Fatalf("exec session: %v", err)
	}
	return res
}

func execOut(t *testing.T, d *Driver, id string, args ...string) *drivertest.ExecResult {
	t.Helper()
	s, err := d.Exec(execCtx(t), id, &driver.ExecConfig{Args: args})
	if err != nil {
		t.Fatalf("Exec(%q): %v", args, err)
	}
	defer s.Close()
	return collect(t, s)
}

// guestProcs lists the guest's processes whose command line contains
// marker, from an exec of its own.
func guestProcs(t *testing.T, d *Driver, id, marker string) string {
	t.Helper()
	res := execOut(t, d, id, "sh", "-c", `for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' < "$f" 2>/dev/null; echo; done`)
	var found []string
	for _, line := range strings.Split(res.Stdout, "\n") {
		if strings.Contains(line, marker) {
			found = append(found, line)
		}
	}
	return strings.Join(found, "; ")
}

// guestProcSet lists the guest's processes by pid with their command
// lines, leaving out what comes and goes by itself: kernel threads
// (kthreadd's children), the listing, and the workload's `sleep 1`.
func guestProcSet(t *testing.T, d *Driver, id string) map[string]string {
	t.Helper()
	res := execOut(t, d, id, "sh", "-c", `for p in /proc/[0-9]*; do read -r pid comm state ppid rest < "$p/stat" || continue; if [ "$ppid" = 2 ] || [ "$pid" = 2 ]; then continue; fi; printf '%s ' "$pid"; tr '\0' ' ' < "$p/cmdline" 2>/dev/null; echo; done`)
	procs := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(res.Stdout), "\n") {
		pid, cmd, _ := strings.Cut(line, " ")
		cmd = strings.TrimSpace(cmd)
		if cmd == "sleep 1" || strings.HasPrefix(cmd, "tr ") || strings.Contains(cmd, "/proc/[0-9]*") {
			continue
		}
		procs[pid] = cmd
	}
	return procs
}

// guestInitFDs counts berth-init's open files, as seen by an exec (whose
// own pipes count the same each time).
func guestInitFDs(t *testing.T, d *Driver, id string) int {
	t.Helper()
	res := execOut(t, d, id, "sh", "-c", "ls /proc/1/fd | wc -l")
	n, err := strconv.Atoi(strings.TrimSpace(res.Stdout))
	if err != nil {
		t.Fatalf("berth-init's open files %q: %v", res.Stdout, err)
	}
	return n
}

// hostFDs counts the test process's open files.
func hostFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

func readUntil(t *testing.T, r io.Reader, seen *bytes.Buffer, want string) {
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

func marker() string { return strconv.Itoa(100000 + rand.IntN(800000)) }

// TestExec runs the exec cases in one VM (each boot costs seconds under
// TCG).
func TestExec(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := startRunning(t, d)

	// The first exec comes while the guest still boots: the handshake
	// waits for berth-init.
	if res := execOut(t, d, cfg.ID, "echo", "early"); res.Stdout != "early\n" || res.Exit.ExitCode != 0 {
		t.Fatalf("exec during boot = %+v", res)
	}

	t.Run("ExitCodes", func(t *testing.T) {
		res := execOut(t, d, cfg.ID, "sh", "-c", "echo out; echo err >&2; exit 3")
		if res.Exit.ExitCode != 3 || res.Exit.Signal != 0 || res.Stdout != "out\n" || res.Stderr != "err\n" {
			t.Errorf("exit 3: %+v stdout %q stderr %q", res.Exit, res.Stdout, res.Stderr)
		}
		// Killed by TERM: 128+15 and the signal, as a container reports it.
		res = execOut(t, d, cfg.ID, "sh", "-c", "kill -TERM $$")
		if res.Exit.ExitCode != 143 || res.Exit.Signal != int(syscall.SIGTERM) {
			t.Errorf("killed by TERM: %+v, want 143 and signal 15", res.Exit)
		}
	})

	t.Run("EnvWorkdirUser", func(t *testing.T) {
		s := startExec(t, d, cfg.ID, &driver.ExecConfig{
			Args: []string{"sh", "-c", `echo "$TASK_VAR $EXEC_VAR"; pwd; id -u; id -g`},
			Env:  []string{"EXEC_VAR=from-exec"}, Workdir: "/tmp", User: "1234:2345",
		})
		if res := collect(t, s); res.Stdout != "from-task from-exec\n/tmp\n1234\n2345\n" {
			t.Errorf("stdout = %q (stderr %q)", res.Stdout, res.Stderr)
		}
		if res := execOut(t, d, cfg.ID, "id", "-u"); res.Stdout != "0\n" {
			t.Errorf("id -u as the task's user = %q", res.Stdout)
		}
	})

	t.Run("Stdin", func(t *testing.T) {
		s := startExec(t, d, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "wc -c; echo done"}, Stdin: true})
		const size = 3<<20 + 17 // past several windows
		go func() {
			_, _ = s.Stdin().Write(bytes.Repeat([]byte("x"), size))
			_ = s.Stdin().Close()
		}()
		if res := collect(t, s); res.Stdout != fmt.Sprintf("%d\ndone\n", size) || res.Exit.ExitCode != 0 {
			t.Errorf("wc -c of %d bytes of stdin: %+v %q", size, res.Exit, res.Stdout)
		}
	})

	t.Run("TTY", func(t *testing.T) {
		s := startExec(t, d, cfg.ID, &driver.ExecConfig{
			Args:  []string{"sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; stty size; read x; stty size; echo err-through-tty >&2; exit 3"},
			Stdin: true, TTY: true, Size: driver.TermSize{Rows: 31, Cols: 101},
		})
		if s.Stderr() != nil {
			t.Errorf("Stderr() is not nil with a terminal")
		}
		var seen bytes.Buffer
		readUntil(t, s.Stdout(), &seen, "31 101")
		if !strings.Contains(seen.String(), "is-a-tty") {
			t.Errorf("terminal output %q: not a terminal", seen.String())
		}
		if err := s.Resize(driver.TermSize{Rows: 42, Cols: 123}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(s.Stdin(), "go\n"); err != nil {
			t.Fatal(err)
		}
		readUntil(t, s.Stdout(), &seen, "err-through-tty")
		rest, _ := io.ReadAll(s.Stdout())
		seen.Write(rest)
		res, err := s.Wait(execCtx(t))
		if err != nil || res.ExitCode != 3 {
			t.Errorf("Wait = %+v, %v; want 3", res, err)
		}
		if out := seen.String(); !strings.Contains(out, "42 123") || !strings.Contains(out, "go\r\n") {
			t.Errorf("terminal output %q: want the new size and the echo of the input", out)
		}
	})

	t.Run("Signal", func(t *testing.T) {
		s := startExec(t, d, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", `trap 'echo got-hup; exit 5' HUP; echo ready; while true; do sleep 0.1; done`}})
		var seen bytes.Buffer
		readUntil(t, s.Stdout(), &seen, "ready\n")
		if err := s.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		readUntil(t, s.Stdout(), &seen, "got-hup\n")
		if res, err := s.Wait(execCtx(t)); err != nil || res.ExitCode != 5 {
			t.Errorf("after HUP: %+v, %v; want 5", res, err)
		}
		s = startExec(t, d, cfg.ID, &driver.ExecConfig{Args: []string{"sleep", "1000"}})
		if err := s.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if res, err := s.Wait(execCtx(t)); err != nil || res.ExitCode != 137 || res.Signal != 9 {
			t.Errorf("after KILL: %+v, %v; want 137 by signal 9", res, err)
		}
	})

	t.Run("BadInput", func(t *testing.T) {
		for name, ec := range map[string]*driver.ExecConfig{
			"missing workdir":     {Args: []string{"true"}, Workdir: "/does/not/exist"},
			"workdir a file":      {Args: []string{"true"}, Workdir: "/bin/busybox"},
			"relative workdir":    {Args: []string{"true"}, Workdir: "tmp"},
			"user name":           {Args: []string{"true"}, User: "nobody"},
			"bad gid":             {Args: []string{"true"}, User: "1:x"},
			"no command":          {},
			"missing command":     {Args: []string{"/no/such/binary"}},
			"command not in PATH": {Args: []string{"no-such-command"}},
		} {
			s, err := d.Exec(execCtx(t), cfg.ID, ec)
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				if s != nil {
					s.Close()
				}
				t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
			}
		}
		if res := execOut(t, d, cfg.ID, "true"); res.Exit.ExitCode != 0 {
			t.Errorf("exec after refusals: %+v", res.Exit)
		}
	})

	t.Run("CloseKillsAll", func(t *testing.T) {
		for _, tty := range []bool{false, true} {
			m := marker()
			s, err := d.Exec(execCtx(t), cfg.ID, &driver.ExecConfig{
				Args:  []string{"sh", "-c", "sleep " + m + "1 & sleep " + m + "2 & echo started; wait"},
				Stdin: tty, TTY: tty, Size: driver.TermSize{Rows: 24, Cols: 80},
			})
			if err != nil {
				t.Fatal(err)
			}
			var seen bytes.Buffer
			readUntil(t, s.Stdout(), &seen, "started")
			if guestProcs(t, d, cfg.ID, "sleep "+m) == "" {
				t.Fatalf("tty=%v: the session's processes do not run", tty)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if got := guestProcs(t, d, cfg.ID, "sleep "+m); got != "" {
				t.Errorf("tty=%v: left after Close: %s", tty, got)
			}
			if res, err := s.Wait(execCtx(t)); err != nil || res.ExitCode == 0 {
				t.Errorf("tty=%v: Wait after Close = %+v, %v", tty, res, err)
			}
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		before := guestProcSet(t, d, cfg.ID)
		initFDs := guestInitFDs(t, d, cfg.ID)
		t.Logf("berth-init has %d open files before the sessions", initFDs)
		goroutines, fds := runtime.NumGoroutine(), hostFDs(t)
		const n = 100
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				tty := i%3 == 0
				s, err := d.Exec(execCtx(t), cfg.ID, &driver.ExecConfig{
					Args: []string{"sh", "-c", fmt.Sprintf("echo exec-%d; exit %d", i, i)}, TTY: tty, Size: driver.TermSize{Rows: 24, Cols: 80},
				})
				if err != nil {
					t.Errorf("session %d: %v", i, err)
					return
				}
				defer s.Close()
				res, err := drivertest.Collect(execCtx(t), s)
				want := fmt.Sprintf("exec-%d\n", i)
				if tty {
					want = fmt.Sprintf("exec-%d\r\n", i)
				}
				if err != nil || res.Exit.ExitCode != i || res.Stdout != want {
					t.Errorf("session %d: %+v, %v", i, res, err)
				}
			})
		}
		wg.Wait()
		for pid, cmd := range guestProcSet(t, d, cfg.ID) {
			if _, ok := before[pid]; !ok {
				t.Errorf("left in the guest after %d sessions: pid %s %q", n, pid, cmd)
			}
		}
		d.execMu.Lock()
		ch := d.execChans[cfg.ID]
		d.execMu.Unlock()
		if left := ch.client.Sessions(); left != 0 {
			t.Errorf("%d sessions still registered on the host", left)
		}
		for deadline := time.Now().Add(10 * time.Second); runtime.NumGoroutine() > goroutines || hostFDs(t) > fds; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Errorf("after %d sessions ended the host has %d goroutines (%d before) and %d open files (%d before)",
					n, runtime.NumGoroutine(), goroutines, hostFDs(t), fds)
				break
			}
		}
		// berth-init releases a session's pipes or terminal after its end.
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			after := guestInitFDs(t, d, cfg.ID)
			if after <= initFDs {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("berth-init has %d open files after %d sessions ended, %d before", after, n, initFDs)
				break
			}
		}
	})

	// A session nobody reads holds back its own process only: the others
	// run, berth-init does not buffer its output, and every byte arrives
	// once it is read.
	t.Run("Backpressure", func(t *testing.T) {
		rss := func() int {
			res := execOut(t, d, cfg.ID, "sh", "-c", "grep VmRSS /proc/1/status | tr -dc 0-9")
			n, err := strconv.Atoi(res.Stdout)
			if err != nil {
				t.Fatalf("berth-init's RSS %q: %v", res.Stdout, err)
			}
			return n // KiB
		}
		before := rss()
		const total = 16 << 20
		slow := startExec(t, d, cfg.ID, &driver.ExecConfig{Args: []string{"head", "-c", strconv.Itoa(total), "/dev/zero"}})
		for i := range 5 {
			if res := execOut(t, d, cfg.ID, "echo", strconv.Itoa(i)); res.Stdout != fmt.Sprintf("%d\n", i) {
				t.Errorf("session next to a stalled one: %+v", res)
			}
		}
		if grown := rss() - before; grown > 4<<10 {
			t.Errorf("berth-init grew by %d KiB with %d MiB of output unread", grown, total>>20)
		}
		n, err := io.Copy(io.Discard, slow.Stdout())
		if err != nil || n != total {
			t.Errorf("read %d bytes (%v), want %d", n, err, total)
		}
		if res, err := slow.Wait(execCtx(t)); err != nil || res.ExitCode != 0 {
			t.Errorf("the stalled session's end: %+v, %v", res, err)
		}
	})

	// The driver's connection going away (what the agent's death does to
	// it) kills the sessions it carried; the next exec reconnects.
	t.Run("ClientGone", func(t *testing.T) {
		m := marker()
		s, err := d.Exec(execCtx(t), cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "echo started; exec sleep " + m}})
		if err != nil {
			t.Fatal(err)
		}
		var seen bytes.Buffer
		readUntil(t, s.Stdout(), &seen, "started")
		d.closeExec()
		if _, err := s.Wait(execCtx(t)); err == nil {
			t.Errorf("Wait on a session whose channel closed returned no error")
		}
		s.Close()
		// berth-init notices the host left within moments; poll a little.
		deadline := time.Now().Add(30 * time.Second)
		for guestProcs(t, d, cfg.ID, "sleep "+m) != "" {
			if time.Now().After(deadline) {
				t.Fatalf("the session's process survives its channel")
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("OlderVM", func(t *testing.T) {
		// A VM started by an older berth has no exec port: no socket.
		sock := filepath.Join(d.taskDir(cfg.ID), execSocket)
		if err := os.Rename(sock, sock+".hidden"); err != nil {
			t.Fatal(err)
		}
		defer os.Rename(sock+".hidden", sock)
		d.closeExec()
		_, err := d.Exec(execCtx(t), cfg.ID, &driver.ExecConfig{Args: []string{"true"}})
		if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "older berth") {
			t.Errorf("Exec into a VM without the port: %v, want ErrConflict naming the older berth", err)
		}
		if err := d.Signal(execCtx(t), cfg.ID, syscall.SIGHUP); !errors.Is(err, errdefs.ErrConflict) {
			t.Errorf("Signal of a VM without the port: %v, want ErrConflict", err)
		}
	})
}

func TestExecSignalMain(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", `trap 'echo got-hup; exit 9' HUP; echo ready; while true; do sleep 0.1; done`)
	if _, err := d.Start(execCtx(t), cfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Destroy(context.Background(), cfg.ID) })
	waitLog(t, cfg, driver.StdoutLog, "ready\n", slack)
	// A session open when the workload ends ends with it.
	open := startExec(t, d, cfg.ID, &driver.ExecConfig{Args: []string{"sleep", "1000"}})
	if err := d.Signal(execCtx(t), cfg.ID, syscall.SIGHUP); err != nil {
		t.Fatalf("Signal(HUP): %v", err)
	}
	res, err := d.Wait(execCtx(t), cfg.ID)
	if err != nil || res.ExitCode != 9 {
		t.Errorf("exit after HUP = %+v, %v; want the trap's 9", res, err)
	}
	// berth-init kills what is left when the workload ends, reports it and
	// powers off; either the kill or the closed channel ends the session.
	if sres, err := open.Wait(execCtx(t)); err == nil && sres.ExitCode != 137 {
		t.Errorf("session open when the workload ended: %+v, want killed (137) or an error", sres)
	} else {
		t.Logf("session open when the workload ended: %+v, %v", sres, err)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "ready\ngot-hup\n" {
		t.Errorf("stdout = %q", got)
	}
	// The task has ended: exec and signal are conflicts.
	if _, err := d.Exec(execCtx(t), cfg.ID, &driver.ExecConfig{Args: []string{"true"}}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("Exec into an exited VM: %v, want ErrConflict", err)
	}
	if err := d.Signal(execCtx(t), cfg.ID, syscall.SIGHUP); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("Signal of an exited VM: %v, want ErrConflict", err)
	}
	if _, err := d.Exec(execCtx(t), drivertest.NewID("dt-missing"), &driver.ExecConfig{Args: []string{"true"}}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Exec into an unknown task: %v, want ErrNotFound", err)
	}
	if err := d.Signal(execCtx(t), drivertest.NewID("dt-missing"), syscall.SIGHUP); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Signal of an unknown task: %v, want ErrNotFound", err)
	}
}

// Environment of the agent stand-in TestExecAgentKilled starts.
const (
	helperEnvRoot    = "BERTH_TEST_EXEC_AGENT_ROOT"
	helperEnvTask    = "BERTH_TEST_EXEC_AGENT_TASK"
	helperEnvMarker  = "BERTH_TEST_EXEC_AGENT_MARKER"
	helperEnvMonitor = "BERTH_TEST_EXEC_AGENT_MONITOR"
	helperEnvPrefix  = "BERTH_TEST_EXEC_AGENT_PREFIX"
	// helperEnvAttach: attach to the task's terminal and type the
	// marker, instead of starting an exec session.
	helperEnvAttach = "BERTH_TEST_EXEC_AGENT_ATTACH"
)

// TestExecAgentHelper is not a test: run by TestExecAgentKilled in a
// process of its own, it is an agent that recovers the task, starts an
// exec session and then is SIGKILLed.
func TestExecAgentHelper(t *testing.T) {
	root := os.Getenv(helperEnvRoot)
	if root == "" {
		t.Skip("the agent stand-in of TestExecAgentKilled; runs only when that test starts it")
	}
	d, err := New(Options{Root: root, Accel: AccelTCG, DomainPrefix: os.Getenv(helperEnvPrefix),
		InitPath: "/nonexistent", MonitorCmd: []string{os.Getenv(helperEnvMonitor)}})
	if err != nil {
		t.Fatal(err)
	}
	id := os.Getenv(helperEnvTask)
	if err := d.Recover(context.Background(), &driver.Handle{ID: id, Driver: Name, Version: handleVersion}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if os.Getenv(helperEnvAttach) != "" {
		a, err := d.Attach(context.Background(), id, driver.AttachOptions{Stdin: true})
		if err != nil {
			t.Fatalf("Attach: %v", err)
		}
		// The quotes tell the output from the terminal's echo.
		if _, err := io.WriteString(a.Stdin(), "echo typed-'"+os.Getenv(helperEnvMarker)+"'\n"); err != nil {
			t.Fatalf("type: %v", err)
		}
		var seen bytes.Buffer
		readUntil(t, a.Stdout(), &seen, "typed-"+os.Getenv(helperEnvMarker)+"\r\n")
		fmt.Println("helper: session started")
		select {} // until killed
	}
	s, err := d.Exec(context.Background(), id, &driver.ExecConfig{
		Args: []string{"sh", "-c", "echo started; exec sleep " + os.Getenv(helperEnvMarker)}, TTY: true, Stdin: true,
	})
	if err != nil {
		t.Fatalf("Exec: %v", err)
	}
	var seen bytes.Buffer
	readUntil(t, s.Stdout(), &seen, "started")
	fmt.Println("helper: session started")
	select {} // until killed
}

// killedAgent runs TestExecAgentHelper as an agent of its own (env says
// what it does) for task id, and SIGKILLs it once its session started.
func killedAgent(t *testing.T, d *Driver, id string, env ...string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestExecAgentHelper$", "-test.v")
	cmd.Env = append(append(os.Environ(),
		helperEnvRoot+"="+fixtures.root, helperEnvTask+"="+id,
		helperEnvMonitor+"="+d.opts.MonitorCmd[0], helperEnvPrefix+"="+testPrefix), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var seen bytes.Buffer
	readUntil(t, out, &seen, "helper: session started")
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
}

// An agent SIGKILLed with an exec session open: the guest kills the
// session's processes, and a restarted agent (a new driver, Recover)
// reconnects and execs as before.
func TestExecAgentKilled(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := startRunning(t, d)
	waitLog(t, cfg, driver.StdoutLog, "ready\n", slack)

	m := marker()
	killedAgent(t, d, cfg.ID, helperEnvMarker+"="+m)

	// The restarted agent.
	d2 := newDriver(t, fixtures.root)
	if err := d2.Recover(execCtx(t), &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for guestProcs(t, d2, cfg.ID, "sleep "+m) != "" {
		if time.Now().After(deadline) {
			t.Fatalf("the session of the killed agent still runs in the guest")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if res := execOut(t, d2, cfg.ID, "echo", "after-restart"); res.Stdout != "after-restart\n" {
		t.Errorf("exec after the restart = %+v", res)
	}
	if err := d2.Signal(execCtx(t), cfg.ID, syscall.SIGKILL); err != nil {
		t.Errorf("Signal after the restart: %v", err)
	}
	if res, err := d2.Wait(execCtx(t), cfg.ID); err != nil || res.ExitCode != 137 {
		t.Errorf("workload killed through the restarted agent: %+v, %v", res, err)
	}
}
