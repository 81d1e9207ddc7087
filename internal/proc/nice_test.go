package proc

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

func niceOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	n, _ := strconv.Atoi(strings.Fields(rest)[16])
	return n
}

// InBackground runs its function, and what it starts, at BackgroundNice,
// and leaves the caller's thread as it was.
func TestInBackground(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("coming back from the background needs CAP_SYS_NICE (root)")
	}
	before, err := Nice()
	if err != nil {
		t.Fatal(err)
	}
	var inside int
	cmd := exec.Command("sleep", "5")
	err = InBackground(func() error {
		inside, _ = Nice()
		return cmd.Start()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	if inside != BackgroundNice {
		t.Errorf("niceness inside: %d, want %d", inside, BackgroundNice)
	}
	if n := niceOf(t, cmd.Process.Pid); n != BackgroundNice {
		t.Errorf("a process started in the background runs at niceness %d, want %d", n, BackgroundNice)
	}
	if after, _ := Nice(); after != before {
		t.Errorf("niceness after: %d, want %d as before", after, before)
	}
}

// SetNice reaches every thread of the process.
func TestSetNice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("lowering niceness needs CAP_SYS_NICE (root)")
	}
	before, _ := Nice()
	if err := SetNice(5); err != nil {
		t.Fatal(err)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, task := range tasks {
		b, _ := os.ReadFile("/proc/self/task/" + task.Name() + "/stat")
		_, rest, _ := strings.Cut(string(b), ") ")
		if f := strings.Fields(rest); len(f) > 16 && f[16] != "5" {
			t.Errorf("thread %s at niceness %s after SetNice(5)", task.Name(), f[16])
		}
	}
	if err := SetNice(before); err != nil {
		t.Fatal(err)
	}
}
