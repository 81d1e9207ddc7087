package server_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"testing"

	"github.com/berthd/berth/api"
)

// FuzzSpecDecode sends arbitrary bodies through the server's strict JSON
// decoding and the agent's spec validation (POST /v1/placements: the
// same decode and validation as a submit, without creating anything), as
// a submitter of two tenants, so the tenant checks are fuzzed too.
// Whatever the body, the answer is a 200 decision or a 4xx problem with a
// reason: never a 5xx, never a panic.
func FuzzSpecDecode(f *testing.F) {
	for _, s := range []string{
		`{"image":"` + testImage + `","command":["true"]}`,
		`{"name":"x","image":"` + testImage + `","command":["sh","-c","echo"],"args":["a"],"env":{"A":"b"},"workdir":"/srv","labels":{"tenant":"a","team":"x"},"isolation":"vm","privileged":true,"resources":{"cpu":0.5,"memory_mb":64,"pids":10},"restart":{"policy":"on-failure","max_retries":3}}`,
		`{"image":"busybox","workdir":"../etc"}`,
		`{"image":"x","env":{"":"a","A=B":"c"}}`,
		`{"image":"x","resources":{"cpu":-1,"memory_mb":1e30}}`,
		`{"image":"x","labels":{"a b":"c"}}`,
		`{"image":"x"} {"image":"y"}`,
		`{"image":"x","unknown":1}`,
		`[]`, `null`, `"x"`, `{`, ``, "{\"image\":\"\x00\"}",
		`{"image":"x","command":[""]}`,
		`{"image":"x","network":{"mode":"host"}}`,
	} {
		f.Add([]byte(s))
	}
	e := newAuthEnv(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := http.NewRequest("POST", e.srv.URL+"/v1/placements", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+e.tokens["sub-ab"])
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusOK:
			var d api.PlacementDecision
			if err := json.Unmarshal(data, &d); err != nil {
				t.Fatalf("200 with a body that is not a decision: %s", data)
			}
		case resp.StatusCode >= 400 && resp.StatusCode < 500:
			var p api.Problem
			if err := json.Unmarshal(data, &p); err != nil || p.Reason == "" || p.Status != resp.StatusCode {
				t.Fatalf("%d without a problem document: %s", resp.StatusCode, data)
			}
		default:
			t.Fatalf("body %q: %d %s", body, resp.StatusCode, data)
		}
	})
}
