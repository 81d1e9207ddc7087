package server_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/internal/exectest"
)

// run -it as the CLI does it: submit with stdin and a terminal, attach
// with the earlier output, type, and get the workload's exit code.
func TestAttachTerminalWithLogs(t *testing.T) {
	e := newEnv(t)
	w := e.running(`{"image":"` + testImage + `","command":["sh","-c","echo before-attach; read a; echo got-$a; exit 5"],"stdin":true,"tty":true}`)
	c := e.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The line printed before the attach is in the log first.
	e.waitWorkload(w.ID, func(*api.Workload) bool {
		var buf bytes.Buffer
		_ = c.Logs(ctx, w.ID, api.LogOptions{Tail: -1}, func(l api.LogLine) error { buf.WriteString(l.Line); return nil })
		return strings.Contains(buf.String(), "before-attach")
	})
	sess, err := c.Attach(ctx, w.ID, api.AttachRequest{Stdin: true, Logs: true, Size: &api.TermSize{Rows: 30, Cols: 100}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	if _, err := sess.Write([]byte("x\n")); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	exit, err := sess.Wait(&out, io.Discard)
	if err != nil {
		t.Fatalf("attach session: %v (output %q)", err, out.String())
	}
	if *exit.ExitCode != 5 {
		t.Errorf("exit code %d, want 5", *exit.ExitCode)
	}
	if n := strings.Count(out.String(), "before-attach"); n != 1 || !strings.Contains(out.String(), "got-x") {
		t.Errorf("output %q: want the earlier line once, then got-x", out.String())
	}
}

// A detach leaves the workload running; a second attach types on.
func TestAttachDetachLeavesTheWorkloadRunning(t *testing.T) {
	e := newEnv(t)
	w := e.running(`{"image":"` + testImage + `","command":["sh","-c","read a; echo A-$a; read b; echo B-$b"],"stdin":true}`)
	c := e.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first, err := c.Attach(ctx, w.ID, api.AttachRequest{Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { _, err := first.Wait(pw, io.Discard); pw.CloseWithError(err) }()
	if _, err := first.Write([]byte("x\n")); err != nil {
		t.Fatal(err)
	}
	exectest.ReadUntil(t, pr, "A-x")
	first.Close()
	time.Sleep(200 * time.Millisecond)
	if got := e.waitWorkload(w.ID, func(*api.Workload) bool { return true }); got.State != api.StateRunning {
		t.Fatalf("after a detach the workload is %s, want running", got.State)
	}
	second, err := c.Attach(ctx, w.ID, api.AttachRequest{Stdin: true})
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if _, err := second.Write([]byte("y\n")); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	exit, err := second.Wait(&out, io.Discard)
	if err != nil || *exit.ExitCode != 0 || out.String() != "B-y\n" {
		t.Errorf("second attach: %+v %v, output %q; want B-y and exit 0", exit, err, out.String())
	}
}

func TestAttachRefusals(t *testing.T) {
	e := newEnv(t)
	noStdin := e.sleeper("")
	c := e.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	wantProblem := func(what string, err error, status int, field string) {
		t.Helper()
		var p *api.Problem
		if !errors.As(err, &p) || p.Status != status {
			t.Errorf("%s: %v, want a %d problem", what, err, status)
			return
		}
		if field != "" && (len(p.Fields) == 0 || p.Fields[0].Field != field) {
			t.Errorf("%s: fields %+v, want %s", what, p.Fields, field)
		}
	}
	_, err := c.Attach(ctx, noStdin.ID, api.AttachRequest{Stdin: true})
	wantProblem("stdin on a workload without it", err, http.StatusBadRequest, "stdin")
	_, err = c.Attach(ctx, "no-such-workload", api.AttachRequest{})
	wantProblem("unknown workload", err, http.StatusNotFound, "")
	ended := e.submitJSON(`{"image":"` + testImage + `","command":["true"]}`)
	e.waitWorkload(ended.ID, func(w *api.Workload) bool { return w.State.Terminal() })
	_, err = c.Attach(ctx, ended.ID, api.AttachRequest{})
	wantProblem("exited workload", err, http.StatusConflict, "")
	// A plain GET is not a session.
	resp := e.do("GET", "/v1/workloads/"+noStdin.ID+"/attach", "", nil)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("attach without a WebSocket handshake: %d, want 400", resp.StatusCode)
	}
	// Output only is fine on any running workload, and a detach ends it.
	sess, err := c.Attach(ctx, noStdin.ID, api.AttachRequest{})
	if err != nil {
		t.Fatal(err)
	}
	sess.Close()
}
