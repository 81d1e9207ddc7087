// Command probe tries, from inside a workload, what a hardened container
// must not be able to do, and prints each outcome as "WHAT: RESULT" where
// RESULT is "ok" or the error text. The security tests build it statically
// and put it into the test image. It is not part of berth.
package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
)

func report(what string, err error) {
	if err == nil {
		fmt.Printf("%s: ok\n", what)
		return
	}
	fmt.Printf("%s: %v\n", what, err)
}

func main() {
	for _, arg := range os.Args[1:] {
		switch {
		case arg == "raw":
			fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_ICMP)
			if err == nil {
				syscall.Close(fd)
			}
			report("raw socket", err)
		case arg == "packet":
			fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, 0)
			if err == nil {
				syscall.Close(fd)
			}
			report("packet socket", err)
		case len(arg) > 7 && arg[:7] == "ptrace=":
			pid, _ := strconv.Atoi(arg[7:])
			err := syscall.PtraceAttach(pid)
			if err == nil {
				syscall.PtraceDetach(pid)
			}
			report("ptrace "+arg[7:], err)
		case arg == "unshare":
			report("unshare user+mount", syscall.Unshare(syscall.CLONE_NEWUSER|syscall.CLONE_NEWNS))
		case arg == "chroot-escape":
			report("mknod", syscall.Mknod("/tmp/sda", syscall.S_IFBLK|0o600, 8<<8))
		}
	}
}
