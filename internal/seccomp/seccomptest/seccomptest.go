// Package seccomptest reads the seccomp filter a process runs under, for
// tests that check what was installed.
package seccomptest

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxInstructions is BPF_MAXINSNS.
const maxInstructions = 4096

// ReadFilter returns the newest seccomp filter of process pid (the one
// installed last), in the kernel's struct sock_filter layout, with
// PTRACE_SECCOMP_GET_FILTER. It stops the process briefly under ptrace:
// root only. ptrace requests must all come from the tracing thread, so it
// runs on a locked OS thread of its own.
func ReadFilter(pid int) ([]byte, error) {
	type result struct {
		filter []byte
		err    error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// the thread stays locked: it ends with the goroutine, so no
		// other goroutine inherits a thread that was a tracer
		f, err := getFilter(pid)
		ch <- result{f, err}
	}()
	r := <-ch
	return r.filter, r.err
}

func getFilter(pid int) (filter []byte, err error) {
	if err := unix.PtraceSeize(pid); err != nil {
		return nil, fmt.Errorf("PTRACE_SEIZE: %w", err)
	}
	defer func() {
		if derr := unix.PtraceDetach(pid); derr != nil && err == nil {
			err = fmt.Errorf("PTRACE_DETACH: %w", derr)
		}
	}()
	if err := unix.PtraceInterrupt(pid); err != nil {
		return nil, fmt.Errorf("PTRACE_INTERRUPT: %w", err)
	}
	var ws unix.WaitStatus
	for {
		wpid, err := unix.Wait4(pid, &ws, unix.WALL, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("wait4: %w", err)
		}
		if wpid == pid && ws.Stopped() {
			break
		}
		if ws.Exited() || ws.Signaled() {
			return nil, fmt.Errorf("pid %d ended: %v", pid, ws)
		}
	}
	ptrace := func(data unsafe.Pointer) (uintptr, error) {
		n, _, errno := unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_SECCOMP_GET_FILTER, uintptr(pid), 0, uintptr(data), 0, 0)
		if errno != 0 {
			return 0, fmt.Errorf("PTRACE_SECCOMP_GET_FILTER: %w", errno)
		}
		return n, nil
	}
	n, err := ptrace(nil)
	if err != nil {
		return nil, err
	}
	if n == 0 || n > maxInstructions {
		return nil, fmt.Errorf("filter of %d instructions", n)
	}
	buf := make([]unix.SockFilter, n)
	if _, err := ptrace(unsafe.Pointer(&buf[0])); err != nil {
		return nil, err
	}
	out := make([]byte, 0, 8*n)
	for _, in := range buf {
		out = binary.LittleEndian.AppendUint16(out, in.Code)
		out = append(out, in.Jt, in.Jf)
		out = binary.LittleEndian.AppendUint32(out, in.K)
	}
	return out, nil
}
