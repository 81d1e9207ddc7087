package server_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
)

// Cordon, drain and uncordon through the API: a cordoned node answers a
// submit with 503 node_cordoned and the reason; bad bodies are 400 and
// change nothing.
func TestNodeCordonAPI(t *testing.T) {
	e := newEnv(t)
	post := func(path, body string) (int, string) {
		t.Helper()
		ct := ""
		if body != "" {
			ct = "application/json"
		}
		resp := e.do(http.MethodPost, path, ct, strings.NewReader(body))
		defer resp.Body.Close()
		data, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(data)
	}
	for _, bad := range []string{`{"timeout_seconds":5}`, `{"reason":"x","extra":1}`, `{"reason":"a\u0001b"}`} {
		if code, body := post("/v1/node/cordon", bad); code != http.StatusBadRequest {
			t.Errorf("cordon %s: %d %s, want 400", bad, code, body)
		}
	}
	if code, body := post("/v1/node/drain", `{"timeout_seconds":-1}`); code != http.StatusBadRequest {
		t.Errorf("drain with a negative timeout: %d %s", code, body)
	}
	if n := e.agent.Node(t.Context()); !n.Schedulable {
		t.Fatalf("bad requests cordoned the node: %+v", n.Cordon)
	}
	code, body := post("/v1/node/cordon", `{"reason":"rack move"}`)
	var n api.Node
	if code != http.StatusOK || json.Unmarshal([]byte(body), &n) != nil || n.Schedulable || n.Cordon == nil {
		t.Fatalf("cordon: %d %s", code, body)
	}
	code, body = post("/v1/workloads", `{"image":"`+testImage+`","command":["true"]}`)
	var p api.Problem
	if code != http.StatusServiceUnavailable || json.Unmarshal([]byte(body), &p) != nil || p.Reason != api.ReasonNodeCordoned || !strings.Contains(p.Detail, "rack move") {
		t.Errorf("submit to a cordoned node: %d %s", code, body)
	}
	if code, body = post("/v1/node/uncordon", ""); code != http.StatusOK || !strings.Contains(body, `"schedulable":true`) {
		t.Errorf("uncordon: %d %s", code, body)
	}
	if code, body = post("/v1/workloads", `{"image":"`+testImage+`","command":["true"]}`); code != http.StatusCreated {
		t.Errorf("submit after uncordon: %d %s", code, body)
	}
}
