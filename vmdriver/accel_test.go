package vmdriver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
)

func TestCheapChoice(t *testing.T) {
	for _, c := range []struct {
		want      Accel
		kvmWhy    string
		accel     Accel
		probe     bool
		errIs     error
		reasonHas string
	}{
		{want: AccelTCG, accel: AccelTCG, reasonHas: "forced by configuration (accel=tcg)"},
		{want: AccelTCG, kvmWhy: "open /dev/kvm: no such file", accel: AccelTCG, reasonHas: "forced"},
		{want: AccelKVM, accel: AccelKVM, reasonHas: "forced by configuration (accel=kvm)"},
		{want: AccelKVM, kvmWhy: "open /dev/kvm: permission denied", errIs: errdefs.ErrUnavailable},
		{want: AccelAuto, kvmWhy: "open /dev/kvm: no such file", accel: AccelTCG, reasonHas: "auto: KVM unusable (open /dev/kvm: no such file); using TCG"},
		{want: AccelAuto, probe: true},
	} {
		got, probe, err := cheapChoice(c.want, c.kvmWhy)
		if c.errIs != nil {
			if !errors.Is(err, c.errIs) || !strings.Contains(err.Error(), c.kvmWhy) {
				t.Errorf("cheapChoice(%s, %q) error = %v, want %v naming the cause", c.want, c.kvmWhy, err, c.errIs)
			}
			continue
		}
		if err != nil || probe != c.probe || got.Accel != c.accel || !strings.Contains(got.Reason, c.reasonHas) {
			t.Errorf("cheapChoice(%s, %q) = %+v, probe %v, %v; want %s (%q), probe %v", c.want, c.kvmWhy, got, probe, err, c.accel, c.reasonHas, c.probe)
		}
	}
}

func TestProbeChoice(t *testing.T) {
	for _, c := range []struct {
		o      probeOutcome
		accel  Accel
		reason string
	}{
		{probeOutcome{Reached: true, Took: 1234 * time.Millisecond}, AccelKVM,
			"auto: a KVM probe guest reached user space in 1.23s"},
		{probeOutcome{Took: 20 * time.Second, Why: "did not reach user space within 20s"}, AccelTCG,
			"auto: a KVM probe guest did not reach user space within 20s; using TCG"},
		{probeOutcome{Took: 2 * time.Second, Why: `ended after 2s without reaching user space (end of its console: "KVM: entry failed")`}, AccelTCG,
			`auto: a KVM probe guest ended after 2s without reaching user space (end of its console: "KVM: entry failed"); using TCG`},
		{probeOutcome{Why: "could not be started (MSR 0x48b)"}, AccelTCG,
			"auto: a KVM probe guest could not be started (MSR 0x48b); using TCG"},
		{probeOutcome{}, AccelTCG, "auto: a KVM probe guest did not reach user space; using TCG"},
	} {
		got := probeChoice(c.o)
		if got.Accel != c.accel || got.Reason != c.reason || got.ProbeTook != c.o.Took || !got.Probed {
			t.Errorf("probeChoice(%+v) = %+v, want %s %q", c.o, got, c.accel, c.reason)
		}
	}
}

// fakeProbeDriver is a driver whose acceleration is decided by injected
// checks: the cheap ones say KVM looks usable, probe is the probe guest.
// No libvirt is involved.
func fakeProbeDriver(t *testing.T, probe func(ctx context.Context) (probeOutcome, error)) (*Driver, *atomic.Int32) {
	t.Helper()
	d, err := New(Options{Root: t.TempDir(), URI: "test:///nonexistent", InitPath: "/nonexistent", MonitorCmd: []string{"/bin/false"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close(context.Background()) })
	var runs atomic.Int32
	d.cheapAccel = func(ctx context.Context) (accelChoice, bool, error) { return cheapChoice(AccelAuto, "") }
	d.probeGuest = func(ctx context.Context) (probeOutcome, error) {
		runs.Add(1)
		return probe(ctx)
	}
	return d, &runs
}

// While the probe runs, the non-waiting caller (Fingerprint) hears
// "probing" at once and the waiting ones (Start) get the verdict; the probe
// runs once however many ask, and its verdict is kept.
func TestResolveAccelWaitsForOneProbe(t *testing.T) {
	release := make(chan probeOutcome)
	d, runs := fakeProbeDriver(t, func(ctx context.Context) (probeOutcome, error) {
		select {
		case o := <-release:
			return o, nil
		case <-ctx.Done():
			return probeOutcome{}, ctx.Err()
		}
	})
	ctx := context.Background()
	c, err := d.resolveAccel(ctx, false)
	if err != nil || c.Accel != AccelProbing || !strings.Contains(c.Reason, "probe guest is booting") || !strings.Contains(c.Reason, "20s") {
		t.Fatalf("while probing: %+v, %v; want accel probing and why", c, err)
	}
	var wg sync.WaitGroup
	got := make([]accelChoice, 5)
	errs := make([]error, 5)
	for i := range got {
		wg.Go(func() { got[i], errs[i] = d.resolveAccel(ctx, true) })
	}
	// A waiter gives up when its context ends, without disturbing the probe.
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := d.resolveAccel(short, true); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("waiter with an ended context: %v, want DeadlineExceeded", err)
	}
	if c, _ := d.resolveAccel(ctx, false); c.Accel != AccelProbing {
		t.Errorf("still probing, but accel = %s", c.Accel)
	}
	release <- probeOutcome{Took: 20 * time.Second, Why: "did not reach user space within 20s"}
	wg.Wait()
	want := "auto: a KVM probe guest did not reach user space within 20s; using TCG"
	for i := range got {
		if errs[i] != nil || got[i].Accel != AccelTCG || got[i].Reason != want {
			t.Errorf("waiter %d: %+v, %v; want tcg %q", i, got[i], errs[i], want)
		}
	}
	if c, err := d.resolveAccel(ctx, false); err != nil || c.Accel != AccelTCG || c.ProbeTook != 20*time.Second {
		t.Errorf("after the probe: %+v, %v", c, err)
	}
	if n := runs.Load(); n != 1 {
		t.Errorf("probe ran %d times, want once", n)
	}
}

func TestResolveAccelProbeReachesUserSpace(t *testing.T) {
	d, _ := fakeProbeDriver(t, func(context.Context) (probeOutcome, error) {
		return probeOutcome{Reached: true, Took: 900 * time.Millisecond}, nil
	})
	c, err := d.resolveAccel(context.Background(), true)
	if err != nil || c.Accel != AccelKVM || c.Reason != "auto: a KVM probe guest reached user space in 900ms" {
		t.Errorf("resolveAccel = %+v, %v; want kvm", c, err)
	}
}

// A probe that cannot run (no kernel, libvirt gone) or panics decides
// nothing: it is an error, reported without re-running until probeRetry
// has passed, then tried again.
func TestResolveAccelProbeCannotRun(t *testing.T) {
	var fail atomic.Bool
	fail.Store(true)
	d, runs := fakeProbeDriver(t, func(context.Context) (probeOutcome, error) {
		if fail.Load() {
			panic("boom")
		}
		return probeOutcome{Took: time.Second, Why: "did not reach user space within 1s"}, nil
	})
	ctx := context.Background()
	_, err := d.resolveAccel(ctx, true)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "panicked: boom") {
		t.Fatalf("panicking probe: %v, want ErrUnavailable saying it panicked", err)
	}
	if _, err2 := d.resolveAccel(ctx, false); err2 == nil || err2.Error() != err.Error() || runs.Load() != 1 {
		t.Errorf("within probeRetry: %v after %d runs; want the same error and no new run", err2, runs.Load())
	}
	fail.Store(false)
	d.accelMu.Lock()
	d.probeErrAt = time.Now().Add(-probeRetry)
	d.accelMu.Unlock()
	c, err := d.resolveAccel(ctx, true)
	if err != nil || c.Accel != AccelTCG || runs.Load() != 2 {
		t.Errorf("after probeRetry: %+v, %v after %d runs; want a second run deciding tcg", c, err, runs.Load())
	}
}

// Forced accelerations never boot a probe guest.
func TestForcedAccelSkipsProbe(t *testing.T) {
	for _, want := range []Accel{AccelKVM, AccelTCG} {
		d, runs := fakeProbeDriver(t, func(context.Context) (probeOutcome, error) { return probeOutcome{}, nil })
		d.cheapAccel = func(context.Context) (accelChoice, bool, error) { return cheapChoice(want, "") }
		c, err := d.resolveAccel(context.Background(), false)
		if err != nil || c.Accel != want || !strings.Contains(c.Reason, "forced") || runs.Load() != 0 {
			t.Errorf("forced %s: %+v, %v, %d probe runs", want, c, err, runs.Load())
		}
	}
}

// Close stops a running probe and waits for it; later calls fail cleanly.
func TestCloseStopsProbe(t *testing.T) {
	started := make(chan struct{})
	d, _ := fakeProbeDriver(t, func(ctx context.Context) (probeOutcome, error) {
		close(started)
		<-ctx.Done()
		return probeOutcome{}, ctx.Err()
	})
	if c, _ := d.resolveAccel(context.Background(), false); c.Accel != AccelProbing {
		t.Fatalf("accel = %s, want probing", c.Accel)
	}
	<-started
	closed := make(chan struct{})
	go func() { _ = d.Close(context.Background()); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not stop the probe")
	}
	if _, err := d.resolveAccel(context.Background(), true); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("after Close: %v, want ErrUnavailable", err)
	}
}

// kvmBrokenHere says whether this machine's KVM is known not to run
// guests: on berth's build machines /dev/kvm answers but nested guests hang
// after the kernel starts (DESIGN.md, environment facts). On a host where
// KVM works, set BERTH_TEST_KVM_WORKS=1.
func kvmBrokenHere() bool { return os.Getenv("BERTH_TEST_KVM_WORKS") != "1" }

// auto boots a real probe guest under KVM in the background: Fingerprint
// says "probing" meanwhile, a Start waits for the verdict, and on this
// machine the verdict is TCG because the KVM guest never reaches user
// space; the workload then runs to its exit code under TCG, and the probe
// leaves no domain or file behind.
func TestAutoAccelProbe(t *testing.T) {
	setup(t)
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skipf("no /dev/kvm (%v): auto decides without a probe guest", err)
	}
	root := filepath.Join(fixtures.work, "auto")
	d := newDriverAccel(t, root, AccelAuto)
	ctx, cancel := context.WithTimeout(context.Background(), DefaultProbeTimeout+3*slack)
	defer cancel()
	begin := time.Now()
	fp := d.Fingerprint(ctx)
	if took := time.Since(begin); took > 5*time.Second {
		t.Errorf("Fingerprint took %v: it must not wait for the probe", took)
	}
	if !fp.Healthy || fp.Details["accel"] != string(AccelProbing) {
		t.Fatalf("first Fingerprint = healthy %v (%s), accel %q (%s); want healthy and probing",
			fp.Healthy, fp.Reason, fp.Details["accel"], fp.Details["accel_reason"])
	}

	cfg := newTask(t, "sh", "-c", "echo hello from auto; exit 5")
	// Start waits for the probe's verdict. The first VM of the process
	// also builds the initramfs and the image's base: on a shared, busy
	// machine that takes more than one slack.
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
	if res.ExitCode != 5 || res.Err != "" {
		t.Errorf("exit = %+v, want 5", res)
	}
	if got := drivertest.ReadLog(t, cfg, driver.StdoutLog); got != "hello from auto\n" {
		t.Errorf("stdout = %q", got)
	}
	fp = d.Fingerprint(ctx)
	accel, reason, took := fp.Details["accel"], fp.Details["accel_reason"], fp.Details["accel_probe_duration"]
	t.Logf("auto on this machine: accel %s (%s), probe guest ran %s; first Start to exit %v", accel, reason, took, time.Since(begin).Round(time.Millisecond))
	if !fp.Healthy || took == "" || !strings.HasPrefix(reason, "auto: a KVM probe guest ") {
		t.Errorf("after the probe: healthy %v (%s), details %v; want the probe's verdict and duration", fp.Healthy, fp.Reason, fp.Details)
	}
	var st taskState
	if err := fileutil.ReadJSON(filepath.Join(d.taskDir(cfg.ID), taskStateFile), &st); err != nil {
		t.Error(err)
	}
	if kvmBrokenHere() {
		// With the driver's KVM domain (host-model CPU) QEMU aborts here
		// ("failed to set MSR"); with a CPU model it can start, the guest
		// hangs before user space. Either way the probe must say TCG.
		if accel != string(AccelTCG) || strings.Contains(reason, "reached user space in") || !strings.HasSuffix(reason, "; using TCG") ||
			!(strings.Contains(reason, "could not be started") || strings.Contains(reason, "did not reach user space within 20s") || strings.Contains(reason, "without reaching user space")) {
			t.Errorf("accel %s (%s), want tcg with the probe guest's failure", accel, reason)
		}
		if st.Accel != AccelTCG {
			t.Errorf("the workload ran with accel %q, want tcg", st.Accel)
		}
	}
	assertNoProbeLeft(t, d)
}

// assertNoProbeLeft checks the probe's domain and directory are gone.
func assertNoProbeLeft(t *testing.T, d *Driver) {
	t.Helper()
	c, err := libvirt.NewConnect(DefaultURI)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if dom, err := c.LookupDomainByName(d.probeDomainName()); err == nil {
		dom.Free()
		t.Errorf("probe domain %s left behind", d.probeDomainName())
	}
	if _, err := os.Stat(filepath.Join(d.opts.Root, probeDirName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("probe dir left behind: %v", err)
	}
}

// The probe's mechanism works when the accelerator does: under TCG (which
// works here) the probe guest reaches user space and is seen doing so. A
// stale probe domain of the same driver, left by an agent that died
// mid-probe, is removed first.
func TestProbeGuestReachesUserSpaceUnderTCG(t *testing.T) {
	setup(t)
	d := newDriver(t, filepath.Join(fixtures.work, "probe-tcg"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*slack)
	defer cancel()
	boot, err := d.bootAssets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stale, err := domainXML(domainSpec{Name: d.probeDomainName(), Meta: domainMeta{Root: d.opts.Root, Probe: true},
		Accel: AccelTCG, VCPUs: 1, MemoryKi: memoryKiB(probeMemory), Kernel: boot.kernel.Path, Initrd: boot.initrd,
		Cmdline: kernelCmdline, Console: filepath.Join(fixtures.work, "stale-probe-console.log")})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := c.DomainCreateXML(stale, libvirt.DOMAIN_START_PAUSED)
		if err == nil {
			dom.Free()
		}
		return err
	}); err != nil {
		t.Fatalf("create a stale probe domain: %v", err)
	}
	t.Cleanup(func() { _ = d.destroyProbeDomain(context.Background(), d.probeDomainName()) })

	o, err := d.bootProbeGuest(ctx, AccelTCG, slack)
	if err != nil || !o.Reached {
		t.Fatalf("TCG probe guest: %+v, %v; want it to reach user space", o, err)
	}
	t.Logf("TCG probe guest reached user space %v after its domain started", o.Took.Round(time.Millisecond))
	assertNoProbeLeft(t, d)
}

// A probe that gives up destroys its guest: a 1 ms bound cannot be met.
func TestProbeGuestTimeoutCleansUp(t *testing.T) {
	setup(t)
	d := newDriver(t, filepath.Join(fixtures.work, "probe-timeout"))
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	o, err := d.bootProbeGuest(ctx, AccelTCG, time.Millisecond)
	if err != nil || o.Reached || o.Why != "did not reach user space within 1ms" {
		t.Fatalf("probe = %+v, %v; want a timeout", o, err)
	}
	assertNoProbeLeft(t, d)
}

// A domain with the probe's name that is not this driver's probe is never
// touched; the probe fails instead of deciding anything.
func TestProbeGuestLeavesForeignDomain(t *testing.T) {
	setup(t)
	d := newDriver(t, filepath.Join(fixtures.work, "probe-foreign"))
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	boot, err := d.bootAssets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Same name, another root in its metadata.
	doc, err := domainXML(domainSpec{Name: d.probeDomainName(), Meta: domainMeta{Root: "/elsewhere", Probe: true},
		Accel: AccelTCG, VCPUs: 1, MemoryKi: memoryKiB(probeMemory), Kernel: boot.kernel.Path, Initrd: boot.initrd,
		Cmdline: kernelCmdline, Console: filepath.Join(fixtures.work, "foreign-probe-console.log")})
	if err != nil {
		t.Fatal(err)
	}
	c, err := libvirt.NewConnect(DefaultURI)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dom, err := c.DomainCreateXML(doc, libvirt.DOMAIN_START_PAUSED)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		dom.Destroy()
		dom.Free()
	}()
	if _, err := d.bootProbeGuest(ctx, AccelTCG, slack); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("probe next to a foreign domain: %v, want ErrFailedPrecondition", err)
	}
	if active, err := dom.IsActive(); err != nil || !active {
		t.Errorf("foreign domain was touched: active %v, %v", active, err)
	}
}

func TestOneLine(t *testing.T) {
	got := oneLine("internal error: qemu closed\nqemu: failed to set MSR 0x10a\r\n\x1b[?7l\x1b[2J", 240)
	if got != "internal error: qemu closed qemu: failed to set MSR 0x10a [?7l[2J" {
		t.Errorf("oneLine = %q", got)
	}
	if got := oneLine(strings.Repeat("a", 300)+" end", 10); got != "...aaaaaa end" {
		t.Errorf("oneLine kept %q, want the last 10 bytes", got)
	}
}

// The failure the probe exists for: under KVM with a CPU model this host's
// nested KVM accepts, QEMU starts and the guest hangs before user space.
// The probe gives up at its bound and destroys the hung guest.
func TestProbeGuestKVMHangTimesOut(t *testing.T) {
	setup(t)
	if !kvmBrokenHere() {
		t.Skip("KVM works on this host (BERTH_TEST_KVM_WORKS=1): no hang to see")
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		t.Skipf("no /dev/kvm: %v", err)
	}
	d := newDriver(t, filepath.Join(fixtures.work, "probe-hang"))
	d.probeCPUModel = "qemu64"
	ctx, cancel := context.WithTimeout(context.Background(), slack)
	defer cancel()
	o, err := d.bootProbeGuest(ctx, AccelKVM, 10*time.Second)
	if err != nil || o.Reached || o.Why != "did not reach user space within 10s" {
		t.Fatalf("KVM probe guest = %+v, %v; want a timeout", o, err)
	}
	t.Logf("KVM probe guest (qemu64 CPU) gave up after %v", o.Took.Round(time.Millisecond))
	assertNoProbeLeft(t, d)
}
