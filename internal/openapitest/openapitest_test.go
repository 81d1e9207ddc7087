package openapitest

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

const workload = `{"id":"w1","spec":{"image":"busybox"},"state":"running","isolation":"container","restart_count":0,"created_at":"2026-01-02T03:04:05Z","modify_index":3}`

func exch(method, target, reqBody string, status int, ct, body string, header ...string) *exchange {
	r := httptest.NewRequest(method, target, strings.NewReader(reqBody))
	if reqBody != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	h := http.Header{}
	if ct != "" {
		h.Set("Content-Type", ct)
	}
	for i := 0; i+1 < len(header); i += 2 {
		h.Set(header[i], header[i+1])
	}
	x := &exchange{req: r, status: status, header: h, body: []byte(body)}
	if reqBody != "" {
		x.reqBody = []byte(reqBody)
	}
	return x
}

// TestCheckFindsDrift: each kind of drift the checker exists for is
// reported, and a faithful exchange is not.
func TestCheckFindsDrift(t *testing.T) {
	d, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	problem := func(status int, reason string) string {
		return `{"type":"https://berth.dev/problems/` + reason + `","title":"x","status":` + http.StatusText(status)[:0] + strconv.Itoa(status) + `,"reason":"` + reason + `"}`
	}
	for _, c := range []struct {
		name  string
		x     *exchange
		drift string // "" when the exchange is faithful
	}{
		{"faithful workload", exch("GET", "/v1/workloads/w1", "", 200, "application/json", workload, IndexHeader, "3"), ""},
		{"faithful escaped ref", exch("GET", "/v1/workloads/a%2Fb", "", 404, "application/problem+json", problem(404, "not_found")), ""},
		{"faithful unknown route", exch("GET", "/v1/nope", "", 404, "application/problem+json", problem(404, "route_not_found")), ""},
		{"faithful bad request", exch("GET", "/v1/workloads?state=bogus", "", 400, "application/problem+json", problem(400, "invalid_argument")), ""},
		{"faithful event", exch("GET", "/v1/events", "", 200, "text/event-stream", ": keep-alive\n\nid: 4\nevent: workload.started\ndata: {\"id\":4,\"time\":\"2026-01-02T03:04:05Z\",\"type\":\"workload.started\",\"message\":\"m\"}\n\n"), ""},
		{"unknown field", exch("GET", "/v1/workloads/w1", "", 200, "application/json", strings.Replace(workload, `"id"`, `"surprise":1,"id"`, 1), IndexHeader, "3"), "surprise"},
		{"missing field", exch("GET", "/v1/workloads/w1", "", 200, "application/json", strings.Replace(workload, `"state":"running",`, "", 1), IndexHeader, "3"), "state"},
		{"undocumented status", exch("GET", "/v1/node", "", 418, "application/problem+json", problem(418, "internal")), "not documented"},
		{"undocumented route", exch("GET", "/v1/secret", "", 200, "application/json", `{}`), "not in api/openapi.yaml"},
		{"undocumented method", exch("PUT", "/v1/policy", "", 200, "application/json", `{}`), "not its method"},
		{"undocumented index header", exch("GET", "/v1/images", "", 200, "application/json", `{"images":[]}`, IndexHeader, "9"), IndexHeader},
		{"undocumented media type", exch("GET", "/v1/images", "", 200, "text/html", `<p>`), "Content-Type"},
		{"unknown reason", exch("GET", "/v1/workloads/w1", "", 404, "application/problem+json", problem(404, "gone_fishing")), "reason"},
		{"invalid request accepted", exch("GET", "/v1/workloads?state=bogus", "", 200, "application/json", `{"workloads":[]}`, IndexHeader, "1"), "accepted"},
		{"invalid body accepted", exch("POST", "/v1/workloads", `{"image":"x","colour":"red"}`, 201, "application/json", workload, "Location", "/v1/workloads/w1", IndexHeader, "3"), "accepted"},
		{"event of unknown type", exch("GET", "/v1/events", "", 200, "text/event-stream", "id: 4\nevent: workload.vanished\ndata: {\"id\":4,\"time\":\"2026-01-02T03:04:05Z\",\"type\":\"workload.vanished\",\"message\":\"m\"}\n\n"), "Event"},
		{"event type mismatch", exch("GET", "/v1/events", "", 200, "text/event-stream", "id: 4\nevent: workload.exited\ndata: {\"id\":4,\"time\":\"2026-01-02T03:04:05Z\",\"type\":\"workload.started\",\"message\":\"m\"}\n\n"), "SSE type"},
		{"log line with extra field", exch("GET", "/v1/workloads/w1/logs?format=ndjson", "", 200, "application/x-ndjson", `{"stream":"stdout","line":"hi"}`+"\n"+`{"stream":"stdout","line":"hi","pid":1}`+"\n"), "LogLine"},
		{"body on 204", exch("DELETE", "/v1/workloads/w1", "", 204, "", `{}`), "no body"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rep := &reporter{t: t}
			d.check(rep, c.x)
			got := strings.Join(rep.errs, "\n")
			switch {
			case c.drift == "" && got != "":
				t.Errorf("a faithful exchange is reported:\n%s", got)
			case c.drift != "" && !strings.Contains(got, c.drift):
				t.Errorf("want a report naming %q, got %q", c.drift, got)
			}
		})
	}
}
