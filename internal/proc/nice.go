package proc

import (
	"errors"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// BackgroundNice is the niceness of work made ahead for later starts
// (spare monitors, prepared layers): on a busy node it takes the CPU only
// when the starts themselves leave some.
const BackgroundNice = 19

// Nice returns the calling thread's niceness.
func Nice() (int, error) {
	// The system call answers 20 - nice (1 to 40), which x/sys passes on.
	p, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		return 0, err
	}
	return 20 - p, nil
}

// InBackground runs fn on a thread of its own at BackgroundNice: fn's
// system calls, and any process it starts (a child inherits the niceness
// of the thread that forks it), yield the CPU to everything else. Linux
// keeps niceness per thread, so the rest of the process is untouched.
func InBackground(fn func() error) error {
	runtime.LockOSThread()
	tid := unix.Gettid()
	was, err := Nice()
	if err == nil {
		err = unix.Setpriority(unix.PRIO_PROCESS, tid, BackgroundNice)
	}
	if err != nil {
		// Not allowed (no CAP_SYS_NICE to come back): run as is.
		runtime.UnlockOSThread()
		return fn()
	}
	ferr := fn()
	if unix.Setpriority(unix.PRIO_PROCESS, tid, was) == nil {
		runtime.UnlockOSThread()
	}
	// Otherwise the thread stays locked and ends with the goroutine:
	// no other goroutine ever runs on it at the background's niceness.
	return ferr
}

// SetNice sets the niceness of every thread of this process (a thread
// starts with its creator's, so this is how a process started in the
// background comes to the foreground). It reports the first thread it
// could not set.
func SetNice(n int) error {
	var first error
	// Twice: a thread started during the first pass is caught by the
	// second.
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			// ESRCH: the thread ended since the listing.
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, n); err != nil && first == nil && !errors.Is(err, unix.ESRCH) {
				first = err
			}
		}
	}
	return first
}
