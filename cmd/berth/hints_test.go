package main

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
)

func TestHintFor(t *testing.T) {
	prob := func(reason string) error {
		return &api.Problem{Status: 400, Reason: reason, Title: "x"}
	}
	cases := []struct {
		path string
		args []string
		err  error
		want string // a substring; "" for no hint
	}{
		{"berth run", []string{"example.com/app:1", "--", "sh"}, prob(api.ReasonImageNotFound), "berth image pull example.com/app:1"},
		{"berth run", []string{"example.com/app:1"}, prob(api.ReasonImageNotFound), "berth image import --ref example.com/app:1 FILE"},
		{"berth inspect", []string{"web"}, prob(api.ReasonNotFound), "berth ps -a"},
		{"berth rm", []string{"web"}, prob(api.ReasonNotFound), "berth ps -a"},
		{"berth exec", []string{"web", "--", "sh"}, prob(api.ReasonFailedPrecondition), "berth inspect web"},
		{"berth image rm", []string{"busybox"}, prob(api.ReasonNotFound), "berth image ls"},
		{"berth volume rm", []string{"pgdata"}, prob(api.ReasonNotFound), "berth volume ls"},
		{"berth stats", []string{"web"}, prob(api.ReasonFailedPrecondition), "berth inspect web"},
		{"berth run", nil, prob(api.ReasonAlreadyExists), "berth rm NAME"},
		{"berth run", nil, prob(api.ReasonDenied), "berth policy explain"},
		{"berth run", nil, prob(api.ReasonResourceExhausted), "berth node status"},
		{"berth run", nil, prob(api.ReasonNodeCordoned), "berth node uncordon"},
		{"berth ps", nil, prob(api.ReasonUnauthenticated), "--token or BERTH_TOKEN"},
		{"berth node drain", nil, prob(api.ReasonPermissionDenied), "berth token add --help"},
		{"berth ps", nil, prob(api.ReasonRouteNotFound), "older than this berth"},
		// Nothing useful to add: no hint rather than a wrong one.
		{"berth run", nil, prob(api.ReasonInvalidArgument), ""},
		{"berth ps", nil, prob(api.ReasonInternal), ""},
		{"berth ps", nil, errors.New("some local failure"), ""},
	}
	for _, tc := range cases {
		got := hintFor(tc.path, tc.args, "127.0.0.1:7470", tc.err)
		switch {
		case tc.want == "" && got != "":
			t.Errorf("%s %v: hint %q, want none", tc.path, tc.err, got)
		case tc.want != "" && !strings.Contains(got, tc.want):
			t.Errorf("%s %v: hint %q, want it to contain %q", tc.path, tc.err, got, tc.want)
		}
		if strings.Contains(got, "/v1/") {
			t.Errorf("%s: hint %q names an API route", tc.path, got)
		}
	}
}

const cliImage = "berth.test/busybox:latest"

// TestErrorsNameTheCommand: what a CLI user reads for an agent's problem
// names the berth command to run, not the API route.
func TestErrorsNameTheCommand(t *testing.T) {
	addr, _ := execAgent(t)
	// --pull never: a missing image is then refused, not looked up.
	err, _, _ := berth(t, "", "--addr", addr, "run", "--pull", "never", "berth.test/absent:1", "--", "true")
	msg := describeHinted(err)
	if err == nil || !strings.Contains(msg, "hint: pull it: berth image pull berth.test/absent:1") || strings.Contains(msg, "/v1/") {
		t.Errorf("run of a missing image: %v\n%s", err, msg)
	}
	if !strings.Contains(msg, "("+api.ReasonImageNotFound+")") {
		t.Errorf("run of a missing image does not show its reason:\n%s", msg)
	}
	err, _, _ = berth(t, "", "--addr", addr, "inspect", "no-such-workload")
	if msg := describeHinted(err); err == nil || !strings.Contains(msg, "hint: berth ps -a") {
		t.Errorf("inspect of a missing workload: %v\n%s", err, msg)
	}

	// Nothing listens on a port just closed.
	ln, lerr := net.Listen("tcp", "127.0.0.1:0")
	if lerr != nil {
		t.Fatal(lerr)
	}
	dead := ln.Addr().String()
	ln.Close()
	err, _, _ = berth(t, "", "--addr", dead, "ps")
	if msg := describeHinted(err); err == nil || !strings.Contains(msg, "no agent answers at "+dead) {
		t.Errorf("ps against no agent: %v\n%s", err, msg)
	}
	err, _, _ = berth(t, "", "--addr", "unix://"+filepath.Join(t.TempDir(), "none.sock"), "ps")
	if msg := describeHinted(err); err == nil || !strings.Contains(msg, "no agent answers") {
		t.Errorf("ps against a missing socket: %v\n%s", err, msg)
	}
}

// TestPsQuiet: ps -q prints the ids and nothing else, with the filters.
func TestPsQuiet(t *testing.T) {
	addr, c := execAgent(t)
	// An empty node prints nothing, not a header.
	if err, out, _ := berth(t, "", "--addr", addr, "ps", "-q"); err != nil || out != "" {
		t.Fatalf("ps -q on an empty node: %v %q", err, out)
	}
	var ids []string
	for _, app := range []string{"web", "batch"} {
		w, err := c.Submit(context.Background(), api.WorkloadSpec{Image: cliImage, Command: []string{"sleep", "30"}, Labels: map[string]string{"app": app}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, w.ID)
	}
	err, out, _ := berth(t, "", "--addr", addr, "ps", "-q")
	if err != nil || out != ids[0]+"\n"+ids[1]+"\n" && out != ids[1]+"\n"+ids[0]+"\n" {
		t.Errorf("ps -q = %v %q, want the two ids", err, out)
	}
	err, out, _ = berth(t, "", "--addr", addr, "-o", "json", "ps", "-q", "-l", "app=web")
	if err != nil || out != ids[0]+"\n" {
		t.Errorf("ps -q -l app=web = %v %q, want %s alone", err, out, ids[0])
	}
}
