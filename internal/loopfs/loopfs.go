// Package loopfs makes filesystems of a fixed size out of sparse files:
// a workload's writable layer (or a sized volume) lives on one, so that
// writing past its budget gives ENOSPC inside the workload and never fills
// the node's disk, on filesystems without project quotas.
//
// A loop device is attached with autoclear: it goes away by itself when
// its filesystem is unmounted, or when the process attaching it dies
// before the mount. No device can leak past either.
package loopfs

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// MinBytes is the smallest filesystem Create makes: ext4 with no journal
// needs a few hundred KiB of its own.
const MinBytes = 4 << 20

// Create makes img a sparse file of size bytes holding an empty ext4
// filesystem. Nothing but the filesystem's metadata takes space until
// written. The filesystem has no journal (its content does not outlive a
// crash of the node: it is scratch space) and no blocks reserved for root,
// and its root directory belongs to uid:gid with mode 0755.
func Create(img string, size int64, uid, gid int) (err error) {
	if size < MinBytes {
		return fmt.Errorf("loopfs: %d bytes is below the smallest filesystem, %d: %w", size, MinBytes, errdefs.ErrInvalidArgument)
	}
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("loopfs: create %s: %w", img, err)
	}
	defer func() {
		if err != nil {
			os.Remove(img)
		}
	}()
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("loopfs: size %s: %w", img, err)
	}
	cmd := exec.Command("mkfs.ext4", "-q", "-F",
		"-O", "^has_journal",
		"-m", "0",
		"-E", "lazy_itable_init=1,nodiscard,root_owner="+strconv.Itoa(uid)+":"+strconv.Itoa(gid),
		img)
	if out, err := cmd.CombinedOutput(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("loopfs: mkfs.ext4 not found (install e2fsprogs): %w", errdefs.ErrUnavailable)
		}
		return fmt.Errorf("loopfs: mkfs.ext4 %s: %w: %s", img, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Mount attaches img to a free loop device and mounts its filesystem on
// target with flags (MS_NOSUID, MS_NODEV, ...).
func Mount(img, target string, flags uintptr) error {
	backing, err := os.OpenFile(img, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopfs: open %s: %w", img, err)
	}
	defer backing.Close()
	dev, err := attach(backing)
	if err != nil {
		return fmt.Errorf("loopfs: attach %s: %w", img, err)
	}
	// Autoclear detaches the device once this last open file goes and
	// no mount holds it: after a failed mount, or after the unmount.
	defer dev.Close()
	// noinit_itable: the inode tables of a new sparse file read as zeros
	// already; the kernel need not write them out behind the workload.
	if err := unix.Mount(dev.Name(), target, "ext4", flags, "errors=remount-ro,noinit_itable"); err != nil {
		return fmt.Errorf("loopfs: mount %s on %s: %w", img, target, err)
	}
	return nil
}

// attach binds backing to a free loop device and returns it, open.
func attach(backing *os.File) (*os.File, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer ctl.Close()
	// Another process may take the device between GET_FREE and
	// CONFIGURE: EBUSY then, and a new one is asked for.
	for range 64 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("find a free loop device: %w", err)
		}
		dev, err := openLoop(n)
		if err != nil {
			return nil, err
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		err = unix.IoctlLoopConfigure(int(dev.Fd()), &cfg)
		if err == nil {
			return dev, nil
		}
		dev.Close()
		if !errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("configure %s: %w", dev.Name(), err)
		}
	}
	return nil, fmt.Errorf("no loop device stayed free: %w", errdefs.ErrUnavailable)
}

// openLoop opens /dev/loopN, waiting briefly for the device node of a
// device the kernel has just made.
func openLoop(n int) (*os.File, error) {
	name := "/dev/loop" + strconv.Itoa(n)
	for i := 0; ; i++ {
		f, err := os.OpenFile(name, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || i == 50 {
			return f, err
		}
		time.Sleep(2 * time.Millisecond)
	}
}
