package volume

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/internal/idmap"
)

// Source is one volume a workload mounts: a named volume of its tenant or
// an allowed host directory.
type Source struct {
	// Tenant and Name name a volume of the store; HostPath a host
	// directory. Exactly one of Name and HostPath is set.
	Tenant, Name string
	HostPath     string
	Target       string
	ReadOnly     bool
	// Devices says the workload's side of the mount creates device
	// nodes as root (a VM's virtiofsd): a writable host path must then
	// be on a nodev mount of the host.
	Devices bool
	// Owner, when set, shows the volume id-mapped: its uid and gid 0 are
	// Owner's ids, and what Owner creates is stored as 0. QEMU serves 9p
	// as its own unprivileged user; through such a mount it may write
	// the volume, whose files stay root's on disk, as a container's and
	// a virtiofsd's writes are.
	Owner *Owner
}

// Owner is a host user a staged mount is shown to as its root.
type Owner struct{ UID, GID uint32 }

// Stage makes the host side of a workload's volumes: for each source a
// mount at mounts/<workload>/<n>, cloned from the volume's directory (or
// from the host directory opened as CheckHostPath opens it, so a symlink
// swapped in after the check changes nothing), nosuid and nodev, and
// read-only when asked: a VM's virtiofsd, which has no read-only mode,
// shares a mount it cannot write. It returns the mounts for the driver.
// A workload staged before (a restart) is released first.
func (s *Store) Stage(workload string, srcs []Source) ([]driver.Mount, error) {
	if len(srcs) == 0 {
		return nil, nil
	}
	if err := driver.CheckID(workload); err != nil {
		return nil, err
	}
	s.staging.Lock()
	defer s.staging.Unlock()
	if err := s.releaseLocked(workload); err != nil {
		return nil, err
	}
	wdir := filepath.Join(s.opts.Root, mountsDir, workload)
	if err := os.Mkdir(wdir, 0o700); err != nil {
		return nil, fmt.Errorf("stage volumes: %w", err)
	}
	if err := shareDir(wdir, s.opts.ShareGID); err != nil {
		return nil, fmt.Errorf("stage volumes: %w", err)
	}
	mounts := make([]driver.Mount, 0, len(srcs))
	for i, src := range srcs {
		target := filepath.Join(wdir, strconv.Itoa(i))
		if err := s.stageOne(src, target); err != nil {
			if rerr := s.releaseLocked(workload); rerr != nil {
				s.log.Warn("release the volumes of a workload that could not be staged", "workload_id", workload, "err", rerr)
			}
			return nil, fmt.Errorf("volume %s: %w", describe(src), err)
		}
		mounts = append(mounts, driver.Mount{Source: target, Target: src.Target, ReadOnly: src.ReadOnly})
	}
	return mounts, nil
}

func describe(src Source) string {
	if src.HostPath != "" {
		return "host path " + src.HostPath
	}
	return strconv.Quote(ref(src.Tenant, src.Name))
}

func (s *Store) stageOne(src Source, target string) error {
	var f *os.File
	var err error
	if src.HostPath != "" {
		f, err = s.openHostPath(src.HostPath, src.ReadOnly, src.Devices)
	} else {
		var v *Volume
		if v, err = s.Get(src.Tenant, src.Name); err == nil {
			f, err = os.OpenFile(s.DataPath(v), unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		}
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if err := os.Mkdir(target, 0o700); err != nil {
		return err
	}
	tree, err := unix.OpenTree(int(f.Fd()), "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return fmt.Errorf("clone the mount: %w", err)
	}
	defer unix.Close(tree)
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if src.ReadOnly {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	if src.Owner != nil {
		ns, err := idmap.UserNS(src.Owner.UID, src.Owner.GID, 1)
		if err != nil {
			return err
		}
		defer ns.Close()
		attr.Attr_set |= unix.MOUNT_ATTR_IDMAP
		attr.Userns_fd = uint64(ns.Fd())
	}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("set the mount's flags: %w", err)
	}
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("mount on %s: %w", target, err)
	}
	return nil
}

// Release unmounts and removes a workload's staged mounts. Releasing a
// workload with none is not an error.
func (s *Store) Release(workload string) error {
	if err := driver.CheckID(workload); err != nil {
		return err
	}
	s.staging.Lock()
	defer s.staging.Unlock()
	return s.releaseLocked(workload)
}

func (s *Store) releaseLocked(workload string) error {
	wdir := filepath.Join(s.opts.Root, mountsDir, workload)
	entries, err := os.ReadDir(wdir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		p := filepath.Join(wdir, e.Name())
		if err := unmountAll(p); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return os.Remove(wdir)
}

// Staged lists the workloads that have staged mounts, for reconciliation.
func (s *Store) Staged() ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(s.opts.Root, mountsDir))
	if err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(entries))
	for _, e := range entries {
		ids = append(ids, e.Name())
	}
	return ids, nil
}
