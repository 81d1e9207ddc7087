package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// TestExecContainerAndVMAlike runs the same exec requests through the API
// into a container and into a VM of the same spec, and expects the same
// answers: output, exit codes (3, and 143 for a process killed by TERM),
// environment, workdir and user, refusals, a terminal, signals to the
// workload, and 409 once it has ended.
func TestExecContainerAndVMAlike(t *testing.T) {
	requireLibvirt(t)
	c, addr := serve(t, withVMs(t, testConfig(t, vmDataDir(t), "127.0.0.1:0")))
	importBusybox(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	ids := map[api.Isolation]string{}
	for _, iso := range []api.Isolation{api.IsolationContainer, api.IsolationVM} {
		spec := sh("trap 'echo got-hup; exit 9' HUP; echo ready; while true; do sleep 0.2; done")
		spec.Env = map[string]string{"TASK_VAR": "from-task"}
		spec.Isolation = iso
		w, err := c.Submit(ctx, spec)
		if err != nil {
			t.Fatalf("submit %s: %v", iso, err)
		}
		ids[iso] = w.ID
	}
	for iso, id := range ids {
		for {
			if out, _ := logs(t, c, id); strings.Contains(out, "ready") {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("%s workload never became ready", iso)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	cases := []struct {
		name string
		req  api.ExecRequest
	}{
		{"exit 3", api.ExecRequest{Command: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}}},
		{"killed by TERM", api.ExecRequest{Command: []string{"sh", "-c", "kill -TERM $$"}}},
		{"env workdir user", api.ExecRequest{
			Command: []string{"sh", "-c", `echo "$TASK_VAR $EXEC_VAR"; pwd; id -u; id -g`},
			Env:     map[string]string{"EXEC_VAR": "from-exec"}, Workdir: "/tmp", User: "1234:2345",
		}},
		{"input", api.ExecRequest{Command: []string{"sh", "-c", "cat; echo done"}, Input: "line one\nline two\n"}},
		{"missing workdir", api.ExecRequest{Command: []string{"true"}, Workdir: "/does/not/exist"}},
		{"missing command", api.ExecRequest{Command: []string{"/no/such/binary"}}},
	}
	answer := func(res *api.ExecResult, err error) string {
		var p *api.Problem
		if errors.As(err, &p) {
			return fmt.Sprintf("problem %d %s", p.Status, p.Reason)
		}
		if err != nil {
			return "error " + err.Error()
		}
		return fmt.Sprintf("exit %d signal %d stdout %q stderr %q", res.ExitCode, res.Signal, res.Stdout, res.Stderr)
	}
	want := map[string]string{
		"exit 3":           `exit 3 signal 0 stdout "out\n" stderr "err\n"`,
		"killed by TERM":   `exit 143 signal 15 stdout "" stderr ""`,
		"env workdir user": `exit 0 signal 0 stdout "from-task from-exec\n/tmp\n1234\n2345\n" stderr ""`,
		"input":            `exit 0 signal 0 stdout "line one\nline two\ndone\n" stderr ""`,
		"missing workdir":  "problem 400 " + api.ReasonInvalidArgument,
		"missing command":  "problem 400 " + api.ReasonInvalidArgument,
	}
	for _, tc := range cases {
		got := map[api.Isolation]string{}
		for iso, id := range ids {
			got[iso] = answer(c.Exec(ctx, id, tc.req))
		}
		if got[api.IsolationContainer] != want[tc.name] || got[api.IsolationVM] != want[tc.name] {
			t.Errorf("%s:\n container: %s\n vm:        %s\n want:      %s", tc.name, got[api.IsolationContainer], got[api.IsolationVM], want[tc.name])
		}
	}

	// A terminal, through the WebSocket form, sized as asked. (The OpenAPI
	// checker of c reads HTTP bodies; a WebSocket is none.)
	ws, err := client.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	for iso, id := range ids {
		s, err := ws.ExecStream(ctx, id, api.ExecRequest{
			Command: []string{"sh", "-c", "test -t 1 && echo is-a-tty; stty size; exit 4"},
			TTY:     true, Size: &api.TermSize{Rows: 31, Cols: 101},
		})
		if err != nil {
			t.Fatalf("%s: exec stream: %v", iso, err)
		}
		var out bytes.Buffer
		end, err := s.Wait(&out, &out)
		s.Close()
		if err != nil || end.ExitCode == nil || *end.ExitCode != 4 || !strings.Contains(out.String(), "is-a-tty\r\n31 101\r\n") {
			t.Errorf("%s: terminal session: %+v, %v, output %q", iso, end, err, out.String())
		}
	}

	// Concurrent sessions in both at once.
	var wg sync.WaitGroup
	for iso, id := range ids {
		for i := range 10 {
			wg.Go(func() {
				res, err := c.Exec(ctx, id, api.ExecRequest{Command: []string{"sh", "-c", fmt.Sprintf("echo %d; exit %d", i, i)}})
				if err != nil || res.ExitCode != i || res.Stdout != fmt.Sprintf("%d\n", i) {
					t.Errorf("%s: concurrent session %d: %s", iso, i, answer(res, err))
				}
			})
		}
	}
	wg.Wait()

	// A signal to the workload's main process, then exec into an ended one.
	for iso, id := range ids {
		if _, err := c.Signal(ctx, id, "HUP"); err != nil {
			t.Fatalf("%s: signal: %v", iso, err)
		}
		w, err := c.WaitExit(ctx, id)
		if err != nil || exitCode(w) != 9 {
			t.Errorf("%s: after HUP: %+v, %v; want exit 9", iso, w, err)
		}
		_, err = c.Exec(ctx, id, api.ExecRequest{Command: []string{"true"}})
		if !client.IsReason(err, api.ReasonConflict) {
			t.Errorf("%s: exec into an exited workload: %v, want 409 conflict", iso, err)
		}
	}
}
