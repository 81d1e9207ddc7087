package server

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/berthd/berth/api"
)

// Maintenance is what the API needs of the agent to take the node out of
// service and back (berth node cordon, drain, uncordon).
type Maintenance interface {
	// Cordon makes the node refuse new workloads; Drain also asks every
	// workload to stop with timeout (0: the default) as its grace period.
	// Both are persisted before they return; Uncordon lifts either.
	Cordon(ctx context.Context, reason string) (*api.Node, error)
	Drain(ctx context.Context, reason string, timeout time.Duration) (*api.Node, error)
	Uncordon(ctx context.Context) (*api.Node, error)
	// PruneImages removes images no workload uses (all, or least recently
	// used first down to the low watermark).
	PruneImages(ctx context.Context, all bool) ([]api.RemovedImage, error)
}

// pruneImages is POST /v1/images/prune; the body (api.PruneRequest) is
// optional.
func (s *Server) pruneImages(w http.ResponseWriter, r *http.Request) {
	var req api.PruneRequest
	if r.ContentLength != 0 {
		if p := s.decodeJSON(w, r, &req); p != nil {
			writeProblem(w, r, s.log, p)
			return
		}
	}
	removed, err := s.be(r).PruneImages(r.Context(), req.All)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, api.PruneResult{Removed: removed})
}

// cordonNode is POST /v1/node/cordon and POST /v1/node/drain; the body
// (an api.CordonRequest) is optional.
func (s *Server) cordonNode(drain bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req api.CordonRequest
		if r.ContentLength != 0 {
			if p := s.decodeJSON(w, r, &req); p != nil {
				writeProblem(w, r, s.log, p)
				return
			}
		}
		timeout := time.Duration(req.TimeoutSeconds) * time.Second
		if req.TimeoutSeconds < 0 || timeout > maxStopTimeout || (!drain && req.TimeoutSeconds != 0) {
			writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad timeout", api.FieldError{Field: "timeout_seconds", Detail: "a drain's grace period per workload, between 0 and 3600 seconds; a cordon stops nothing"}))
			return
		}
		var (
			n   *api.Node
			err error
		)
		if drain {
			n, err = s.be(r).Drain(r.Context(), req.Reason, timeout)
		} else {
			n, err = s.be(r).Cordon(r.Context(), req.Reason)
		}
		if err != nil {
			s.fail(w, r, err)
			return
		}
		w.Header().Set(IndexHeader, strconv.FormatUint(n.Index, 10))
		writeJSON(w, http.StatusOK, n)
	}
}

// uncordonNode is POST /v1/node/uncordon.
func (s *Server) uncordonNode(w http.ResponseWriter, r *http.Request) {
	n, err := s.be(r).Uncordon(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set(IndexHeader, strconv.FormatUint(n.Index, 10))
	writeJSON(w, http.StatusOK, n)
}
