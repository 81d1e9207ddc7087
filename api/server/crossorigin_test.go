package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/api/server"
)

func (e *env) execCalls() int {
	n := 0
	for _, c := range e.ctr.Calls() {
		if c.Method == "Exec" {
			n++
		}
	}
	return n
}

func (e *env) problem(resp *http.Response) api.Problem {
	e.t.Helper()
	defer resp.Body.Close()
	var p api.Problem
	data, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(data, &p); err != nil {
		e.t.Fatalf("%s: not a problem: %s", resp.Status, data)
	}
	return p
}

// A handshake websocket.Accept would refuse, or one from another origin,
// is refused before the command reaches the driver.
func TestExecWebSocketRefusedBeforeStart(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	path := "/v1/workloads/" + w.ID + "/exec?command=true"
	good := http.Header{
		"Connection":             {"Upgrade"},
		"Upgrade":                {"websocket"},
		"Sec-Websocket-Version":  {"13"},
		"Sec-Websocket-Key":      {"dGhlIHNhbXBsZSBub25jZQ=="},
		"Sec-Websocket-Protocol": {api.ExecSubprotocol},
	}
	for name, tc := range map[string]struct {
		set    map[string]string
		status int
	}{
		"no upgrade":        {map[string]string{"Upgrade": ""}, 400},
		"no connection":     {map[string]string{"Connection": "keep-alive"}, 400},
		"old version":       {map[string]string{"Sec-Websocket-Version": "8"}, 400},
		"bad key":           {map[string]string{"Sec-Websocket-Key": "short"}, 400},
		"no subprotocol":    {map[string]string{"Sec-Websocket-Protocol": ""}, 400},
		"foreign origin":    {map[string]string{"Origin": "http://evil.example"}, 403},
		"null origin":       {map[string]string{"Origin": "null"}, 403},
		"origin other port": {map[string]string{"Origin": "http://" + strings.Split(strings.TrimPrefix(e.srv.URL, "http://"), ":")[0] + ":1"}, 403},
	} {
		req, err := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header = good.Clone()
		for k, v := range tc.set {
			if v == "" {
				req.Header.Del(k)
			} else {
				req.Header.Set(k, v)
			}
		}
		before := e.execCalls()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		p := e.problem(resp)
		if resp.StatusCode != tc.status || p.Status != tc.status {
			t.Errorf("%s: %d %+v, want %d", name, resp.StatusCode, p, tc.status)
		}
		if got := e.execCalls(); got != before {
			t.Errorf("%s: the command reached the driver (%d exec calls, were %d) although the handshake was refused", name, got, before)
		}
	}
	// The same handshake from the agent's own origin runs.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u := strings.Replace(e.srv.URL, "http", "ws", 1) + path
	conn, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{Subprotocols: []string{api.ExecSubprotocol}, HTTPHeader: http.Header{"Origin": {e.srv.URL}}})
	if err != nil {
		t.Fatalf("same-origin session: %v", err)
	}
	conn.CloseNow()
}

// A web page of another origin can change nothing: a form (no JSON media
// type) is refused with 415, anything with its Origin with 403.
func TestCrossSiteRequestsChangeNothing(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	spec := `{"name":"xsite","image":"` + testImage + `","command":["sleep","60"]}`
	before := e.snapshot()
	for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"} {
		resp := e.do("POST", "/v1/workloads", ct, strings.NewReader(spec))
		if p := e.problem(resp); resp.StatusCode != http.StatusUnsupportedMediaType || p.Reason != api.ReasonUnsupportedMedia {
			t.Errorf("POST /v1/workloads with Content-Type %q = %d %+v, want 415", ct, resp.StatusCode, p)
		}
	}
	for _, ct := range []string{"", "text/plain"} {
		resp := e.do("POST", "/v1/workloads/"+w.ID+"/exec", ct, strings.NewReader(`{"command":["true"]}`))
		if p := e.problem(resp); resp.StatusCode != http.StatusUnsupportedMediaType {
			t.Errorf("POST exec with Content-Type %q = %d %+v, want 415", ct, resp.StatusCode, p)
		}
	}
	// A form with no fields: the stop route takes an empty body, but not a
	// form's.
	for _, ct := range []string{"application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"} {
		resp := e.do("POST", "/v1/workloads/"+w.ID+"/stop", ct, strings.NewReader(""))
		if p := e.problem(resp); resp.StatusCode != http.StatusUnsupportedMediaType {
			t.Errorf("POST stop with an empty %s body = %d %+v, want 415", ct, resp.StatusCode, p)
		}
	}
	for _, origin := range []string{"http://evil.example", "null", "https://" + strings.TrimPrefix(e.srv.URL, "http://") + ".evil.example"} {
		for _, path := range []string{"/v1/workloads", "/v1/workloads/" + w.ID + "/exec", "/v1/workloads/" + w.ID + "/stop", "/v1/node/cordon"} {
			req, _ := http.NewRequest("POST", e.srv.URL+path, strings.NewReader(`{"command":["true"]}`))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Origin", origin)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			if p := e.problem(resp); resp.StatusCode != http.StatusForbidden || p.Reason != api.ReasonPermissionDenied {
				t.Errorf("POST %s with Origin %s = %d %+v, want 403", path, origin, resp.StatusCode, p)
			}
		}
	}
	if after := e.snapshot(); after != before {
		t.Errorf("refused requests changed something: %+v, was %+v", after, before)
	}
	if n := e.execCalls(); n != 0 {
		t.Errorf("%d exec calls reached the driver", n)
	}
	// Reads stay open to any origin's fetch (the browser keeps the answer
	// from the page without CORS headers), and the agent's own origin may
	// change things.
	req, _ := http.NewRequest("POST", e.srv.URL+"/v1/workloads/"+w.ID+"/exec", strings.NewReader(`{"command":["true"]}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Origin", e.srv.URL)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("same-origin exec = %s", resp.Status)
	}
}

// The start of an exec session is audited while the process runs, before
// its end; the end record carries the exit code; neither holds env values.
func TestExecAuditStartedBeforeEnd(t *testing.T) {
	e := newEnv(t)
	var audit syncBuffer
	hs := httptest.NewServer(server.New(e.agent, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Audit: slog.New(slog.NewJSONHandler(&audit, nil))}))
	defer hs.Close()
	e.srv = hs
	w := e.sleeper("")
	c, err := client.New(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := c.ExecStream(ctx, w.ID, api.ExecRequest{Command: []string{"sh", "-c", "read x; exit 7"}, User: "nobody", Stdin: true, Env: map[string]string{"TOKEN": "s3cr3t-value"}})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	records := func(msg string) []map[string]any {
		var out []map[string]any
		for _, line := range strings.Split(strings.TrimSpace(audit.String()), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == msg && strings.HasSuffix(fmt.Sprint(rec["route"]), "/exec") {
				out = append(out, rec)
			}
		}
		return out
	}
	// An exec refused by the agent's checks (here: the workload ended)
	// started nothing and has no start record.
	done := e.running(`{"image":"` + testImage + `","command":["sh","-c","sleep 0.2"]}`)
	e.waitWorkload(done.ID, func(w *api.Workload) bool { return w.State == api.StateExited })
	if code, _, p := e.execSimple(done.ID, api.ExecRequest{Command: []string{"true"}}); code != http.StatusConflict {
		t.Fatalf("exec into an exited workload = %d %+v", code, p)
	}
	// The process waits for input: its session has not ended.
	started := records("exec started")
	if len(started) != 1 {
		t.Fatalf("%d exec started records while the process runs, want 1:\n%s", len(started), audit.String())
	}
	rec := started[0]
	cmd, _ := json.Marshal(rec["command"])
	if rec["workload"] != w.ID || rec["user"] != "nobody" || rec["tty"] != false || string(cmd) != `["sh","-c","read x; exit 7"]` || rec["exit_code"] != nil {
		t.Errorf("exec started record = %v", rec)
	}
	if n := len(records("api request")); n != 1 {
		t.Errorf("%d end records before the process ended, want the refusal's only", n)
	}
	if _, err := sess.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
	if end, err := sess.Wait(io.Discard, io.Discard); err != nil || end.ExitCode == nil || *end.ExitCode != 7 {
		t.Fatalf("Wait = %+v, %v", end, err)
	}
	var ended []map[string]any
	for deadline := time.Now().Add(10 * time.Second); len(ended) < 2 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		ended = records("api request")
	}
	if len(ended) != 2 || ended[0]["status"] != float64(409) || ended[1]["exit_code"] != float64(7) {
		t.Errorf("end records = %v, want the refusal's (409) and one with exit code 7", ended)
	}
	if strings.Contains(audit.String(), "s3cr3t-value") {
		t.Errorf("the audit log holds an environment value:\n%s", audit.String())
	}
}

// Without a tokens file, a request addressed to a name that is not a
// loopback one (a web page that rebound its own name to 127.0.0.1) gets
// nothing and changes nothing.
func TestNoTokensAnswersLoopbackHostsOnly(t *testing.T) {
	e := newEnv(t)
	w := e.sleeper("")
	port := e.srv.URL[strings.LastIndex(e.srv.URL, ":")+1:]
	send := func(method, host, path, body string) int {
		t.Helper()
		req, _ := http.NewRequest(method, e.srv.URL+path, strings.NewReader(body))
		req.Host = host
		req.Header.Set("Origin", "http://"+host)
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, host := range []string{"rebound.example:" + port, "127.0.0.1.nip.example:" + port, "10.0.0.1:" + port} {
		if code := send("GET", host, "/v1/workloads", ""); code != http.StatusForbidden {
			t.Errorf("GET /v1/workloads with Host %s = %d, want 403", host, code)
		}
		if code := send("POST", host, "/v1/workloads/"+w.ID+"/exec", `{"command":["true"]}`); code != http.StatusForbidden {
			t.Errorf("POST exec with Host %s = %d, want 403", host, code)
		}
	}
	if n := e.execCalls(); n != 0 {
		t.Errorf("%d exec calls reached the driver", n)
	}
	for _, host := range []string{"localhost:" + port, "127.0.0.1:" + port, "LOCALHOST"} {
		if code := send("GET", host, "/v1/workloads", ""); code != http.StatusOK {
			t.Errorf("GET /v1/workloads with Host %s = %d, want 200", host, code)
		}
	}
	if code := send("GET", "rebound.example", "/healthz", ""); code != http.StatusOK {
		t.Errorf("a probe with any Host = %d, want 200 (it holds nothing)", code)
	}
}
