package image

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// Who may reach what under the store's root. Unpacked trees keep the
// setuid bits, file capabilities and private content of their images, so
// no host user but root may reach them: a local user who could would run
// an image's setuid-root binary on the host (the class of Docker's
// CVE-2021-41091). Containers run through runc as root and VM root disks
// are built as root, so root access is all they need. The one exception is
// QEMU, which runs as libvirt's unprivileged user and opens whole-disk
// images as the backing files of workloads' overlays: with a disk group
// (WithDiskGroup) the root and disks/ are searchable (not listable) by that
// group alone and disk files readable by it; everything else is 0700.
const (
	privateDir = 0o700
	groupDir   = 0o710 // search only: the group reaches names it is given
	diskFile   = 0o400
	groupDisk  = 0o440
)

// WithRegistries sets the registries pulls may use (see Registries).
func WithRegistries(r Registries) Option {
	return func(s *Store) { s.registries = r }
}

// WithDiskGroup lets the group named group (a name or a number; QEMU's
// under libvirt, e.g. Debian's libvirt-qemu) read whole-disk images and
// nothing else. Empty: root only. A group that does not exist is logged
// and treated as empty, so a node without libvirt still runs containers.
func WithDiskGroup(group string) Option {
	return func(s *Store) { s.diskGroupName = group }
}

func (s *Store) resolveDiskGroup() error {
	s.diskGroup = -1
	if s.diskGroupName == "" {
		return nil
	}
	if n, err := strconv.Atoi(s.diskGroupName); err == nil && n >= 0 {
		s.diskGroup = n
		return nil
	}
	g, err := user.LookupGroup(s.diskGroupName)
	if err != nil {
		s.log.Warn("image store: the disk group does not exist; whole-disk images are readable by root only, so QEMU cannot boot them",
			"group", s.diskGroupName, "err", err)
		return nil
	}
	n, err := strconv.Atoi(g.Gid)
	if err != nil {
		return fmt.Errorf("image store: group %s has a non-numeric id %q", s.diskGroupName, g.Gid)
	}
	s.diskGroup = n
	return nil
}

// secureDirs creates the store's directories, or tightens those an older
// berth made (0711 root and rootfs/, 0444 disks), with the modes above.
func (s *Store) secureDirs() error {
	rootMode, diskDirMode := os.FileMode(privateDir), os.FileMode(privateDir)
	if s.diskGroup >= 0 {
		rootMode, diskDirMode = groupDir, groupDir
	}
	// Parents first and each set explicitly: MkdirAll would give a parent
	// the mode of the child it makes.
	for _, d := range []struct {
		dir   string
		perm  os.FileMode
		group bool
	}{
		{s.root, rootMode, s.diskGroup >= 0},
		{filepath.Dir(s.blobDir()), privateDir, false},
		{s.blobDir(), privateDir, false},
		{s.rootfsDir(), privateDir, false},
		{s.tmpDir(), privateDir, false},
		{s.diskDir(), diskDirMode, s.diskGroup >= 0},
	} {
		if err := os.MkdirAll(d.dir, d.perm); err != nil {
			return fmt.Errorf("create image store directory: %w", err)
		}
		if d.group {
			if err := os.Lchown(d.dir, -1, s.diskGroup); err != nil {
				return fmt.Errorf("image store directory: %w", err)
			}
		}
		if err := os.Chmod(d.dir, d.perm); err != nil {
			return fmt.Errorf("image store directory: %w", err)
		}
	}
	entries, err := os.ReadDir(s.diskDir())
	if err != nil {
		return fmt.Errorf("image store directory: %w", err)
	}
	for _, e := range entries {
		if err := s.secureDisk(filepath.Join(s.diskDir(), e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("whole-disk image %s: %w", e.Name(), err)
		}
	}
	return nil
}

// secureDisk gives a whole-disk image file its owner and mode: read-only,
// to root and the disk group.
func (s *Store) secureDisk(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return nil // not berth's; garbage collection removes it
	}
	mode := os.FileMode(diskFile)
	if s.diskGroup >= 0 {
		mode = groupDisk
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Gid) != s.diskGroup {
			if err := os.Lchown(path, -1, s.diskGroup); err != nil {
				return err
			}
		}
	}
	return os.Chmod(path, mode)
}
