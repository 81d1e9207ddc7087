package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// TestErrorMapping holds every error class to its status and reason, and
// to the level it is logged at: 5xx at ERROR (the agent's fault), a client
// that went away at DEBUG, the rest not at all.
func TestErrorMapping(t *testing.T) {
	live := context.Background()
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	cases := []struct {
		name   string
		ctx    context.Context // the request's
		err    error
		status int
		reason string
		level  string // what writeProblem logs, "" for nothing
	}{
		{"invalid argument", live, errdefs.Invalid("name", "bad"), 400, api.ReasonInvalidArgument, ""},
		{"image not found", live, &errdefs.ValidationError{Class: errdefs.ErrImageNotFound, Fields: []errdefs.FieldError{{Field: "image", Detail: "absent"}}}, 400, api.ReasonImageNotFound, ""},
		{"not found", live, fmt.Errorf("workload x: %w", errdefs.ErrNotFound), 404, api.ReasonNotFound, ""},
		{"already exists", live, fmt.Errorf("x: %w", errdefs.ErrAlreadyExists), 409, api.ReasonAlreadyExists, ""},
		{"conflict", live, fmt.Errorf("x is being deleted: %w", errdefs.ErrConflict), 409, api.ReasonConflict, ""},
		{"failed precondition", live, fmt.Errorf("x: %w", errdefs.ErrFailedPrecondition), 409, api.ReasonFailedPrecondition, ""},
		{"resource exhausted", live, fmt.Errorf("x: %w", errdefs.ErrResourceExhausted), 409, api.ReasonResourceExhausted, ""},
		{"too many at once", live, fmt.Errorf("x: %w", errdefs.ErrTooManyRequests), 429, api.ReasonTooManyRequests, ""},
		{"denied", live, fmt.Errorf("x: %w", errdefs.ErrDenied), 403, api.ReasonDenied, ""},
		{"permission denied", live, fmt.Errorf("x: %w", errdefs.ErrPermissionDenied), 403, api.ReasonPermissionDenied, ""},
		{"unauthenticated", live, fmt.Errorf("x: %w", errdefs.ErrUnauthenticated), 401, api.ReasonUnauthenticated, ""},
		{"not implemented", live, fmt.Errorf("x: %w", errdefs.ErrNotImplemented), 501, api.ReasonNotImplemented, "ERROR"},
		{"unavailable", live, fmt.Errorf("x: %w", errdefs.ErrUnavailable), 503, api.ReasonUnavailable, "ERROR"},
		{"client went away", gone, fmt.Errorf("stop x: %w", context.Canceled), StatusClientClosedRequest, reasonClientClosed, "DEBUG"},
		{"cancelled", live, context.Canceled, StatusClientClosedRequest, reasonClientClosed, "DEBUG"},
		{"client's deadline", gone, fmt.Errorf("wait: %w", context.DeadlineExceeded), StatusClientClosedRequest, reasonClientClosed, "DEBUG"},
		{"agent's own deadline", live, fmt.Errorf("pull: %w", context.DeadlineExceeded), 504, api.ReasonTimeout, "ERROR"},
		{"unclassified", live, errors.New("runc exploded"), 500, api.ReasonInternal, "ERROR"},
		{"problem as it is", live, &api.Problem{Status: 418, Reason: "teapot", Title: "Teapot"}, 418, "teapot", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var logs bytes.Buffer
			log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			r := httptest.NewRequestWithContext(tc.ctx, "POST", "/v1/workloads/x/stop", nil)
			w := httptest.NewRecorder()
			writeProblem(w, r, log, problemFor(r.Context(), tc.err))
			if w.Code != tc.status {
				t.Errorf("status %d, want %d", w.Code, tc.status)
			}
			if !strings.Contains(w.Body.String(), `"reason":"`+tc.reason+`"`) {
				t.Errorf("body %s, want reason %q", w.Body, tc.reason)
			}
			if ct := w.Header().Get("Content-Type"); ct != api.ProblemMediaType {
				t.Errorf("Content-Type %q", ct)
			}
			switch {
			case tc.level == "" && logs.Len() > 0:
				t.Errorf("logged %q, want nothing", logs.String())
			case tc.level != "" && !strings.Contains(logs.String(), "level="+tc.level):
				t.Errorf("logged %q, want it at %s", logs.String(), tc.level)
			}
		})
	}
	if http.StatusText(StatusClientClosedRequest) != "" {
		t.Errorf("499 is a standard status now (%q): use its constant", http.StatusText(StatusClientClosedRequest))
	}
}
