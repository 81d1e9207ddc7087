package idmap

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
)

// forkUserNS makes the namespace's process by forking: a child that stops
// at its exec (ptrace), before running any code of its own. A fork copies
// the caller's page tables: it costs what the caller's size makes it.
func forkUserNS(uid, gid, size uint32) (*os.File, error) {
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
