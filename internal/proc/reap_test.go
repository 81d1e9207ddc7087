package proc

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// threadsInWait counts this process's threads blocked in a wait system
// call (waitid or wait4): /proc/self/task/*/syscall names the call a
// blocked thread sits in, and says "running" for one that is not blocked.
// Idle threads the runtime keeps from earlier system calls sit in futex and
// are not counted, so the figure does not depend on the machine's load.
func threadsInWait(t *testing.T) int {
	t.Helper()
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/syscall")
		if err != nil {
			continue // the thread ended since the listing
		}
		nr, _, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
		if nr == strconv.Itoa(unix.SYS_WAITID) || nr == strconv.Itoa(unix.SYS_WAIT4) {
			n++
		}
	}
	return n
}

// 50 children waited for at once hold no thread in a wait each, and each is
// reaped (no zombie) when it exits. A blocking wait (os.Process.Wait) would
// hold a thread per child blocked in waitid. The test counts threads blocked
// in a wait, not threads: on a loaded machine the runtime may start idle
// threads of its own around the short pidfd system calls (CI saw 45 threads
// for 50 children parked on the poller), and those wait for nothing.
func TestReapParksWithoutAThreadAndLeavesNoZombie(t *testing.T) {
	const children = 50
	var cmds []*exec.Cmd
	for range children {
		cmd := exec.Command("sleep", "2")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(cmds))
	for i, cmd := range cmds {
		wg.Go(func() { errs[i] = Reap(cmd.Process) })
	}
	time.Sleep(300 * time.Millisecond) // every Reap is parked by now
	if n := threadsInWait(t); n > 0 {
		t.Errorf("%d threads blocked in a wait while %d children are waited for: waits hold threads", n, children)
	}
	wg.Wait()
	for i, cmd := range cmds {
		if errs[i] != nil {
			t.Errorf("reap %d: %v", cmd.Process.Pid, errs[i])
		}
		if _, err := os.Stat("/proc/" + strconv.Itoa(cmd.Process.Pid)); err == nil {
			if info, err := ReadInfo(cmd.Process.Pid); err == nil && info.State == 'Z' {
				t.Errorf("child %d left a zombie", cmd.Process.Pid)
			}
		}
	}
}
