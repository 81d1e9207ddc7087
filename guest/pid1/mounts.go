//go:build linux

package pid1

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

type mountSpec struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// earlyMounts are what berth-init needs for itself in the initramfs: device
// nodes, sysfs for device discovery, proc for the kernel's view of things.
var earlyMounts = []mountSpec{
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
}

// workloadMounts are mounted inside the workload's root, after berth-init
// has chrooted into it, mirroring what runc gives a container. /dev is a
// small tmpfs with the usual nodes rather than devtmpfs, so the workload
// does not see berth's own disks and channels.
var workloadMounts = []mountSpec{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"tmpfs", "/dev", "tmpfs", unix.MS_NOSUID | unix.MS_STRICTATIME, "mode=755,size=65536k"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "mode=1777,size=65536k"},
	{"mqueue", "/dev/mqueue", "mqueue", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=755"},
}

// devNodes are created on the workload's /dev tmpfs, as runc's defaults.
var devNodes = []struct {
	name         string
	major, minor uint32
}{
	{"/dev/null", 1, 3},
	{"/dev/zero", 1, 5},
	{"/dev/full", 1, 7},
	{"/dev/random", 1, 8},
	{"/dev/urandom", 1, 9},
	{"/dev/tty", 5, 0},
}

var devLinks = [][2]string{
	{"/proc/self/fd", "/dev/fd"},
	{"/proc/self/fd/0", "/dev/stdin"},
	{"/proc/self/fd/1", "/dev/stdout"},
	{"/proc/self/fd/2", "/dev/stderr"},
	{"pts/ptmx", "/dev/ptmx"},
	{"/proc/kcore", "/dev/core"},
}

// mountAll mounts specs in order, creating mount points, and returns the
// targets it mounted so they can be unmounted in reverse. The kernel may
// already have mounted devtmpfs (CONFIG_DEVTMPFS_MOUNT); EBUSY is fine.
func mountAll(specs []mountSpec) ([]string, error) {
	var done []string
	for _, m := range specs {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return done, fmt.Errorf("mount %s: create mount point: %w", m.target, err)
		}
		err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
		if errors.Is(err, unix.EBUSY) {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
		done = append(done, m.target)
		if m.target == "/dev" && m.fstype == "tmpfs" {
			if err := populateDev(); err != nil {
				return done, err
			}
		}
	}
	return done, nil
}

func populateDev() error {
	for _, d := range devNodes {
		if err := unix.Mknod(d.name, unix.S_IFCHR|0o666, int(unix.Mkdev(d.major, d.minor))); err != nil {
			return fmt.Errorf("create %s: %w", d.name, err)
		}
		// mknod honours the umask; these nodes are world-usable by design.
		if err := os.Chmod(d.name, 0o666); err != nil {
			return fmt.Errorf("create %s: %w", d.name, err)
		}
	}
	for _, l := range devLinks {
		if err := os.Symlink(l[0], l[1]); err != nil {
			return fmt.Errorf("create %s: %w", l[1], err)
		}
	}
	return nil
}

// unmountAll unmounts targets in reverse order. Everything of the workload
// has been killed by then; a lazy detach covers what still is busy anyway.
func unmountAll(targets []string) error {
	var errs []error
	for i := len(targets) - 1; i >= 0; i-- {
		if err := unix.Unmount(targets[i], 0); err != nil {
			if derr := unix.Unmount(targets[i], unix.MNT_DETACH); derr != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", targets[i], err))
			}
		}
	}
	return errors.Join(errs...)
}
