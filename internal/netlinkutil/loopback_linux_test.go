package netlinkutil

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// loFlags reads lo's flags in the calling thread's network namespace.
func loFlags() (uint16, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return 0, err
	}
	return ifr.Uint16(), nil
}

func TestLoopbackUpInNewNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a network namespace")
	}
	errc := make(chan error, 1)
	var before, after uint16
	go func() {
		// The thread never returns to the host namespace: it stays locked
		// and exits with this goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		var err error
		if before, err = loFlags(); err != nil {
			errc <- err
			return
		}
		if err := LoopbackUp(); err != nil {
			errc <- err
			return
		}
		if err := LoopbackUp(); err != nil { // already up: a no-op
			errc <- err
			return
		}
		after, err = loFlags()
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if before&unix.IFF_UP != 0 || after&unix.IFF_UP == 0 {
		t.Errorf("lo flags %#x before, %#x after; want down, then up", before, after)
	}
}
