package server

import (
	"net/http"

	"github.com/berthd/berth/api"
)

// openAPI is GET /v1/openapi.json: the API's OpenAPI document. It is
// public, like the probes: it is the same document for every agent of a
// version and says nothing about the node, and client generators fetch it
// before they hold a credential.
func (s *Server) openAPI(w http.ResponseWriter, r *http.Request) {
	doc, err := api.OpenAPI()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "public, max-age=300")
	_, _ = w.Write(doc)
}
