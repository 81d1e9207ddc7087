package server

import (
	"embed"
	"net/http"
	"path"
	"strconv"

	"github.com/go-chi/chi/v5"

	"github.com/berthd/berth/api"
)

// The node page: HTML and a little script, embedded in the binary, with
// nothing from anywhere else (no CDN, no web font), so it works on a node
// without internet. The pages hold no data: the script reads the API with
// the caller's credential, so the page itself is public, as the probes
// are, and shows only what that credential may read.
//
//go:embed ui/index.html ui/workload.html ui/app.js ui/style.css
var uiFiles embed.FS

// uiCSP allows the page nothing but this agent: its own script and style
// sheet (no inline script or style), fetches to its own API, no frames,
// no forms that post anywhere. data: is for the empty favicon only.
const uiCSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// uiAssets are the files under /ui/ and their media types.
var uiAssets = map[string]string{
	"app.js":    "text/javascript; charset=utf-8",
	"style.css": "text/css; charset=utf-8",
}

func uiHeaders(w http.ResponseWriter, contentType string) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Security-Policy", uiCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-cache")
}

// serveUIFile sends an embedded file whole: the files are small, and
// no-cache with no validators keeps every load current.
func (s *Server) serveUIFile(w http.ResponseWriter, r *http.Request, name, contentType string) {
	data, err := uiFiles.ReadFile("ui/" + name)
	if err != nil {
		writeProblem(w, r, s.log, &api.Problem{Status: http.StatusNotFound, Reason: api.ReasonNotFound, Title: "Not found", Detail: "the node page has no file " + name})
		return
	}
	uiHeaders(w, contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	_, _ = w.Write(data)
}

// nodePage is GET /: the node page.
func (s *Server) nodePage(w http.ResponseWriter, r *http.Request) {
	s.serveUIFile(w, r, "index.html", "text/html; charset=utf-8")
}

// workloadPage is GET /workloads/{ref}: a workload's page (its script
// reads the reference from the path).
func (s *Server) workloadPage(w http.ResponseWriter, r *http.Request) {
	s.serveUIFile(w, r, "workload.html", "text/html; charset=utf-8")
}

// uiAsset is GET /ui/{file}: the page's script and style sheet.
func (s *Server) uiAsset(w http.ResponseWriter, r *http.Request) {
	name := path.Base(chi.URLParam(r, "file"))
	ct, ok := uiAssets[name]
	if !ok {
		writeProblem(w, r, s.log, &api.Problem{Status: http.StatusNotFound, Reason: api.ReasonNotFound, Title: "Not found", Detail: "the node page has no file " + name})
		return
	}
	s.serveUIFile(w, r, name, ct)
}
