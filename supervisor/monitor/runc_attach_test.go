package monitor

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/testrootfs"
	"github.com/berthd/berth/supervisor/monitortest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	monitortest.Cleanup()
	os.Exit(code)
}

// The real monitor binary runs a container on a terminal under real runc
// (the bundle is runc's own default, `runc spec`: a shell on a terminal)
// and serves its attach socket: the size given on attach is the
// terminal's, typed input runs, the output ends with FrameEnd after the
// last byte, status.json has the exit code, and the socket is gone with
// the monitor.
func TestContainerMonitorServesAttach(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the monitor runs a container with runc")
	}
	runcPath, err := exec.LookPath("runc")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/runc"); serr != nil {
			t.Skip("runc is not installed (apt-get install runc)")
		}
		runcPath = "/usr/sbin/runc"
	}
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle")
	if err := testrootfs.Build(filepath.Join(bundle, "rootfs")); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(runcPath, "spec", "--bundle", bundle).CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v: %s", err, out)
	}
	var spec struct {
		Process struct {
			Terminal bool     `json:"terminal"`
			Args     []string `json:"args"`
		} `json:"process"`
	}
	if err := fileutil.ReadJSON(filepath.Join(bundle, "config.json"), &spec); err != nil || !spec.Process.Terminal {
		t.Fatalf("runc spec's default is no longer a shell on a terminal: %+v, %v", spec.Process, err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	id := "dt-monattach-" + hex.EncodeToString(b)
	runcRoot := filepath.Join(dir, "runc")
	t.Cleanup(func() { _ = exec.Command(runcPath, "--root", runcRoot, "delete", "--force", id).Run() })
	cfg := Config{Version: Version, Kind: KindRunc, ID: id, Runc: &RuncConfig{
		Runc: runcPath, RuncRoot: runcRoot, Bundle: bundle, LogDir: dir,
		StartTimeout: time.Minute, Stdin: true, TTY: true,
	}}
	if err := fileutil.ReplaceJSON(filepath.Join(dir, ConfigFile), cfg); err != nil {
		t.Fatal(err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer readyR.Close()
	endedR, endedW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer endedR.Close()
	logf, err := os.Create(filepath.Join(dir, LogFile))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	mon := exec.Command(monitortest.Path(t), dir)
	mon.Stdout, mon.Stderr = logf, logf
	mon.ExtraFiles = []*os.File{readyW, endedW}
	mon.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := mon.Start(); err != nil {
		t.Fatal(err)
	}
	readyW.Close()
	endedW.Close()
	exited := make(chan struct{})
	go func() { _ = mon.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = unix.Kill(-mon.Process.Pid, unix.SIGKILL)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
		}
	})
	_, _ = readyR.Read(make([]byte, 1))
	var st Status
	if err := fileutil.ReadJSON(filepath.Join(dir, StatusFile), &st); err != nil || st.State != StateRunning {
		log, _ := os.ReadFile(filepath.Join(dir, LogFile))
		t.Fatalf("status %+v, %v; want running (monitor.log: %s)", st, err, log)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, reply, err := DialAttach(ctx, dir, AttachHello{Stdin: true, Replay: true, Rows: 33, Cols: 77})
	if err != nil || conn == nil {
		t.Fatalf("DialAttach: %v, reply %+v", err, reply)
	}
	defer conn.Close()
	if !reply.TTY || !reply.Stdin {
		t.Errorf("reply %+v: want a terminal with stdin", reply)
	}
	if _, err := conn.WriteStdin([]byte("stty size; echo he''llo; exit 5\n")); err != nil {
		t.Fatal(err)
	}
	out, last, err := readAll(conn)
	if err != nil || last != FrameEnd {
		t.Fatalf("session ended with %v, frame %q; output %q", err, last, out)
	}
	if !strings.Contains(string(out), "33 77") || !strings.Contains(string(out), "hello") {
		t.Errorf("terminal output %q lacks the size given on attach or the shell's output", out)
	}
	select {
	case <-exited:
	case <-ctx.Done():
		t.Fatal("the monitor did not exit after its container")
	}
	if err := fileutil.ReadJSON(filepath.Join(dir, StatusFile), &st); err != nil || st.State != StateExited || st.ExitCode != 5 {
		t.Errorf("status %+v, %v; want exited 5", st, err)
	}
	if _, err := os.Stat(filepath.Join(dir, AttachSocket)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the attach socket outlives its monitor: %v", err)
	}
	if log, _ := os.ReadFile(filepath.Join(dir, stdoutLog)); !strings.Contains(string(log), "hello") {
		t.Errorf("stdout.log %q lacks the terminal's output", log)
	}
}
