package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/ptyio"
)

func TestDetachReader(t *testing.T) {
	for _, tc := range []struct {
		in, out string
		detach  bool
	}{
		{"plain input", "plain input", false},
		{"ab\x10\x11cd", "ab", true},
		{"\x10x", "\x10x", false},          // ctrl-p then something else: both go on
		{"\x10\x10\x11", "\x10", true},     // the second ctrl-p starts the sequence
		{"end\x10", "end\x10", false},      // a ctrl-p at the end of input goes on
		{"\x11\x10\x11rest", "\x11", true}, // ctrl-q alone is input
	} {
		got, err := io.ReadAll(&detachReader{r: bufio.NewReaderSize(strings.NewReader(tc.in), 16)})
		if string(got) != tc.out || errors.Is(err, errDetach) != tc.detach {
			t.Errorf("%q: read %q, %v; want %q, detach %v", tc.in, got, err, tc.out, tc.detach)
		}
	}
}

func TestRunInteractive(t *testing.T) {
	addr, c := execAgent(t)
	// -i: this process's input is the workload's; the exit code is its.
	out, err := berthCLI(t, "hello\nworld\n", "--addr", addr, "run", "-i", "berth.test/busybox:latest", "--", "sh", "-c", "cat; exit 3")
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 3 || out != "hello\nworld\n" {
		t.Errorf("berth run -i: %q %v, want the input echoed and exit code 3", out, err)
	}
	// -t: a terminal of its own (and its \r\n).
	out, err = berthCLI(t, "", "--addr", addr, "run", "-t", "berth.test/busybox:latest", "--", "sh", "-c", "test -t 1 && echo on-a-tty")
	if err != nil || out != "on-a-tty\r\n" {
		t.Errorf("berth run -t: %q %v", out, err)
	}
	// -d: only the id.
	out, err = berthCLI(t, "", "--addr", addr, "run", "-d", "-it", "berth.test/busybox:latest", "--", "sh")
	id := strings.TrimSpace(out)
	if err != nil || id == "" {
		t.Fatalf("berth run -d -it: %q %v", out, err)
	}
	w, _, err := c.Get(context.Background(), id, nil)
	if err != nil || !w.Spec.Stdin || !w.Spec.TTY {
		t.Fatalf("workload of run -d -it: %+v %v, want stdin and tty", w, err)
	}
}

// berth attach on a terminal: typed input runs in the workload, ctrl-p
// ctrl-q detaches and leaves it running, a second attach finds it.
func TestAttachDetachKeys(t *testing.T) {
	addr, c := execAgent(t)
	out, err := berthCLI(t, "", "--addr", addr, "run", "-d", "-it", "--name", "shell", "berth.test/busybox:latest", "--", "sh")
	if err != nil {
		t.Fatalf("berth run -d -it: %q %v", out, err)
	}
	id := strings.TrimSpace(out)
	waitState(t, c, id, api.StateRunning)

	master, slave := openTestPty(t)
	outR, outW, _ := os.Pipe()
	oldIn, oldOut := os.Stdin, os.Stdout
	os.Stdin, os.Stdout = slave, outW
	defer func() { os.Stdin, os.Stdout = oldIn, oldOut }()
	done := make(chan error, 1)
	go func() {
		root := newRootCmd()
		root.SetArgs([]string{"--addr", addr, "attach", "shell"})
		done <- root.ExecuteContext(context.Background())
		outW.Close()
	}()
	seen := make(chan string, 1)
	go func() {
		data, _ := io.ReadAll(outR)
		seen <- string(data)
	}()
	// The quotes tell the command's output from the terminal's echo.
	// Input typed before the attach connects waits in this terminal.
	if _, err := io.WriteString(master, "echo hel''lo-attached > /dev/stderr; echo hel''lo-attached\n"); err != nil {
		t.Fatal(err)
	}
	waitLog(t, c, id, "hello-attached")
	if _, err := master.Write([]byte{keyCtrlP, keyCtrlQ}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("berth attach after the detach keys: %v, want exit 0", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("berth attach did not end at ctrl-p ctrl-q")
	}
	if got := <-seen; !strings.Contains(got, "hello-attached") {
		t.Errorf("attached output %q lacks the command's", got)
	}
	w, _, err := c.Get(context.Background(), id, nil)
	if err != nil || w.State != api.StateRunning {
		t.Errorf("after a detach: %+v %v, want it running", w, err)
	}
	// Ending it while attached gives its exit code.
	out, err = berthCLI(t, "exit 9\n", "--addr", addr, "attach", id)
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 9 {
		t.Errorf("berth attach, then exit 9: %q %v, want exit code 9", out, err)
	}
}

func waitState(t *testing.T, c *client.Client, id string, state api.State) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		w, _, err := c.Get(context.Background(), id, nil)
		if err == nil && w.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %s: %+v %v, want %s", id, w, err, state)
		}
	}
}

// waitLog waits until the workload's log has marker.
func waitLog(t *testing.T, c *client.Client, id, marker string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var all strings.Builder
		_ = c.Logs(context.Background(), id, api.LogOptions{Tail: -1}, func(l api.LogLine) error {
			all.WriteString(l.Line)
			return nil
		})
		if strings.Contains(all.String(), marker) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %s never wrote %q; log %q", id, marker, all.String())
		}
	}
}

func openTestPty(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, s, err := ptyio.Open()
	if err != nil {
		t.Skipf("no pseudo-terminal here: %v", err)
	}
	t.Cleanup(func() { m.Close(); s.Close() })
	return m, s
}
