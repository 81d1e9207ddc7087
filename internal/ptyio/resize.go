package ptyio

import (
	"os"

	"golang.org/x/sys/unix"
)

// Resize sets the size of the terminal whose master (or slave) is f. It
// goes through f's raw connection, not f.Fd(), which would put f in
// blocking mode: a Read pending on it could then no longer be ended by
// Close.
func Resize(f *os.File, rows, cols uint16) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols})
	}); err != nil {
		return err
	}
	return ierr
}
