package ctrdriver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// runc is a thin wrapper over the runc command line. berth keeps its own
// runc state root so it never sees (or touches) other runtimes' containers.
type runc struct {
	path string
	root string
}

func (r runc) args(extra ...string) []string {
	return append([]string{"--root", r.root}, extra...)
}

// run runs one runc command in a process group of its own; when ctx ends
// the whole group is killed (a hung runc and what it started), and the
// pipes it leaked to its children are not waited for.
func (r runc) run(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.path, r.args(args...)...)
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("runc %s: %w: %s", args[0], err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// runcState is the part of `runc state` berth reads.
type runcState struct {
	ID     string `json:"id"`
	Pid    int    `json:"pid"`
	Status string `json:"status"` // creating, created, running, paused, stopped
}

func (r runc) state(ctx context.Context, id string) (*runcState, error) {
	out, err := r.run(ctx, "state", id)
	if err != nil {
		return nil, err
	}
	var st runcState
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("decode runc state of %s: %w", id, err)
	}
	return &st, nil
}

func (r runc) kill(ctx context.Context, id, signal string) error {
	_, err := r.run(ctx, "kill", id, signal)
	return err
}

func (r runc) delete(ctx context.Context, id string) error {
	// runc knows a container by its state directory: without one there is
	// nothing for runc delete to do (the monitor released the ended
	// container itself), and no runc process is started to be told so.
	if _, err := os.Lstat(filepath.Join(r.root, id)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	_, err := r.run(ctx, "delete", "--force", id)
	if err != nil && strings.Contains(err.Error(), "does not exist") {
		return nil
	}
	return err
}

// removeLeftovers removes the container's runc state directory once runc
// has deleted the container. A runc killed halfway (its session killed
// with the monitor, or its parent gone) can leave in it the read-only
// bind mount of its own binary it makes while it runs, which runc delete
// cannot remove: the directory and the mount would stay for ever.
func (r runc) removeLeftovers(id string) error {
	dir := filepath.Join(r.root, id)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("runc state of %s: %w", id, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state.json")); err == nil {
		return nil // runc still knows the container: not a leftover
	}
	for _, e := range entries {
		if err := unmountAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("runc state of %s: %w", id, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("runc state of %s: %w", id, err)
	}
	return nil
}

func (r runc) version(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, r.path, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", r.path, err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(strings.TrimPrefix(first, "runc version")), nil
}
