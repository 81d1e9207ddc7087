package ctrdriver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/supervisor/monitortest"
)

// searchableTempDir is a temporary directory that other users may pass
// through (o+x), as a container's mapped ids must to reach its root
// filesystem; t.TempDir's parent is closed to them.
func searchableTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "berth-userns-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	return dir
}

// newUserNSDriver is a driver whose containers run in user namespaces.
// It skips only where the kernel lacks id-mapped mounts on overlayfs.
func newUserNSDriver(t *testing.T, root string, opts Options) *Driver {
	t.Helper()
	requireRunc(t)
	opts.Root = root
	if opts.MonitorCmd == nil {
		opts.MonitorCmd = []string{monitortest.Path(t)}
	}
	d, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if on, reason := d.userns.enabled(); !on {
		if strings.Contains(reason, "the kernel cannot") {
			t.Skipf("user namespaces are off on this machine: %s", reason)
		}
		t.Fatalf("user namespaces are off: %s", reason)
	}
	return d
}

func userNSTask(t *testing.T, prefix string, args ...string) *driver.TaskConfig {
	return &driver.TaskConfig{
		ID:     drivertest.NewID(prefix),
		Image:  driver.Image{RootfsDir: sharedRootfs(t)},
		Args:   args,
		Env:    []string{"PATH=/bin"},
		LogDir: t.TempDir(),
	}
}

// procIDs reads the Uid: and Gid: lines of /proc/PID/status on the host.
func procIDs(t *testing.T, pid int) (uids, gids []string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 5 && f[0] == "Uid:" {
			uids = f[1:]
		}
		if len(f) == 5 && f[0] == "Gid:" {
			gids = f[1:]
		}
	}
	return uids, gids
}

// The container's root is an unprivileged host uid: the first of its
// range, in every one of real, effective, saved and file system ids.
func TestUserNSRootIsUnprivilegedOnHost(t *testing.T) {
	d := newUserNSDriver(t, searchableTempDir(t), Options{})
	cfg := userNSTask(t, "dt-uns", "sh", "-c", "id; cat /proc/self/uid_map; sleep 30")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	st, err := d.Inspect(ctx, cfg.ID)
	if err != nil || st.Pid == 0 {
		t.Fatalf("Inspect: %+v %v", st, err)
	}
	m, err := readIDMap(d.taskDir(cfg.ID))
	if err != nil || m == nil {
		t.Fatalf("no range recorded: %v", err)
	}
	if m.UID < DefaultUserNSBase || m.GID < DefaultUserNSBase || m.Size != DefaultUserNSRangeSize {
		t.Fatalf("range %+v is not from the default ids", m)
	}
	uids, gids := procIDs(t, st.Pid)
	want := []string{fmt.Sprint(m.UID), fmt.Sprint(m.UID), fmt.Sprint(m.UID), fmt.Sprint(m.UID)}
	if strings.Join(uids, " ") != strings.Join(want, " ") {
		t.Errorf("container root's host uids %v, want %v", uids, want)
	}
	if gids[0] != fmt.Sprint(m.GID) || gids[1] != fmt.Sprint(m.GID) {
		t.Errorf("container root's host gids %v, want %d", gids, m.GID)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(drivertest.ReadLog(t, cfg, driver.StdoutLog), "uid_map") && time.Now().Before(deadline) {
		out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
		if strings.Count(out, "\n") >= 2 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
	if !strings.Contains(out, "uid=0(root) gid=0(root)") || !strings.Contains(strings.Join(strings.Fields(out), " "), fmt.Sprintf("0 %d %d", m.UID, m.Size)) {
		t.Errorf("inside the container: %q (stderr %q)", out, drivertest.ReadLog(t, cfg, driver.StderrLog))
	}
}

// The conformance suite with every container in a user namespace.
func TestConformanceUserNS(t *testing.T) {
	root := filepath.Join(searchableTempDir(t), "containers")
	newUserNSDriver(t, root, Options{})
	drivertest.Run(t, drivertest.Harness{
		New:         func(t *testing.T) driver.Driver { return newUserNSDriver(t, root, Options{}) },
		Image:       driver.Image{Ref: "test/busybox", Digest: "sha256:test", RootfsDir: sharedRootfs(t)},
		StopTimeout: 2 * time.Second,
		Slack:       15 * time.Second,
		Parallel:    20,
	})
	assertNoLeaks(t, root)
	assertNoRanges(t, root)
}

// assertNoRanges checks that no range directory is left.
func assertNoRanges(t *testing.T, root string) {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(root, "userns"))
	for _, e := range entries {
		if e.Name() != ".lock" {
			t.Errorf("left in %s: %s", filepath.Join(root, "userns"), e.Name())
		}
	}
}
