package proc

import (
	"bytes"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
)

func threads(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("Threads:")); ok {
			n, _ := strconv.Atoi(string(bytes.TrimSpace(v)))
			return n
		}
	}
	t.Fatal("no Threads line")
	return 0
}

// 50 children waited for at once hold no thread each, and each is reaped
// (no zombie) when it exits. A blocking wait would hold a thread per child
// (50 more); starting the children and the short pidfd syscalls may add a
// few idle threads of the runtime's own on a loaded machine, which is why
// the count is taken after the starts and the bound is half the children.
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
	before := threads(t)
	var wg sync.WaitGroup
	errs := make([]error, len(cmds))
	for i, cmd := range cmds {
		wg.Go(func() { errs[i] = Reap(cmd.Process) })
	}
	time.Sleep(300 * time.Millisecond) // every Reap is parked by now
	if during := threads(t); during > before+children/2 {
		t.Errorf("%d threads while 50 children are waited for, %d before: waits hold threads", during, before)
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
