package vmdriver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

// Run both in one go to compare them on the same machine:
//
//	go test -run '^$' -bench 'VMStartToFirstOutput|QEMUDirectBoot' -benchtime 5x ./vmdriver/

// waitFirstByte polls path until it holds at least one byte.
func waitFirstByte(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if fi, err := os.Stat(path); err == nil && fi.Size() > 0 {
			return nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return fmt.Errorf("no output in %s after %v", path, timeout)
}

// BenchmarkVMStartToFirstOutput times Driver.Start of `echo hi` until the
// first byte reaches the task's stdout log: overlay and config disk,
// domain definition, boot under TCG, berth-init, the monitor's copy.
func BenchmarkVMStartToFirstOutput(b *testing.B) {
	setup(b)
	d := newDriver(b, fixtures.root)
	ctx := context.Background()
	// Warm the caches (initramfs, base image) outside the timer, as on a
	// node that already ran the image.
	if _, err := d.bootAssets(ctx); err != nil {
		b.Fatal(err)
	}
	if _, err := rootdisk.Base(ctx, fixtures.rootfs, baseKey(testImage()), d.cacheDir, rootdisk.WithHeadroom(d.opts.BaseHeadroom)); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		b.StopTimer()
		cfg := &driver.TaskConfig{
			ID: drivertest.NewID("bench"), Image: testImage(), Args: []string{"echo", "hi"},
			Resources: driver.Resources{CPU: 1, MemoryBytes: 128 << 20}, LogDir: b.TempDir(),
		}
		b.StartTimer()
		if _, err := d.Start(ctx, cfg); err != nil {
			b.Fatal(err)
		}
		err := waitFirstByte(filepath.Join(cfg.LogDir, driver.StdoutLog), slack)
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := d.Wait(ctx, cfg.ID); err != nil {
			b.Fatal(err)
		}
		if err := d.Destroy(ctx, cfg.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkQEMUDirectBoot is the baseline: qemu-system-x86_64 started by
// hand with the same kernel, initramfs, root overlay, config disk, machine
// and CPU model, output ports as plain files, timed from exec until the
// first stdout byte. The gap to BenchmarkVMStartToFirstOutput is what
// libvirt and berth add.
func BenchmarkQEMUDirectBoot(b *testing.B) {
	setup(b)
	d := newDriver(b, fixtures.root)
	ctx := context.Background()
	boot, err := d.bootAssets(ctx)
	if err != nil {
		b.Fatal(err)
	}
	base, err := rootdisk.Base(ctx, fixtures.rootfs, baseKey(testImage()), d.cacheDir, rootdisk.WithHeadroom(d.opts.BaseHeadroom))
	if err != nil {
		b.Fatal(err)
	}
	cfgData, err := guest.EncodeConfig(guest.Config{Args: []string{"echo", "hi"}})
	if err != nil {
		b.Fatal(err)
	}
	opt := func(path string) string { return strings.ReplaceAll(path, ",", ",,") }
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		p := func(name string) string { return filepath.Join(dir, name) }
		if err := rootdisk.Overlay(ctx, base, p("root.qcow2")); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(p("config.img"), cfgData, 0o644); err != nil {
			b.Fatal(err)
		}
		args := []string{
			"-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-m", fmt.Sprint(memoryKiB(128<<20) / 1024),
			"-nodefaults", "-nographic", "-no-reboot",
			"-kernel", boot.kernel.Path, "-initrd", boot.initrd, "-append", kernelCmdline,
			"-chardev", "file,id=console,path=" + opt(p("console.log")), "-serial", "chardev:console",
			"-device", "virtio-serial-pci,id=vser0",
			"-drive", "if=none,id=root,format=qcow2,file=" + opt(p("root.qcow2")),
			"-device", "virtio-blk-pci,drive=root,serial=" + guest.RootDiskSerial,
			"-drive", "if=none,id=config,format=raw,readonly=on,file=" + opt(p("config.img")),
			"-device", "virtio-blk-pci,drive=config,serial=" + guest.ConfigDiskSerial,
		}
		for i, port := range []string{guest.StdoutPort, guest.StderrPort, guest.StatusPort} {
			id := fmt.Sprintf("port%d", i)
			args = append(args,
				"-chardev", fmt.Sprintf("file,id=%s,path=%s", id, opt(p(port))),
				"-device", fmt.Sprintf("virtserialport,bus=vser0.0,chardev=%s,name=%s", id, port))
		}
		cmd := exec.Command("qemu-system-x86_64", args...)
		b.StartTimer()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		err := waitFirstByte(p(guest.StdoutPort), slack)
		b.StopTimer()
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			b.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			b.Fatalf("qemu: %v", err)
		}
		b.StartTimer()
	}
}

// BenchmarkVMExec times exec round trips into one running VM under TCG:
// "true" is Exec of `true` until its exit is reported, then Close (what
// `berth exec ID -- true` costs below the API); "channel" is the baseline
// in the same VM and run, a bare request and answer on the exec channel
// (signal 0 to the workload), so the difference is berth-init's fork, exec
// and reaping of the process.
//
//	go test -run '^$' -bench VMExec -benchtime 50x ./vmdriver/
func BenchmarkVMExec(b *testing.B) {
	setup(b)
	d := newDriver(b, fixtures.root)
	ctx := context.Background()
	cfg := &driver.TaskConfig{
		ID: drivertest.NewID("bench"), Image: testImage(), Args: []string{"sh", "-c", "echo ready; while true; do sleep 1; done"},
		Resources: driver.Resources{CPU: 1, MemoryBytes: 128 << 20}, LogDir: b.TempDir(),
	}
	if _, err := d.Start(ctx, cfg); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = d.Destroy(context.Background(), cfg.ID) })
	waitLog(b, cfg, driver.StdoutLog, "ready\n", slack)
	t, err := d.sup.Get(cfg.ID)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("true", func(b *testing.B) {
		for b.Loop() {
			s, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"true"}})
			if err != nil {
				b.Fatal(err)
			}
			res, err := s.Wait(ctx)
			if err != nil || res.ExitCode != 0 {
				b.Fatalf("exec true: %+v, %v", res, err)
			}
			s.Close()
		}
	})
	b.Run("channel", func(b *testing.B) {
		c, err := d.execClient(ctx, t)
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if err := c.SignalMain(ctx, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
}
