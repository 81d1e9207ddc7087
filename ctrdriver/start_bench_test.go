package ctrdriver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/internal/fileutil"
)

// BenchmarkStart compares the driver's Start of /bin/true (overlay, bundle,
// monitor, runc create and start) with runc create + start of the same
// hardened bundle by hand, in the same run.
func BenchmarkStart(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root (runc)")
	}
	root := b.TempDir()
	d := newDriver(&testing.T{}, root)
	rootfs := sharedRootfsB(b)
	ctx := context.Background()
	cfg := func() *driver.TaskConfig {
		return &driver.TaskConfig{ID: drivertest.NewID("dt-bench"), Image: driver.Image{RootfsDir: rootfs},
			Args: []string{"/bin/true"}, Env: []string{"PATH=/bin"}, LogDir: b.TempDir(),
			Resources: driver.Resources{MemoryBytes: 32 << 20, Pids: 16}}
	}
	startAll := func(b *testing.B, d *Driver, diskBytes int64) {
		for b.Loop() {
			c := cfg()
			c.Resources.DiskBytes = diskBytes
			if _, err := d.Start(ctx, c); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			_, _ = d.Wait(ctx, c.ID)
			_ = d.Destroy(ctx, c.ID)
			b.StartTimer()
		}
	}
	b.Run("berth", func(b *testing.B) { startAll(b, d, 0) })
	// The writable layer on a 1 GiB filesystem of its own (the default
	// disk budget): what the budget costs a start.
	b.Run("berth-disk-budget", func(b *testing.B) { startAll(b, d, 1<<30) })
	// The same with filesystems made ahead (container.prepared_layers).
	b.Run("berth-disk-budget-prepared", func(b *testing.B) {
		pd, err := New(Options{Root: b.TempDir(), MonitorCmd: d.opts.MonitorCmd, LayerPool: 4, LayerPoolBytes: 1 << 30})
		if err != nil {
			b.Fatal(err)
		}
		defer pd.Close(ctx)
		startAll(b, pd, 1<<30)
	})
	b.Run("runc-create-start", func(b *testing.B) {
		// berth's own bundle, as Start wrote it, over a plain bind of the rootfs.
		c := cfg()
		if _, err := d.Start(ctx, c); err != nil {
			b.Fatal(err)
		}
		_, _ = d.Wait(ctx, c.ID)
		var spec map[string]any
		if err := fileutil.ReadJSON(filepath.Join(root, "tasks", c.ID, "bundle", "config.json"), &spec); err != nil {
			b.Fatal(err)
		}
		_ = d.Destroy(ctx, c.ID)
		bundle := b.TempDir()
		spec["root"] = map[string]any{"path": rootfs, "readonly": true}
		runcRoot := b.TempDir()
		parent := drivertest.NewID("/berth-bench-")
		defer func() {
			for _, c := range cgroupControllers {
				_ = os.Remove("/sys/fs/cgroup/" + c + parent)
			}
		}()
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			id := fmt.Sprintf("raw%d", i)
			if lx, ok := spec["linux"].(map[string]any); ok {
				lx["cgroupsPath"] = parent + "/" + id
			}
			if err := fileutil.WriteJSON(filepath.Join(bundle, "config.json"), spec); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			// /dev/null stdio: the container's init would hold a pipe of
			// ours open until it ends, after the start below.
			runcLog := filepath.Join(bundle, "runc.log")
			create := exec.Command(d.runc.path, "--root", runcRoot, "--log", runcLog, "create", "--bundle", bundle, id)
			if err := create.Run(); err != nil {
				msg, _ := os.ReadFile(runcLog)
				b.Fatalf("runc create: %v: %s", err, msg)
			}
			if out, err := exec.Command(d.runc.path, "--root", runcRoot, "start", id).CombinedOutput(); err != nil {
				b.Fatalf("runc start: %v: %s", err, out)
			}
			b.StopTimer()
			_ = exec.Command(d.runc.path, "--root", runcRoot, "delete", "--force", id).Run()
			b.StartTimer()
		}
	})
}
