// Package openapitest holds berth's API to its OpenAPI document
// (api/openapi.yaml) in tests: Handler (around a server) and Transport
// (around a client) check every request and answer that passes through
// them, so the API test suites are the document's drift tests. Nothing
// that ships links it.
//
// What fails a test:
//   - an answer of a route the document does not have (other than the
//     agent's own route_not_found / method_not_allowed problems);
//   - an answer whose status the route does not document, whose body does
//     not match the schema of that status and media type (the schemas of
//     answers have no room for fields the document does not name), or that
//     carries X-Berth-Index where the document does not say so;
//   - each event of an event stream and each line of an NDJSON log that
//     does not match its schema;
//   - a request the document calls invalid that the agent accepted (any
//     answer but a 4xx).
package openapitest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"

	"github.com/berthd/berth/api"
)

// IndexHeader is the blocking-query header every answer that carries it
// must document.
const IndexHeader = "X-Berth-Index"

// maxCapture bounds what is kept of one body; a longer one is checked
// only as far as its status and headers.
const maxCapture = 4 << 20

// Doc is the loaded, validated document.
type Doc struct {
	T     *openapi3.T
	paths []pathTemplate
}

type pathTemplate struct {
	path     string
	segments []string
}

var loadDoc = sync.OnceValues(func() (*Doc, error) {
	// Bodies that are opaque strings to the document: archives, and the
	// node page's files.
	for _, mt := range []string{"application/x-tar", "text/html", "text/javascript", "text/css"} {
		openapi3filter.RegisterBodyDecoder(mt, openapi3filter.FileBodyDecoder)
	}
	data, err := api.OpenAPI()
	if err != nil {
		return nil, err
	}
	loader := openapi3.NewLoader()
	t, err := loader.LoadFromData(data)
	if err != nil {
		return nil, fmt.Errorf("load api/openapi.yaml: %w", err)
	}
	if err := t.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("api/openapi.yaml is not a valid OpenAPI document: %w", err)
	}
	d := &Doc{T: t}
	for p := range t.Paths.Map() {
		d.paths = append(d.paths, pathTemplate{path: p, segments: strings.Split(p, "/")})
	}
	// Literal segments win over parameters (/v1/images/pull is not
	// /v1/images/{x}): sort templates with fewer parameters first.
	slices.SortFunc(d.paths, func(a, b pathTemplate) int {
		return strings.Count(a.path, "{") - strings.Count(b.path, "{")
	})
	return d, nil
})

// Load returns the document, loaded once and checked to be valid OpenAPI.
func Load() (*Doc, error) { return loadDoc() }

// Find returns the documented path matching an escaped request path and
// its parameters (unescaped), or "" when no documented path matches.
func (d *Doc) Find(escapedPath string) (string, map[string]string) {
	segs := strings.Split(escapedPath, "/")
next:
	for _, p := range d.paths {
		if len(p.segments) != len(segs) {
			continue
		}
		params := map[string]string{}
		for i, s := range p.segments {
			if strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}") {
				if segs[i] == "" {
					continue next
				}
				v, err := url.PathUnescape(segs[i])
				if err != nil {
					v = segs[i]
				}
				params[s[1:len(s)-1]] = v
				continue
			}
			if s != segs[i] {
				continue next
			}
		}
		return p.path, params
	}
	return "", nil
}

// Operation is the documented operation of method on path, or nil.
func (d *Doc) Operation(method, path string) *openapi3.Operation {
	item := d.T.Paths.Value(path)
	if item == nil {
		return nil
	}
	return item.GetOperation(method)
}

// reporter collects failures and reports them on the test when it ends
// (answers may be checked on goroutines of the server).
type reporter struct {
	t    testing.TB
	mu   sync.Mutex
	errs []string
	n    int
}

func newReporter(t testing.TB) *reporter {
	r := &reporter{t: t}
	t.Cleanup(r.flush)
	return r
}

func (r *reporter) errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func (r *reporter) checked() {
	r.mu.Lock()
	r.n++
	r.mu.Unlock()
}

func (r *reporter) flush() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.t.Logf("openapi: %d exchanges checked against api/openapi.yaml, %d failures", r.n, len(r.errs))
	for _, e := range r.errs {
		r.t.Errorf("openapi: %s", e)
	}
	r.errs = nil
}

// exchange is one request and its answer as seen by a Handler or
// Transport.
type exchange struct {
	req         *http.Request
	reqBody     []byte
	status      int
	header      http.Header
	body        []byte
	truncated   bool
	clientGone  bool
	bodyPartial bool // a stream cut by its client: only whole items count
}

// check holds one exchange to the document.
func (d *Doc) check(rep *reporter, x *exchange) {
	if x.clientGone {
		return
	}
	rep.checked()
	what := x.req.Method + " " + x.req.URL.RequestURI() + " -> " + fmt.Sprint(x.status)
	path, params := d.Find(x.req.URL.EscapedPath())
	var op *openapi3.Operation
	if path != "" {
		op = d.Operation(x.req.Method, path)
	}
	if op == nil {
		// The agent's own answers to what is not part of the API.
		reason := problemReason(x)
		switch {
		case x.status == http.StatusNotFound && reason == api.ReasonRouteNotFound,
			x.status == http.StatusMethodNotAllowed && reason == api.ReasonMethodNotAllowed,
			// Without a credential, nothing about routes is told.
			x.status == http.StatusUnauthorized && reason == api.ReasonUnauthenticated:
			return
		case path == "":
			rep.errorf("%s: the route is not in api/openapi.yaml", what)
		default:
			rep.errorf("%s: api/openapi.yaml has %s but not its method %s", what, path, x.req.Method)
		}
		return
	}
	route := &routers.Route{Spec: d.T, Path: path, PathItem: d.T.Paths.Value(path), Method: x.req.Method, Operation: op}
	req := x.req.Clone(context.Background())
	req.Body = io.NopCloser(bytes.NewReader(x.reqBody))
	in := &openapi3filter.RequestValidationInput{
		Request:    req,
		PathParams: params,
		Route:      route,
		Options: &openapi3filter.Options{
			AuthenticationFunc: openapi3filter.NoopAuthenticationFunc,
			MultiError:         true,
		},
	}
	if x.reqBody == nil && !isJSON(x.req.Header.Get("Content-Type")) {
		// Archives are not kept; their route and parameters are checked.
		in.Options.ExcludeRequestBody = true
	}
	if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
		if x.status < 400 || x.status >= 500 {
			rep.errorf("%s: the document calls the request invalid, yet the agent accepted it: %v", what, err)
		}
	}

	resp := op.Responses.Status(x.status)
	if resp == nil || resp.Value == nil {
		rep.errorf("%s: status %d is not documented for %s %s", what, x.status, x.req.Method, path)
		return
	}
	if x.header.Get(IndexHeader) != "" && resp.Value.Headers[IndexHeader] == nil {
		rep.errorf("%s: the answer carries %s, which the document does not list for this status", what, IndexHeader)
	}
	ct := x.header.Get("Content-Type")
	mt, _, _ := mime.ParseMediaType(ct)
	var media *openapi3.MediaType
	if len(resp.Value.Content) > 0 {
		media = resp.Value.Content.Get(mt)
		if media == nil {
			rep.errorf("%s: Content-Type %q is not documented for status %d", what, ct, x.status)
			return
		}
	} else if len(x.body) > 0 {
		rep.errorf("%s: status %d has no body in the document, yet the answer has %d bytes", what, x.status, len(x.body))
		return
	}
	opts := &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true, AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}
	var item string
	if media != nil {
		item, _ = media.Extensions["x-berth-item-schema"].(string)
	}
	if media == nil || x.truncated || x.bodyPartial || item != "" {
		opts.ExcludeResponseBody = true
	}
	rin := &openapi3filter.ResponseValidationInput{RequestValidationInput: in, Status: x.status, Header: x.header, Options: opts}
	rin.SetBodyBytes(x.body)
	if err := openapi3filter.ValidateResponse(context.Background(), rin); err != nil {
		rep.errorf("%s: the answer does not match the document: %v\nbody: %s", what, err, clip(x.body))
	}
	if item != "" && !x.truncated {
		d.checkItems(rep, what, item, mt, x.body)
	}
}

// checkItems checks each event of an event stream, or each line of an
// NDJSON body, against the component schema named item.
func (d *Doc) checkItems(rep *reporter, what, item, mt string, body []byte) {
	ref := d.T.Components.Schemas[item]
	if ref == nil || ref.Value == nil {
		rep.errorf("%s: x-berth-item-schema names %q, which is not a component schema", what, item)
		return
	}
	validate := func(data []byte) error {
		var v any
		if err := json.Unmarshal(data, &v); err != nil {
			return err
		}
		return ref.Value.VisitJSON(v, openapi3.EnableJSONSchema2020(), openapi3.MultiErrors())
	}
	switch mt {
	case "application/x-ndjson":
		sc := bufio.NewScanner(bytes.NewReader(body))
		sc.Buffer(nil, maxCapture)
		for sc.Scan() {
			line := sc.Bytes()
			if len(bytes.TrimSpace(line)) == 0 {
				continue
			}
			if err := validate(line); err != nil {
				rep.errorf("%s: a line does not match %s: %v\nline: %s", what, item, err, clip(line))
			}
		}
	case "text/event-stream":
		// Only whole events (those ended by a blank line) are checked.
		blocks := strings.Split(string(body), "\n\n")
		for _, b := range blocks[:len(blocks)-1] {
			var typ, data string
			for _, l := range strings.Split(b, "\n") {
				switch {
				case strings.HasPrefix(l, "event: "):
					typ = strings.TrimPrefix(l, "event: ")
				case strings.HasPrefix(l, "data: "):
					data = strings.TrimPrefix(l, "data: ")
				}
			}
			if data == "" {
				continue // a comment (keep-alive, events dropped)
			}
			if err := validate([]byte(data)); err != nil {
				rep.errorf("%s: an event does not match %s: %v\ndata: %s", what, item, err, clip([]byte(data)))
				continue
			}
			var e struct {
				Type string `json:"type"`
			}
			_ = json.Unmarshal([]byte(data), &e)
			if e.Type != typ {
				rep.errorf("%s: an event's SSE type %q is not its data's type %q", what, typ, e.Type)
			}
		}
	default:
		rep.errorf("%s: x-berth-item-schema on media type %s, which has no items", what, mt)
	}
}

func problemReason(x *exchange) string {
	var p struct {
		Reason string `json:"reason"`
	}
	_ = json.Unmarshal(x.body, &p)
	return p.Reason
}

func isJSON(ct string) bool {
	if ct == "" {
		return true
	}
	mt, _, err := mime.ParseMediaType(ct)
	return err == nil && (mt == "application/json" || strings.HasSuffix(mt, "+json"))
}

func clip(b []byte) string {
	if len(b) > 2000 {
		return string(b[:2000]) + "..."
	}
	return string(b)
}

// readRequestBody takes the body of a request to check it, leaving the
// request with a body that reads the same. Bodies that are not JSON (image
// archives) are not kept.
func readRequestBody(r *http.Request) ([]byte, error) {
	if r.Body == nil || r.Body == http.NoBody || !isJSON(r.Header.Get("Content-Type")) {
		return nil, nil
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, maxCapture+1))
	rest := r.Body
	r.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(data), rest), rest}
	if err != nil || len(data) > maxCapture {
		return nil, errors.Join(err, errors.New("request body too long to check"))
	}
	return data, nil
}
