package ctrdriver

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/testrootfs"
	"github.com/berthd/berth/supervisor/monitor"
	"github.com/berthd/berth/supervisor/monitortest"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	code := m.Run()
	monitortest.Cleanup()
	if rootfsDir != "" {
		os.RemoveAll(rootfsDir)
	}
	os.Exit(code)
}

// requireRunc skips only when this machine truly cannot run containers.
func requireRunc(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("ctrdriver integration tests need root (runc, overlayfs, cgroups); run `make test` as root")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("runc is not installed; `make test` installs it (apt-get install runc)")
	}
}

var (
	rootfsOnce sync.Once
	rootfsDir  string
	rootfsErr  error
)

// sharedRootfs is the busybox image rootfs all tasks of this process share,
// as tasks of one image share it in berth.
func sharedRootfs(t *testing.T) string {
	rootfsOnce.Do(func() {
		dir, err := os.MkdirTemp("", "berth-ctr-rootfs-")
		if err != nil {
			rootfsErr = err
			return
		}
		rootfsDir = dir
		rootfsErr = testrootfs.Build(dir)
	})
	if rootfsErr != nil {
		t.Fatalf("build test rootfs: %v", rootfsErr)
	}
	return rootfsDir
}

func newDriver(t *testing.T, root string) *Driver {
	t.Helper()
	d, err := New(Options{Root: root, MonitorCmd: []string{monitortest.Path(t)}})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestConformance(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	drivertest.Run(t, drivertest.Harness{
		New:         func(t *testing.T) driver.Driver { return newDriver(t, root) },
		Image:       driver.Image{Ref: "test/busybox", Digest: "sha256:test", RootfsDir: sharedRootfs(t)},
		StopTimeout: 2 * time.Second,
		Slack:       15 * time.Second,
		Parallel:    20,
	})
	assertNoLeaks(t, root)
}

// assertNoLeaks checks that every task of the driver left nothing behind:
// no task dir, no overlay mount, no cgroup, no runc state.
func assertNoLeaks(t *testing.T, root string) {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(root, "tasks"))
	for _, e := range entries {
		t.Errorf("task dir left behind: %s", e.Name())
	}
	runcEntries, _ := os.ReadDir(filepath.Join(root, "runc"))
	for _, e := range runcEntries {
		t.Errorf("runc state left behind: %s", e.Name())
	}
	layers, _ := os.ReadDir(filepath.Join(root, "layers"))
	for _, e := range layers {
		t.Errorf("writable layer left behind: %s", e.Name())
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), root) {
		t.Errorf("mounts under %s left behind:\n%s", root, mounts)
	}
	if loops := loopsUnder(root); len(loops) != 0 {
		t.Errorf("loop devices of files under %s left behind: %v", root, loops)
	}
	for _, id := range cgroupChildren() {
		if strings.HasPrefix(id, "dt") {
			t.Errorf("cgroup %s left behind", cgroupPath(id))
		}
	}
}

func cgroupChildren() []string {
	var ids []string
	entries, _ := os.ReadDir("/sys/fs/cgroup/memory" + cgroupParent)
	for _, e := range entries {
		if e.IsDir() {
			ids = append(ids, e.Name())
		}
	}
	return ids
}

func TestMemoryLimitOOM(t *testing.T) {
	requireRunc(t)
	d := newDriver(t, t.TempDir())
	cfg := &driver.TaskConfig{
		ID:    drivertest.NewID("dt-oom"),
		Image: driver.Image{RootfsDir: sharedRootfs(t)},
		// The shell itself (the container's init) reads 100 MB into a
		// variable, past the 32 MiB limit.
		Args:      []string{"sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' x); echo survived ${#x}"},
		Resources: driver.Resources{MemoryBytes: 32 << 20, Pids: 64},
		Env:       []string{"PATH=/bin"},
		LogDir:    t.TempDir(),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !res.OOMKilled {
		t.Errorf("result %+v: want OOMKilled; stdout %q stderr %q", res, drivertest.ReadLog(t, cfg, driver.StdoutLog), drivertest.ReadLog(t, cfg, driver.StderrLog))
	}
	if res.ExitCode != 137 {
		t.Errorf("exit code = %d, want 137 (SIGKILL by the OOM killer)", res.ExitCode)
	}
}

func TestPidsLimit(t *testing.T) {
	requireRunc(t)
	d := newDriver(t, t.TempDir())
	cfg := &driver.TaskConfig{
		ID:    drivertest.NewID("dt-pids"),
		Image: driver.Image{RootfsDir: sharedRootfs(t)},
		// Start 30 sleepers under a limit of 10 processes: forks must fail.
		Args:      []string{"sh", "-c", "ok=0; for i in $(seq 30); do sleep 30 & [ $? -eq 0 ] && ok=$((ok+1)); done; echo started=$(jobs -p | wc -l); kill $(jobs -p) 2>/dev/null; exit 0"},
		Resources: driver.Resources{Pids: 10},
		Env:       []string{"PATH=/bin"},
		LogDir:    t.TempDir(),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	if _, err := d.Wait(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	stderr := drivertest.ReadLog(t, cfg, driver.StderrLog)
	if !strings.Contains(stderr, "Resource temporarily unavailable") && !strings.Contains(stderr, "can't fork") {
		t.Errorf("want fork failures under a pids limit of 10; stdout %q stderr %q", drivertest.ReadLog(t, cfg, driver.StdoutLog), stderr)
	}
}

func TestEndedContainerIsUnmounted(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	cfg := &driver.TaskConfig{
		ID:     drivertest.NewID("dt-umount"),
		Image:  driver.Image{RootfsDir: sharedRootfs(t)},
		Args:   []string{"sh", "-c", "echo gone"},
		Env:    []string{"PATH=/bin"},
		LogDir: t.TempDir(),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	if _, err := d.Wait(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	// The end is reported before the unmount; the unmount follows on its
	// own, without a Destroy.
	for {
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		if !strings.Contains(string(mounts), d.taskDir(cfg.ID)) && !strings.Contains(string(mounts), d.layerDir(cfg.ID)) {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("the root filesystem of an ended container is still mounted")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "gone\n" {
		t.Errorf("stdout %q", got)
	}
}

// TestWritableLayerIsVolatile: a running container's root filesystem is a
// volatile overlay (its writable layer is never synced), and a Destroy
// right after the end (while the unmount that follows it may still run)
// leaves nothing.
func TestWritableLayerIsVolatile(t *testing.T) {
	requireRunc(t)
	t.Run("userns=off", func(t *testing.T) {
		root := t.TempDir()
		testVolatileLayers(t, root, newDriver(t, root))
	})
	t.Run("userns=auto", func(t *testing.T) {
		root := searchableTempDir(t)
		testVolatileLayers(t, root, newUserNSDriver(t, root, Options{}))
	})
}

func testVolatileLayers(t *testing.T, root string, d *Driver) {
	t.Helper()
	if !d.volatile {
		t.Fatalf("this kernel's overlayfs should take the volatile option (Linux 5.10 and later)")
	}
	if got := d.Fingerprint(context.Background()).Details["overlay_volatile"]; got != "on" {
		t.Errorf("fingerprint overlay_volatile = %q, want on", got)
	}
	for i := range 5 {
		cfg := &driver.TaskConfig{
			ID:    drivertest.NewID("dt-volatile"),
			Image: driver.Image{RootfsDir: sharedRootfs(t)},
			// Runs until stopped: its overlay is looked at while it runs.
			Args:   []string{"sh", "-c", "echo data > /f && sync && exec sleep 60"},
			Env:    []string{"PATH=/bin"},
			LogDir: t.TempDir(),
		}
		if i%2 == 1 {
			cfg.Resources.DiskBytes = 16 << 20 // the upper layer on a filesystem of its own
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		found := false
		for _, line := range strings.Split(string(mounts), "\n") {
			if strings.Contains(line, " overlay ") && strings.Contains(line, cfg.ID) {
				found = true
				if !strings.Contains(line, "volatile") {
					t.Errorf("the container's overlay is not volatile: %s", line)
				}
			}
		}
		if !found {
			t.Errorf("no overlay of %s in mountinfo", cfg.ID)
		}
		if err := d.Stop(ctx, cfg.ID, time.Millisecond); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Wait(ctx, cfg.ID); err != nil {
			t.Fatalf("wait: %v", err)
		}
		if err := d.Destroy(ctx, cfg.ID); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	assertNoLeaks(t, root)
}

// TestDestroyWaitsForTheUnmountAfterTheEnd: the unmount that follows the
// report of a container's end may still run when a Destroy comes; the
// Destroy removes nothing until it is done (or its context ends).
func TestDestroyWaitsForTheUnmountAfterTheEnd(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	id := drivertest.NewID("dt-unmounting")
	dir := d.taskDir(id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	unmounted := make(chan struct{})
	d.unmounts.Store(id, unmounted) // as finish does before it reports the end
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := d.Destroy(ctx, id); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Destroy during the unmount: %v, want it to wait until its context ends", err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("Destroy removed the task directory while the unmount ran: %v", err)
	}
	d.unmounts.CompareAndDelete(id, unmounted)
	close(unmounted)
	if err := d.Destroy(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("task directory left after the Destroy that followed the unmount: %v", err)
	}
}

// awaitMonitorExit waits until the monitor of an ended task has exited:
// it tells the agent of the end first, then releases the container (its
// cgroups and runc's state) and exits, so a test that looks at (or fakes)
// what runc left must wait for it.
func awaitMonitorExit(t *testing.T, d *Driver, id string) {
	t.Helper()
	var mon monitor.PidRecord
	if err := fileutil.ReadJSON(filepath.Join(d.taskDir(id), monitor.PidFile), &mon); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); unix.Kill(mon.Pid, 0) == nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the monitor %d still runs 10 s after the container ended", mon.Pid)
		}
	}
}

// loopsUnder lists the loop devices whose backing file is under root.
func loopsUnder(root string) []string {
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), root+"/") {
			out = append(out, p)
		}
	}
	return out
}

// An ended container is released (its cgroups in every hierarchy runc
// made one in, runc's state) by its monitor, without a runc delete
// process, and removing the task then starts no runc process either.
func TestEndedContainerIsReleasedWithoutRunc(t *testing.T) {
	requireRunc(t)
	real, _ := exec.LookPath("runc")
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	wrapper := filepath.Join(dir, "runc")
	script := "#!/bin/sh\necho \"$@\" >> " + calls + "\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	d, err := New(Options{Root: root, Runc: wrapper, MonitorCmd: []string{monitortest.Path(t)}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cfg := &driver.TaskConfig{ID: drivertest.NewID("dt-release"), Image: driver.Image{RootfsDir: sharedRootfs(t)},
		Args: []string{"/bin/true"}, Env: []string{"PATH=/bin"}, LogDir: t.TempDir()}
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("wait: %+v, %v", res, err)
	}
	// Once the monitor is gone, so is everything of the container.
	awaitMonitorExit(t, d, cfg.ID)
	if cgroupExists(cfg.ID) {
		t.Errorf("cgroup %s left after the end", cgroupPath(cfg.ID))
	}
	for _, h := range []string{"systemd", "unified"} {
		if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", h) + cgroupPath(cfg.ID)); err == nil {
			t.Errorf("cgroup %s left in the %s hierarchy", cgroupPath(cfg.ID), h)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "runc", cfg.ID)); !os.IsNotExist(err) {
		t.Errorf("runc state left after the end: %v", err)
	}
	if err := d.Destroy(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	log, err := os.ReadFile(calls)
	if err != nil {
		t.Fatal(err)
	}
	// One runc process in all: the one that ran the container.
	lines := strings.Split(strings.TrimSpace(string(log)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], " run --detach ") {
		t.Errorf("runc was called %d times, want once (run): %q", len(lines), lines)
	}
	assertNoLeaks(t, root)
}

// A running container costs the driver one goroutine, parked on the
// poller: its monitor's follower, which reads the monitor's ended pipe,
// records the end, and then reaps the monitor (no other goroutine waits
// for the end to record it, or for the monitor to reap it).
func TestRunningContainerCostsOneGoroutine(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	rootfs := sharedRootfs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	before := drivertest.StableGoroutines(t)
	const n = 6
	var ids []string
	for range n {
		cfg := &driver.TaskConfig{
			ID:     drivertest.NewID("dt-gor"),
			Image:  driver.Image{RootfsDir: rootfs},
			Args:   []string{"sleep", "1000"},
			Env:    []string{"PATH=/bin"},
			LogDir: t.TempDir(),
		}
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, cfg.ID)
		t.Cleanup(func() { d.Destroy(context.Background(), cfg.ID) })
	}
	running := drivertest.StableGoroutines(t)
	if per := float64(running-before) / n; per > 1 {
		t.Errorf("%d goroutines with no container, %d with %d running: %.1f a container, want 1", before, running, n, per)
	}
	// The end is still recorded, by the goroutine that saw it.
	for _, id := range ids {
		if err := d.Stop(ctx, id, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Wait(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}
