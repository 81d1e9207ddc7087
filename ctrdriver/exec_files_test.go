package ctrdriver

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
)

// A session's process.json (the workload's environment, secrets
// included) lives in the task's directory, private to root, and what an
// agent that died left there is swept when the task is recovered.
func TestExecSessionFilesInTaskDir(t *testing.T) {
	d, cfg := execTask(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"sleep", "1005"}, Env: []string{"SECRET_TOKEN=hunter2-exec"}})
	if err != nil {
		t.Fatal(err)
	}
	s := sess.(*execSession)
	execDir := filepath.Join(d.taskDir(cfg.ID), execDirName)
	if filepath.Dir(s.tmp) != execDir {
		t.Errorf("session directory %s is not in the task's %s", s.tmp, execDir)
	}
	for path, want := range map[string]os.FileMode{execDir: 0o700 | os.ModeDir, s.tmp: 0o700 | os.ModeDir, filepath.Join(s.tmp, "process.json"): 0o600} {
		if fi, err := os.Stat(path); err != nil || fi.Mode() != want {
			t.Errorf("%s: %v %v, want mode %v", path, fi.Mode(), err, want)
		}
	}
	if data, err := os.ReadFile(filepath.Join(s.tmp, "process.json")); err != nil || !strings.Contains(string(data), "hunter2-exec") {
		t.Fatalf("process.json not where it should be: %v", err)
	}
	if err := sess.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.tmp); !os.IsNotExist(err) {
		t.Errorf("session directory after Close: %v", err)
	}

	// What a dead agent's session left behind.
	leftover, err := newExecDir(d.taskDir(cfg.ID))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(leftover, "process.json"), []byte(`{"env":["SECRET_TOKEN=hunter2-exec"]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	restarted, err := New(Options{Root: d.opts.Root, MonitorCmd: d.opts.MonitorCmd, UserNS: d.opts.UserNS})
	if err != nil {
		t.Fatal(err)
	}
	if err := restarted.Recover(ctx, &driver.Handle{ID: cfg.ID, Driver: Name}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Errorf("leftover session directory after Recover: %v", err)
	}
	// The recovered driver's sessions work as before.
	if out := execOut(t, restarted, cfg.ID, "echo", "again"); out != "again\n" {
		t.Errorf("exec after Recover = %q", out)
	}
}
