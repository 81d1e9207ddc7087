package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// errorClasses maps each errdefs class to its HTTP status and reason. This
// table is the only place errors become statuses.
var errorClasses = []struct {
	err    error
	status int
	reason string
	title  string
}{
	// Before ErrUnavailable, which it wraps: a cordon has its own reason.
	{errdefs.ErrCordoned, http.StatusServiceUnavailable, api.ReasonNodeCordoned, "Node cordoned"},
	// Before ErrInvalidArgument, which it wraps.
	{errdefs.ErrImageNotFound, http.StatusBadRequest, api.ReasonImageNotFound, "Image not on this node"},
	{errdefs.ErrInvalidArgument, http.StatusBadRequest, api.ReasonInvalidArgument, "Invalid request"},
	{errdefs.ErrNotFound, http.StatusNotFound, api.ReasonNotFound, "Not found"},
	{errdefs.ErrAlreadyExists, http.StatusConflict, api.ReasonAlreadyExists, "Already exists"},
	{errdefs.ErrConflict, http.StatusConflict, api.ReasonConflict, "Conflict"},
	{errdefs.ErrFailedPrecondition, http.StatusConflict, api.ReasonFailedPrecondition, "Not possible in the current state"},
	{errdefs.ErrResourceExhausted, http.StatusConflict, api.ReasonResourceExhausted, "Insufficient capacity"},
	{errdefs.ErrTooManyRequests, http.StatusTooManyRequests, api.ReasonTooManyRequests, "Too many at once"},
	{errdefs.ErrDenied, http.StatusForbidden, api.ReasonDenied, "Denied by policy"},
	{errdefs.ErrPermissionDenied, http.StatusForbidden, api.ReasonPermissionDenied, "Permission denied"},
	{errdefs.ErrUnauthenticated, http.StatusUnauthorized, api.ReasonUnauthenticated, "Authentication required"},
	{errdefs.ErrNotImplemented, http.StatusNotImplemented, api.ReasonNotImplemented, "Not implemented on this node"},
	{errdefs.ErrUnavailable, http.StatusServiceUnavailable, api.ReasonUnavailable, "Temporarily unavailable"},
	// A client that goes away is not the agent's failure: logged at
	// debug, never at error.
	{context.Canceled, StatusClientClosedRequest, reasonClientClosed, "Client closed request"},
	{context.DeadlineExceeded, http.StatusGatewayTimeout, api.ReasonTimeout, "Timed out"},
}

// StatusClientClosedRequest is the status of a request whose client went
// away before the answer (nginx's 499): no client reads it; it is for the
// access log and the metrics.
const StatusClientClosedRequest = 499

// reasonClientClosed is the reason of StatusClientClosedRequest.
const reasonClientClosed = "client_closed"

// problemFor turns an error into the problem document a client gets. ctx
// is the request's: an error that comes of the client leaving (its
// context cancelled, or its deadline passed) is the client's doing, not a
// failure of the agent's.
func problemFor(ctx context.Context, err error) *api.Problem {
	var p *api.Problem
	if errors.As(err, &p) {
		return p
	}
	// A deadline that passed with the request's is the client's (it went
	// away); one that passed alone is the agent's own (504).
	clientGone := ctx.Err() != nil && errors.Is(err, context.DeadlineExceeded)
	for _, c := range errorClasses {
		if errors.Is(err, c.err) || clientGone && c.err == context.Canceled {
			p = &api.Problem{Status: c.status, Reason: c.reason, Title: c.title, Detail: err.Error()}
			break
		}
	}
	if p == nil {
		p = &api.Problem{Status: http.StatusInternalServerError, Reason: api.ReasonInternal, Title: "Internal error", Detail: err.Error()}
	}
	var se *errdefs.StateError
	if errors.As(err, &se) {
		p.State = se.State
	}
	var v *errdefs.ValidationError
	if errors.As(err, &v) {
		for _, f := range v.Fields {
			p.Fields = append(p.Fields, api.FieldError{Field: f.Field, Detail: f.Detail})
		}
		p.Detail = "the request has invalid fields; see fields"
	}
	return p
}

// writeProblem sends a problem document. 5xx are logged: they are the
// agent's fault, never the client's.
func writeProblem(w http.ResponseWriter, r *http.Request, log *slog.Logger, p *api.Problem) {
	if p.Type == "" {
		p.Type = api.ProblemTypeBase + p.Reason
	}
	if p.Instance == "" {
		p.Instance = r.URL.Path
	}
	switch {
	case p.Status >= 500:
		log.Error("request failed", "method", r.Method, "path", r.URL.Path, "status", p.Status, "reason", p.Reason, "detail", p.Detail)
	case p.Status == StatusClientClosedRequest:
		log.Debug("client went away", "method", r.Method, "path", r.URL.Path, "detail", p.Detail)
	}
	w.Header().Set("Content-Type", api.ProblemMediaType)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	writeProblem(w, r, s.log, problemFor(r.Context(), err))
}

func badRequest(reason, detail string, fields ...api.FieldError) *api.Problem {
	return &api.Problem{Status: http.StatusBadRequest, Reason: reason, Title: "Invalid request", Detail: detail, Fields: fields}
}
