package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

func decodeWorkload(t *testing.T, body string) api.Workload {
	t.Helper()
	var w api.Workload
	if err := json.Unmarshal([]byte(body), &w); err != nil || w.ID == "" {
		t.Fatalf("not a workload: %v: %s", err, body)
	}
	return w
}

// The leak, through the API: tenant a submits x, tenant b submits
// x. Two workloads; neither submitter sees the other's id; each retry is
// its own; a submitter addresses its own names, others TENANT/NAME or a
// bare NAME of the node's namespace.
func TestNamesArePerTenantThroughTheAPI(t *testing.T) {
	e := newAuthEnv(t)
	named := func(tenant string) string {
		labels := ""
		if tenant != "" {
			labels = `,"labels":{"tenant":"` + tenant + `"}`
		}
		return `{"name":"x","image":"` + testImage + `","command":["sleep","60"]` + labels + `}`
	}
	code, body := e.do("sub-a", "POST", "/v1/workloads", named(""))
	if code != http.StatusCreated {
		t.Fatalf("tenant a submits x: %d %s", code, body)
	}
	wa := decodeWorkload(t, body)
	code, body = e.do("sub-ab", "POST", "/v1/workloads", named("b"))
	if code != http.StatusCreated {
		t.Fatalf("tenant b submits x: %d %s (before the fix: 200 with tenant a's workload)", code, body)
	}
	wb := decodeWorkload(t, body)
	if wa.ID == wb.ID || strings.Contains(body, wa.ID) {
		t.Fatalf("tenant b's submit of x answers with tenant a's workload: %s", body)
	}
	if wa.Tenant != "a" || wb.Tenant != "b" {
		t.Errorf("tenants %q and %q", wa.Tenant, wb.Tenant)
	}
	// Idempotent per tenant.
	if code, body := e.do("sub-a", "POST", "/v1/workloads", named("")); code != http.StatusOK || decodeWorkload(t, body).ID != wa.ID {
		t.Errorf("tenant a's retry: %d %s, want 200 with %s", code, body, wa.ID)
	}
	if code, body := e.do("sub-ab", "POST", "/v1/workloads", named("b")); code != http.StatusOK || decodeWorkload(t, body).ID != wb.ID {
		t.Errorf("tenant b's retry: %d %s, want 200 with %s", code, body, wb.ID)
	}
	// A different spec under b's x is b's conflict alone.
	if code, body := e.do("sub-ab", "POST", "/v1/workloads", strings.Replace(named("b"), "60", "61", 1)); code != http.StatusConflict || strings.Contains(body, wa.ID) {
		t.Errorf("tenant b's conflicting x: %d %s", code, body)
	}

	code, body = e.do("admin", "POST", "/v1/workloads", named(""))
	if code != http.StatusCreated {
		t.Fatalf("the admin submits an untenanted x: %d %s", code, body)
	}
	wn := decodeWorkload(t, body)
	if wn.Tenant != "" || wn.ID == wa.ID || wn.ID == wb.ID {
		t.Fatalf("the node's x: %+v", wn)
	}

	for _, c := range []struct {
		caller, ref string
		want        string // an id, or "404"
	}{
		{"sub-a", "x", wa.ID},
		{"sub-a", "a%2Fx", wa.ID},
		{"sub-a", wa.ID, wa.ID},
		{"sub-a", "b%2Fx", "404"},
		{"sub-a", wb.ID, "404"},
		{"sub-a", wn.ID, "404"},
		{"sub-ab", "a%2Fx", wa.ID},
		{"sub-ab", "b%2Fx", wb.ID},
		{"sub-ab", wb.ID, wb.ID},
		{"admin", "x", wn.ID},
		{"admin", "a%2Fx", wa.ID},
		{"admin", "b%2Fx", wb.ID},
		{"admin", "c%2Fx", "404"},
		{"operator", "x", wn.ID},
		{"operator", "b%2Fx", wb.ID},
	} {
		code, body := e.do(c.caller, "GET", "/v1/workloads/"+c.ref, "")
		switch {
		case c.want == "404" && code != http.StatusNotFound:
			t.Errorf("%s GET %s: %d %s, want 404", c.caller, c.ref, code, body)
		case c.want != "404" && (code != http.StatusOK || decodeWorkload(t, body).ID != c.want):
			t.Errorf("%s GET %s: %d %s, want %s", c.caller, c.ref, code, body, c.want)
		}
	}
	// Another tenant's TENANT/NAME is a missing one, byte for byte.
	_, hidden := e.do("sub-a", "GET", "/v1/workloads/b%2Fx", "")
	_, missing := e.do("sub-a", "GET", "/v1/workloads/b%2Fy", "")
	if strings.ReplaceAll(hidden, "b/x", "b/y") != missing {
		t.Errorf("tenant b's x answers\n%s\na missing one\n%s", hidden, missing)
	}
	// A submitter of two tenants that both hold x must say which.
	code, body = e.do("sub-ab", "GET", "/v1/workloads/x", "")
	if code != http.StatusBadRequest || !strings.Contains(body, "a/x") || strings.Contains(body, wa.ID) || strings.Contains(body, wb.ID) {
		t.Errorf("sub-ab GET x (held by a and b): %d %s, want 400 asking for TENANT/NAME", code, body)
	}

	// The Go client escapes TENANT/NAME.
	c, err := client.New(e.srv.URL, client.WithToken(e.tokens["admin"]))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if w, _, err := c.Get(ctx, "b/x", nil); err != nil || w.ID != wb.ID {
		t.Errorf("client Get(b/x): %v %v", w, err)
	}
	if st, err := c.Stats(ctx, "a/x"); err != nil || st == nil {
		t.Errorf("client Stats(a/x): %v", err)
	}
	// A delete by a name takes that namespace's workload only.
	if code, body := e.do("sub-a", "DELETE", "/v1/workloads/x?force=true", ""); code != http.StatusNoContent {
		t.Fatalf("tenant a deletes its x: %d %s", code, body)
	}
	if err := c.Delete(ctx, "b/x", true); err != nil {
		t.Errorf("client Delete(b/x): %v", err)
	}
	for id, gone := range map[string]bool{wa.ID: true, wb.ID: true, wn.ID: false} {
		if _, err := e.agent.Get(ctx, id); (err != nil) != gone {
			t.Errorf("after the deletes, %s: %v (gone: %v)", id, err, gone)
		}
	}
	// The audit log names each request's own workload.
	if !strings.Contains(e.audit.String(), `"workload":"`+wa.ID+`"`) {
		t.Errorf("the audit log lacks tenant a's delete:\n%s", e.audit)
	}
}

const apiSecret = "api-s3cr3t-4e9d"

// A secret reaches the workload's output and nothing else the API gives:
// the submit's answer, get, list, the dry run, the event stream, problem
// details, the audit log and the server's log.
func TestSecretsThroughTheAPI(t *testing.T) {
	e := newAuthEnv(t)
	spec := `{"name":"s","image":"` + testImage + `","command":["sh","-c","echo got=$TOKEN"],"secret_env":{"TOKEN":"` + apiSecret + `"}}`
	check := func(what, body string) {
		t.Helper()
		if strings.Contains(body, apiSecret) {
			t.Errorf("%s holds the secret: %s", what, body)
		}
	}

	// The event stream is open before the submit (a stream starts now).
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+"/v1/events", nil)
	req.Header.Set("Authorization", "Bearer "+e.tokens["admin"])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()

	code, body := e.do("sub-a", "POST", "/v1/workloads", spec)
	if code != http.StatusCreated {
		t.Fatalf("submit: %d %s", code, body)
	}
	check("the submit's answer", body)
	w := decodeWorkload(t, body)
	if w.Spec.SecretEnv["TOKEN"] != api.Redacted {
		t.Errorf("the answer's secret_env: %v", w.Spec.SecretEnv)
	}
	// The events up to its exit.
	sc := bufio.NewScanner(resp.Body)
	var stream strings.Builder
	for sc.Scan() {
		stream.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), `"workload.exited"`) && strings.Contains(sc.Text(), w.ID) {
			break
		}
	}
	if !strings.Contains(stream.String(), w.ID) {
		t.Errorf("the event stream showed nothing of %s:\n%s", w.ID, stream.String())
	}
	check("the event stream", stream.String())

	if code, body := e.do("sub-a", "GET", "/v1/workloads/s/logs", ""); code != http.StatusOK || !strings.Contains(body, "got="+apiSecret) {
		t.Errorf("the workload's output: %d %q, want the secret it printed", code, body)
	}
	for _, c := range []struct{ caller, path string }{
		{"sub-a", "/v1/workloads/s"},
		{"sub-a", "/v1/workloads"},
		{"admin", "/v1/workloads/a%2Fs"},
		{"operator", "/v1/workloads"},
	} {
		_, body := e.do(c.caller, "GET", c.path, "")
		check(c.caller+" GET "+c.path, body)
		if !strings.Contains(body, `"secret_env":{"TOKEN":"\u003credacted\u003e"}`) {
			t.Errorf("%s GET %s does not show the redacted name: %s", c.caller, c.path, body)
		}
	}
	code, body = e.do("sub-a", "POST", "/v1/placements", spec)
	if code != http.StatusOK {
		t.Errorf("dry run: %d %s", code, body)
	}
	check("the dry run", body)
	// Problem details: a conflict, a validation error.
	code, body = e.do("sub-a", "POST", "/v1/workloads", strings.Replace(spec, apiSecret, apiSecret+"-2", 1))
	if code != http.StatusConflict {
		t.Errorf("another secret under the same name: %d %s, want 409", code, body)
	}
	check("the conflict", body)
	code, body = e.do("sub-a", "POST", "/v1/workloads", strings.Replace(spec, `"TOKEN"`, `"1TOKEN"`, 1))
	if code != http.StatusBadRequest || !strings.Contains(body, "secret_env.1TOKEN") {
		t.Errorf("a bad secret name: %d %s, want 400 naming it", code, body)
	}
	check("the validation problem", body)
	if code, body := e.do("sub-a", "POST", "/v1/workloads", spec); code != http.StatusOK {
		t.Errorf("the same secret again: %d %s, want 200", code, body)
	}
	if code, body := e.do("sub-a", "DELETE", "/v1/workloads/s", ""); code != http.StatusNoContent {
		t.Errorf("delete: %d %s", code, body)
	}
	check("the audit log", e.audit.String())
	check("the server's log", e.log.String())
	if !strings.Contains(e.audit.String(), w.ID) {
		t.Errorf("the audit log was not captured:\n%s", e.audit)
	}
}
