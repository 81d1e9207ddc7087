package vmdriver

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"

	"github.com/berthd/berth/errdefs"
)

// kvmAPIVersion is the only KVM API version Linux has ever reported.
const kvmAPIVersion = 12

// kvmGetAPIVersion is the KVM_GET_API_VERSION ioctl, _IO(0xAE, 0x00).
const kvmGetAPIVersion = 0xAE00

// accelChoice is the acceleration the driver uses, and why.
type accelChoice struct {
	Accel  Accel
	Reason string
}

// chooseAccel resolves the configured acceleration. "kvm" and "tcg" are
// taken as given (kvm is checked, so a forced kvm on a host without it
// fails loudly instead of falling back). "auto" picks kvm when /dev/kvm
// opens, answers the KVM API version ioctl, and libvirt reports a kvm
// domain type for x86_64; otherwise tcg.
//
// The probe does not boot a guest: a boot test costs seconds, and its one
// extra catch, nested KVM that starts the kernel and then hangs (as on
// berth's own build machines), is a property of the host operators know
// about; they force "tcg" there.
func chooseAccel(ctx context.Context, hv *hypervisor, want Accel) (accelChoice, error) {
	switch want {
	case AccelTCG:
		return accelChoice{AccelTCG, "forced by configuration (accel=tcg)"}, nil
	case AccelKVM, AccelAuto, "":
	default:
		return accelChoice{}, fmt.Errorf("accel %q: want auto, kvm or tcg: %w", want, errdefs.ErrInvalidArgument)
	}
	why, err := probeKVM(ctx, hv)
	if err != nil {
		return accelChoice{}, err
	}
	if want == AccelKVM {
		if why != "" {
			return accelChoice{}, fmt.Errorf("accel=kvm is configured but KVM is not usable: %s: %w", why, errdefs.ErrUnavailable)
		}
		return accelChoice{AccelKVM, "forced by configuration (accel=kvm); /dev/kvm and libvirt's kvm domain type are available"}, nil
	}
	if why != "" {
		return accelChoice{AccelTCG, "auto: KVM unusable (" + why + "); using TCG software emulation"}, nil
	}
	return accelChoice{AccelKVM, "auto: /dev/kvm answers KVM API 12 and libvirt offers the kvm domain type"}, nil
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
