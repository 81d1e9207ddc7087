package monitor

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/supervisor/monitortest"
)

// A spare monitor whose agent goes away before handing it a task (its
// pipe's end of file) exits at once, quietly, having written nothing.
func TestSpareExitsWhenLetGo(t *testing.T) {
	bin := monitortest.Path(t)
	for _, handed := range []string{"", "   \n"} {
		readyR, readyW, _ := os.Pipe()
		endedR, endedW, _ := os.Pipe()
		taskR, taskW, _ := os.Pipe()
		var out strings.Builder
		cmd := exec.Command(bin, SpareArg, SpareTitle)
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.ExtraFiles = []*os.File{readyW, endedW, taskR}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		readyW.Close()
		endedW.Close()
		taskR.Close()
		_, _ = taskW.WriteString(handed)
		taskW.Close() // the agent's end: its exit closes it just so
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil || out.Len() != 0 {
				t.Errorf("spare handed %q then let go: %v, output %q", handed, err, out.String())
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("spare handed %q then let go still runs", handed)
		}
		readyR.Close()
		endedR.Close()
	}
}
