package vmdriver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
)

// kvmAPIVersion is the only KVM API version Linux has ever reported.
const kvmAPIVersion = 12

// kvmGetAPIVersion is the KVM_GET_API_VERSION ioctl, _IO(0xAE, 0x00).
const kvmGetAPIVersion = 0xAE00

// AccelProbing is the acceleration Fingerprint reports while auto's KVM
// probe guest runs. Start waits for the probe's verdict.
const AccelProbing Accel = "probing"

const (
	// DefaultProbeTimeout bounds how long the KVM probe guest may take to
	// reach user space. Under working KVM it takes about a second.
	DefaultProbeTimeout = 20 * time.Second
	// probeRetry is how long a probe that could not run at all (libvirt
	// down, no guest kernel) is reported before it is tried again.
	probeRetry = 30 * time.Second
	// probeMemory is the probe guest's RAM request: the initramfs is
	// unpacked into it and nothing else runs.
	probeMemory int64 = 64 << 20
	// probeDirName is the probe's directory under the driver root (its
	// console log); it exists only while a probe runs.
	probeDirName = "probe"
	// probeMarker follows the domain prefix in the probe domain's name.
	// Task ids start with a letter or digit, so no task's domain can have
	// this name.
	probeMarker = "_probe-"
	// probeConsoleTail is how much of a failed probe's console or QEMU
	// error the reason quotes.
	probeConsoleTail = 240
)

// accelChoice is the acceleration the driver uses, and why.
type accelChoice struct {
	Accel  Accel
	Reason string
	// Probed: a KVM probe guest decided, in ProbeTook (from the request
	// to start its domain to the verdict).
	Probed    bool
	ProbeTook time.Duration
}

// chooseAccel resolves the configured acceleration as far as it can be
// without booting a guest. "tcg" is taken as given; "kvm" is checked, so a
// forced kvm on a host without it fails loudly instead of falling back.
// "auto" falls back to tcg when /dev/kvm does not open or answer the KVM
// API version ioctl, or libvirt offers no kvm domain type for x86_64;
// when all of that is there, probe is true: only a guest booted under KVM
// can tell whether KVM really runs guests (on nested-virtualization hosts
// such as berth's build machines, a KVM guest hangs right after its kernel
// starts).
func chooseAccel(ctx context.Context, hv *hypervisor, want Accel) (c accelChoice, probe bool, err error) {
	switch want {
	case AccelTCG:
		return cheapChoice(want, "")
	case AccelKVM, AccelAuto, "":
	default:
		return accelChoice{}, false, fmt.Errorf("accel %q: want auto, kvm or tcg: %w", want, errdefs.ErrInvalidArgument)
	}
	why, err := probeKVM(ctx, hv)
	if err != nil {
		return accelChoice{}, false, err
	}
	return cheapChoice(want, why)
}

// cheapChoice is chooseAccel's decision once /dev/kvm and libvirt have
// been asked: kvmWhy says why KVM is unusable, "" when the checks passed.
func cheapChoice(want Accel, kvmWhy string) (accelChoice, bool, error) {
	switch want {
	case AccelTCG:
		return accelChoice{Accel: AccelTCG, Reason: "forced by configuration (accel=tcg)"}, false, nil
	case AccelKVM:
		if kvmWhy != "" {
			return accelChoice{}, false, fmt.Errorf("accel=kvm is configured but KVM is not usable: %s: %w", kvmWhy, errdefs.ErrUnavailable)
		}
		return accelChoice{Accel: AccelKVM, Reason: "forced by configuration (accel=kvm); /dev/kvm and libvirt's kvm domain type are available"}, false, nil
	}
	if kvmWhy != "" {
		return accelChoice{Accel: AccelTCG, Reason: "auto: KVM unusable (" + kvmWhy + "); using TCG"}, false, nil
	}
	return accelChoice{}, true, nil
}

// probeOutcome is what the KVM probe guest did.
type probeOutcome struct {
	// Reached: berth-init ran (guest.ProbeMarker on the console).
	Reached bool
	// Took is the time from the request to start the domain to user
	// space, or to the probe giving up.
	Took time.Duration
	// Why says what happened instead, when not Reached, as a phrase after
	// "a KVM probe guest".
	Why string
}

// probeChoice is auto's decision after a probe guest ran.
func probeChoice(o probeOutcome) accelChoice {
	if o.Reached {
		return accelChoice{Accel: AccelKVM, Probed: true, ProbeTook: o.Took,
			Reason: fmt.Sprintf("auto: a KVM probe guest reached user space in %s", o.Took.Round(10*time.Millisecond))}
	}
	why := o.Why
	if why == "" {
		why = "did not reach user space"
	}
	return accelChoice{Accel: AccelTCG, Probed: true, ProbeTook: o.Took, Reason: "auto: a KVM probe guest " + why + "; using TCG"}
}

// probingChoice is what Fingerprint reports while the probe runs.
func (d *Driver) probingChoice() accelChoice {
	return accelChoice{Accel: AccelProbing, Reason: fmt.Sprintf(
		"auto: /dev/kvm and libvirt's kvm domain type are available; a KVM probe guest is booting to see whether guests reach user space (up to %s)",
		d.opts.ProbeTimeout)}
}

// resolveAccel returns the driver's acceleration. The first call decides
// it: forced and cheaply decided choices at once; for auto with KVM
// apparently available it starts the probe guest in the background. While
// that runs, resolveAccel returns AccelProbing, or with wait blocks until
// the verdict (or ctx's end). The verdict is kept for the driver's life.
// A probe that could not run at all (libvirt down, no kernel) is an error,
// reported for probeRetry and then tried again.
func (d *Driver) resolveAccel(ctx context.Context, wait bool) (accelChoice, error) {
	d.accelMu.Lock()
	if d.accel != nil {
		c := *d.accel
		d.accelMu.Unlock()
		return c, nil
	}
	done := d.probeDone
	if done == nil && d.probeErr != nil && time.Since(d.probeErrAt) < probeRetry {
		err := d.probeErr
		d.accelMu.Unlock()
		return accelChoice{}, err
	}
	d.accelMu.Unlock()

	if done == nil {
		c, probe, err := d.cheapAccel(ctx)
		if err != nil {
			return c, err
		}
		d.accelMu.Lock()
		switch {
		case d.accel != nil:
			c = *d.accel
			d.accelMu.Unlock()
			return c, nil
		case !probe:
			d.accel = &c
			d.accelMu.Unlock()
			return c, nil
		case d.probeDone == nil:
			if err := d.ctx.Err(); err != nil {
				d.accelMu.Unlock()
				return accelChoice{}, fmt.Errorf("vm driver is closed: %w", errdefs.ErrUnavailable)
			}
			d.probeDone = make(chan struct{})
			d.probeWG.Add(1)
			go d.runProbe(d.probeDone)
		}
		done = d.probeDone
		d.accelMu.Unlock()
	}
	if !wait {
		return d.probingChoice(), nil
	}
	select {
	case <-done:
	case <-ctx.Done():
		return accelChoice{}, fmt.Errorf("waiting for the KVM probe to decide the acceleration: %w", ctx.Err())
	}
	d.accelMu.Lock()
	defer d.accelMu.Unlock()
	if d.accel != nil {
		return *d.accel, nil
	}
	return accelChoice{}, d.probeErr
}

// runProbe runs the probe guest once and records the verdict. It never
// panics: a panicking probe is a probe that could not run.
func (d *Driver) runProbe(done chan struct{}) {
	defer d.probeWG.Done()
	var o probeOutcome
	var err error
	func() {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("the probe panicked: %v", r)
			}
		}()
		o, err = d.probeGuest(d.ctx)
	}()
	d.accelMu.Lock()
	if err != nil {
		if !errors.Is(err, errdefs.ErrUnavailable) {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrUnavailable)
		}
		d.probeErr = fmt.Errorf("auto: the KVM probe guest could not be run: %w", err)
		d.probeErrAt = time.Now()
		d.log.Warn("KVM probe could not run; retrying later", "err", err, "retry_in", probeRetry)
	} else {
		c := probeChoice(o)
		d.accel = &c
		d.probeErr = nil
		d.log.Info("KVM probe decided the acceleration", "accel", c.Accel, "reason", c.Reason, "probe_took", o.Took)
	}
	d.probeDone = nil
	d.accelMu.Unlock()
	close(done)
}

// probeKVM returns why KVM cannot be used, or "" when it can. It fails
// only when libvirt cannot be asked: that says nothing about KVM.
func probeKVM(ctx context.Context, hv *hypervisor) (string, error) {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Sprintf("open /dev/kvm: %v", err), nil
	}
	v, err := unix.IoctlRetInt(int(f.Fd()), kvmGetAPIVersion)
	f.Close()
	if err != nil {
		return fmt.Sprintf("KVM_GET_API_VERSION: %v", err), nil
	}
	if v != kvmAPIVersion {
		return fmt.Sprintf("KVM API version %d, want %d", v, kvmAPIVersion), nil
	}
	err = hv.do(ctx, func(c *libvirt.Connect) error {
		_, err := c.GetDomainCapabilities("", "x86_64", "", "kvm", 0)
		return err
	})
	if errors.Is(err, errdefs.ErrUnavailable) || isConnError(err) {
		return "", err
	}
	if err != nil {
		return fmt.Sprintf("libvirt has no kvm domain type for x86_64: %v", lvError(err)), nil
	}
	return "", nil
}

// probeDomainName is the probe guest's domain: the driver's prefix, the
// probe marker and a hash of the driver root (two drivers with the same
// prefix on one libvirtd do not collide).
func (d *Driver) probeDomainName() string {
	sum := sha256.Sum256([]byte(d.opts.Root))
	return d.opts.DomainPrefix + probeMarker + hex.EncodeToString(sum[:4])
}

// bootProbeGuest boots the node's kernel and berth's initramfs with
// berth-init in probe mode (guest.ProbeParam), no disks and no ports, as a
// transient domain under accel, and watches its console for
// guest.ProbeMarker for up to timeout. The domain and its directory are
// removed whatever happens. An error means the probe could not be run
// (no boot assets, libvirt unreachable, ctx ended), which says nothing
// about the accelerator; any other failure is in the outcome.
func (d *Driver) bootProbeGuest(ctx context.Context, accel Accel, timeout time.Duration) (probeOutcome, error) {
	boot, err := d.bootAssets(ctx)
	if err != nil {
		return probeOutcome{}, err
	}
	name := d.probeDomainName()
	dir := filepath.Join(d.opts.Root, probeDirName)
	cleanup := func() error {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		return errors.Join(d.destroyProbeDomain(cctx, name), os.RemoveAll(dir))
	}
	// A probe domain an agent left when it died mid-probe.
	if err := cleanup(); err != nil {
		return probeOutcome{}, err
	}
	if err := d.qemuDir(dir, os.Mkdir); err != nil {
		return probeOutcome{}, fmt.Errorf("create probe dir: %w", err)
	}
	defer func() {
		if err := cleanup(); err != nil {
			d.log.Error("remove the probe guest", "domain", name, "err", err)
		}
	}()
	console := filepath.Join(dir, consoleLog)
	doc, err := domainXML(domainSpec{
		Name:     name,
		Meta:     domainMeta{Root: d.opts.Root, Probe: true},
		Accel:    accel,
		CPUModel: d.probeCPUModel,
		VCPUs:    1,
		MemoryKi: memoryKiB(probeMemory),
		Kernel:   boot.kernel.Path,
		Initrd:   boot.initrd,
		Cmdline:  kernelCmdline + " " + guest.ProbeParam,
		Console:  console,
	})
	if err != nil {
		return probeOutcome{}, err
	}
	start := time.Now()
	err = d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := c.DomainCreateXML(doc, libvirt.DOMAIN_NONE)
		if err != nil {
			return err
		}
		return dom.Free()
	})
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, errdefs.ErrUnavailable) || isConnError(err) {
			return probeOutcome{}, lvError(err)
		}
		// QEMU refusing KVM (e.g. "failed to set MSR" on nested hosts).
		return probeOutcome{Took: time.Since(start), Why: fmt.Sprintf("could not be started (%s)",
			oneLine(lvError(err).Error(), probeConsoleTail))}, nil
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for n := 1; ; n++ {
		data, _ := os.ReadFile(console)
		if guest.ProbeReached(data) {
			return probeOutcome{Reached: true, Took: time.Since(start)}, nil
		}
		if n%5 == 0 {
			alive, err := d.probeAlive(ctx, name)
			if err == nil && !alive {
				data, _ = os.ReadFile(console) // the last line may have just landed
				if guest.ProbeReached(data) {
					return probeOutcome{Reached: true, Took: time.Since(start)}, nil
				}
				took := time.Since(start)
				return probeOutcome{Took: took, Why: fmt.Sprintf("ended after %s without reaching user space (end of its console: %q)",
					took.Round(10*time.Millisecond), oneLine(string(data), probeConsoleTail))}, nil
			}
		}
		select {
		case <-ctx.Done():
			return probeOutcome{}, ctx.Err()
		case <-deadline.C:
			return probeOutcome{Took: time.Since(start), Why: fmt.Sprintf("did not reach user space within %s", timeout)}, nil
		case <-tick.C:
		}
	}
}

// oneLine makes s fit a one-line reason: whitespace runs (newlines too)
// become one space, control characters (a console's escape sequences) are
// dropped, and only the last max bytes are kept, where a console or QEMU
// says what went wrong.
func oneLine(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if r < ' ' && r != '\n' && r != '\t' && r != '\r' || r == 0x7f {
			return -1
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > max {
		s = "..." + s[len(s)-max:]
	}
	return s
}

// probeDomain looks the probe domain up; nil when there is none. A domain
// of that name that is not this driver's probe is never touched.
func (d *Driver) probeDomain(c *libvirt.Connect, name string) (*libvirt.Domain, error) {
	dom, err := c.LookupDomainByName(name)
	if err != nil {
		if isNoDomain(err) {
			return nil, nil
		}
		return nil, err
	}
	raw, err := dom.GetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, metadataNS, libvirt.DOMAIN_AFFECT_LIVE)
	if err != nil {
		if active, aerr := dom.IsActive(); isNotRunning(err) || (aerr == nil && !active) || isNotRunning(aerr) {
			dom.Free()
			return nil, nil
		}
	}
	var m domainMeta
	if err != nil || xml.Unmarshal([]byte(raw), &m) != nil || !m.Probe || m.Root != d.opts.Root {
		dom.Free()
		return nil, fmt.Errorf("domain %s exists but is not the KVM probe of %s; not touching it: %w", name, d.opts.Root, errdefs.ErrFailedPrecondition)
	}
	return dom, nil
}

// probeAlive reports whether the probe domain still runs.
func (d *Driver) probeAlive(ctx context.Context, name string) (bool, error) {
	return call(ctx, d.hv, func(c *libvirt.Connect) (bool, error) {
		dom, err := d.probeDomain(c, name)
		if err != nil || dom == nil {
			return false, err
		}
		defer dom.Free()
		alive, err := dom.IsActive()
		if isNotRunning(err) {
			return false, nil
		}
		return alive, err
	})
}

// destroyProbeDomain forces the probe domain off; none is not an error.
func (d *Driver) destroyProbeDomain(ctx context.Context, name string) error {
	return d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.probeDomain(c, name)
		if err != nil || dom == nil {
			return err
		}
		defer dom.Free()
		if err := dom.Destroy(); err != nil && !isNotRunning(err) {
			return fmt.Errorf("destroy probe domain %s: %w", name, lvError(err))
		}
		return nil
	})
}
