package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
)

// execAgent serves an agent over the fake driver (host processes) with the
// busybox test image, and returns its address and a client.
func execAgent(t *testing.T) (string, *client.Client) {
	t.Helper()
	dir := t.TempDir()
	imgs, err := image.New(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, "berth.test/busybox:latest"); err != nil {
		t.Fatal(err)
	}
	if _, err := imgs.Import(context.Background(), &buf, ""); err != nil {
		t.Fatal(err)
	}
	return serveAgent(t, dir, imgs)
}

// serveAgent serves an agent over the fake driver with its data in dir and
// its images in imgs, and returns its address and a client.
func serveAgent(t *testing.T, dir string, imgs *image.Store) (string, *client.Client) {
	t.Helper()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	a, err := agent.New(context.Background(), agent.Options{Capacity: &api.NodeResources{CPU: 64, MemoryMB: 1 << 16},
		DataDir: dir, Drivers: []driver.Driver{fake.New("container", fake.NewNode())}, Images: imgs,
		Defaults: agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256}, StopTimeout: 2 * time.Second, Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(server.New(a, server.Options{Logger: quiet}))
	t.Cleanup(func() {
		hs.Close()
		for _, w := range a.List(context.Background(), api.ListFilter{}) {
			_ = a.Delete(context.Background(), w.ID, true)
		}
		a.Close()
	})
	c, err := client.New(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	return hs.URL, c
}

func runningWorkload(t *testing.T, c *client.Client, cmd ...string) *api.Workload {
	t.Helper()
	ctx := context.Background()
	w, err := c.Submit(ctx, api.WorkloadSpec{Image: "berth.test/busybox:latest", Command: cmd})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got, _, err := c.Get(ctx, w.ID, nil)
		if err == nil && got.State == api.StateRunning {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload not running: %+v %v", got, err)
		}
	}
}

// berthCLI runs the CLI with stdin, returning its stdout and error.
func berthCLI(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	inR, inW, _ := os.Pipe()
	outR, outW, _ := os.Pipe()
	oldIn, oldOut := os.Stdin, os.Stdout
	os.Stdin, os.Stdout = inR, outW
	defer func() { os.Stdin, os.Stdout = oldIn, oldOut }()
	go func() {
		_, _ = io.WriteString(inW, stdin)
		inW.Close()
	}()
	got := make(chan string)
	go func() {
		data, _ := io.ReadAll(outR)
		got <- string(data)
	}()
	root := newRootCmd()
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	outW.Close()
	inR.Close()
	return <-got, err
}

func TestExecAndKillCommands(t *testing.T) {
	addr, c := execAgent(t)
	w := runningWorkload(t, c, "sh", "-c", "trap 'exit 7' HUP; while true; do sleep 0.1; done")
	out, err := berthCLI(t, "", "--addr", addr, "exec", w.ID, "--", "sh", "-c", "echo hi; exit 3")
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 3 || out != "hi\n" {
		t.Errorf("berth exec exit 3: %q %v, want hi and exit code 3", out, err)
	}
	// Flags after the workload are the command's.
	out, err = berthCLI(t, "from stdin\n", "--addr", addr, "exec", "-i", "-e", "X=1", w.ID, "sh", "-c", "cat; echo $X")
	if err != nil || out != "from stdin\n1\n" {
		t.Errorf("berth exec -i: %q %v", out, err)
	}
	// -t: the command runs on a terminal (here with no local one to make
	// raw), whose output ends lines with \r\n.
	out, err = berthCLI(t, "", "--addr", addr, "exec", "-t", w.ID, "--", "sh", "-c", "test -t 1 && echo on-a-tty")
	if err != nil || out != "on-a-tty\r\n" {
		t.Errorf("berth exec -t: %q %v", out, err)
	}
	if _, err := berthCLI(t, "", "--addr", addr, "kill", "-s", "HUP", w.ID); err != nil {
		t.Fatalf("berth kill -s HUP: %v", err)
	}
	ended, err := c.WaitExit(context.Background(), w.ID)
	if err != nil || ended.ExitCode == nil || *ended.ExitCode != 7 {
		t.Errorf("after berth kill -s HUP: %+v %v, want exit 7 from the trap", ended, err)
	}
	if _, err := berthCLI(t, "", "--addr", addr, "exec", w.ID, "--", "true"); !client.IsReason(err, api.ReasonConflict) {
		t.Errorf("berth exec into an exited workload: %v, want a conflict", err)
	}
}
