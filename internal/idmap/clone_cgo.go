//go:build cgo

package idmap

/*
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

// berth_userns_idle is all the child runs: raw system calls only (it
// shares the caller's memory and thread-local storage, so it touches
// nothing of the C library's or Go's), every signal blocked. It dies with
// the thread that made it, or when killed.
static int berth_userns_idle(void *arg) {
	syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (syscall(SYS_getppid) != (long)(intptr_t)arg)
		syscall(SYS_exit, 0);
	for (;;)
		syscall(SYS_ppoll, NULL, 0, NULL, NULL, 0);
	return 0;
}

// berth_userns_clone starts that child in a new user namespace. CLONE_VM:
// the caller's memory is shared, not copied, however large the caller.
static int berth_userns_clone(void *stack_top, int *err) {
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int pid = clone(berth_userns_idle, stack_top, CLONE_NEWUSER | CLONE_VM | SIGCHLD, (void *)(intptr_t)getpid());
	*err = errno;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return pid;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// childStack is the stack of the child, which makes four system calls.
const childStack = 16 << 10

// userNS makes the namespace's process with clone(CLONE_NEWUSER|CLONE_VM):
// a fork would copy the page tables of the whole agent for a process that
// only needs to exist.
func userNS(uid, gid, size uint32) (*os.File, error) {
	// The child dies with the thread that made it (if the agent dies
	// before killing it): that thread stays until the child is gone.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	stack := C.malloc(childStack)
	if stack == nil {
		return nil, errors.New("create a user namespace: out of memory")
	}
	var cerr C.int
	pid := int(C.berth_userns_clone(unsafe.Add(stack, childStack), &cerr))
	if pid < 0 {
		C.free(stack)
		return nil, fmt.Errorf("create a user namespace: %w", syscall.Errno(cerr))
	}
	defer func() {
		_ = unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		for {
			if _, err := unix.Wait4(pid, &ws, 0, nil); err != unix.EINTR {
				break
			}
		}
		C.free(stack) // the child ran on it: only once it is gone
	}()
	if err := writeMaps(pid, uid, gid, size); err != nil {
		return nil, err
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/ns/user", pid))
	if err != nil {
		return nil, fmt.Errorf("open the user namespace: %w", err)
	}
	return f, nil
}

// writeMaps gives the user namespace of process pid its ids, as the
// parent's root may.
func writeMaps(pid int, uid, gid, size uint32) error {
	for _, f := range []struct{ name, data string }{
		{"uid_map", fmt.Sprintf("0 %d %d\n", uid, size)},
		{"setgroups", "deny"},
		{"gid_map", fmt.Sprintf("0 %d %d\n", gid, size)},
	} {
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/%s", pid, f.name), []byte(f.data), 0); err != nil {
			return fmt.Errorf("create a user namespace: write %s: %w", f.name, err)
		}
	}
	return nil
}
