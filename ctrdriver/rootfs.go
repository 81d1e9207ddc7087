package ctrdriver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/internal/loopfs"
)

// mountRootfs gives a task its own writable view of the image's shared,
// read-only root filesystem and returns where it is mounted. With user
// namespaces on, the task first gets its range of host ids, and the image
// is shown to it through an id-mapped mount (nothing is chowned, the image
// stays shared): ids returns the range.
func (d *Driver) mountRootfs(ctx context.Context, cfg *driver.TaskConfig, dir string) (rootfs string, ids *idMap, err error) {
	layer := d.layerDir(cfg.ID)
	upper, work := filepath.Join(layer, "upper"), filepath.Join(layer, "work")
	if err := os.MkdirAll(filepath.Join(dir, "bundle"), 0o755); err != nil {
		return "", nil, fmt.Errorf("create bundle dir: %w", err)
	}
	if err := os.Mkdir(layer, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", nil, fmt.Errorf("create the writable layer's directory: %w", err)
	}
	if size := cfg.Resources.DiskBytes; size > 0 {
		scratch := filepath.Join(layer, scratchDir)
		if err := d.mountScratch(scratch, size); err != nil {
			return "", nil, err
		}
		upper, work = filepath.Join(scratch, "upper"), filepath.Join(scratch, "work")
	}
	if on, _ := d.userns.enabled(); !on {
		rootfs = filepath.Join(dir, "bundle", "rootfs")
		return rootfs, nil, mountOverlay(cfg.Image.RootfsDir, upper, work, rootfs, d.volatile)
	}
	m, err := d.userns.allocate(ctx, dir)
	if err != nil {
		return "", nil, err
	}
	rdir := d.userns.rangeDir(m)
	// The range was free, so a directory of it is a crash's leftover.
	if err := removeRangeDir(rdir); err != nil {
		return "", nil, err
	}
	if err := os.Mkdir(rdir, 0o710); err != nil {
		return "", nil, fmt.Errorf("create the range directory: %w", err)
	}
	if err := os.Chown(rdir, int(m.UID), int(m.GID)); err != nil {
		return "", nil, fmt.Errorf("create the range directory: %w", err)
	}
	if err := os.Chmod(rdir, 0o710); err != nil { // past the umask
		return "", nil, fmt.Errorf("create the range directory: %w", err)
	}
	rootfs = filepath.Join(rdir, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return "", nil, fmt.Errorf("create the root filesystem's mount point: %w", err)
	}
	ns, err := d.userns.pool.get(m)
	if err != nil {
		return "", nil, err
	}
	defer ns.Close()
	if err := mountIDMappedOverlay(cfg.Image.RootfsDir, filepath.Join(dir, "lower"), upper, work, rootfs, ns, d.volatile); err != nil {
		return "", nil, err
	}
	return rootfs, &m, nil
}

// overlayOptions are the mount options of an overlay. A volatile overlay
// never syncs its upper layer: not at unmount, not when the container
// calls fsync or syncfs. A container's writable layer lives and dies with
// its run (a restart gets a new one, and a node's reboot releases it), so
// nothing it holds is kept past a crash of the node whether synced or not;
// what a workload must keep goes on a volume. Without it, each unmount of
// an ended container's root filesystem wrote back and flushed the whole
// upper filesystem (about 1 ms on a writable layer's own filesystem).
func overlayOptions(lower, upper, work string, volatile bool) string {
	o := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if volatile {
		o += ",volatile"
	}
	return o
}

// probeVolatile reports whether this kernel's overlayfs takes the volatile
// option (Linux 5.10 and later), by mounting a small overlay under dir.
func probeVolatile(dir string) (bool, error) {
	scratch, err := os.MkdirTemp(dir, ".probe-volatile-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(scratch)
	var p [4]string
	for i, name := range []string{"lower", "upper", "work", "merged"} {
		p[i] = filepath.Join(scratch, name)
		if err := os.Mkdir(p[i], 0o700); err != nil {
			return false, err
		}
	}
	err = unix.Mount("overlay", p[3], "overlay", unix.MS_NODEV, overlayOptions(p[0], p[1], p[2], true))
	if err != nil {
		return false, nil
	}
	return true, unmountAll(p[3])
}

// mountOverlay mounts an overlay of lower with a writable upper layer:
// nothing is copied until the task writes.
func mountOverlay(lower, upper, work, target string, volatile bool) error {
	for _, d := range []string{upper, work, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create overlay dir: %w", err)
		}
	}
	if err := unix.Mount("overlay", target, "overlay", unix.MS_NODEV, overlayOptions(lower, upper, work, volatile)); err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	return nil
}

// mountIDMappedOverlay mounts an overlay on target whose lower layer is
// lower id-mapped into the user namespace ns, through a mount at stage
// that is gone again once the overlay holds its own. Files the container makes or copies up are
// owned by its mapped ids in upper, as the host sees them: a setuid
// binary its root writes is no host root's.
func mountIDMappedOverlay(lower, stage, upper, work, target string, ns *os.File, volatile bool) error {
	if err := os.Mkdir(stage, 0o700); err != nil {
		return fmt.Errorf("create overlay dir: %w", err)
	}
	if err := mountIDMapped(lower, stage, ns); err != nil {
		return err
	}
	defer func() {
		_ = unmountAll(stage)
		_ = os.Remove(stage)
	}()
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return fmt.Errorf("create overlay dir: %w", err)
		}
	}
	// The root directory shows the upper layer's owner and mode: the
	// image's root directory's, as the container sees it.
	var st unix.Stat_t
	if err := unix.Stat(stage, &st); err != nil {
		return fmt.Errorf("stat the image root: %w", err)
	}
	if err := os.Chown(upper, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("own the upper layer: %w", err)
	}
	if err := unix.Chmod(upper, st.Mode&0o7777); err != nil {
		return fmt.Errorf("set the upper layer's mode: %w", err)
	}
	if err := unix.Mount("overlay", target, "overlay", unix.MS_NODEV, overlayOptions(stage, upper, work, volatile)); err != nil {
		return fmt.Errorf("mount overlay on %s: %w", target, err)
	}
	return nil
}

// unmountRootfs unmounts the task's root filesystem and whatever else
// was mounted for it; the writable layer stays on disk. dir is the task's
// directory.
func (d *Driver) unmountRootfs(dir string) error {
	errs := []error{unmountAll(filepath.Join(dir, "bundle", "rootfs"))}
	m, err := readIDMap(dir)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if m != nil {
		errs = append(errs,
			unmountAll(filepath.Join(d.userns.rangeDir(*m), "rootfs")),
			unmountVolumes(d.userns.rangeDir(*m)),
			unmountAll(filepath.Join(dir, "lower")),
			unmountAll(filepath.Join(dir, "sys")))
	}
	// Last: the overlay above held it. (A task of a release before the
	// layers' own directory has it in the task directory.)
	errs = append(errs, unmountAll(filepath.Join(d.layerDir(filepath.Base(dir)), scratchDir)),
		unmountAll(filepath.Join(dir, scratchDir)))
	return errors.Join(errs...)
}

// scratchDir is where a task with a disk budget has the filesystem its
// writable layer lives on; scratchImage is that filesystem's file.
const (
	scratchDir   = "scratch"
	scratchImage = "scratch.img"
)

// mountScratch makes a filesystem of size bytes for the task's writable
// layer and mounts it on dir: writes past the budget fail with ENOSPC in
// the container and never reach the node's disk. Only root reaches it;
// the overlay's upper and work directories are made inside it.
func (d *Driver) mountScratch(dir string, size int64) error {
	img := filepath.Join(filepath.Dir(dir), scratchImage)
	if size < loopfs.MinBytes {
		size = loopfs.MinBytes
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("the writable layer's filesystem: %w", err)
	}
	if d.layers.take(size, img, dir) {
		return nil
	}
	if err := d.scratch.Create(img, size, 0, 0); err != nil {
		return fmt.Errorf("the writable layer's filesystem: %w", err)
	}
	if err := loopfs.Mount(img, dir, unix.MS_NODEV|unix.MS_NOSUID); err != nil {
		return fmt.Errorf("the writable layer's filesystem: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("the writable layer's filesystem: %w", err)
	}
	return nil
}

// releaseRootfs unmounts the task's root filesystem and removes its range
// directory. The range itself is free once the task directory (and its
// record) is gone.
func (d *Driver) releaseRootfs(dir string) error {
	if err := d.unmountRootfs(dir); err != nil {
		return err
	}
	m, err := readIDMap(dir)
	if err != nil || m == nil {
		return err
	}
	return removeRangeDir(d.userns.rangeDir(*m))
}

// removeRangeDir removes a range directory and its mount point. It
// removes only empty directories: a mount that did not go stays, with
// what it shows.
func removeRangeDir(rdir string) error {
	rootfs := filepath.Join(rdir, "rootfs")
	if err := unmountAll(rootfs); err != nil {
		return err
	}
	if err := unmountVolumes(rdir); err != nil {
		return err
	}
	for _, p := range []string{rootfs, rdir} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove the range directory: %w", err)
		}
	}
	return nil
}

// unmountAll removes the overlay mount; a lazy unmount is the fallback when
// something (a process of a lost task) still holds it.
func unmountAll(target string) error {
	for {
		err := unix.Unmount(target, 0)
		switch {
		case err == nil:
			continue // a mount may be stacked; unmount until none is left
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not a mount point (any more)
		case errors.Is(err, unix.EBUSY):
			if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", target, err)
			}
			return nil
		default:
			return fmt.Errorf("unmount %s: %w", target, err)
		}
	}
}
