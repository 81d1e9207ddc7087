package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// previousRelease is the last commit that landed before the shared
// supervisor: its agent runs every container's monitor as `berth monitor
// DIR` (protocol version 1: no boot id, no stop requests).
const previousRelease = "b8ed699d26f2e2e96b826ba1f120aadc7ec89f68"

// buildPreviousRelease builds berth at previousRelease from this clone's
// history into a directory of the test's.
func buildPreviousRelease(t *testing.T) string {
	t.Helper()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Skipf("the upgrade test builds the previous release from git history, and this is not a git checkout: %v", err)
	}
	repo := strings.TrimSpace(string(top))
	if err := exec.Command("git", "-C", repo, "cat-file", "-e", previousRelease+"^{commit}").Run(); err != nil {
		t.Skipf("commit %s (the previous release) is not in this clone (a shallow clone?); the upgrade test needs it", previousRelease)
	}
	work := t.TempDir()
	src := filepath.Join(work, "src")
	if out, err := exec.Command("git", "-C", repo, "worktree", "add", "--detach", src, previousRelease).CombinedOutput(); err != nil {
		t.Fatalf("git worktree add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("git", "-C", repo, "worktree", "remove", "--force", src).Run() })
	bin := filepath.Join(work, "bin", "berth")
	build := exec.Command("go", "build", "-o", bin, "./cmd/berth")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the previous release: %v: %s", err, out)
	}
	return bin
}

// TestUpgradeInPlace: workloads started by the previous release's agent
// (and its monitors) are adopted by this agent after a restart on the same
// data dir: one still running is stopped (its old monitor does not enforce
// stops: this agent does), one ends by itself with its own exit code, one
// that ended before the upgrade keeps its result, and deleting them all
// leaves nothing.
func TestUpgradeInPlace(t *testing.T) {
	requireRunc(t)
	old := buildPreviousRelease(t)
	dataDir := t.TempDir()
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nvm:\n  enabled: false\nnetwork:\n  enabled: false\nworkload_defaults:\n  stop_timeout: 2s\n  cpu: 0.05\n", addr, dataDir)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}

	var oldErr bytes.Buffer
	oldAgent := exec.Command(old, "agent", "--config", cfgFile)
	oldAgent.Stderr = &oldErr
	if err := oldAgent.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := client.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	waitReady(t, c, &oldErr)
	importBusybox(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	stubborn, err := c.Submit(ctx, sh("trap '' TERM; echo started; sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	later, err := c.Submit(ctx, sh("echo working; sleep 6; echo done; exit 5"))
	if err != nil {
		t.Fatal(err)
	}
	ended, err := c.Submit(ctx, sh("exit 7"))
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, stubborn.ID)
	waitRunning(t, c, later.ID)
	if w, err := c.WaitExit(ctx, ended.ID); err != nil || exitCode(w) != 7 {
		t.Fatalf("before the upgrade: %v, %v; want exit 7", w, err)
	}
	// The upgrade: the old agent stops as systemd stops it (its monitors
	// and containers stay), and this build's agent starts on the same data.
	_ = oldAgent.Process.Signal(syscall.SIGTERM)
	_ = oldAgent.Wait()

	p := &agentProcess{t: t, config: cfgFile}
	c = p.start(addr)
	t.Cleanup(p.kill)

	if w, _, err := c.Get(ctx, stubborn.ID, nil); err != nil || w.State != api.StateRunning {
		t.Fatalf("after the upgrade the old agent's workload is %+v, %v; want running", w, err)
	}
	if w, _, err := c.Get(ctx, ended.ID, nil); err != nil || w.State != api.StateExited || exitCode(w) != 7 {
		t.Errorf("after the upgrade the ended workload is %+v, %v; want exited 7", w, err)
	}
	w, err := c.WaitExit(ctx, later.ID)
	if err != nil {
		t.Fatal(err)
	}
	if w.State != api.StateExited || exitCode(w) != 5 {
		t.Errorf("workload that ended after the upgrade: %s exit %d (%q), want exited 5", w.State, exitCode(w), w.Error)
	}
	if out, _ := logs(t, c, later.ID); out != "working\ndone\n" {
		t.Errorf("its log = %q, want the lines from before and after the upgrade", out)
	}
	begin := time.Now()
	w, err = c.Stop(ctx, stubborn.ID, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if exitCode(w) != 137 {
		t.Errorf("stop of an adopted workload that ignores SIGTERM: exit %d (%q), want 137", exitCode(w), w.Error)
	}
	t.Logf("adopted workload stopped in %v", time.Since(begin).Round(time.Millisecond))
	for _, id := range []string{stubborn.ID, later.ID, ended.ID} {
		if err := c.Delete(ctx, id, true); err != nil {
			t.Errorf("delete %s: %v", id, err)
		}
	}
	tasks, _ := os.ReadDir(filepath.Join(dataDir, "containers", "tasks"))
	for _, e := range tasks {
		t.Errorf("task dir left after deleting every workload: %s", e.Name())
	}
	for _, id := range []string{stubborn.ID, later.ID} {
		if _, err := os.Stat("/sys/fs/cgroup/memory/berth/" + id); err == nil {
			t.Errorf("cgroup of %s left behind", id)
		}
		if out, _ := exec.Command("pgrep", "-f", id).Output(); len(out) > 0 {
			t.Errorf("processes of %s left behind: %s", id, out)
		}
	}
}

func waitReady(t *testing.T, c *client.Client, stderr *bytes.Buffer) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for c.Ready(context.Background()) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("agent did not become ready:\n%s", stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
