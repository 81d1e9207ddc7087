// Package idmap makes user namespaces for id-mapped mounts
// (mount_setattr(MOUNT_ATTR_IDMAP)): the container driver shows images and
// volumes to a container's id range through them, and the volume store
// shows a volume to QEMU's user for 9p.
package idmap

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
)

// UserNS opens a new user namespace whose ids 0 to size-1 are host uids
// uid to uid+size-1 and gids gid to gid+size-1. A multithreaded Go
// program cannot unshare a user namespace itself, so a child process is
// made in one: it stops at its exec (ptrace), before running any code of
// its own, and is killed once its namespace is open. The returned file
// keeps the namespace alive; nothing else outlives the call.
func UserNS(uid, gid, size uint32) (*os.File, error) {
	// The tracer of a ptraced child is the thread that forked it.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cmd := &exec.Cmd{
		Path: "/proc/self/exe",
		Args: []string{"berth-userns"},
		Env:  []string{},
		SysProcAttr: &syscall.SysProcAttr{
			Cloneflags:  syscall.CLONE_NEWUSER,
			UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(uid), Size: int(size)}},
			GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(gid), Size: int(size)}},
			Ptrace:      true,
			Pdeathsig:   syscall.SIGKILL,
		},
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("create a user namespace: %w", err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	f, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", cmd.Process.Pid))
	if err != nil {
		return nil, fmt.Errorf("open the user namespace: %w", err)
	}
	return f, nil
}
