// Package netlinkutil holds the few link operations berth makes without a
// netlink library, so the guest init (a static, cgo-free binary in the VM's
// initramfs) and the host agent share one copy. It uses
// golang.org/x/sys/unix only.
package netlinkutil

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// LoopbackUp sets lo up in the calling thread's network namespace, which
// makes the kernel give it 127.0.0.1 and ::1. Setting an interface that is
// already up is a no-op.
func LoopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: get flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("loopback: set up: %w", err)
	}
	return nil
}
