package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/ociimage"
)

// benchImage is the reference the harness imports its busybox image as.
const benchImage = "berth.local/bench/busybox:latest"

// agentProc is the berth agent the harness started.
type agentProc struct {
	cmd     *exec.Cmd
	done    chan struct{}
	addr    string
	dataDir string
	// stateDir is the agent's state_dir, on the run's tmpfs.
	stateDir string
	logPath  string
	c        *client.Client
}

// agentConfig is the bench agent's configuration. Workloads ask for 1 core
// (no CFS throttling of runc init or the workload) and admission lets 128
// of them in on a 2-core node through cpu_overcommit. VMs run under TCG
// unless the caller says KVM works here.
func agentConfig(addr, dataDir, stateDir, accel string) string {
	// No unix socket: the node's own agent may hold the default one.
	return fmt.Sprintf(`listen: %s
listen_unix: ""
data_dir: %s
state_dir: %s
log:
  level: warn
workload_defaults:
  cpu: 1
  memory_mb: 32
  pids: 256
  stop_timeout: 2s
node:
  reserved_memory_mb: 0
  cpu_overcommit: 64
vm:
  accel: %s
`, addr, dataDir, stateDir, accel)
}

// runDir is the run's tmpfs, mounted at <scratch>/run: what /run is on a
// node (berth's state_dir is there, as the Debian package sets it), and
// where the raw runc baselines keep their state too, as runc does by
// default (/run/runc).
func runDir(benchDir string) string { return filepath.Join(benchDir, "run") }

// mountRunDir mounts the run's tmpfs; the cleaner's unmountUnder removes
// it with the rest of the scratch directory.
func mountRunDir(benchDir string) error {
	dir := runDir(benchDir)
	if err := os.Mkdir(dir, 0o711); err != nil {
		return err
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=0711,size=1g"); err != nil {
		return fmt.Errorf("mount the run's tmpfs on %s: %w", dir, err)
	}
	return nil
}

// freePort asks the kernel for a free loopback port.
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// startAgent runs `berth agent` on dataDir/agent (its state directory:
// stateDir) and a free loopback port and waits until it is ready.
func startAgent(ctx context.Context, berth, dataDir, stateDir, accel string) (*agentProc, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dataDir, "bench-agent.yaml")
	if err := os.WriteFile(cfgPath, []byte(agentConfig(addr, filepath.Join(dataDir, "agent"), stateDir, accel)), 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dataDir, "agent.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(berth, "agent", "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: a Ctrl-C on the harness's terminal must not
	// kill the agent before the harness has deleted its workloads.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start agent: %w", err)
	}
	a := &agentProc{cmd: cmd, done: make(chan struct{}), addr: addr, dataDir: filepath.Join(dataDir, "agent"), stateDir: stateDir, logPath: logPath}
	go func() { _ = cmd.Wait(); close(a.done) }()
	a.c, err = client.New(addr)
	if err != nil {
		a.stop()
		return nil, err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err = a.c.Ready(rctx)
		cancel()
		if err == nil {
			return a, nil
		}
		select {
		case <-a.done:
			return nil, fmt.Errorf("agent exited at start: %s", tailFile(logPath, 2000))
		case <-ctx.Done():
			a.stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			a.stop()
			return nil, fmt.Errorf("agent not ready after 60s: %v; log: %s", err, tailFile(logPath, 2000))
		}
	}
}

func (a *agentProc) pid() int { return a.cmd.Process.Pid }

// stop ends the agent: SIGTERM, then SIGKILL after 10 s.
func (a *agentProc) stop() {
	select {
	case <-a.done:
		return
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(10 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
}

// importImage builds the deterministic busybox image and imports it.
func (a *agentProc) importImage(ctx context.Context) error {
	img, err := ociimage.BusyboxFrom(ociimage.BusyboxPath)
	if err != nil {
		return fmt.Errorf("build busybox image: %w", err)
	}
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, benchImage); err != nil {
		return err
	}
	if _, err := a.c.ImportImage(ctx, &buf, benchImage); err != nil {
		return fmt.Errorf("import image: %w", err)
	}
	return nil
}

// procMem is a process's memory as /proc reports it, in KiB.
type procMem struct {
	RSS, HWM, PSS int64
	// Anon is RssAnon: the heap and stacks, not the mapped binary.
	Anon int64
}

// readMem reads VmRSS and VmHWM from /proc/PID/status and Pss from
// smaps_rollup (PSS splits shared pages, such as the berth binary's text
// that every monitor maps, among the processes that map them).
func readMem(pid int) (procMem, error) {
	var m procMem
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return m, err
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		v, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "VmRSS:":
			m.RSS = v
		case "VmHWM:":
			m.HWM = v
		case "RssAnon:":
			m.Anon = v
		}
	}
	f.Close()
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			fields := strings.Fields(line)
			if len(fields) >= 2 && fields[0] == "Pss:" {
				m.PSS, _ = strconv.ParseInt(fields[1], 10, 64)
			}
		}
	}
	if m.RSS == 0 {
		return m, errors.New("no VmRSS (process gone?)")
	}
	return m, nil
}

// settledMem reads pid's memory once its RSS has held still (within 1%)
// for 5 s, and at least 10 s from now: an agent just started, or just
// done importing, is still settling (its heap, the Go scavenger). It
// gives up waiting after 60 s and reads what there is.
func settledMem(ctx context.Context, pid int) (procMem, time.Duration, error) {
	t0 := time.Now()
	var last procMem
	still := time.Time{}
	for {
		m, err := readMem(pid)
		if err != nil {
			return m, 0, err
		}
		if last.RSS == 0 || m.RSS > last.RSS*101/100 || m.RSS < last.RSS*99/100 {
			last, still = m, time.Now()
		}
		waited := time.Since(t0)
		if waited >= 10*time.Second && time.Since(still) >= 5*time.Second || waited >= time.Minute {
			return m, waited, nil
		}
		select {
		case <-ctx.Done():
			return m, waited, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// resetPeak resets VmHWM of pid to its current RSS (clear_refs 5).
func resetPeak(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}
