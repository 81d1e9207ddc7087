package vmdriver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/internal/testrootfs"
	"github.com/berthd/berth/supervisor/monitortest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	monitortest.Cleanup()
	// Every domain and task was destroyed by its own test; the shared
	// fixtures (berth-init, rootfs, caches) go last.
	if fixtures.work != "" {
		os.RemoveAll(fixtures.work)
	}
	os.Exit(code)
}

// libvirtSocket is where the system libvirtd listens.
const libvirtSocket = "/run/libvirt/libvirt-sock"

// requireLibvirt skips only when this machine truly cannot run VMs, and
// fails when it can but libvirtd is not running.
func requireLibvirt(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("boots VMs under libvirt; skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		tb.Skip("vmdriver integration tests need root (libvirt qemu:///system); run `make test` as root")
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		tb.Skip("libvirtd is not installed; install libvirt-daemon-system and qemu-system-x86")
	}
	if _, err := os.Stat(libvirtSocket); err != nil {
		tb.Fatalf("libvirtd is not running: %s is missing; start it with `libvirtd -d` (and `virtlogd -d`)", libvirtSocket)
	}
	if _, err := os.Stat(virtlogdSocket); err != nil {
		tb.Fatalf("virtlogd is not running: %s is missing; start it with `virtlogd -d`", virtlogdSocket)
	}
}

// fixtures are built once per test process and shared, as an agent shares
// its kernel, initramfs and image bases between tasks.
var fixtures struct {
	once    sync.Once
	err     error
	work    string // berth-init and the busybox rootfs
	root    string // the driver root of every test in this process
	initBin string
	rootfs  string
}

func setup(tb testing.TB) {
	tb.Helper()
	requireLibvirt(tb)
	fixtures.once.Do(func() {
		fixtures.err = buildFixtures()
	})
	if fixtures.err != nil {
		tb.Fatalf("build vm test fixtures: %v", fixtures.err)
	}
}

func buildFixtures() error {
	work, err := os.MkdirTemp("", "bvm-")
	if err != nil {
		return err
	}
	fixtures.work = work
	// QEMU runs as libvirt's unprivileged user: it must pass through the
	// driver root to reach the task disks.
	if err := os.Chmod(work, 0o711); err != nil {
		return err
	}
	fixtures.root = filepath.Join(work, "r")
	fixtures.initBin = filepath.Join(work, "berth-init")
	gobin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("go toolchain not found to build berth-init: %w", err)
	}
	build := exec.Command(gobin, "build", "-trimpath", "-ldflags=-s -w", "-o", fixtures.initBin, "github.com/berthd/berth/cmd/berth-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build berth-init: %v\n%s", err, out)
	}
	fixtures.rootfs = filepath.Join(work, "rootfs")
	return testrootfs.Build(fixtures.rootfs)
}

// testPrefix names this process's domains, so tests never touch another
// run's (or anyone's) domains on a shared libvirtd.
var testPrefix = fmt.Sprintf("berth-test%d-", os.Getpid())

func newDriver(tb testing.TB, root string) *Driver {
	tb.Helper()
	return newDriverAccel(tb, root, AccelTCG) // nested KVM guests hang on these machines
}

func newDriverAccel(tb testing.TB, root string, accel Accel) *Driver {
	tb.Helper()
	d, err := New(Options{
		Root:         root,
		Accel:        accel,
		DomainPrefix: testPrefix,
		InitPath:     fixtures.initBin,
		MonitorCmd:   []string{monitortest.Path(tb)},
		// Test tasks write little; a small headroom keeps the base quick to build.
		BaseHeadroom: 64 << 20,
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = d.Close(context.Background()) })
	return d
}

func testImage() driver.Image {
	return driver.Image{Ref: "test/busybox", Digest: "sha256:vmdriver-test", RootfsDir: fixtures.rootfs}
}

func newTask(t *testing.T, args ...string) *driver.TaskConfig {
	return &driver.TaskConfig{
		ID:        drivertest.NewID("dt"),
		Image:     testImage(),
		Args:      args,
		Env:       []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		Resources: driver.Resources{CPU: 1, MemoryBytes: 128 << 20},
		LogDir:    t.TempDir(),
	}
}

// slack bounds one VM's boot and end under TCG on a busy 2-core machine.
const slack = 90 * time.Second

func TestConformance(t *testing.T) {
	setup(t)
	root := filepath.Join(fixtures.work, "conf")
	drivertest.Run(t, drivertest.Harness{
		New:         func(t *testing.T) driver.Driver { return newDriver(t, root) },
		Image:       testImage(),
		StopTimeout: 3 * time.Second,
		Slack:       slack,
		Parallel:    3,
	})
	assertNoLeaks(t, newDriver(t, root), root)
}

// assertNoLeaks checks that every task of the driver left nothing behind:
// no task dir (disks, config disk, sockets, console log), no domain.
func assertNoLeaks(t *testing.T, d *Driver, root string) {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(root, "tasks"))
	for _, e := range entries {
		t.Errorf("task dir left behind: %s", e.Name())
	}
	c, err := libvirt.NewConnect(DefaultURI)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer c.Close()
	doms, err := c.ListAllDomains(0)
	if err != nil {
		t.Fatal(err)
	}
	for _, dom := range doms {
		if name, _ := dom.GetName(); strings.HasPrefix(name, d.opts.DomainPrefix) {
			if _, ok, _ := d.owned(&dom); ok {
				t.Errorf("domain left behind: %s", name)
			}
		}
		dom.Free()
	}
}

func run(t *testing.T, d *Driver, cfg *driver.TaskConfig) *driver.ExitResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Destroy(context.Background(), cfg.ID); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	})
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	return res
}

func TestOutputStreamsAndExitCode(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", "echo hi; echo to-err >&2; echo more; exit 7")
	res := run(t, d, cfg)
	if res.ExitCode != 7 || res.Err != "" {
		t.Errorf("result = %+v, want exit 7 without error", res)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "hi\nmore\n" {
		t.Errorf("stdout = %q", got)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StderrLog); got != "to-err\n" {
		t.Errorf("stderr = %q", got)
	}
	if m := regexp.MustCompile(`started pid \d+ [0-9.]+s after boot`).FindString(tail(filepath.Join(d.taskDir(cfg.ID), consoleLog), 4096)); m != "" {
		t.Logf("guest: %s", m)
	} else {
		t.Errorf("console.log lacks berth-init's start line:\n%s", tail(filepath.Join(d.taskDir(cfg.ID), consoleLog), 4096))
	}
}

// Output past virtlogd's 2 MiB rotation size lands whole in one file.
func TestLargeOutputIsOneFile(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	const size = 5 << 20
	cfg := newTask(t, "sh", "-c", fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x", size))
	if res := run(t, d, cfg); res.ExitCode != 0 {
		t.Fatalf("result = %+v", res)
	}
	out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
	if len(out) != size || strings.Trim(out, "x") != "" {
		t.Errorf("stdout has %d bytes, want %d of 'x'", len(out), size)
	}
	entries, _ := os.ReadDir(cfg.LogDir)
	for _, e := range entries {
		// Each log has its time index beside it (name + ".idx").
		if name := strings.TrimSuffix(e.Name(), ".idx"); name != driver.StdoutLog && name != driver.StderrLog {
			t.Errorf("unexpected file in the log dir (rotated?): %s", e.Name())
		}
	}
}

func TestCommandNotFound(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "no-such-command")
	res := run(t, d, cfg)
	if res.ExitCode != 127 || !strings.Contains(res.Err, "no-such-command") {
		t.Errorf("result = %+v, want 127 with an error naming the command", res)
	}
}

func TestUserResolvedFromImage(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", "id -u; id -g; hostname")
	cfg.User = "nobody"
	cfg.Name = "web-1"
	if res := run(t, d, cfg); res.ExitCode != 0 {
		t.Fatalf("result = %+v; stderr %q", res, drivertest.ReadLog(t, cfg, driver.StderrLog))
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "65534\n65534\nweb-1\n" {
		t.Errorf("stdout = %q", got)
	}
}

// A plain `sleep 1000` dies of the power button's SIGTERM: Stop returns
// long before its grace period, with 143.
func TestStopSleep(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sleep", "1000")
	ctx, cancel := context.WithTimeout(context.Background(), 2*slack)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	waitStarted(t, d, cfg.ID)
	const grace = 60 * time.Second
	begin := time.Now()
	if err := d.Stop(ctx, cfg.ID, grace); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	took := time.Since(begin)
	if took >= grace {
		t.Errorf("Stop took %v, the whole grace period: SIGTERM did not reach sleep", took)
	}
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 143 || res.Signal != 15 {
		t.Errorf("result = %+v, want 143 (SIGTERM)", res)
	}
}

// waitStarted waits for berth-init's "started" record: before it, a power
// button press may be lost (package guest documents why).
func waitStarted(t *testing.T, d *Driver, id string) {
	t.Helper()
	deadline := time.Now().Add(slack)
	for time.Now().Before(deadline) {
		data, _ := os.ReadFile(filepath.Join(d.taskDir(id), statusLog))
		if strings.Contains(string(data), `"started"`) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("task %s never reported started; console:\n%s", id, tail(filepath.Join(d.taskDir(id), consoleLog), 4096))
}

// A killed monitor is replaced while the VM runs; output written after
// its death still reaches the log.
func TestMonitorRespawn(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", "echo one; sleep 3; echo two; exit 4")
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	waitStarted(t, d, cfg.ID)
	tk, err := d.sup.Get(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := killProc(tk.Monitor().Ident); err != nil {
		t.Fatal(err)
	}
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 4 {
		t.Errorf("result = %+v, want 4", res)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "one\ntwo\n" {
		t.Errorf("stdout = %q, want both lines", got)
	}
}

func killProc(id proc.Ident) error {
	p, err := os.FindProcess(id.Pid)
	if err != nil {
		return err
	}
	return p.Kill()
}

// Recover with a brand-new driver after the old one is gone entirely
// (connection closed, goroutines forgotten), as after an agent SIGKILL:
// the VM's exit code and its later output still arrive.
func TestRecoverAfterRestart(t *testing.T) {
	setup(t)
	root := filepath.Join(fixtures.work, "restart")
	d1 := newDriver(t, root)
	cfg := newTask(t, "sh", "-c", "echo before; sleep 4; echo after; exit 9")
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	h, err := d1.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitStarted(t, d1, cfg.ID)
	_ = d1.Close(context.Background())

	d2 := newDriver(t, root)
	defer d2.Destroy(context.Background(), cfg.ID)
	ids, err := d2.List(ctx)
	if err != nil || !slices.Contains(ids, cfg.ID) {
		t.Fatalf("List after restart = %v, %v; want %s", ids, err, cfg.ID)
	}
	if err := d2.Recover(ctx, &driver.Handle{ID: h.ID, Driver: h.Driver, Version: h.Version}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	st, err := d2.Inspect(ctx, cfg.ID)
	if err != nil || st.State != driver.TaskRunning {
		t.Errorf("Inspect after Recover = %+v, %v; want running", st, err)
	}
	res, err := d2.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 9 {
		t.Errorf("exit code = %d, want 9 (%+v)", res.ExitCode, res)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "before\nafter\n" {
		t.Errorf("stdout = %q", got)
	}
	if err := d2.Destroy(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	assertNoLeaks(t, d2, root)
}

// Destroy removes the domain and every file the driver made: overlay,
// config disk, sockets, console and status logs, the task dir.
func TestDestroyLeavesNothing(t *testing.T) {
	setup(t)
	root := filepath.Join(fixtures.work, "destroy")
	d := newDriver(t, root)
	cfg := newTask(t, "sleep", "1000")
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	dir := d.taskDir(cfg.ID)
	for _, f := range []string{rootDiskFile, configDisk, consoleLog, taskStateFile, "stdout.sock"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("while running: %v", err)
		}
	}
	tk, err := d.sup.Get(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	mon, qemu := tk.Monitor().Ident, tk.Data.QEMU
	if err := d.Destroy(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("task dir still there: %v", err)
	}
	if alive, err := d.domainAlive(ctx, cfg.ID); err != nil || alive {
		t.Errorf("domain alive after Destroy: %v, %v", alive, err)
	}
	if mon.Alive() || qemu.Alive() {
		t.Errorf("process left behind: monitor alive %v, qemu alive %v", mon.Alive(), qemu.Alive())
	}
	// The logs are the agent's (it removes LogDir): they stay.
	if _, err := os.Stat(filepath.Join(cfg.LogDir, driver.StdoutLog)); err != nil {
		t.Errorf("stdout log removed by Destroy: %v", err)
	}
	if err := d.Destroy(ctx, cfg.ID); err != nil {
		t.Errorf("second Destroy: %v", err)
	}
	assertNoLeaks(t, d, root)
}

// A domain with the driver's name prefix but without berth's metadata for
// this root is someone else's: List ignores it and Destroy refuses it.
func TestForeignDomainUntouched(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	id := drivertest.NewID("foreign")
	c, err := libvirt.NewConnect(DefaultURI)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	boot, err := d.bootAssets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Paused: it costs no CPU and does nothing.
	dx := libvirtxml.Domain{
		Type: "qemu", Name: d.domainName(id),
		Memory: &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		OS: &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Arch: "x86_64", Type: "hvm"},
			Kernel: boot.kernel.Path},
		Devices: &libvirtxml.DomainDeviceList{MemBalloon: &libvirtxml.DomainMemBalloon{Model: "none"}},
	}
	doc, err := dx.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := c.DomainCreateXML(doc, libvirt.DOMAIN_START_PAUSED)
	if err != nil {
		t.Fatalf("create foreign domain: %v", err)
	}
	defer func() {
		dom.Destroy()
		dom.Free()
	}()
	ids, err := d.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(ids, id) {
		t.Errorf("List = %v includes the foreign domain", ids)
	}
	if err := d.Destroy(ctx, id); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Destroy(foreign) = %v, want ErrFailedPrecondition", err)
	}
	if active, err := dom.IsActive(); err != nil || !active {
		t.Errorf("foreign domain was touched: active %v, %v", active, err)
	}
}

func TestFingerprint(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	fp := d.Fingerprint(context.Background())
	if !fp.Healthy {
		t.Fatalf("Fingerprint unhealthy: %s", fp.Reason)
	}
	if fp.Details["accel"] != "tcg" || !strings.Contains(fp.Details["accel_reason"], "forced") {
		t.Errorf("accel details = %q (%q), want tcg forced", fp.Details["accel"], fp.Details["accel_reason"])
	}
	if fp.Version == "" || fp.Details["kernel"] == "" {
		t.Errorf("fingerprint lacks versions: %+v", fp)
	}
	if _, ok := fp.Details["accel_probe_duration"]; ok {
		t.Errorf("forced tcg ran a KVM probe: %+v", fp.Details)
	}
}

// An unreachable libvirt is a reported condition, not a crash.
func TestFingerprintUnreachable(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "no-libvirt-sock")
	d, err := New(Options{Root: t.TempDir(), URI: "qemu+unix:///system?socket=" + sock, InitPath: "/nonexistent", MonitorCmd: []string{"/bin/false"}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(context.Background())
	fp := d.Fingerprint(context.Background())
	if fp.Healthy || !strings.Contains(fp.Reason, sock) {
		t.Errorf("Fingerprint = %+v, want unhealthy naming %s", fp, sock)
	}
	cfg := &driver.TaskConfig{ID: "dt-unreachable", Image: driver.Image{RootfsDir: t.TempDir()}, Args: []string{"true"}, LogDir: t.TempDir()}
	if _, err := d.Start(context.Background(), cfg); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Start with libvirt down = %v, want ErrUnavailable", err)
	}
	if _, err := d.List(context.Background()); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("List with libvirt down = %v, want ErrUnavailable", err)
	}
}

// libvirtd restarts under a running VM (an upgrade, a crash): the VM runs
// on, the driver reconnects at its next call and still sees the exit.
// Opt-in: it restarts the node's shared libvirtd, which would disturb any
// other libvirt user on the machine (another test run, another agent).
func TestLibvirtdRestart(t *testing.T) {
	if os.Getenv("BERTH_TEST_LIBVIRTD_RESTART") != "1" {
		t.Skip("restarts the shared libvirtd; set BERTH_TEST_LIBVIRTD_RESTART=1 to run it on a machine of your own")
	}
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", "echo ready; sleep 15; echo done; exit 6")
	ctx, cancel := context.WithTimeout(context.Background(), 2*slack)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	waitStarted(t, d, cfg.ID)
	if out, err := exec.Command("sh", "-c", "kill $(pgrep -x libvirtd) && sleep 1 && libvirtd -d && sleep 2").CombinedOutput(); err != nil {
		t.Fatalf("restart libvirtd: %v %s", err, out)
	}
	st, err := d.Stats(ctx, cfg.ID)
	if err != nil || st.CPUUsageNanos == 0 {
		t.Errorf("Stats after the libvirtd restart = %+v, %v; want a reconnect and a reading", st, err)
	}
	if fp := d.Fingerprint(ctx); !fp.Healthy {
		t.Errorf("Fingerprint after the restart: %s", fp.Reason)
	}
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil || res.ExitCode != 6 {
		t.Errorf("Wait = %+v, %v; want exit 6", res, err)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "ready\ndone\n" {
		t.Errorf("stdout = %q", got)
	}
}

// A domain an interrupted start left behind (libvirtd finished creating it
// after the agent that asked was killed, and recovery had already removed
// the task's directory) does not keep the task from starting again: the
// new start destroys it and runs the task once, in a domain of its own.
func TestStartReplacesADomainAnInterruptedStartLeft(t *testing.T) {
	setup(t)
	root := filepath.Join(fixtures.work, "leftover")
	d1 := newDriver(t, root)
	cfg := newTask(t, "sh", "-c", "echo run; exit 4")
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	if _, err := d1.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	_ = d1.Close(context.Background())
	// What a recovery that found no domain yet does: the directory goes,
	// the domain (created later by libvirtd) stays.
	dir := d1.taskDir(cfg.ID)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if alive, err := d1.domainAlive(ctx, cfg.ID); err != nil || !alive {
		t.Fatalf("the leftover domain: alive %v, %v", alive, err)
	}
	cfg.LogDir = t.TempDir()
	d2 := newDriver(t, root)
	defer d2.Destroy(context.Background(), cfg.ID)
	if _, err := d2.Start(ctx, cfg); err != nil {
		t.Fatalf("Start over a leftover domain: %v", err)
	}
	res, err := d2.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 4 || drivertest.ReadLog(t, cfg, driver.StdoutLog) != "run\n" {
		t.Errorf("exit %+v, stdout %q; want 4 and one run's output", res, drivertest.ReadLog(t, cfg, driver.StdoutLog))
	}
	if err := d2.Destroy(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	assertNoLeaks(t, d2, root)
}
