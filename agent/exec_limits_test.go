package agent

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// Sessions past a workload's or the node's cap are refused, naming the
// key to raise; closing one (or a start that failed) frees its place.
func TestExecSessionCaps(t *testing.T) {
	e := newEnvWith(t, func(o *Options) { o.ExecLimits = ExecLimits{MaxSessions: 3, MaxSessionsPerWorkload: 2} })
	w1 := e.waitFor(e.submit(sh("sleep 300")).ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	w2 := e.waitFor(e.submit(sh("sleep 300")).ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	ctx := context.Background()
	open := func(id string) (driver.ExecSession, error) {
		sess, err := e.agent.Exec(ctx, id, api.ExecRequest{Command: []string{"sleep", "300"}})
		if err == nil {
			t.Cleanup(func() { sess.Close() })
		}
		return sess, err
	}
	refused := func(id, key string) {
		t.Helper()
		_, err := open(id)
		if !errors.Is(err, errdefs.ErrTooManyRequests) || !strings.Contains(err.Error(), key) {
			t.Fatalf("exec past the cap = %v, want ErrTooManyRequests naming %s", err, key)
		}
	}
	a, err := open(w1.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := open(w1.ID); err != nil {
		t.Fatal(err)
	}
	refused(w1.ID, "exec.max_sessions_per_workload")
	// A start that fails takes no place.
	for range 5 {
		if _, err := e.agent.Exec(ctx, w2.ID, api.ExecRequest{Command: []string{"true"}, Workdir: "/does/not/exist"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("exec with a missing workdir = %v", err)
		}
	}
	if _, err := open(w2.ID); err != nil {
		t.Fatal(err)
	}
	refused(w2.ID, "exec.max_sessions")
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	_ = a.Close() // twice frees one place, not two
	if _, err := open(w2.ID); err != nil {
		t.Fatalf("exec after one closed: %v", err)
	}
	refused(w1.ID, "exec.max_sessions")
}
