package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
)

// berth runs the CLI in-process and returns its error, stdout and stderr.
func berth(t *testing.T, stdin string, args ...string) (error, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := newRootCmd()
	root.SetArgs(args)
	root.SetIn(strings.NewReader(stdin))
	root.SetOut(&out)
	root.SetErr(&errOut)
	err := root.ExecuteContext(context.Background())
	return err, out.String(), errOut.String()
}

func exitCode(err error) int {
	var ee exitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	}
	return 1
}

func write(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const goodPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: untrusted
    match: {labels: {trust: untrusted}}
    isolation: vm
`

func TestPolicyCheck(t *testing.T) {
	dir := t.TempDir()
	good := write(t, dir, "good.yaml", goodPolicy)
	bad := write(t, dir, "bad.yaml", "apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: sometimes\nrules:\n  - name: x\n    match: {privileged: maybe}\n    isolation: vm\n")

	err, out, _ := berth(t, "", "policy", "check", good, "../../configs/policy.yaml")
	if exitCode(err) != 0 || !strings.Contains(out, good+": ok, version sha256:") || strings.Count(out, ": ok,") != 2 {
		t.Errorf("check of valid files: exit %d (%v), output %q", exitCode(err), err, out)
	}

	err, out, errOut := berth(t, "", "policy", "check", good, bad, filepath.Join(dir, "absent.yaml"))
	if exitCode(err) != 1 {
		t.Errorf("check with invalid files: exit %d (%v), want 1", exitCode(err), err)
	}
	if !strings.Contains(out, good+": ok") {
		t.Errorf("the valid file is not reported: %q", out)
	}
	for _, want := range []string{bad + ":3:10: ", bad + ":6:25: ", filepath.Join(dir, "absent.yaml") + ": no such file or directory"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr does not hold %q:\n%s", want, errOut)
		}
	}

	err, out, _ = berth(t, "", "-o", "json", "policy", "check", good, bad)
	var results []policyCheck
	if jerr := json.Unmarshal([]byte(out), &results); jerr != nil || exitCode(err) != 1 || len(results) != 2 ||
		!results[0].Valid || results[1].Valid || len(results[1].Errors) != 2 || results[1].Errors[0].Line != 3 {
		t.Errorf("check -o json: exit %d, %v, %+v", exitCode(err), jerr, results)
	}
}

func TestPolicyExplainOffline(t *testing.T) {
	dir := t.TempDir()
	pol := write(t, dir, "policy.yaml", goodPolicy)
	spec := write(t, dir, "w.json", `{"image":"busybox","labels":{"trust":"untrusted"}}`)

	err, out, _ := berth(t, "", "-o", "json", "policy", "explain", "--policy", pol, "-f", spec)
	var d api.PlacementDecision
	if err != nil || json.Unmarshal([]byte(out), &d) != nil {
		t.Fatalf("explain: %v, %q", err, out)
	}
	if d.Verdict != api.VerdictAllow || d.Isolation != api.IsolationVM || d.DecidingRule != "untrusted" ||
		d.Spec.Image != "docker.io/library/busybox:latest" || len(d.Matched) != 1 {
		t.Errorf("decision = %+v", d)
	}

	err, out, _ = berth(t, `{"image":"busybox","privileged":true}`, "policy", "explain", "--policy", "builtin", "--vm=false", "-f", "-")
	if err != nil || !strings.Contains(out, "unschedulable") || !strings.Contains(out, `"privileged-to-vm"`) {
		t.Errorf("explain without VMs: %v\n%s", err, out)
	}

	if err, _, _ := berth(t, `{"image":"busybox","imag":"x"}`, "policy", "explain", "--policy", pol, "-f", "-"); err == nil || !strings.Contains(err.Error(), `unknown field "imag"`) {
		t.Errorf("explain of a spec with an unknown field: %v", err)
	}
	if err, _, _ := berth(t, `{"image":"busybox","isolation":"jail"}`, "policy", "explain", "--policy", pol, "-f", "-"); err == nil || !strings.Contains(err.Error(), "isolation") {
		t.Errorf("explain of an invalid spec: %v", err)
	}
}

// TestPolicyAgainstAgent runs explain (POST /v1/placements) and show (GET
// /v1/policy) against an agent with the built-in policy and no VM driver.
func TestPolicyAgainstAgent(t *testing.T) {
	a, err := agent.New(context.Background(), agent.Options{
		DataDir:  t.TempDir(),
		Drivers:  []driver.Driver{fake.New("container", fake.NewNode())},
		Defaults: agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	hs := httptest.NewServer(server.New(a, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}))
	defer hs.Close()

	err, out, _ := berth(t, `{"image":"busybox","labels":{"trust":"untrusted"}}`, "--addr", hs.URL, "policy", "explain", "-f", "-")
	if err != nil || !strings.Contains(out, "unschedulable") || !strings.Contains(out, "no vm driver is configured") {
		t.Errorf("explain via the agent: %v\n%s", err, out)
	}
	if err, _, _ := berth(t, `{"image":"busybox"}`, "--addr", hs.URL, "policy", "explain", "--vm=false", "-f", "-"); err == nil {
		t.Error("explain via the agent accepted an offline-only flag")
	}
	err, out, _ = berth(t, "", "--addr", hs.URL, "policy", "show")
	if err != nil || !strings.Contains(out, "builtin") || !strings.Contains(out, "privileged-to-vm") || !strings.Contains(out, "0 applied, 0 rejected") {
		t.Errorf("show: %v\n%s", err, out)
	}
}

func TestPlacedLine(t *testing.T) {
	cases := []struct {
		p    *api.Placement
		want string
	}{
		{&api.Placement{Isolation: "vm", DecidingRule: "untrusted", PolicyVersion: "sha256:ab",
			Matched: []api.RuleMatch{{Rule: "untrusted", Outcome: "vm", Reason: "label trust=untrusted"}}},
			`placed on vm by rule "untrusted" (label trust=untrusted), policy sha256:ab`},
		{&api.Placement{Isolation: "container", DecidingRule: "default", PolicyVersion: "sha256:ab"},
			"placed on container by the policy default (no rule matched), policy sha256:ab"},
		{&api.Placement{Isolation: "vm", DecidingRule: "request", PolicyVersion: "sha256:ab"},
			"placed on vm by the isolation request, policy sha256:ab"},
	}
	for _, tc := range cases {
		if got := placedLine(&api.Workload{Isolation: tc.p.Isolation, Placement: tc.p}); got != tc.want {
			t.Errorf("placedLine = %q, want %q", got, tc.want)
		}
	}
}
