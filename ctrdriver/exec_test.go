package ctrdriver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/internal/proc"
)

// execTask starts a long-running container on a user-namespaced driver
// and returns it with the driver.
func execTask(t *testing.T) (*Driver, *driver.TaskConfig) {
	t.Helper()
	return startUserNSTask(t, "dtx", nil, "sh", "-c", "echo ready; while true; do sleep 1; done")
}

// startUserNSTask starts a container running args on a user-namespaced driver
// (berth's default), its config changed by edit, and removes it at the
// end of the test.
func startUserNSTask(t *testing.T, prefix string, edit func(*driver.TaskConfig), args ...string) (*Driver, *driver.TaskConfig) {
	t.Helper()
	requireRunc(t)
	root := filepath.Join(searchableTempDir(t), "containers")
	d := newUserNSDriver(t, root, Options{})
	cfg := userNSTask(t, prefix, args...)
	cfg.Image.Ref = "test/busybox"
	cfg.Resources = driver.Resources{CPU: 1, MemoryBytes: 128 << 20, Pids: 64}
	if edit != nil {
		edit(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		_ = d.Destroy(context.Background(), cfg.ID)
		assertNoLeaks(t, root)
	})
	return d, cfg
}

func execOut(t *testing.T, d *Driver, id string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := d.Exec(ctx, id, &driver.ExecConfig{Args: args})
	if err != nil {
		t.Fatalf("Exec %v: %v", args, err)
	}
	defer sess.Close()
	res, err := drivertest.Collect(ctx, sess)
	if err != nil {
		t.Fatalf("Exec %v: %v", args, err)
	}
	return res.Stdout
}

// statusField returns one line's value of a /proc/PID/status text.
func statusField(status, key string) string {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// An exec'd process is held in exactly like the container's own: the same
// capabilities, no_new_privileges, seccomp filter, user namespace and
// cgroup (whose pids limit counts it).
func TestExecHasTheContainersHardening(t *testing.T) {
	d, cfg := execTask(t)
	init := execOut(t, d, cfg.ID, "cat", "/proc/1/status")
	self := execOut(t, d, cfg.ID, "cat", "/proc/self/status")
	for _, key := range []string{"CapEff", "CapBnd", "CapPrm", "NoNewPrivs", "Seccomp", "Seccomp_filters"} {
		if statusField(self, key) != statusField(init, key) || statusField(self, key) == "" {
			t.Errorf("%s: exec %q, container init %q", key, statusField(self, key), statusField(init, key))
		}
	}
	if statusField(self, "NoNewPrivs") != "1" || statusField(self, "Seccomp") != "2" {
		t.Errorf("exec'd process: NoNewPrivs %q Seccomp %q, want 1 and 2", statusField(self, "NoNewPrivs"), statusField(self, "Seccomp"))
	}
	if got, want := execOut(t, d, cfg.ID, "cat", "/proc/self/uid_map"), execOut(t, d, cfg.ID, "cat", "/proc/1/uid_map"); got != want || !strings.Contains(got, "65536") {
		t.Errorf("uid_map of the exec %q, of the container %q", got, want)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	pid := sess.(*execSession).pid
	procs, err := cgroupProcs(cfg.ID)
	if err != nil || !slices.Contains(procs, pid) {
		t.Errorf("exec'd process %d is not in the container's cgroup %v (%v)", pid, procs, err)
	}
	// The pids limit (64) counts exec'd processes: a fork loop in a
	// session stops at it, and Close ends what it made.
	loop, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "for i in $(seq 100); do sleep 30 & done"}})
	if err != nil {
		t.Fatal(err)
	}
	max := 0
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && max < 63; time.Sleep(20 * time.Millisecond) {
		max = readPids(t, cfg.ID)
	}
	// The loop's shell itself ends at the first refused fork.
	if max < 63 || max > 64 {
		t.Errorf("pids.current with a fork loop in an exec reached %d, want the limit, 64 (or 63 once the loop's shell died)", max)
	}
	if err := loop.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	sess.Close()
	// Zombies wait for the container's init to reap them (the
	// workload's business); none may still run.
	if live := liveProcs(cfg.ID, "sleep\x0030"); len(live) > 0 {
		t.Errorf("%d of the loop's processes still run after Close: %v", len(live), live)
	}
}

// liveProcs lists the running (not zombie) processes of task id's
// cgroup whose command line contains marker.
func liveProcs(id, marker string) []int {
	var live []int
	procs, _ := cgroupProcs(id)
	for _, p := range procs {
		info, err := proc.ReadInfo(p)
		cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(p) + "/cmdline")
		if err == nil && info.State != 'Z' && strings.Contains(string(cmdline), marker) {
			live = append(live, p)
		}
	}
	return live
}

func readPids(t *testing.T, id string) int {
	t.Helper()
	data, err := os.ReadFile("/sys/fs/cgroup/pids" + cgroupPath(id) + "/pids.current")
	if err != nil {
		t.Fatalf("read pids.current: %v", err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A session whose shim (runc's and the process's parent) is SIGKILLed
// still kills its process on Close: the driver holds a pidfd of it and
// knows its session.
func TestExecCloseAfterShimKilled(t *testing.T) {
	d, cfg := execTask(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "sleep 1001 & sleep 1002"}})
	if err != nil {
		t.Fatal(err)
	}
	s := sess.(*execSession)
	pid := s.pid
	if err := unix.Kill(s.shim.Process.Pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The process outlives its parent until Close.
	time.Sleep(100 * time.Millisecond)
	if ident, err := proc.Identify(pid); err != nil || !ident.Alive() {
		t.Fatalf("exec'd process died with its shim (%v); the test needs it alive", err)
	}
	if err := sess.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	res, err := sess.Wait(ctx)
	if err != nil || res.Err == "" {
		t.Errorf("Wait after the shim's death = %+v, %v; want an exit marked as lost", res, err)
	}
	if live := liveProcs(cfg.ID, "sleep\x00100"); len(live) > 0 {
		t.Errorf("processes %v left in the container after Close", live)
	}
}

// A shim whose lifeline closes (the agent died: the kernel closed its
// end) or that gets SIGTERM kills its session: no exec'd process outlives
// the agent serving it.
func TestExecShimKillsSessionWhenAgentDies(t *testing.T) {
	d, cfg := execTask(t)
	for name, end := range map[string]func(s *execSession) error{
		"lifeline closed": func(s *execSession) error { return s.files[len(s.files)-1].Close() },
		"SIGTERM":         func(s *execSession) error { return unix.Kill(s.shim.Process.Pid, unix.SIGTERM) },
	} {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"sh", "-c", "sleep 1003 & sleep 1004"}})
			if err != nil {
				t.Fatal(err)
			}
			defer sess.Close()
			if err := end(sess.(*execSession)); err != nil {
				t.Fatal(err)
			}
			if _, err := sess.Wait(ctx); err != nil {
				t.Fatalf("Wait: %v", err)
			}
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				live := liveProcs(cfg.ID, "sleep\x00100")
				if len(live) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("processes %v left after the shim was told", live)
				}
			}
		})
	}
}

// A container in a user namespace of its own that joins a network
// namespace the host made (bridge mode: the agent's, with CNI) is entered
// in the order the kernel allows: its network namespace first, while the
// process is still the host's root, then its user namespace (runc 1.1
// joins the user namespace first and fails). The session is in the
// container's network namespace, not the host's.
func TestExecIntoBridgedUserNSContainer(t *testing.T) {
	requireRunc(t)
	root := filepath.Join(searchableTempDir(t), "containers")
	d := newUserNSDriver(t, root, Options{})
	netns := testNetns(t)
	cfg := &driver.TaskConfig{
		ID: drivertest.NewID("dtn"), Image: driver.Image{Ref: "test/busybox", RootfsDir: sharedRootfs(t)},
		Args:    []string{"sh", "-c", "while true; do sleep 1; done"},
		Env:     []string{"PATH=/bin"},
		LogDir:  t.TempDir(),
		Network: &driver.Network{Mode: driver.NetworkBridge, Netns: netns},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		_ = d.Destroy(context.Background(), cfg.ID)
		assertNoLeaks(t, root)
	})
	want, err := os.Readlink(netns)
	if err != nil {
		// A bind-mounted namespace file: its identity is its inode.
		var st unix.Stat_t
		if err := unix.Stat(netns, &st); err != nil {
			t.Fatal(err)
		}
		want = fmt.Sprintf("net:[%d]", st.Ino)
	}
	got := strings.TrimSpace(execOut(t, d, cfg.ID, "readlink", "/proc/self/ns/net"))
	if got != want {
		t.Errorf("exec'd process is in network namespace %q, want the container's %q", got, want)
	}
	if uid := execOut(t, d, cfg.ID, "cat", "/proc/self/uid_map"); !strings.Contains(uid, "65536") {
		t.Errorf("exec'd process's uid_map %q: not the container's user namespace", uid)
	}
	sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"sh"}, TTY: true, Stdin: true, Size: driver.TermSize{Rows: 24, Cols: 80}})
	if err != nil {
		t.Fatalf("Exec with a terminal: %v", err)
	}
	sess.Close()
}
