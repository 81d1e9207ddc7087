package ctrdriver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/supervisor/monitortest"
)

// hangingRunc writes a runc wrapper that hangs creating the container (`create`, or `run`) (the way a
// wedged runc or a stuck cgroup write does) while marker exists, and runs
// the real runc otherwise.
func hangingRunc(t *testing.T) (path, marker string) {
	t.Helper()
	real := findRunc("runc")
	dir := t.TempDir()
	marker = filepath.Join(dir, "hang")
	path = filepath.Join(dir, "runc")
	script := fmt.Sprintf(`#!/bin/sh
for a in "$@"; do
	if { [ "$a" = create ] || [ "$a" = run ]; } && [ -e %q ]; then
		sleep 3600 &
		wait
	fi
done
exec %q "$@"
`, marker, real)
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, marker
}

// sessionAlive reports whether a process of the task dir's monitor's
// session (the monitor, runc, the wrapper's sleep) still runs.
func leftoverProcesses(t *testing.T, dir string) []string {
	t.Helper()
	out, _ := exec.Command("ps", "-eo", "pid,args").Output()
	var left []string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, dir) && !strings.Contains(line, "ps -eo") {
			left = append(left, strings.TrimSpace(line))
		}
	}
	return left
}

// A runc that hangs in create fails the start at the start timeout, and
// nothing of it is left running.
func TestHungRuncStartTimesOut(t *testing.T) {
	requireRunc(t)
	runcPath, _ := hangingRunc(t)
	root := t.TempDir()
	d, err := New(Options{Root: root, Runc: runcPath, StartTimeout: 2 * time.Second, MonitorCmd: []string{monitortest.Path(t)}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := &driver.TaskConfig{ID: drivertest.NewID("dt-hang"), Image: driver.Image{RootfsDir: sharedRootfs(t)},
		Args: []string{"true"}, Env: []string{"PATH=/bin"}, LogDir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	begin := time.Now()
	_, err = d.Start(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "hung") {
		t.Fatalf("Start with a hung runc = %v, want a start timeout naming the hang", err)
	}
	t.Logf("start failed after %v: %v", time.Since(begin).Round(time.Millisecond), err)
	if left := leftoverProcesses(t, root); len(left) > 0 {
		t.Errorf("processes left after the failed start: %v", left)
	}
	assertNoLeaks(t, root)
}

// A start whose caller gives up (the agent's stop of a starting
// workload) while runc hangs ends at once: runc and its children are
// killed, nothing is left, and the error is the caller's.
func TestHungRuncStartCalledOff(t *testing.T) {
	requireRunc(t)
	runcPath, _ := hangingRunc(t)
	root := t.TempDir()
	d, err := New(Options{Root: root, Runc: runcPath, StartTimeout: time.Hour, MonitorCmd: []string{monitortest.Path(t)}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := &driver.TaskConfig{ID: drivertest.NewID("dt-hang"), Image: driver.Image{RootfsDir: sharedRootfs(t)},
		Args: []string{"true"}, Env: []string{"PATH=/bin"}, LogDir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := d.Start(ctx, cfg)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Start called off = %v, want the caller's deadline", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Start did not return 20 s after its caller gave up, with runc hung")
	}
	if left := leftoverProcesses(t, root); len(left) > 0 {
		t.Errorf("processes left after the called-off start: %v", left)
	}
	if err := d.Destroy(context.Background(), cfg.ID); err != nil {
		t.Errorf("Destroy after a called-off start: %v", err)
	}
	assertNoLeaks(t, root)
}

// killTasks kills the containers and the monitors of cfgs, as a node's
// reboot would, and waits until the driver has seen each task end.
func killTasks(ctx context.Context, t *testing.T, d *Driver, cfgs []*driver.TaskConfig) {
	t.Helper()
	for _, cfg := range cfgs {
		tk, err := d.sup.Get(cfg.ID)
		if err != nil {
			t.Fatal(err)
		}
		_ = d.runc.kill(ctx, cfg.ID, "KILL")
		_ = unix.Kill(tk.Monitor().Pid, unix.SIGKILL)
	}
	for _, cfg := range cfgs {
		tk, _ := d.sup.Get(cfg.ID)
		select {
		case <-tk.Done():
		case <-ctx.Done():
			t.Fatal("tasks did not end after their monitors were killed")
		}
	}
}

// A node reboot, simulated: every monitor and container of the driver is
// killed and its overlay unmounted, and the next driver runs under another
// boot id. Recover answers ErrRebooted and releases what is left; Destroy
// then finds nothing.
func TestRecoverAfterReboot(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	var cfgs []*driver.TaskConfig
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range 3 {
		cfg := &driver.TaskConfig{ID: drivertest.NewID(fmt.Sprintf("dt-reboot%d-", i)), Image: driver.Image{RootfsDir: sharedRootfs(t)},
			Args: []string{"sleep", "1000"}, Env: []string{"PATH=/bin"}, LogDir: t.TempDir()}
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		cfgs = append(cfgs, cfg)
	}
	// What a reboot leaves: files, no processes, no mounts. (runc's state
	// directory and the cgroups would be gone too on a real reboot; here
	// they are what Recover must clean up.)
	killTasks(ctx, t, d, cfgs)
	for _, cfg := range cfgs {
		_ = unmountAll(filepath.Join(root, "tasks", cfg.ID, "bundle", "rootfs"))
	}

	d2, err := New(Options{Root: root, MonitorCmd: []string{monitortest.Path(t)}, BootID: "another-boot"})
	if err != nil {
		t.Fatal(err)
	}
	for _, cfg := range cfgs {
		err := d2.Recover(ctx, &driver.Handle{ID: cfg.ID, Driver: Name})
		if !errors.Is(err, driver.ErrRebooted) {
			t.Errorf("Recover after a reboot = %v, want ErrRebooted", err)
		}
		if _, err := d2.Inspect(ctx, cfg.ID); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("Inspect after a rebooted Recover = %v, want ErrNotFound", err)
		}
		if err := d2.Destroy(ctx, cfg.ID); err != nil {
			t.Errorf("Destroy after a reboot: %v", err)
		}
	}
	assertNoLeaks(t, root)
}

// A runc killed halfway can leave the bind mount of its own binary in the
// container's state directory, which runc delete cannot remove: Destroy
// removes it, and the directory, once runc has deleted the container.
func TestDestroyRemovesRuncLeftovers(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	cfg := userNSTask(t, "dt-leftover", "true")
	runToEnd(t, d, cfg)
	state := filepath.Join(root, "runc", cfg.ID)
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	// What a killed runc leaves: a file with a read-only bind mount on it.
	leftover := filepath.Join(state, "runc.Kaa7Ba")
	if err := os.WriteFile(leftover, nil, 0o500); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc/self/exe", leftover, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(leftover, unix.MNT_DETACH) })
	if err := d.Destroy(t.Context(), cfg.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("runc state directory left after Destroy: %v", err)
	}
	assertNoLeaks(t, root)
}
