// Package idmap makes user namespaces for id-mapped mounts
// (mount_setattr(MOUNT_ATTR_IDMAP)): the container driver shows images and
// volumes to a container's id range through them, and the volume store
// shows a volume to QEMU's user for 9p.
package idmap

import "os"

// UserNS opens a new user namespace whose ids 0 to size-1 are host uids
// uid to uid+size-1 and gids gid to gid+size-1. A multithreaded Go
// program cannot unshare a user namespace itself, so a child process is
// made in one, runs nothing of its own, and is killed once its namespace
// is open. The returned file keeps the namespace alive; nothing else
// outlives the call.
func UserNS(uid, gid, size uint32) (*os.File, error) {
	return userNS(uid, gid, size)
}
