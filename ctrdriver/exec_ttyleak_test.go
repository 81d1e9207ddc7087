package ctrdriver

import (
	"context"
	"os"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
)

// ptyFds counts this process's open terminal masters.
func ptyFds(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.Contains(target, "ptmx") {
			n++
		}
	}
	return n
}

// A terminal session whose start fails after runc handed over the
// terminal leaves no terminal open in the agent.
func TestExecFailedTTYStartLeaksNoTerminal(t *testing.T) {
	d, cfg := execTask(t)
	// No collection meanwhile: an *os.File's finalizer would close a
	// leaked terminal and hide the leak.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := ptyFds(t)
	for range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"/does/not/exist"}, TTY: true, Stdin: true, Size: driver.TermSize{Rows: 24, Cols: 80}})
		cancel()
		if err == nil {
			sess.Close()
			t.Fatal("exec of a missing program with a terminal started")
		}
	}
	for deadline := time.Now().Add(time.Minute); ptyFds(t) != before; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d terminal masters open after failed starts, were %d", ptyFds(t), before)
		}
	}
}
