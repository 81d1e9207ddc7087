package ctrdriver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/supervisor/monitor"
	"github.com/berthd/berth/supervisor/monitortest"
)

func newDriverApart(t *testing.T, root, state, bootID string) *Driver {
	t.Helper()
	d, err := New(Options{Root: root, StateDir: state, MonitorCmd: []string{monitortest.Path(t)}, BootID: bootID})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// assertStateEmpty: nothing of a task is left in the state directory.
func assertStateEmpty(t *testing.T, state string) {
	t.Helper()
	for _, sub := range []string{"tasks", "runc"} {
		entries, _ := os.ReadDir(filepath.Join(state, sub))
		for _, e := range entries {
			t.Errorf("%s/%s left behind in the state directory", sub, e.Name())
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), state) {
		t.Errorf("mounts under the state directory %s left behind", state)
	}
}

// With a state directory apart from the root, a task's runtime files (its
// bundle, its monitor's records, runc's state) are in the state directory
// and its writable layer is under the root, with or without a disk
// budget; a Destroy removes both.
func TestStateDirHoldsTheRuntimeFilesAndTheRootTheLayer(t *testing.T) {
	requireRunc(t)
	root, state := t.TempDir(), t.TempDir()
	d := newDriverApart(t, root, state, "")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, budget := range []int64{0, 16 << 20} {
		cfg := userNSTask(t, "dt-state", "sh", "-c", "echo kept > /file; sleep 60")
		cfg.Resources.DiskBytes = budget
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{
			filepath.Join(state, "tasks", cfg.ID, "bundle", "config.json"),
			filepath.Join(state, "tasks", cfg.ID, monitor.PidFile),
			filepath.Join(state, "runc", cfg.ID, "state.json"),
		} {
			if _, err := os.Stat(f); err != nil {
				t.Errorf("budget %d: %v", budget, err)
			}
		}
		if _, err := os.Stat(filepath.Join(root, "tasks", cfg.ID)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("budget %d: a task directory under the root: %v", budget, err)
		}
		upper := filepath.Join(root, "layers", cfg.ID, "upper")
		if budget > 0 {
			upper = filepath.Join(root, "layers", cfg.ID, scratchDir, "upper")
			if _, err := os.Stat(filepath.Join(root, "layers", cfg.ID, scratchImage)); err != nil {
				t.Errorf("budget %d: the layer's filesystem is not under the root: %v", budget, err)
			}
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			b, err := os.ReadFile(filepath.Join(upper, "file"))
			if err == nil && string(b) == "kept\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("budget %d: the container's write is not in %s: %q %v", budget, upper, b, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := d.Stop(ctx, cfg.ID, time.Millisecond); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Wait(ctx, cfg.ID); err != nil {
			t.Fatal(err)
		}
		if err := d.Destroy(ctx, cfg.ID); err != nil {
			t.Fatal(err)
		}
	}
	assertNoLeaks(t, root)
	assertStateEmpty(t, state)
}

// A reboot takes the state directory (a tmpfs) with every process and
// mount: the next driver finds the writable layers on disk with no task,
// and removes them; Recover of the tasks answers ErrNotFound, and Destroy
// finds nothing to do.
func TestRebootTakesTheStateDir(t *testing.T) {
	requireRunc(t)
	root, state := t.TempDir(), t.TempDir()
	d := newDriverApart(t, root, state, "")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var cfgs []*driver.TaskConfig
	for _, budget := range []int64{0, 16 << 20} {
		cfg := userNSTask(t, "dt-treboot", "sleep", "1000")
		cfg.Resources.DiskBytes = budget
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		cfgs = append(cfgs, cfg)
	}
	// The reboot: processes and mounts go, and the tmpfs with them.
	killTasks(ctx, t, d, cfgs)
	for _, cfg := range cfgs {
		// The end's own unmount may have run already; what is left goes
		// as a reboot takes it, the cgroups too.
		if err := d.awaitUnmount(ctx, cfg.ID); err != nil {
			t.Fatal(err)
		}
		if err := d.unmountRootfs(d.taskDir(cfg.ID)); err != nil {
			t.Fatal(err)
		}
		removeCgroup(cfg.ID)
	}
	d.Close(ctx)
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(filepath.Join(root, "layers")); len(entries) != len(cfgs) {
		t.Fatalf("%d writable layers on disk before the restart, want %d", len(entries), len(cfgs))
	}

	d2 := newDriverApart(t, root, state, "another-boot")
	defer d2.Close(ctx)
	if entries, _ := os.ReadDir(filepath.Join(root, "layers")); len(entries) != 0 {
		t.Errorf("writable layers of tasks the reboot took are still on disk: %d", len(entries))
	}
	for _, cfg := range cfgs {
		if err := d2.Recover(ctx, &driver.Handle{ID: cfg.ID, Driver: Name}); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("Recover of a task the reboot took = %v, want ErrNotFound", err)
		}
		if err := d2.Destroy(ctx, cfg.ID); err != nil {
			t.Errorf("Destroy of a task the reboot took: %v", err)
		}
	}
	assertNoLeaks(t, root)
	assertStateEmpty(t, state)
}

// A state directory moved while tasks still live in the old one (the
// root, an agent upgraded with workloads running) waits for them: the
// driver keeps the old one, or it would not find them, and says so.
func TestMovedStateDirWaitsForTheTasksOfTheOldOne(t *testing.T) {
	root, state := t.TempDir(), t.TempDir()
	old := filepath.Join(root, "tasks", "dt-old-task")
	if err := os.MkdirAll(old, 0o700); err != nil {
		t.Fatal(err)
	}
	d := newDriverApart(t, root, state, "")
	if d.taskDir("dt-old-task") != old {
		t.Errorf("with a task in the old state directory, tasks are looked for in %s, want %s", d.taskDir("dt-old-task"), old)
	}
	if got := d.Fingerprint(t.Context()).Details["state_dir"]; got != root {
		t.Errorf("node status state_dir = %q, want the old one %q while its task is there", got, root)
	}
	d.Close(t.Context())
	if err := os.Remove(old); err != nil {
		t.Fatal(err)
	}
	d = newDriverApart(t, root, state, "")
	defer d.Close(t.Context())
	if got := d.Fingerprint(t.Context()).Details["state_dir"]; got != state {
		t.Errorf("node status state_dir = %q, want the configured %q once the old one holds no task", got, state)
	}
}
