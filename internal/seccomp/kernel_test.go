package seccomp

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

const kernelChildEnv = "BERTH_SECCOMP_KERNEL_CHILD"

// TestKernelEnforces loads the compiled berth profile into the kernel in a
// child process (this test binary again) and makes a few system calls
// under it: the kernel must accept the program and give the verdicts the
// interpreter gives.
func TestKernelEnforces(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("skipped: the compiler targets x86_64 hosts")
	}
	if os.Getenv(kernelChildEnv) == "1" {
		kernelChild(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestKernelEnforces$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), kernelChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestKernelEnforces") {
		t.Fatalf("child under the filter: %v\n%s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "kernel_test.go") {
			t.Log(strings.TrimSpace(l))
		}
	}
}

func kernelChild(t *testing.T) {
	raw, err := Compile(DefaultProfile())
	if err != nil {
		t.Fatal(err)
	}
	prog := make([]unix.SockFilter, len(raw)/8)
	for i, in := range decode(t, raw) {
		prog[i] = unix.SockFilter{Code: in.code, Jt: in.jt, Jf: in.jf, K: in.k}
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_NO_NEW_PRIVS: %v", err)
	}
	// TSYNC: every thread of the Go runtime gets the filter.
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC,
		uintptr(unsafe.Pointer(&fprog))); errno != 0 {
		t.Fatalf("seccomp(SECCOMP_SET_MODE_FILTER): %v", errno)
	}
	runtime.KeepAlive(prog)
	t.Logf("kernel accepted the %d-instruction filter", len(prog))

	sys := func(nr uintptr, a ...uintptr) error {
		var args [6]uintptr
		copy(args[:], a)
		_, _, errno := unix.Syscall6(nr, args[0], args[1], args[2], args[3], args[4], args[5])
		if errno != 0 {
			return errno
		}
		return nil
	}
	for _, c := range []struct {
		what string
		nr   uintptr
		args []uintptr
		want error
	}{
		{"mount", unix.SYS_MOUNT, nil, unix.EPERM},
		{"unshare(CLONE_NEWUSER)", unix.SYS_UNSHARE, []uintptr{unix.CLONE_NEWUSER}, unix.EPERM},
		{"clone3", unix.SYS_CLONE3, nil, unix.ENOSYS},
		{"socket(AF_VSOCK)", unix.SYS_SOCKET, []uintptr{unix.AF_VSOCK, unix.SOCK_STREAM}, unix.EPERM},
		{"personality(ADDR_NO_RANDOMIZE)", unix.SYS_PERSONALITY, []uintptr{0x0040000 /* ADDR_NO_RANDOMIZE */}, unix.EPERM},
		{"personality(query)", unix.SYS_PERSONALITY, []uintptr{0xffffffff}, nil},
		{"set_mempolicy_home_node (450, not allowed)", 450, nil, unix.EPERM},
		{"syscall 460 (newer than the profile)", 460, nil, unix.ENOSYS},
		{"getpid", unix.SYS_GETPID, nil, nil},
	} {
		if err := sys(c.nr, c.args...); !errors.Is(err, c.want) && err != c.want {
			t.Errorf("%s: %v, want %v", c.what, err, c.want)
		} else {
			t.Logf("%s: %v", c.what, err)
		}
	}
	// The kernel reads the family from the low 32 bits: high bits must
	// not carry AF_VSOCK past the rule.
	if r, _, errno := unix.Syscall(unix.SYS_SOCKET, 1<<32|unix.AF_VSOCK, unix.SOCK_STREAM, 0); errno != unix.EPERM {
		t.Errorf("socket(1<<32|AF_VSOCK) = %d, %v; want EPERM", int(r), errno)
		if errno == 0 {
			unix.Close(int(r))
		}
	}
	// Families above AF_VSOCK are allowed one by one: AF_XDP gets the
	// kernel's own answer (a socket for root, or EAFNOSUPPORT), not the
	// filter's EPERM.
	r, _, errno := unix.Syscall(unix.SYS_SOCKET, unix.AF_XDP, unix.SOCK_RAW, 0)
	if errno == unix.EPERM {
		t.Errorf("socket(AF_XDP): EPERM, want it past the filter")
	}
	if errno == 0 {
		unix.Close(int(r))
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Errorf("socket(AF_UNIX): %v", err)
	} else {
		unix.Close(fd)
	}
}
