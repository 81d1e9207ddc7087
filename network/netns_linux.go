package network

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/netlinkutil"
)

// createNetnsFile makes the file a namespace is pinned on. A file already
// there is from an attachment of the same id that was not torn down (the
// caller tore down what it knew of): it is unpinned and replaced, never an
// error.
func createNetnsFile(path string) error {
	for try := 0; ; try++ {
		f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
		if err == nil {
			return f.Close()
		}
		if !errors.Is(err, os.ErrExist) || try > 0 {
			return fmt.Errorf("create netns file: %w", err)
		}
		if err := removeNetns(path); err != nil {
			return err
		}
	}
}

// pinNetns makes a network namespace and pins it with a bind mount on
// path, as `ip netns add` does, without entering it for good: the work is
// done on a locked OS thread that returns to the host namespace, or dies
// with its goroutine when it cannot.
func pinNetns(path string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		host, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer host.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unshare network namespace: %w", err)
			return
		}
		err = netlinkutil.LoopbackUp()
		if err == nil {
			err = unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "", unix.MS_BIND, "")
		}
		if serr := unix.Setns(int(host.Fd()), unix.CLONE_NEWNET); serr != nil {
			// Stuck in the new namespace: keep the thread locked so it
			// exits with this goroutine instead of serving others.
			errc <- errors.Join(err, fmt.Errorf("return to the host network namespace: %w", serr))
			return
		}
		runtime.UnlockOSThread()
		if err != nil {
			err = fmt.Errorf("pin network namespace: %w", err)
		}
		errc <- err
	}()
	return <-errc
}

// isNetns reports whether a namespace is mounted on path. After a host
// reboot the file is still there, but as a plain file.
func isNetns(path string) bool {
	var st unix.Statfs_t
	return path != "" && unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC
}

// unpinNetns removes every mount on path (one, unless something stacked
// more); a path with none, or no path, is fine.
func unpinNetns(path string) error {
	for range 16 {
		err := unix.Unmount(path, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("unmount netns %s: %w", path, err)
		}
	}
	return fmt.Errorf("unmount netns %s: still mounted after 16 unmounts", path)
}

// removeNetns unpins and removes a namespace file; a missing one is fine.
func removeNetns(path string) error {
	if err := unpinNetns(path); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// ensureBridge makes the bridge with the gateway address when no container
// has made it yet (the bridge plugin makes it for containers), so a VM's
// tap has something to join.
func (m *Manager) ensureBridge() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	gw := fmt.Sprintf("%s/%d", m.gateway, m.subnet.Bits())
	steps := [][]string{
		{"link", "add", "name", m.cfg.Bridge, "type", "bridge"},
		{"addr", "add", gw, "dev", m.cfg.Bridge},
		{"link", "set", m.cfg.Bridge, "up"},
	}
	for _, args := range steps {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil && !strings.Contains(string(out), "File exists") && !strings.Contains(string(out), "already assigned") {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// deleteLink deletes the host's end of a veth pair if it still exists and
// is still on bridge (the pair goes when the namespace does, but not while
// something else holds the namespace).
func deleteLink(name, bridge string) error {
	if name == "" || strings.ContainsAny(name, "/ ") {
		return nil
	}
	master, err := os.Readlink("/sys/class/net/" + name + "/master")
	if err != nil || !strings.HasSuffix(master, "/"+bridge) {
		return nil
	}
	out, err := exec.Command("ip", "link", "del", "dev", name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "Cannot find device") {
		return fmt.Errorf("ip link del %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}
