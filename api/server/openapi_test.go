package server_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/go-chi/chi/v5"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/internal/openapitest"
)

// docPath is the OpenAPI path of a chi route pattern: chi's catch-all
// (/ui/*) is one documented parameter.
func docPath(route string) string {
	if len(route) > 1 {
		route = strings.TrimSuffix(route, "/")
	}
	if strings.HasSuffix(route, "/*") {
		route = strings.TrimSuffix(route, "*") + "{file}"
	}
	return route
}

// TestEveryRouteIsDocumented walks the router: every route it serves is
// an operation of api/openapi.yaml, and every operation there is a route.
func TestEveryRouteIsDocumented(t *testing.T) {
	e := newEnv(t)
	d, err := openapitest.Load()
	if err != nil {
		t.Fatal(err)
	}
	served := map[string]bool{}
	err = chi.Walk(e.api.Router(), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		p := docPath(route)
		served[method+" "+p] = true
		if d.Operation(method, p) == nil {
			t.Errorf("%s %s is served but not in api/openapi.yaml: document it (parameters, request, every status and its body)", method, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	documented := 0
	for p, item := range d.T.Paths.Map() {
		for method := range item.Operations() {
			documented++
			if !served[method+" "+p] {
				t.Errorf("api/openapi.yaml documents %s %s, which the router does not serve", method, p)
			}
		}
	}
	if len(served) == 0 || documented == 0 {
		t.Fatalf("%d routes served, %d documented", len(served), documented)
	}
}

// TestOpenAPIDocumentIsServed: GET /v1/openapi.json is the embedded
// document, as JSON, without a credential even when auth is on.
func TestOpenAPIDocumentIsServed(t *testing.T) {
	e := newAuthEnv(t)
	code, body := e.do("", "GET", "/v1/openapi.json", "")
	if code != http.StatusOK {
		t.Fatalf("GET /v1/openapi.json without a token: %d %s", code, body)
	}
	want, err := api.OpenAPI()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal([]byte(body), want) {
		t.Error("GET /v1/openapi.json is not the embedded document")
	}
	var doc struct {
		OpenAPI string         `json:"openapi"`
		Paths   map[string]any `json:"paths"`
	}
	if err := json.NewDecoder(io.LimitReader(strings.NewReader(body), 1<<22)).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	if doc.OpenAPI != "3.1.0" || doc.Paths["/v1/workloads"] == nil {
		t.Errorf("served document: openapi %q, paths %d", doc.OpenAPI, len(doc.Paths))
	}
}

// TestDocumentedSecurityMatchesTheGuard: an operation the document marks
// public (security: []) answers without a credential when auth is on, and
// every other one asks for one (401), as the guard decides.
func TestDocumentedSecurityMatchesTheGuard(t *testing.T) {
	e := newAuthEnv(t)
	d, err := openapitest.Load()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for p, item := range d.T.Paths.Map() {
		for method, op := range item.Operations() {
			n++
			public := op.Security != nil && len(*op.Security) == 0
			path := p
			for _, param := range []string{"{ref}", "{file}"} {
				path = strings.ReplaceAll(path, param, "x")
			}
			code, body := e.do("", method, path, "")
			switch {
			case public && code == http.StatusUnauthorized:
				t.Errorf("%s %s is public in api/openapi.yaml, but the agent asks for a credential: %d %.200s", method, p, code, body)
			case !public && code != http.StatusUnauthorized:
				t.Errorf("%s %s needs a credential in api/openapi.yaml, but the agent answers without one: %d %.200s", method, p, code, body)
			}
		}
	}
	if n == 0 {
		t.Fatal("no operations documented")
	}
}
