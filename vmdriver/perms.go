package vmdriver

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
)

// QEMU runs as libvirt's unprivileged user and opens the disks, sockets
// and boot files under the driver's root. With a QEMU group (Debian's
// libvirt-qemu), the driver's directories are 0710 to that group: QEMU
// passes through, nobody else reaches a task's disks, its config disk
// (command and environment) or the image's root disk. Without one they
// are 0711, as before: anyone may pass through, nobody may list.
const (
	groupDirMode  os.FileMode = 0o710
	publicDirMode os.FileMode = 0o711
)

// resolveGroup turns a group name or number into a gid; -1 for none.
func resolveGroup(name string) (int, error) {
	if name == "" {
		return -1, nil
	}
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("vmdriver: QEMU group %q: %w", name, err)
	}
	n, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("vmdriver: group %s has a non-numeric id %q", name, g.Gid)
	}
	return n, nil
}

// qemuDir makes dir (if needed) and gives it the mode and group QEMU must
// pass through with.
func (d *Driver) qemuDir(dir string, mkdir func(string, os.FileMode) error) error {
	mode := publicDirMode
	if d.qemuGID >= 0 {
		mode = groupDirMode
	}
	if mkdir != nil {
		if err := mkdir(dir, mode); err != nil {
			return err
		}
	}
	if d.qemuGID >= 0 {
		if err := os.Chown(dir, 0, d.qemuGID); err != nil {
			return err
		}
	}
	return os.Chmod(dir, mode)
}
