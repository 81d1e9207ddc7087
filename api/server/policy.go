package server

import (
	"net/http"

	"github.com/berthd/berth/api"
)

// explainPlacement is POST /v1/placements: the decision the node's policy
// makes for a spec, whatever the verdict, without creating anything. A
// spec Submit would reject as invalid gets the same 400 here.
func (s *Server) explainPlacement(w http.ResponseWriter, r *http.Request) {
	var spec api.WorkloadSpec
	if p := s.decodeJSON(w, r, &spec); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	d, err := s.be(r).Place(r.Context(), spec)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// getPolicy is GET /v1/policy: the active policy and its reload status.
func (s *Server) getPolicy(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.b.Policy(r.Context()))
}
