package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/internal/exectest"
	"github.com/berthd/berth/internal/proc"
)

func (e *env) sleeper(extra string) *api.Workload {
	e.t.Helper()
	return e.running(`{"image":"` + testImage + `","command":["sleep","300"]` + extra + `}`)
}

func (e *env) execSimple(ref string, req api.ExecRequest) (int, api.ExecResult, *api.Problem) {
	e.t.Helper()
	body, _ := json.Marshal(req)
	resp := e.do("POST", "/v1/workloads/"+ref+"/exec", "application/json", bytes.NewReader(body))
	defer resp.Body.Close()
	var res api.ExecResult
	if resp.StatusCode != http.StatusOK {
		var p api.Problem
		_ = json.NewDecoder(resp.Body).Decode(&p)
		return resp.StatusCode, res, &p
	}
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, res, nil
}

func TestExecSimple(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	code, res, p := e.execSimple(w.ID, api.ExecRequest{Command: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}})
	if code != 200 || res.ExitCode != 3 || res.Stdout != "out\n" || res.Stderr != "err\n" {
		t.Errorf("exec = %d %+v %v", code, res, p)
	}
	code, res, p = e.execSimple(w.ID, api.ExecRequest{Command: []string{"sh", "-c", "cat; pwd; echo $GREETING"}, Input: "in\n", Workdir: "/tmp", Env: map[string]string{"GREETING": "hi"}})
	if code != 200 || res.ExitCode != 0 || res.Stdout != "in\n/tmp\nhi\n" {
		t.Errorf("exec with input, workdir and env = %d %+v %v", code, res, p)
	}
	// Output past the cap is dropped and said so; the process ran to its end.
	code, res, _ = e.execSimple(w.ID, api.ExecRequest{Command: []string{"sh", "-c", "head -c 1100000 /dev/zero; echo done >&2"}})
	if code != 200 || len(res.Stdout) != server.ExecOutputCap || !res.StdoutTruncated || res.Stderr != "done\n" || res.StderrTruncated {
		t.Errorf("capped exec = %d, %d bytes, truncated %v, stderr %q", code, len(res.Stdout), res.StdoutTruncated, res.Stderr)
	}
	marker := fmt.Sprint(100000 + rand.IntN(800000))
	code, res, _ = e.execSimple(w.ID, api.ExecRequest{Command: []string{"sleep", marker}, TimeoutSeconds: 1})
	if code != 200 || !res.TimedOut || res.ExitCode != 137 {
		t.Errorf("exec past its timeout = %d %+v, want timed out with 137", code, res)
	}
	assertGone(t, "sleep\x00"+marker)
}

// assertGone waits until no process of the node has marker in its
// command line (the fake driver runs host processes).
func assertGone(t *testing.T, marker string) {
	t.Helper()
	var left []int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		left = left[:0]
		pids, _ := proc.AllPids()
		for _, pid := range pids {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if info, err := proc.ReadInfo(pid); err == nil && info.State != 'Z' && strings.Contains(string(cmdline), marker) {
				left = append(left, pid)
			}
		}
		if len(left) == 0 {
			return
		}
	}
	t.Errorf("processes %v (%q) still run", left, marker)
}

func TestExecRefusals(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	for name, tc := range map[string]struct {
		req    api.ExecRequest
		status int
		field  string
	}{
		"unknown user":    {api.ExecRequest{Command: []string{"id"}, User: "nosuchuser"}, 400, "user"},
		"unknown workdir": {api.ExecRequest{Command: []string{"pwd"}, Workdir: "/does/not/exist"}, 400, "workdir"},
		"relative":        {api.ExecRequest{Command: []string{"pwd"}, Workdir: "tmp"}, 400, "workdir"},
		"no command":      {api.ExecRequest{}, 400, "command"},
		"tty":             {api.ExecRequest{Command: []string{"true"}, TTY: true}, 400, "tty"},
		"env key":         {api.ExecRequest{Command: []string{"true"}, Env: map[string]string{"A=B": "x"}}, 400, `env["A=B"]`},
	} {
		code, _, p := e.execSimple(w.ID, tc.req)
		if code != tc.status || p == nil || len(p.Fields) == 0 || p.Fields[0].Field != tc.field {
			t.Errorf("%s: %d %+v, want %d naming %s", name, code, p, tc.status, tc.field)
		}
	}
	// A user name resolves against the image like the workload's own.
	if code, res, p := e.execSimple(w.ID, api.ExecRequest{Command: []string{"id", "-u"}, User: "nobody"}); code != 200 || res.Stdout != "65534\n" {
		t.Errorf("exec as nobody = %d %+v %v", code, res, p)
	}
	if code, _, p := e.execSimple("nosuch", api.ExecRequest{Command: []string{"true"}}); code != 404 {
		t.Errorf("exec into an unknown workload = %d %+v", code, p)
	}
	done := e.running(`{"image":"` + testImage + `","command":["sh","-c","sleep 0.2"]}`)
	e.waitWorkload(done.ID, func(w *api.Workload) bool { return w.State == api.StateExited })
	code, _, p := e.execSimple(done.ID, api.ExecRequest{Command: []string{"true"}})
	if code != 409 || p.Reason != api.ReasonConflict || p.State != "exited" {
		t.Errorf("exec into an exited workload = %d %+v, want 409 with state exited", code, p)
	}
}

const execPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: no-exec-into-pci
    match: {labels: {compliance: pci}}
    exec: deny
`

// The policy decides at exec time: a rule written after the workload
// started applies to it, with its name and reason in the refusal.
func TestExecPolicyDeny(t *testing.T) {
	e := newPolicyEnv(t, "apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\n")
	w := e.running(`{"image":"` + testImage + `","command":["sleep","300"],"labels":{"compliance":"pci"}}`)
	if code, _, p := e.execSimple(w.ID, api.ExecRequest{Command: []string{"true"}}); code != 200 {
		t.Fatalf("exec before the rule = %d %+v", code, p)
	}
	file := e.agent.Policy(context.Background()).Source
	if err := os.WriteFile(file, []byte(execPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, _, p := e.execSimple(w.ID, api.ExecRequest{Command: []string{"true"}})
		if code == 403 {
			if p.Reason != api.ReasonDenied || !strings.Contains(p.Detail, "no-exec-into-pci") || !strings.Contains(p.Detail, "compliance=pci") {
				t.Errorf("refusal = %+v, want denied_by_policy naming the rule and why", p)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec still %d after the policy denied it", code)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The dry run says it too.
	resp := e.do("POST", "/v1/placements", "application/json", strings.NewReader(`{"image":"`+testImage+`","labels":{"compliance":"pci"}}`))
	var d api.PlacementDecision
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil || d.Exec == nil || d.Exec.Allowed || d.Exec.Rule != "no-exec-into-pci" {
		t.Errorf("placement dry run: %+v %v, want exec denied by no-exec-into-pci", d.Exec, err)
	}
	resp.Body.Close()
	other := e.running(`{"image":"` + testImage + `","command":["sleep","300"]}`)
	if code, _, p := e.execSimple(other.ID, api.ExecRequest{Command: []string{"true"}}); code != 200 {
		t.Errorf("exec into a workload the rule does not match = %d %+v", code, p)
	}
}

func TestExecAudit(t *testing.T) {
	e := newEnv(t)
	var audit syncBuffer
	hs := httptest.NewServer(server.New(e.agent, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Audit: slog.New(slog.NewJSONHandler(&audit, nil))}))
	defer hs.Close()
	e.srv = hs
	w := e.sleeper("")
	code, _, _ := e.execSimple(w.ID, api.ExecRequest{Command: []string{"sh", "-c", "exit 4"}, Env: map[string]string{"TOKEN": "s3cr3t-value"}})
	if code != 200 {
		t.Fatalf("exec = %d", code)
	}
	c, err := client.New(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := c.ExecStream(context.Background(), w.ID, api.ExecRequest{Command: []string{"sh", "-c", "exit 5"}, Env: map[string]string{"TOKEN": "s3cr3t-value"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sess.Wait(io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	sess.Close()
	if strings.Contains(audit.String(), "s3cr3t-value") {
		t.Errorf("the audit log holds an environment value:\n%s", audit.String())
	}
	var found []map[string]any
	for deadline := time.Now().Add(5 * time.Second); len(found) < 2 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		found = found[:0]
		for _, line := range strings.Split(strings.TrimSpace(audit.String()), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "api request" && strings.HasSuffix(fmt.Sprint(rec["route"]), "/exec") {
				found = append(found, rec)
			}
		}
	}
	if len(found) != 2 {
		t.Fatalf("%d exec audit records, want 2:\n%s", len(found), audit.String())
	}
	for i, want := range []float64{4, 5} {
		rec := found[i]
		cmd, _ := json.Marshal(rec["command"])
		if rec["workload"] != w.ID || rec["exit_code"] != want || !strings.Contains(string(cmd), `"exit `+fmt.Sprint(want)+`"`) {
			t.Errorf("audit record %d = %v, want workload, command and exit code %v", i, rec, want)
		}
	}
}

func TestExecStreamTTYAndStdin(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	c := e.client()
	ctx := context.Background()
	sess, err := c.ExecStream(ctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "cat; echo done; exit 2"}, Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sess.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	if err := sess.CloseStdin(); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	exit, err := sess.Wait(&out, &errOut)
	if err != nil || *exit.ExitCode != 2 || out.String() != "hello\ndone\n" {
		t.Errorf("stdin session: %+v %v, stdout %q", exit, err, out.String())
	}
	sess.Close()

	sess, err = c.ExecStream(ctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "read x; stty size; read x; stty size"}, Stdin: true, TTY: true, Size: &api.TermSize{Rows: 30, Cols: 90}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	pr, pw := io.Pipe()
	waited := make(chan error, 1)
	go func() {
		_, err := sess.Wait(pw, io.Discard)
		pw.CloseWithError(err)
		waited <- err
	}()
	_, _ = sess.Write([]byte("a\n"))
	exectest.ReadUntil(t, pr, "30 90")
	_ = sess.Resize(50, 132)
	_, _ = sess.Write([]byte("b\n"))
	exectest.ReadUntil(t, pr, "50 132")
	go io.Copy(io.Discard, pr)
	if err := <-waited; err != nil {
		t.Errorf("tty session: %v", err)
	}
}

// A client that disconnects without a word: its process is killed.
func TestExecClientDisconnectKills(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	marker := fmt.Sprint(100000 + rand.IntN(800000))
	u := strings.Replace(e.srv.URL, "http", "ws", 1) + "/v1/workloads/" + w.ID + "/exec?command=sh&command=-c&command=sleep+" + marker + "1+%26+sleep+" + marker + "2"
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{Subprotocols: []string{api.ExecSubprotocol}})
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if processRuns("sleep\x00" + marker + "2") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the session's process never ran")
		}
	}
	conn.CloseNow()
	assertGone(t, "sleep\x00"+marker)
}

func processRuns(marker string) bool {
	pids, _ := proc.AllPids()
	for _, pid := range pids {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if strings.Contains(string(cmdline), marker) {
			return true
		}
	}
	return false
}

func TestSignal(t *testing.T) {
	e := newEnv(t)
	w := e.running(`{"image":"` + testImage + `","command":["sh","-c","trap 'exit 7' USR1; echo trapped; while true; do sleep 0.1; done"]}`)
	c := e.client()
	ctx := context.Background()
	// The signal goes once the trap is set (before, it would end the
	// shell with 128+10). USR1 rather than HUP: a test run under nohup
	// hands the shell HUP ignored, and a shell cannot trap a signal it was
	// started with ignored.
	e.waitWorkload(w.ID, func(*api.Workload) bool {
		var buf bytes.Buffer
		_ = c.Logs(ctx, w.ID, api.LogOptions{Tail: -1}, func(l api.LogLine) error { buf.WriteString(l.Line); return nil })
		return strings.Contains(buf.String(), "trapped")
	})
	if _, err := c.Signal(ctx, w.ID, "FOO"); !client.IsReason(err, api.ReasonInvalidArgument) {
		t.Errorf("signal FOO: %v, want invalid_argument", err)
	}
	if _, err := c.Signal(ctx, w.ID, "99"); !client.IsReason(err, api.ReasonInvalidArgument) {
		t.Errorf("signal 99: %v, want invalid_argument", err)
	}
	if _, err := c.Signal(ctx, w.ID, "usr1"); err != nil {
		t.Fatalf("signal usr1: %v", err)
	}
	ended := e.waitWorkload(w.ID, func(w *api.Workload) bool { return w.State == api.StateExited })
	if ended.ExitCode == nil || *ended.ExitCode != 7 {
		t.Errorf("after USR1: %+v, want exit 7 from the trap", ended)
	}
	_, err := c.Signal(ctx, w.ID, "1")
	var p *api.Problem
	if !client.IsReason(err, api.ReasonConflict) || !asProblem(err, &p) || p.State != "exited" {
		t.Errorf("signal of an exited workload: %v, want 409 with its state", err)
	}
}

func asProblem(err error, p **api.Problem) bool {
	q, ok := err.(*api.Problem)
	*p = q
	return ok
}

// countFDs counts this process's open files.
func countFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// 100 sessions at once, interactive and simple, leave no file descriptor,
// goroutine or process behind.
func TestExecManySessionsLeakNothing(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	c := e.client()
	ctx := context.Background()
	// Warm up: the first session starts what stays (the client's pool).
	if _, err := c.Exec(ctx, w.ID, api.ExecRequest{Command: []string{"true"}}); err != nil {
		t.Fatal(err)
	}
	http.DefaultClient.CloseIdleConnections()
	fds, goroutines := countFDs(t), runtime.NumGoroutine()
	marker := fmt.Sprint(100000 + rand.IntN(800000))
	for _, err := range exectest.Sessions(ctx, c, w.ID, 100, marker) {
		t.Error(err)
	}
	assertGone(t, "sleep\x000."+marker)
	c.CloseIdleConnections()
	var nfd, ng int
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		http.DefaultClient.CloseIdleConnections()
		nfd, ng = countFDs(t), runtime.NumGoroutine()
		if nfd <= fds && ng <= goroutines {
			return
		}
	}
	t.Errorf("after 100 sessions: %d fds (before %d), %d goroutines (before %d)", nfd, fds, ng, goroutines)
	buf := make([]byte, 1<<20)
	t.Logf("goroutines:\n%s", buf[:runtime.Stack(buf, true)])
}
