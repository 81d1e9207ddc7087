package server_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/go-chi/chi/v5"

	"github.com/berthd/berth/api"
)

// tenancy is what a route gives a tenant-scoped caller (a submitter).
type tenancy int

const (
	// public needs no credential: probes.
	public tenancy = iota + 1
	// adminOnly is refused to every tenant-scoped role: admins, and the
	// operators and readers the grants name, see every tenant's data.
	adminOnly
	// scoped is open to tenant-scoped roles, and the scoping layer
	// (auth_scope.go) limits what they see and touch to their tenants.
	scoped
)

// routeTenancy is every route of the API. A new route fails
// TestEveryRouteIsClassified until it is listed here; a scoped one needs a
// check that shows a tenant cannot reach another tenant's data through it
// (a {ref} route gets the hidden-is-missing check without one).
var routeTenancy = map[string]struct {
	t     tenancy
	check func(t *testing.T, e *authEnv)
}{
	"GET /healthz":         {t: public},
	"GET /readyz":          {t: public},
	"GET /v1/openapi.json": {t: public},
	"GET /":                {t: public},
	"GET /workloads/{ref}": {t: public},
	"GET /ui/{file}":       {t: public},
	"GET /metrics":         {t: adminOnly},
	"GET /v1/node":         {t: adminOnly},
	"POST /v1/node/cordon": {t: adminOnly},
	// An admin's drain would stop the workloads the test keeps running:
	// a bad body shows the admin gets past the guard to the handler.
	"POST /v1/node/drain": {t: adminOnly, check: func(t *testing.T, e *authEnv) {
		if code, body := e.do("admin", "POST", "/v1/node/drain", `{"timeout_seconds":-1}`); code != http.StatusBadRequest {
			t.Errorf("admin's bad drain: %d %.200s, want 400", code, body)
		}
	}},
	"POST /v1/node/uncordon":          {t: adminOnly},
	"GET /v1/policy":                  {t: adminOnly},
	"POST /v1/images":                 {t: adminOnly},
	"POST /v1/images/prune":           {t: adminOnly},
	"DELETE /v1/images":               {t: adminOnly},
	"GET /v1/workloads/{ref}":         {t: scoped},
	"DELETE /v1/workloads/{ref}":      {t: scoped},
	"POST /v1/workloads/{ref}/stop":   {t: scoped},
	"GET /v1/workloads/{ref}/logs":    {t: scoped},
	"GET /v1/workloads/{ref}/stats":   {t: scoped},
	"POST /v1/workloads/{ref}/exec":   {t: scoped},
	"GET /v1/workloads/{ref}/exec":    {t: scoped},
	"GET /v1/workloads/{ref}/attach":  {t: scoped},
	"POST /v1/workloads/{ref}/signal": {t: scoped},
	"GET /v1/workloads": {t: scoped, check: func(t *testing.T, e *authEnv) {
		_, body := e.do("sub-a", "GET", "/v1/workloads", "")
		var list api.WorkloadList
		if err := json.Unmarshal([]byte(body), &list); err != nil {
			t.Fatalf("list: %v: %s", err, body)
		}
		for _, w := range list.Workloads {
			if w.Spec.Labels["tenant"] != "a" {
				t.Errorf("tenant a lists %s of tenant %q", w.Name, w.Spec.Labels["tenant"])
			}
		}
		if len(list.Workloads) == 0 {
			t.Error("tenant a lists none of its workloads")
		}
	}},
	"POST /v1/workloads": {t: scoped, check: func(t *testing.T, e *authEnv) {
		if code, body := e.do("sub-a", "POST", "/v1/workloads", specJSON("b")); code != http.StatusForbidden {
			t.Errorf("tenant a submits as tenant b: %d %s", code, body)
		}
	}},
	"POST /v1/placements": {t: scoped, check: func(t *testing.T, e *authEnv) {
		if code, body := e.do("sub-a", "POST", "/v1/placements", specJSON("b")); code != http.StatusForbidden {
			t.Errorf("tenant a explains as tenant b: %d %s", code, body)
		}
	}},
	"GET /v1/events": {t: scoped, check: func(t *testing.T, e *authEnv) {
		// The stream itself is filtered (TestSubmitterSeesOnlyItsTenants);
		// asking for another tenant's workload is asking for a missing one.
		hiddenLooksMissing(t, e, "GET", "/v1/events?workload=%s")
	}},
	// Images are the node's, not a tenant's: a submitter sees what an
	// admin sees, and may pull.
	"GET /v1/images": {t: scoped, check: func(t *testing.T, e *authEnv) {
		_, mine := e.do("sub-a", "GET", "/v1/images", "")
		_, all := e.do("admin", "GET", "/v1/images", "")
		if mine != all {
			t.Errorf("tenant a's image list %s differs from the admin's %s", mine, all)
		}
	}},
	"GET /v1/volumes/{ref}":    {t: scoped},
	"DELETE /v1/volumes/{ref}": {t: scoped},
	"GET /v1/volumes": {t: scoped, check: func(t *testing.T, e *authEnv) {
		_, body := e.do("sub-a", "GET", "/v1/volumes", "")
		var list api.VolumeList
		if err := json.Unmarshal([]byte(body), &list); err != nil {
			t.Fatalf("list: %v: %s", err, body)
		}
		for _, v := range list.Volumes {
			if v.Tenant != "a" {
				t.Errorf("tenant a lists volume %s of tenant %q", v.Name, v.Tenant)
			}
		}
		if len(list.Volumes) == 0 {
			t.Error("tenant a lists none of its volumes")
		}
	}},
	"POST /v1/volumes": {t: scoped, check: func(t *testing.T, e *authEnv) {
		if code, body := e.do("sub-a", "POST", "/v1/volumes", `{"name":"v","labels":{"tenant":"b"}}`); code != http.StatusForbidden {
			t.Errorf("tenant a creates a volume as tenant b: %d %s", code, body)
		}
		code, body := e.do("sub-a", "POST", "/v1/volumes", `{"name":"fresh"}`)
		var v api.Volume
		if err := json.Unmarshal([]byte(body), &v); code != http.StatusCreated || err != nil || v.Tenant != "a" {
			t.Errorf("tenant a creates a volume: %d %s, want 201 in tenant a", code, body)
		}
	}},
	"POST /v1/images/pull": {t: scoped, check: func(t *testing.T, e *authEnv) {
		// An empty reference: allowed, then refused as invalid.
		if code, body := e.do("sub-a", "POST", "/v1/images/pull", `{}`); code != http.StatusBadRequest {
			t.Errorf("tenant a pulls nothing: %d %s, want 400", code, body)
		}
	}},
}

func specJSON(tenant string) string {
	return `{"image":"` + testImage + `","command":["true"],"labels":{"tenant":"` + tenant + `"}}`
}

// hiddenLooksMissing: another tenant's workload answers exactly as a name
// nobody uses, with a 404. pathf has one %s for the workload.
func hiddenLooksMissing(t *testing.T, e *authEnv, method, pathf string) {
	t.Helper()
	hiddenCode, hidden := e.do("sub-a", method, fmt.Sprintf(pathf, "theirs"), "")
	missingCode, missing := e.do("sub-a", method, fmt.Sprintf(pathf, "nobody"), "")
	if hiddenCode != http.StatusNotFound || missingCode != http.StatusNotFound {
		t.Errorf("tenant b's workload: %d, a missing one: %d; want 404 for both", hiddenCode, missingCode)
	}
	if strings.ReplaceAll(hidden, "theirs", "nobody") != missing {
		t.Errorf("tenant b's workload answers\n%s\na missing one\n%s", hidden, missing)
	}
}

// routes lists the router's routes as "METHOD pattern", without chi's
// trailing slash of sub-router roots.
func routes(t *testing.T, e *authEnv) []string {
	t.Helper()
	var out []string
	err := chi.Walk(e.api.Router(), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		if len(route) > 1 {
			route = strings.TrimSuffix(route, "/")
		}
		out = append(out, method+" "+route)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestEveryRouteIsClassified: no route reaches callers before someone has
// said what tenants get from it, and the table names no route that is gone.
func TestEveryRouteIsClassified(t *testing.T) {
	e := newAuthEnv(t)
	seen := map[string]bool{}
	for _, r := range routes(t, e) {
		seen[r] = true
		if _, ok := routeTenancy[r]; !ok {
			t.Errorf("route %s is not in routeTenancy (scope_routes_test.go): say whether it is public, adminOnly or scoped, and for scoped how auth_scope.go keeps tenants apart", r)
		}
	}
	for r := range routeTenancy {
		if !seen[r] {
			t.Errorf("routeTenancy lists %s, which the router does not have", r)
		}
	}
	if len(seen) < len(routeTenancy) || len(seen) == 0 {
		t.Fatalf("walked %d routes", len(seen))
	}
}

// TestRouteTenancy holds every route to its class through the real guard,
// grants and scoping layer: public routes answer without a credential,
// admin-only ones refuse every submitter, scoped ones keep tenant a out of
// tenant b's workloads.
func TestRouteTenancy(t *testing.T) {
	e := newAuthEnv(t)
	e.submit("mine", "a")
	e.submit("theirs", "b")
	e.submit("nobodys", "")
	e.waitRunning("a/mine")
	e.waitRunning("b/theirs")
	for _, v := range []api.VolumeSpec{
		{Name: "mine", Labels: map[string]string{"tenant": "a"}},
		{Name: "theirs", Labels: map[string]string{"tenant": "b"}},
	} {
		if _, _, err := e.agent.CreateVolume(t.Context(), v); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range routes(t, e) {
		c, ok := routeTenancy[r]
		if !ok {
			continue // TestEveryRouteIsClassified says so
		}
		method, pattern, _ := strings.Cut(r, " ")
		t.Run(r, func(t *testing.T) {
			switch c.t {
			case public:
				if code, body := e.do("", method, pattern, ""); code == http.StatusUnauthorized || code == http.StatusForbidden {
					t.Errorf("without a credential: %d %.200s", code, body)
				}
			case adminOnly:
				path := strings.ReplaceAll(pattern, "{ref}", "mine")
				for _, caller := range []string{"sub-a", "sub-ab"} {
					if code, body := e.do(caller, method, path, ""); code != http.StatusForbidden {
						t.Errorf("%s: %d %.200s, want 403", caller, code, body)
					}
				}
				if c.check != nil {
					c.check(t, e) // instead of a request with side effects
				} else if code, body := e.do("admin", method, path, ""); code == http.StatusUnauthorized || code == http.StatusForbidden {
					t.Errorf("admin: %d %.200s", code, body)
				}
			case scoped:
				if strings.Contains(pattern, "{ref}") {
					hiddenLooksMissing(t, e, method, strings.ReplaceAll(pattern, "{ref}", "%s"))
				} else if c.check == nil {
					t.Fatal("a scoped route without {ref} needs a check")
				}
				if c.check != nil {
					c.check(t, e)
				}
			default:
				t.Fatalf("tenancy %d", c.t)
			}
		})
	}
	// Refused and hidden requests touched nothing.
	if _, err := e.agent.GetVolume(t.Context(), "b/theirs"); err != nil {
		t.Errorf("tenant b's volume after the submitter's requests: %v", err)
	}
	for _, ref := range []string{"b/theirs", "nobodys"} {
		if w, err := e.agent.Get(t.Context(), ref); err != nil || w.State != api.StateRunning {
			t.Errorf("%s after the submitter's requests: %v %v", ref, w, err)
		}
	}
}
