package monitor

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/berthd/berth/internal/fileutil"
)

// testCgroup makes a cgroup of the v1 hierarchy ctrl (the unified one for
// "") for the test and removes it at the end.
func testCgroup(t *testing.T, ctrl, name string) string {
	t.Helper()
	p := filepath.Join("/sys/fs/cgroup", ctrl, name)
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Skipf("cannot make a cgroup under /sys/fs/cgroup/%s: %v", ctrl, err)
	}
	t.Cleanup(func() { _ = os.Remove(p) })
	return p
}

// runcState writes a state directory as runc 1.1 leaves it for a stopped
// container, its cgroups given.
func runcState(t *testing.T, root, id string, cgroups map[string]string) string {
	t.Helper()
	dir := filepath.Join(root, id)
	if err := os.MkdirAll(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	if err := fileutil.WriteJSON(filepath.Join(dir, "state.json"), map[string]any{
		"id": id, "init_process_pid": 0, "cgroup_paths": cgroups, "config": map[string]any{},
	}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// An ended container's cgroups and runc state are removed without runc;
// anything unexpected is refused (the monitor then runs runc delete), and
// a cgroup that still has a process stays.
func TestReleaseStopped(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: makes cgroups")
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	id := "dt-release-" + hex.EncodeToString(b)
	root := t.TempDir()

	t.Run("released", func(t *testing.T) {
		cg := map[string]string{"pids": testCgroup(t, "pids", id+"-a"), "memory": testCgroup(t, "memory", id+"-a")}
		dir := runcState(t, root, id, cg)
		if err := releaseStopped(root, id); err != nil {
			t.Fatal(err)
		}
		for _, p := range cg {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("cgroup %s left: %v", p, err)
			}
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("runc state %s left: %v", dir, err)
		}
		if err := releaseStopped(root, id); err != nil {
			t.Errorf("a second release: %v, want nothing to do", err)
		}
	})
	refused := func(t *testing.T, dir, want string) {
		t.Helper()
		err := releaseStopped(root, id)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("release: %v, want an error saying %q", err, want)
		}
		if _, err := os.Stat(filepath.Join(dir, "state.json")); err != nil {
			t.Errorf("the state runc delete needs is gone: %v", err)
		}
	}
	t.Run("more than the state", func(t *testing.T) {
		cg := map[string]string{"pids": testCgroup(t, "pids", id+"-b")}
		dir := runcState(t, root, id, cg)
		t.Cleanup(func() { os.RemoveAll(dir) })
		if err := os.WriteFile(filepath.Join(dir, "exec.fifo"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		refused(t, dir, "exec.fifo")
		if _, err := os.Stat(cg["pids"]); err != nil {
			t.Errorf("cgroup removed although the release was refused: %v", err)
		}
	})
	t.Run("another container's state", func(t *testing.T) {
		dir := runcState(t, root, id, nil)
		t.Cleanup(func() { os.RemoveAll(dir) })
		if err := fileutil.WriteJSON(filepath.Join(dir, "state.json"), map[string]any{"id": "someone-else"}); err != nil {
			t.Fatal(err)
		}
		refused(t, dir, "someone-else")
	})
	t.Run("cgroup outside the hierarchy", func(t *testing.T) {
		dir := runcState(t, root, id, map[string]string{"pids": t.TempDir()})
		t.Cleanup(func() { os.RemoveAll(dir) })
		refused(t, dir, "not under /sys/fs/cgroup")
	})
	t.Run("busy cgroup", func(t *testing.T) {
		p := testCgroup(t, "pids", id+"-c")
		sleep := exec.Command("sleep", "60")
		if err := sleep.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sleep.Process.Kill(); _ = sleep.Wait() })
		if err := os.WriteFile(filepath.Join(p, "cgroup.procs"), []byte(strconv.Itoa(sleep.Process.Pid)), 0o644); err != nil {
			t.Fatal(err)
		}
		dir := runcState(t, root, id, map[string]string{"pids": p})
		t.Cleanup(func() { os.RemoveAll(dir) })
		refused(t, dir, "device or resource busy")
		if _, err := os.Stat(p); err != nil {
			t.Errorf("busy cgroup gone: %v", err)
		}
		// Once its process is gone the cgroup can go (the cleanup above
		// kills it first, then removes the cgroup).
		_ = sleep.Process.Kill()
		_ = sleep.Wait()
		if err := releaseStopped(root, id); err != nil {
			t.Errorf("release after the process ended: %v", err)
		}
	})
}
