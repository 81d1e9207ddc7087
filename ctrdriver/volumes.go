package ctrdriver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
)

// volumesDir is where, in a task's range directory, its volumes are
// mounted id-mapped for its user namespace.
const volumesDir = "volumes"

// addVolumes binds the task's volumes (staged by the agent) into its
// spec: nosuid, nodev, read-only when asked. In a user namespace each
// volume is first mounted id-mapped into the task's range (ids, under
// rdir): a file of host uid 0 in the volume is the container's root's,
// and what the container's root writes is stored as uid 0. So a volume
// keeps one owner on disk, whatever range each container that mounts it
// has, and a VM (whose virtiofsd writes as the guest's ids) sees the same
// files: nothing is chowned, and two containers with different mappings
// share a volume as the same root.
func addVolumes(s *specs.Spec, cfg *driver.TaskConfig, ids *idMap, namespaces *nsPool, rdir string) error {
	if len(cfg.Mounts) == 0 {
		return nil
	}
	var ns *os.File
	if ids != nil {
		var err error
		if ns, err = namespaces.get(*ids); err != nil {
			return err
		}
		defer ns.Close()
		vdir := filepath.Join(rdir, volumesDir)
		if err := os.Mkdir(vdir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create the volumes directory: %w", err)
		}
		if err := os.Chown(vdir, int(ids.UID), int(ids.GID)); err != nil {
			return fmt.Errorf("create the volumes directory: %w", err)
		}
	}
	for i, m := range cfg.Mounts {
		src := m.Source
		if ns != nil {
			src = filepath.Join(rdir, volumesDir, strconv.Itoa(i))
			if err := os.Mkdir(src, 0o700); err != nil {
				return fmt.Errorf("volume %s: %w", m.Target, err)
			}
			if err := mountVolumeIDMapped(m.Source, src, ns, m.ReadOnly); err != nil {
				return fmt.Errorf("volume %s: %w", m.Target, err)
			}
		}
		opts := []string{"bind", "nosuid", "nodev", "rprivate"}
		if m.ReadOnly {
			opts = append(opts, "ro")
		}
		opts = append(opts, keptFlags(src)...)
		s.Mounts = append(s.Mounts, specs.Mount{Destination: m.Target, Type: "bind", Source: src, Options: opts})
	}
	return nil
}

// keptFlags are the flags of the mount at path that runc's remount of
// the bind must repeat: in a user namespace a mount's noexec, read-only
// and atime flags are locked (a Nomad secrets tmpfs is noexec), and a
// remount without them fails with EPERM.
func keptFlags(path string) []string {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil
	}
	var out []string
	for _, f := range []struct {
		bit  int64
		name string
	}{{unix.ST_NOEXEC, "noexec"}, {unix.ST_RDONLY, "ro"}, {unix.ST_NOATIME, "noatime"}, {unix.ST_NODIRATIME, "nodiratime"}, {unix.ST_RELATIME, "relatime"}} {
		if st.Flags&f.bit != 0 {
			out = append(out, f.name)
		}
	}
	return out
}

// mountVolumeIDMapped mounts a clone of the mount src on target, id-mapped
// by userns, nosuid and nodev, read-only when ro.
func mountVolumeIDMapped(src, target string, userns *os.File, ro bool) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("clone the mount of %s: %w", src, err)
	}
	defer unix.Close(fd)
	attr := unix.MountAttr{
		Attr_set:  unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV,
		Userns_fd: uint64(userns.Fd()),
	}
	if ro {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("id-map the mount of %s: %w", src, err)
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach the id-mapped mount of %s on %s: %w", src, target, err)
	}
	return nil
}

// unmountVolumes unmounts and removes the id-mapped volume mounts in a
// range directory. Only empty mount points are removed: a mount that did
// not go keeps its data.
func unmountVolumes(rdir string) error {
	vdir := filepath.Join(rdir, volumesDir)
	entries, err := os.ReadDir(vdir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		p := filepath.Join(vdir, e.Name())
		if err := unmountAll(p); err != nil {
			errs = append(errs, err)
		} else if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return os.Remove(vdir)
}
