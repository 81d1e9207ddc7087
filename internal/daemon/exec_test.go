package daemon_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/exectest"
	"github.com/berthd/berth/internal/proc"
)

// cgroupProcs lists the live processes of a container workload's cgroup
// whose command line holds marker.
func cgroupProcs(t *testing.T, id, marker string) []string {
	t.Helper()
	data, err := os.ReadFile("/sys/fs/cgroup/pids/berth/" + id + "/cgroup.procs")
	if err != nil {
		t.Fatalf("the container's cgroup: %v", err)
	}
	var found []string
	for _, f := range strings.Fields(string(data)) {
		pid, _ := strconv.Atoi(f)
		info, err := proc.ReadInfo(pid)
		raw, _ := os.ReadFile("/proc/" + f + "/cmdline")
		cmdline := strings.ReplaceAll(string(raw), "\x00", " ")
		if err == nil && info.State != 'Z' && strings.Contains(cmdline, marker) {
			found = append(found, cmdline)
		}
	}
	return found
}

func waitNoProcs(t *testing.T, id, marker string) {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if left = cgroupProcs(t, id, marker); len(left) == 0 {
			return
		}
	}
	t.Errorf("processes left in the container: %q", left)
}

func TestExecContainer(t *testing.T) {
	c, _ := startAgent(t)
	ctx := context.Background()
	w, err := c.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"sleep", "600"}, Isolation: api.IsolationContainer, Resources: api.Resources{Pids: 512}})
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, w.ID)

	t.Run("OutputAndExitCode", func(t *testing.T) {
		res, err := c.Exec(ctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "echo out; echo err >&2; id -u; exit 3"}, User: "nobody", Workdir: "/tmp"})
		if err != nil || res.ExitCode != 3 || res.Stdout != "out\n65534\n" || res.Stderr != "err\n" {
			t.Errorf("exec = %+v %v", res, err)
		}
	})
	t.Run("BadUserAndWorkdir", func(t *testing.T) {
		for _, req := range []api.ExecRequest{
			{Command: []string{"true"}, User: "nosuchuser"},
			{Command: []string{"true"}, Workdir: "/does/not/exist"},
			{Command: []string{"/no/such/binary"}},
		} {
			if _, err := c.Exec(ctx, w.ID, req); !client.IsReason(err, api.ReasonInvalidArgument) {
				t.Errorf("exec %+v: %v, want 400 invalid_argument", req, err)
			}
		}
	})
	t.Run("TTY", func(t *testing.T) {
		sess, err := c.ExecStream(ctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "read x; stty size; read x; stty size; exit 4"}, Stdin: true, TTY: true, Size: &api.TermSize{Rows: 33, Cols: 99}})
		if err != nil {
			t.Fatal(err)
		}
		defer sess.Close()
		pr, pw := io.Pipe()
		exits := make(chan *api.ExecControl, 1)
		go func() {
			exit, err := sess.Wait(pw, io.Discard)
			pw.CloseWithError(err)
			exits <- exit
		}()
		_, _ = sess.Write([]byte("a\n"))
		exectest.ReadUntil(t, pr, "33 99")
		_ = sess.Resize(44, 111)
		_, _ = sess.Write([]byte("b\n"))
		exectest.ReadUntil(t, pr, "44 111")
		go io.Copy(io.Discard, pr)
		if exit := <-exits; exit == nil || *exit.ExitCode != 4 {
			t.Errorf("tty session exit = %+v, want 4", exit)
		}
	})
	t.Run("ClientDisconnectKills", func(t *testing.T) {
		marker := fmt.Sprint(100000 + rand.IntN(800000))
		cctx, cancel := context.WithCancel(ctx)
		sess, err := c.ExecStream(cctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "sleep " + marker + "1 & sleep " + marker + "2"}, TTY: true, Stdin: true})
		if err != nil {
			t.Fatal(err)
		}
		defer sess.Close()
		for deadline := time.Now().Add(15 * time.Second); len(cgroupProcs(t, w.ID, "sleep "+marker)) < 2; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the session's processes never ran")
			}
		}
		cancel()
		_ = sess.Close()
		waitNoProcs(t, w.ID, "sleep "+marker)
	})
	t.Run("Signal", func(t *testing.T) {
		sw, err := c.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"sh", "-c", "trap 'exit 9' HUP; echo ready; while true; do sleep 0.1; done"}, Isolation: api.IsolationContainer})
		if err != nil {
			t.Fatal(err)
		}
		waitRunning(t, c, sw.ID)
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if out, _ := logs(t, c, sw.ID); out == "ready\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the workload never said ready")
			}
		}
		if _, err := c.Signal(ctx, sw.ID, "HUP"); err != nil {
			t.Fatal(err)
		}
		ended, err := c.WaitExit(ctx, sw.ID)
		if err != nil || exitCode(ended) != 9 {
			t.Errorf("after HUP: %+v %v, want exit 9", ended, err)
		}
		if _, err := c.Exec(ctx, sw.ID, api.ExecRequest{Command: []string{"true"}}); !client.IsReason(err, api.ReasonConflict) {
			t.Errorf("exec into an exited workload: %v, want 409", err)
		}
	})
	// 100 sessions at once, the simple form and WebSockets with and
	// without a terminal, some cut by their client: nothing stays behind,
	// neither in the agent (file descriptors, goroutines) nor in the
	// container (processes).
	t.Run("HundredSessionsLeakNothing", func(t *testing.T) {
		if _, err := c.Exec(ctx, w.ID, api.ExecRequest{Command: []string{"true"}}); err != nil {
			t.Fatal(err)
		}
		c.CloseIdleConnections()
		fds, goroutines := countFDs(t), runtime.NumGoroutine()
		marker := fmt.Sprint(100000 + rand.IntN(800000))
		for _, err := range exectest.Sessions(ctx, c, w.ID, 100, marker) {
			t.Error(err)
		}
		waitNoProcs(t, w.ID, "sleep 0."+marker)
		if left := cgroupProcs(t, w.ID, ""); len(left) != 1 {
			t.Errorf("the container holds %q, want its own sleep alone", left)
		}
		var nfd, ng int
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			c.CloseIdleConnections()
			if nfd, ng = countFDs(t), runtime.NumGoroutine(); nfd <= fds && ng <= goroutines {
				return
			}
		}
		t.Errorf("after 100 sessions: %d fds (before %d), %d goroutines (before %d)", nfd, fds, ng, goroutines)
		buf := make([]byte, 1<<20)
		t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
		entries, _ := os.ReadDir("/proc/self/fd")
		for _, e := range entries {
			target, _ := os.Readlink("/proc/self/fd/" + e.Name())
			t.Logf("fd %s -> %s", e.Name(), target)
		}
	})
}

func countFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// An agent SIGKILLed while exec sessions run takes them with it: their
// processes (and what they started) are gone from the container, which
// itself keeps running and is recovered by the next agent, where exec
// works again.
func TestExecSessionsDieWithTheAgent(t *testing.T) {
	requireRunc(t)
	dataDir := t.TempDir()
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nvm:\n  enabled: false\nnetwork:\n  enabled: false\nworkload_defaults:\n  stop_timeout: 2s\n  cpu: 0.05\n", addr, dataDir)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &agentProcess{t: t, config: cfgFile}
	c := p.start(addr)
	t.Cleanup(func() {
		deleteAll(t, c)
		p.kill()
	})
	importBusybox(t, c)
	ctx := context.Background()
	w, err := c.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"sleep", "600"}, Isolation: api.IsolationContainer})
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, w.ID)
	marker := fmt.Sprint(100000 + rand.IntN(800000))
	for _, tty := range []bool{false, true} {
		sess, err := c.ExecStream(ctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "sleep " + marker + "1 & sleep " + marker + "2"}, TTY: tty, Stdin: tty})
		if err != nil {
			t.Fatal(err)
		}
		defer sess.Close()
	}
	for deadline := time.Now().Add(15 * time.Second); len(cgroupProcs(t, w.ID, "sleep "+marker)) < 4; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the sessions' processes never ran: %q", cgroupProcs(t, w.ID, "sleep "+marker))
		}
	}
	p.kill()
	waitNoProcs(t, w.ID, "sleep "+marker)

	c = p.start(addr)
	got, _, err := c.Get(ctx, w.ID, nil)
	if err != nil || got.State != api.StateRunning {
		t.Fatalf("after the agent restart the workload is %+v, %v; want running", got, err)
	}
	if res, err := c.Exec(ctx, w.ID, api.ExecRequest{Command: []string{"echo", "again"}}); err != nil || res.Stdout != "again\n" {
		t.Errorf("exec after the restart: %+v %v", res, err)
	}
}
