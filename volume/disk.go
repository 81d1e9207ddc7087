package volume

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/loopfs"
)

// diskTimeout bounds mkfs and mount of a volume's filesystem.
const diskTimeout = 2 * time.Minute

// makeDisk gives the volume in dir a filesystem of its own: size bytes
// allocated up front (fallocate, so the node's disk cannot run out under
// it later), formatted ext4 with no blocks reserved for root (a full
// volume is full for everyone) and loop-mounted on data/.
func makeDisk(dir string, size int64) error {
	img := filepath.Join(dir, diskFile)
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = unix.Fallocate(int(f.Fd()), 0, 0, size)
	if errors.Is(err, unix.EOPNOTSUPP) {
		err = f.Truncate(size) // a filesystem without fallocate: sparse
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("reserve %d bytes: %w", size, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), diskTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-m", "0",
		"-E", "root_owner=0:0,lazy_itable_init=0", img).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return mountDisk(dir)
}

// mountDisk loop-mounts the volume's filesystem on data/ unless it is
// mounted already (after a reboot it is not).
func mountDisk(dir string) error {
	data := filepath.Join(dir, dataDir)
	mounted, err := isMountPoint(data)
	if err != nil || mounted {
		return err
	}
	return loopfs.Mount(filepath.Join(dir, diskFile), data, unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOATIME)
}

// isMountPoint reports whether path is the root of a mount: its device
// differs from its parent's, or both are the same directory.
func isMountPoint(path string) (bool, error) {
	var st, parent unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return false, err
	}
	if err := unix.Lstat(filepath.Dir(path), &parent); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev || st.Ino == parent.Ino, nil
}

// unmountAll unmounts whatever is mounted on target, stacked mounts
// included; a busy mount is detached (lazily unmounted). A missing
// target is not an error.
func unmountAll(target string) error {
	for range 16 {
		err := unix.Unmount(target, 0)
		switch {
		case err == nil:
			continue
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not a mount point (any more)
		case errors.Is(err, unix.EBUSY):
			if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", target, err)
			}
		default:
			return fmt.Errorf("unmount %s: %w", target, err)
		}
	}
	return fmt.Errorf("unmount %s: still mounted after 16 unmounts", target)
}
