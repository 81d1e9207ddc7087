package vmdriver

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/testdisk"
)

func diskTask(t *testing.T, disk string) *driver.TaskConfig {
	return &driver.TaskConfig{
		ID:        drivertest.NewID("disk"),
		Image:     driver.Image{Ref: "test/disk", DiskPath: disk},
		Resources: driver.Resources{CPU: 1, MemoryBytes: 128 << 20},
		LogDir:    t.TempDir(),
	}
}

// waitLog waits until a task's log contains want.
func waitLog(t testing.TB, cfg *driver.TaskConfig, name, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		data, _ := os.ReadFile(filepath.Join(cfg.LogDir, name))
		if strings.Contains(string(data), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never showed %q; it has:\n%s", name, want, data)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A whole-disk image boots by its own bootloader from a per-task overlay;
// its serial console is the task's stdout; powering itself off is exit 0;
// a guest that ignores the power button is forced off at the stop timeout
// (137); the shared image is never written, and delete leaves nothing.
func TestWholeDiskImage(t *testing.T) {
	setup(t)
	root := filepath.Join(fixtures.work, "disk")
	d := newDriver(t, root)
	images := filepath.Join(fixtures.work, "disk-images") // under a traversable dir: QEMU opens the base
	t.Run("powers off by itself", func(t *testing.T) {
		t.Parallel()
		disk := testdisk.Build(t, filepath.Join(images, "poweroff"), false)
		before := fileDigest(t, disk)
		cfg := diskTask(t, disk)
		ctx, cancel := context.WithTimeout(context.Background(), 3*slack)
		defer cancel()
		start := time.Now()
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatalf("Start: %v", err)
		}
		res, err := d.Wait(ctx, cfg.ID)
		if err != nil {
			t.Fatalf("Wait: %v", err)
		}
		t.Logf("whole-disk guest booted, printed and powered off in %v", time.Since(start).Round(time.Millisecond))
		if res.ExitCode != 0 || res.Signal != 0 || res.Err != "" {
			t.Errorf("exit = %+v, want 0", res)
		}
		out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
		if !strings.Contains(out, testdisk.Hello) || !strings.Contains(out, "SYSLINUX") {
			t.Errorf("stdout (the serial console) lacks the bootloader's banner or the guest's line:\n%s", out)
		}
		if errOut := drivertest.ReadLog(t, cfg, driver.StderrLog); errOut != "" {
			t.Errorf("stderr = %q, want empty", errOut)
		}
		if err := d.Destroy(ctx, cfg.ID); err != nil {
			t.Fatal(err)
		}
		if after := fileDigest(t, disk); after != before {
			t.Error("the shared disk image changed under the task's overlay")
		}
	})
	t.Run("stop forces off a guest that ignores the power button", func(t *testing.T) {
		t.Parallel()
		disk := testdisk.Build(t, filepath.Join(images, "hold"), true)
		cfg := diskTask(t, disk)
		ctx, cancel := context.WithTimeout(context.Background(), 3*slack)
		defer cancel()
		if _, err := d.Start(ctx, cfg); err != nil {
			t.Fatalf("Start: %v", err)
		}
		defer d.Destroy(context.Background(), cfg.ID)
		waitLog(t, cfg, driver.StdoutLog, testdisk.Hello, 2*slack)
		if st, err := d.Inspect(ctx, cfg.ID); err != nil || st.State != driver.TaskRunning {
			t.Fatalf("Inspect = %+v, %v; want running", st, err)
		}
		if stats, err := d.Stats(ctx, cfg.ID); err != nil || stats.CPUUsageNanos == 0 {
			t.Errorf("Stats = %+v, %v", stats, err)
		}
		// No berth-init runs in it to exec into or signal through.
		if _, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"true"}}); !errors.Is(err, errdefs.ErrNotImplemented) {
			t.Errorf("Exec into a whole-disk VM: %v, want ErrNotImplemented", err)
		}
		if err := d.Signal(ctx, cfg.ID, syscall.SIGHUP); !errors.Is(err, errdefs.ErrNotImplemented) {
			t.Errorf("Signal of a whole-disk VM: %v, want ErrNotImplemented", err)
		}
		stopAt := time.Now()
		if err := d.Stop(ctx, cfg.ID, 3*time.Second); err != nil {
			t.Fatalf("Stop: %v", err)
		}
		res, err := d.Wait(ctx, cfg.ID)
		if err != nil || res.ExitCode != 137 || res.Signal != 9 {
			t.Errorf("Wait = %+v, %v; want 137 (forced off)", res, err)
		}
		if took := time.Since(stopAt); took < 3*time.Second {
			t.Errorf("Stop returned after %v, before its 3s timeout", took)
		}
		if err := d.Destroy(ctx, cfg.ID); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() {
		assertNoLeaks(t, d, root)
		os.RemoveAll(images)
	})
}

func fileDigest(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("sha256sum", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.Fields(string(out))[0]
}

// A whole-disk task needs an absolute path to a qcow2 image and no command.
func TestWholeDiskValidation(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(raw, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(dir, "disk.qcow2")
	if err := os.WriteFile(q, append([]byte("QFI\xfb"), make([]byte, 508)...), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		disk string
		ok   bool
		msg  string
	}{
		{q, true, ""},
		{raw, false, "not a qcow2 image"},
		{"disk.qcow2", false, "not absolute"},
		{filepath.Join(dir, "missing.qcow2"), false, "no such file"},
	} {
		cfg := &driver.TaskConfig{ID: "dt-disk", Image: driver.Image{DiskPath: c.disk}, LogDir: dir}
		err := validateTask(cfg)
		if c.ok != (err == nil) || err != nil && (!errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), c.msg)) {
			t.Errorf("validateTask(disk %q) = %v, want ok %v or InvalidArgument with %q", c.disk, err, c.ok, c.msg)
		}
	}
	if err := validateTask(&driver.TaskConfig{ID: "dt-none", LogDir: dir, Args: []string{"true"}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("a task with neither rootfs nor disk: %v", err)
	}
}

// The whole-disk domain boots the overlay by BIOS, with no kernel, no
// config disk, no berth ports, and the console on a socket.
func TestDomainXMLWholeDisk(t *testing.T) {
	s := domainSpec{
		Name: "berth-d1", Meta: domainMeta{ID: "d1", Root: "/r"}, Accel: AccelTCG, VCPUs: 1, MemoryKi: memoryKiB(0),
		RootDisk: "/r/tasks/d1/root.qcow2", RootFormat: "qcow2", WholeDisk: true, ConsoleSocket: "/r/tasks/d1/console.sock",
	}
	dom := parsedDomain(t, s)
	if dom.OS.Kernel != "" || dom.OS.Initrd != "" || dom.OS.Cmdline != "" {
		t.Errorf("os = %+v, want no direct kernel boot", dom.OS)
	}
	devs := dom.Devices
	if len(devs.Disks) != 1 || devs.Disks[0].Boot == nil || devs.Disks[0].Boot.Order != 1 ||
		devs.Disks[0].Driver.Type != "qcow2" || devs.Disks[0].Source.File.File != s.RootDisk || devs.Disks[0].ReadOnly != nil {
		t.Errorf("disks = %+v, want the writable overlay, boot order 1", devs.Disks)
	}
	if len(devs.Channels) != 0 {
		t.Errorf("channels = %+v, want none", devs.Channels)
	}
	if len(devs.Serials) != 1 || devs.Serials[0].Source.UNIX == nil || devs.Serials[0].Source.UNIX.Mode != "bind" ||
		devs.Serials[0].Source.UNIX.Path != s.ConsoleSocket {
		t.Errorf("serial = %+v, want a unix socket QEMU listens on", devs.Serials)
	}
	if dom.Features == nil || dom.Features.ACPI == nil || dom.OnPoweroff != "destroy" || dom.OnReboot != "destroy" {
		t.Error("a whole-disk guest needs ACPI (the power button) and must end on power-off and reset")
	}
	s.Kernel = "/boot/vmlinuz"
	if _, err := domainXML(s); err == nil {
		t.Error("whole-disk spec with a kernel accepted")
	}
}

func TestWholeDiskExitResult(t *testing.T) {
	dir := t.TempDir()
	if r := wholeDiskExitResult(dir); r.ExitCode != 0 || r.Signal != 0 || r.Err != "" {
		t.Errorf("powered off by itself: %+v, want 0", r)
	}
	writeFile(t, dir, killedFile, "")
	if r := wholeDiskExitResult(dir); r.ExitCode != 137 || r.Signal != 9 {
		t.Errorf("forced off: %+v, want 137", r)
	}
}
