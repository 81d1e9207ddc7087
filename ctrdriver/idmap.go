package ctrdriver

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/idmap"
)

// idMap is a task's own slice of host ids: ids 0 to Size-1 in the
// container are host uids UID to UID+Size-1 and host gids GID to
// GID+Size-1.
type idMap struct {
	UID  uint32 `json:"uid"`
	GID  uint32 `json:"gid"`
	Size uint32 `json:"size"`
}

// usernsFile opens a new user namespace with m's mappings, for
// mount_setattr(MOUNT_ATTR_IDMAP).
func usernsFile(m idMap) (*os.File, error) { return idmap.UserNS(m.UID, m.GID, m.Size) }

// mountIDMapped mounts a read-only clone of the directory src on target,
// its ids shifted by the user namespace userns: a file of uid 0 in src is
// owned by the namespace's root on target. src itself is not changed.
func mountIDMapped(src, target string, userns *os.File) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("clone the mount of %s: %w", src, err)
	}
	defer unix.Close(fd)
	attr := unix.MountAttr{
		Attr_set:  unix.MOUNT_ATTR_IDMAP | unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NODEV,
		Userns_fd: uint64(userns.Fd()),
	}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("id-map the mount of %s: %w", src, err)
	}
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach the id-mapped mount of %s on %s: %w", src, target, err)
	}
	return nil
}
