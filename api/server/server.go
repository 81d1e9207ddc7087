// Package server serves berth's HTTP API (v1) over an agent. It knows
// nothing of runc, libvirt or policy internals: it decodes and validates
// requests, calls the Backend, and encodes answers and problems.
package server

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// Backend is what the API needs of the agent.
type Backend interface {
	Submit(ctx context.Context, spec api.WorkloadSpec) (w *api.Workload, created bool, err error)
	Get(ctx context.Context, ref string) (*api.Workload, error)
	List(ctx context.Context, f api.ListFilter) []api.Workload
	// Stop and Delete record the intent, which the agent carries out
	// whatever happens to the request, and wait (under ctx) for the
	// workload to end, or to be gone. RequestStop and RequestDelete only
	// record it and return the workload.
	Stop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error)
	RequestStop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error)
	Delete(ctx context.Context, ref string, force bool) error
	RequestDelete(ctx context.Context, ref string, force bool) (*api.Workload, error)
	Logs(ctx context.Context, ref string, opts api.LogOptions, emit func(stream string, line []byte, at time.Time) error) error
	Stats(ctx context.Context, ref string) (*api.Stats, error)
	// Index is the state index and a channel closed at its next change.
	Index() (uint64, <-chan struct{})

	// ListImages, PullImage and RemoveImage answer for the caller whose
	// identity ctx carries (auth.NewContext): a submitter sees the node's
	// images and its tenants' private ones only.
	ListImages(ctx context.Context) []api.Image
	ImportImage(ctx context.Context, r io.Reader, ref string) ([]api.Image, error)
	// PullImage pulls req.Ref with req.Auth, when set, as its credentials
	// (never logged, stored or answered); such an image is private to
	// req.Tenant.
	PullImage(ctx context.Context, req api.PullRequest) (*api.Image, error)
	RemoveImage(ctx context.Context, ref string) error

	// Ready reports why the agent cannot take workloads, or nil.
	Ready(ctx context.Context) error

	// Node is the node-status document.
	Node(ctx context.Context) *api.Node
	// Events emits the events after lastID that match f, then new ones,
	// until ctx ends or emit fails; lost is called first when some of the
	// requested events are no longer kept.
	Events(ctx context.Context, lastID uint64, f api.EventFilter, lost func(), emit func(api.Event) error) error

	// Place decides a spec under the active policy without creating
	// anything; only an invalid spec is an error.
	Place(ctx context.Context, spec api.WorkloadSpec) (*api.PlacementDecision, error)
	// Policy describes the active isolation policy and its reloads.
	Policy(ctx context.Context) api.PolicyStatus

	Maintenance
	// Named volumes (volumes.go).
	VolumeBackend

	// Exec starts a process in a running workload; the caller relays its
	// session and closes it.
	Exec(ctx context.Context, ref string, req api.ExecRequest) (driver.ExecSession, error)
	// Signal delivers a signal (name or number) to a running workload's
	// main process.
	Signal(ctx context.Context, ref, sig string) (*api.Workload, error)
	// Attach connects to a running workload's own streams; the caller
	// relays the session and closes it (a detach).
	Attach(ctx context.Context, ref string, req api.AttachRequest) (driver.AttachSession, error)
}

// Options configure the server.
type Options struct {
	Logger *slog.Logger
	// MaxBodyBytes limits JSON request bodies (default 1 MiB).
	MaxBodyBytes int64
	// MaxImageBytes limits an uploaded image archive (default 8 GiB).
	MaxImageBytes int64
	// MaxWait caps a blocking query's wait (default 5 minutes).
	MaxWait time.Duration

	// Auth, when set, requires every request but /healthz and /readyz to
	// carry a credential it knows (auth.go); nil lets everyone do
	// everything, for an agent reachable only on loopback or its socket.
	Auth Authenticator
	// TrustUnixRoot makes a root peer on the unix socket an admin
	// without a token.
	TrustUnixRoot bool
	// Audit, when set, gets one record per mutating request and per
	// refused one.
	Audit *slog.Logger
	// RequestTimeout is the http.Server's read and write timeout, which
	// applies to every request but blocking queries, streams and long
	// operations (default 1 minute); the server only uses it to size
	// those longer deadlines.
	RequestTimeout time.Duration
	// StreamIdle bounds each write of a stream (logs, events): a client
	// that stops reading for this long is cut off (default 1 minute).
	StreamIdle time.Duration
	// LongTimeout bounds a stop, a delete, an image upload or pull
	// (default 65 minutes: the longest stop grace period and then some).
	LongTimeout time.Duration
	// Metrics is the registry GET /metrics serves; nil makes one. The
	// server adds the node's and the workloads' collectors to it, so it
	// serves one server only.
	Metrics *Metrics
}

// Server is the HTTP API.
type Server struct {
	b    Backend
	opts Options
	log  *slog.Logger
	mux  chi.Router
	// metrics is what /metrics serves.
	metrics *Metrics
	// The last node document encoded (nodeDocument).
	nodeMu  sync.Mutex // held by the one request that encodes a new node document
	nodeDoc atomic.Pointer[encodedNode]
}

// New returns the API handler over b.
func New(b Backend, opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxBodyBytes == 0 {
		opts.MaxBodyBytes = 1 << 20
	}
	if opts.MaxImageBytes == 0 {
		opts.MaxImageBytes = 8 << 30
	}
	if opts.MaxWait == 0 {
		opts.MaxWait = 5 * time.Minute
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = time.Minute
	}
	if opts.StreamIdle == 0 {
		opts.StreamIdle = time.Minute
	}
	if opts.LongTimeout == 0 {
		opts.LongTimeout = maxStopTimeout + 5*time.Minute
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics()
	}
	s := &Server{b: b, opts: opts, log: opts.Logger, metrics: opts.Metrics}
	s.metrics.reg.MustRegister(&nodeCollector{b: b}, newWorkloadCollector(b))
	r := chi.NewRouter()
	r.Use(s.recoverer, s.accessLog, s.guard)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeProblem(w, r, s.log, &api.Problem{Status: http.StatusNotFound, Reason: api.ReasonRouteNotFound, Title: "No such endpoint", Detail: r.Method + " " + r.URL.Path + " is not part of the berth API"})
	})
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		writeProblem(w, r, s.log, &api.Problem{Status: http.StatusMethodNotAllowed, Reason: api.ReasonMethodNotAllowed, Title: "Method not allowed", Detail: r.Method + " is not supported on " + r.URL.Path})
	})
	r.Get("/healthz", s.healthz)
	r.Method(http.MethodGet, "/metrics", s.metrics.handler(s))
	r.Get("/readyz", s.readyz)
	r.Get("/", s.nodePage)
	r.Get("/workloads/{ref}", s.workloadPage)
	r.Get("/ui/{file}", s.uiAsset)
	r.Route("/v1", func(r chi.Router) {
		r.Get("/openapi.json", s.openAPI)
		r.Get("/node", s.getNode)
		r.Post("/node/cordon", s.cordonNode(false))
		r.Post("/node/drain", s.cordonNode(true))
		r.Post("/node/uncordon", s.uncordonNode)
		r.Get("/events", s.events)
		r.Route("/workloads", func(r chi.Router) {
			r.Post("/", s.createWorkload)
			r.Get("/", s.listWorkloads)
			r.Route("/{ref}", func(r chi.Router) {
				r.Get("/", s.getWorkload)
				r.Delete("/", s.deleteWorkload)
				r.Post("/stop", s.stopWorkload)
				r.Post("/exec", s.execWorkload)
				r.Get("/exec", s.execWorkload)
				r.Get("/attach", s.attachWorkload)
				r.Post("/signal", s.signalWorkload)
				r.Get("/logs", s.workloadLogs)
				r.Get("/stats", s.workloadStats)
			})
		})
		r.Route("/images", func(r chi.Router) {
			r.Get("/", s.listImages)
			r.Post("/", s.importImage)
			r.Delete("/", s.removeImage)
			r.Post("/pull", s.pullImage)
			r.Post("/prune", s.pruneImages)
		})
		r.Route("/volumes", s.volumeRoutes)
		r.Post("/placements", s.explainPlacement)
		r.Get("/policy", s.getPolicy)
	})
	s.mux = r
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Router exposes the router so later surfaces (metrics, policy) can mount.
func (s *Server) Router() chi.Router { return s.mux }

func (s *Server) recoverer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.log.Error("panic serving request", "method", r.Method, "path", r.URL.Path, "panic", v)
				writeProblem(w, r, s.log, &api.Problem{Status: http.StatusInternalServerError, Reason: api.ReasonInternal, Title: "Internal error", Detail: "the agent hit a bug serving this request; it is logged"})
			}
		}()
		next.ServeHTTP(w, r)
	})
}

func (s *Server) accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		start := time.Now()
		next.ServeHTTP(ww, r)
		route := chi.RouteContext(r.Context()).RoutePattern()
		s.metrics.observeRequest(r.Method, route, ww.Status(), time.Since(start))
		s.log.Debug("request", "method", r.Method, "route", route, "path", r.URL.Path, "status", ww.Status(), "duration", time.Since(start))
	})
}

func (s *Server) healthz(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, api.Health{Status: "ok"})
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if err := s.b.Ready(r.Context()); err != nil {
		w.Header().Set("Content-Type", "application/json")
		writeJSON(w, http.StatusServiceUnavailable, api.Health{Status: "unavailable", Checks: map[string]string{"agent": err.Error()}})
		return
	}
	writeJSON(w, http.StatusOK, api.Health{Status: "ok"})
}
