package vmdriver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/supervisor/monitortest"
	"github.com/berthd/berth/vmdriver/initramfs"
	"github.com/berthd/berth/vmdriver/initramfs/initramfstest"
)

// fakeNode is a node with a fake kernel (no libvirt needed: nothing
// boots).
type fakeNode struct {
	boot, mods string
}

func newFakeNode(t *testing.T) fakeNode {
	dir := t.TempDir()
	return fakeNode{boot: filepath.Join(dir, "boot"), mods: filepath.Join(dir, "lib/modules")}
}

func (n fakeNode) install(t *testing.T, image []byte) {
	t.Helper()
	if err := initramfstest.Node(n.boot, n.mods, "6.1.0-1-amd64", image, initramfs.DefaultModules); err != nil {
		t.Fatal(err)
	}
}

func (n fakeNode) driver(t *testing.T, mode BootMode) *Driver {
	t.Helper()
	initBin := filepath.Join(t.TempDir(), "berth-init")
	if err := os.WriteFile(initBin, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{Root: t.TempDir(), Boot: mode, BootDir: n.boot, ModulesDir: n.mods, InitPath: initBin,
		URI: "qemu+unix:///system?socket=/nonexistent", MonitorCmd: []string{"/bin/false"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close(context.Background()) })
	return d
}

// A kernel without the PVH note boots as its bzImage, and says why; the
// same node's kernel replaced by one with the note boots through PVH.
func TestBootFallbackAndKernelChange(t *testing.T) {
	ctx := context.Background()
	n := newFakeNode(t)
	n.install(t, initramfstest.GzipBzImage(false, 1))
	d := n.driver(t, BootAuto)
	b, err := d.bootAssets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b.mode != BootBzImage || b.kernel.Path != filepath.Join(n.boot, "vmlinuz-6.1.0-1-amd64") || !strings.Contains(b.reason, "no PVH entry note") {
		t.Fatalf("no note: mode %s, kernel %s, reason %q; want the bzImage and why", b.mode, b.kernel.Path, b.reason)
	}
	details := map[string]string{}
	if err := d.bootDetails(details, b.node); err != nil || details["boot"] != "bzimage" || details["boot_reason"] != b.reason {
		t.Fatalf("details %v, %v; want bzimage with the reason", details, err)
	}
	if again, _ := d.bootAssets(ctx); again != b {
		t.Fatal("the assets were prepared again for the same kernel")
	}

	n.install(t, initramfstest.GzipBzImage(true, 2))
	b2, err := d.bootAssets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if b2.mode != BootPVH || !strings.HasPrefix(b2.kernel.Path, d.cacheDir) || b2.kernel.Release != "6.1.0-1-amd64" {
		t.Fatalf("replaced kernel: mode %s, kernel %s (%s); want pvh from the cache", b2.mode, b2.kernel.Path, b2.reason)
	}
	details = map[string]string{}
	if err := d.bootDetails(details, b2.node); err != nil || details["boot"] != "pvh" || !strings.Contains(details["boot_reason"], "gzip-compressed") {
		t.Fatalf("details %v, %v; want pvh", details, err)
	}
}

func TestBootForced(t *testing.T) {
	ctx := context.Background()
	n := newFakeNode(t)
	n.install(t, initramfstest.GzipBzImage(true, 3))
	b, err := n.driver(t, BootBzImage).bootAssets(ctx)
	if err != nil || b.mode != BootBzImage || !strings.HasSuffix(b.kernel.Path, "vmlinuz-6.1.0-1-amd64") {
		t.Fatalf("bzimage forced: %+v, %v", b, err)
	}

	n.install(t, initramfstest.GzipBzImage(false, 4))
	d := n.driver(t, BootPVH)
	_, err = d.bootAssets(ctx)
	if !errors.Is(err, errdefs.ErrUnavailable) || !errors.Is(err, initramfs.ErrNoPVH) || !strings.Contains(err.Error(), "vm.boot is pvh") {
		t.Fatalf("pvh forced, kernel without the note: %v; want unavailable, saying why", err)
	}
	details := map[string]string{}
	if k, _ := initramfs.FindKernel(n.boot, n.mods); d.bootDetails(details, k) == nil {
		t.Fatalf("pvh forced, kernel without the note: details %v and healthy", details)
	}

	if _, err := New(Options{Root: t.TempDir(), Boot: "uefi", InitPath: "/bin/true"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("boot uefi: %v, want invalid argument", err)
	}
}

// The fingerprint never waits for a kernel to be extracted: it says
// pending and prepares the assets in the background.
func TestBootDetailsWarm(t *testing.T) {
	n := newFakeNode(t)
	n.install(t, initramfstest.GzipBzImage(true, 5))
	d := n.driver(t, BootAuto)
	k, err := initramfs.FindKernel(n.boot, n.mods)
	if err != nil {
		t.Fatal(err)
	}
	details := map[string]string{}
	if err := d.bootDetails(details, k); err != nil || details["boot"] != "pending" {
		t.Fatalf("first details %v, %v; want pending", details, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for details["boot"] == "pending" && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		clear(details)
		if err := d.bootDetails(details, k); err != nil {
			t.Fatal(err)
		}
	}
	if details["boot"] != "pvh" || details["boot_config"] != "auto" {
		t.Fatalf("details %v; want pvh once prepared", details)
	}
}

func newDriverBoot(tb testing.TB, root string, mode BootMode, fw Firmware) *Driver {
	tb.Helper()
	d, err := New(Options{
		Root:         root,
		Accel:        AccelTCG,
		Boot:         mode,
		Firmware:     fw,
		DomainPrefix: testPrefix,
		InitPath:     fixtures.initBin,
		MonitorCmd:   []string{monitortest.Path(tb)},
		BaseHeadroom: 64 << 20,
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = d.Close(context.Background()) })
	return d
}

// TestBootModes boots the node's kernel both ways, through both firmwares
// (the conformance suite runs with the default, qboot where installed);
// the guest behaves the same.
func TestBootModes(t *testing.T) {
	setup(t)
	if _, err := os.Stat(DefaultQbootPath); err != nil {
		t.Fatalf("qboot is not installed (%v): make test installs qemu-system-data, which has it", err)
	}
	for _, tc := range []struct {
		mode BootMode
		fw   Firmware
	}{{BootPVH, FirmwareQboot}, {BootBzImage, FirmwareQboot}, {BootPVH, FirmwareSeaBIOS}} {
		mode := tc.mode
		t.Run(string(mode)+"-"+string(tc.fw), func(t *testing.T) {
			d := newDriverBoot(t, fixtures.root, mode, tc.fw)
			b, err := d.bootAssets(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if b.mode != mode {
				t.Fatalf("mode %s (%s), want %s", b.mode, b.reason, mode)
			}
			// Debian's kernel reads lz4: the guest unpacks berth's lz4
			// archive (the kernel's unpacker, not berth's test decoder).
			if cfg, err := os.ReadFile(filepath.Join(filepath.Dir(b.node.Path), "config-"+b.node.Release)); err == nil &&
				strings.Contains(string(cfg), "\nCONFIG_RD_LZ4=y\n") && !strings.HasSuffix(b.initrd, ".cpio.lz4") {
				t.Errorf("initramfs %s for a kernel that reads lz4, want a .cpio.lz4", b.initrd)
			}
			if fp := d.Fingerprint(context.Background()); fp.Details["boot"] != string(mode) || fp.Details["firmware"] != string(tc.fw) {
				t.Errorf("fingerprint boot %q (%q) firmware %q (%q), want %s and %s", fp.Details["boot"], fp.Details["boot_reason"],
					fp.Details["firmware"], fp.Details["firmware_reason"], mode, tc.fw)
			}
			cfg := newTask(t, "sh", "-c", "echo hi; cat /proc/cmdline /sys/class/dmi/id/bios_vendor >&2; exit 3")
			t0 := time.Now()
			res := run(t, d, cfg)
			if res.ExitCode != 3 {
				t.Errorf("result %+v, want exit 3", res)
			}
			if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "hi\n" {
				t.Errorf("stdout %q", got)
			}
			got := drivertest.ReadLog(t, cfg, driver.StderrLog)
			if !strings.Contains(got, kernelCmdline) {
				t.Errorf("guest command line %q, want %q in it", got, kernelCmdline)
			}
			// The firmware the guest ran is in its SMBIOS tables.
			if strings.Contains(got, "qboot") != (tc.fw == FirmwareQboot) {
				t.Errorf("guest's BIOS vendor (after the command line) %q, want qboot only with %s", got, tc.fw)
			}
			m := regexp.MustCompile(`started pid \d+ [0-9.]+s after boot`).FindString(tail(filepath.Join(d.taskDir(cfg.ID), consoleLog), 4096))
			t.Logf("%s, %s: start → exit %.1fs; guest %s", mode, filepath.Base(b.initrd), time.Since(t0).Seconds(), m)
		})
	}
}

// TestConformanceBzImage runs the conformance suite with the bzImage boot
// (TestConformance runs it with the default, PVH where the kernel has it):
// a node whose kernel has no PVH entry boots every VM this way, and must
// keep every promise the suite checks. It runs in every `make test`
// (about six minutes of TCG boots here), not only on request.
func TestConformanceBzImage(t *testing.T) {
	setup(t)
	root := filepath.Join(fixtures.work, "conf-bzimage")
	drivertest.Run(t, drivertest.Harness{
		New:         func(t *testing.T) driver.Driver { return newDriverBoot(t, root, BootBzImage, FirmwareAuto) },
		Image:       testImage(),
		StopTimeout: 3 * time.Second,
		Slack:       slack,
		Parallel:    3,
	})
	assertNoLeaks(t, newDriverBoot(t, root, BootBzImage, FirmwareAuto), root)
}
