package server

import (
	"net/http"
	"time"

	"github.com/berthd/berth/internal/auth"
)

// routeClass says how long a request may hold its connection.
type routeClass int

const (
	// classPlain answers at once: the server's read and write timeouts
	// (Options.RequestTimeout) apply unchanged.
	classPlain routeClass = iota
	// classBlocking may wait for a state change (?index=): up to MaxWait,
	// its jitter, and then a plain request's time to answer.
	classBlocking
	// classStream streams until the client or the workload ends: no
	// overall deadline, but every write must finish within StreamIdle.
	classStream
	// classExec is an exec session: no deadline of the server's (a
	// WebSocket session lasts as long as its process; the simple form
	// sets its own from its timeout).
	classExec
	// classLong does slow work before it answers (a stop with its grace
	// period, an image upload or pull): up to LongTimeout.
	classLong
)

type routeInfo struct {
	action   auth.Action
	class    routeClass
	mutating bool
}

// routeTable maps "METHOD pattern" (chi's pattern, without a trailing
// slash) to what the route does.
// A route missing here is reachable by admins only: a new endpoint stays
// closed until someone decides who may use it. What a tenant-scoped caller
// gets from each route is decided in auth_scope.go and listed, route by
// route, in scope_routes_test.go.
var routeTable = map[string]routeInfo{
	"GET /healthz":         {action: auth.ActPublic},
	"GET /readyz":          {action: auth.ActPublic},
	"GET /v1/openapi.json": {action: auth.ActPublic},
	// The node page holds no data: its script reads the API with the
	// caller's credential.
	"GET /":                         {action: auth.ActPublic},
	"GET /workloads/{ref}":          {action: auth.ActPublic},
	"GET /ui/{file}":                {action: auth.ActPublic},
	"GET /v1/node":                  {action: auth.ActNodeRead, class: classBlocking},
	"POST /v1/node/cordon":          {action: auth.ActNodeWrite, mutating: true},
	"POST /v1/node/drain":           {action: auth.ActNodeWrite, mutating: true},
	"POST /v1/node/uncordon":        {action: auth.ActNodeWrite, mutating: true},
	"GET /v1/events":                {action: auth.ActEventsRead, class: classStream},
	"GET /metrics":                  {action: auth.ActMetrics},
	"POST /v1/workloads":            {action: auth.ActWorkloadCreate, mutating: true},
	"GET /v1/workloads":             {action: auth.ActWorkloadRead, class: classBlocking},
	"GET /v1/workloads/{ref}":       {action: auth.ActWorkloadRead, class: classBlocking},
	"DELETE /v1/workloads/{ref}":    {action: auth.ActWorkloadDelete, class: classLong, mutating: true},
	"POST /v1/workloads/{ref}/stop": {action: auth.ActWorkloadStop, class: classLong, mutating: true},
	"GET /v1/workloads/{ref}/logs":  {action: auth.ActWorkloadRead, class: classStream},
	"GET /v1/workloads/{ref}/stats": {action: auth.ActWorkloadRead},
	"GET /v1/images":                {action: auth.ActImageRead},
	"POST /v1/images":               {action: auth.ActImageWrite, class: classLong, mutating: true},
	"DELETE /v1/images":             {action: auth.ActImageWrite, mutating: true},
	"POST /v1/images/prune":         {action: auth.ActImageWrite, class: classLong, mutating: true},
	"POST /v1/images/pull":          {action: auth.ActImagePull, class: classLong, mutating: true},
	"POST /v1/placements":           {action: auth.ActPlacement},
	"GET /v1/policy":                {action: auth.ActPolicyRead},
	// Volumes are a tenant's, as its workloads are: whoever may submit
	// and delete workloads may create and delete volumes.
	"POST /v1/volumes":         {action: auth.ActWorkloadCreate, mutating: true},
	"GET /v1/volumes":          {action: auth.ActWorkloadRead},
	"GET /v1/volumes/{ref}":    {action: auth.ActWorkloadRead},
	"DELETE /v1/volumes/{ref}": {action: auth.ActWorkloadDelete, mutating: true},
	// exec and signals: whoever may stop the workload.
	"POST /v1/workloads/{ref}/exec":   {action: auth.ActWorkloadStop, class: classExec, mutating: true},
	"GET /v1/workloads/{ref}/exec":    {action: auth.ActWorkloadStop, class: classExec, mutating: true},
	"GET /v1/workloads/{ref}/attach":  {action: auth.ActWorkloadStop, class: classExec, mutating: true},
	"POST /v1/workloads/{ref}/signal": {action: auth.ActWorkloadStop, mutating: true},
}

// setDeadlines moves the connection's deadlines from the server-wide
// request timeout to what the route needs. It runs after authorization, so
// only a caller with a valid identity can hold a connection longer.
func (s *Server) setDeadlines(w http.ResponseWriter, r *http.Request, class routeClass) http.ResponseWriter {
	rc := http.NewResponseController(w)
	now := time.Now()
	switch class {
	case classBlocking:
		if r.URL.Query().Get("index") == "" {
			return w
		}
		d := now.Add(s.opts.MaxWait + s.opts.MaxWait/16 + s.opts.RequestTimeout)
		// The read deadline too: the server's background read of an idle
		// connection would otherwise end the request's context.
		_ = rc.SetReadDeadline(d)
		_ = rc.SetWriteDeadline(d)
	case classLong:
		d := now.Add(s.opts.LongTimeout)
		_ = rc.SetReadDeadline(d)
		_ = rc.SetWriteDeadline(d)
	case classExec:
		_ = rc.SetWriteDeadline(time.Time{})
		if r.Method != http.MethodGet {
			// The simple form's body must come within a plain request's
			// time; execSimple moves the deadline past its timeout once
			// the body is read.
			_ = rc.SetReadDeadline(now.Add(s.opts.RequestTimeout))
			break
		}
		_ = rc.SetReadDeadline(time.Time{})
	case classStream:
		_ = rc.SetReadDeadline(time.Time{})
		_ = rc.SetWriteDeadline(time.Time{})
		return &idleWriter{ResponseWriter: w, rc: rc, idle: s.opts.StreamIdle}
	}
	return w
}

// idleWriter gives each write of a stream StreamIdle to complete: a stream
// may be quiet for as long as it likes, but a client that stops reading is
// cut off instead of holding the handler forever.
type idleWriter struct {
	http.ResponseWriter
	rc   *http.ResponseController
	idle time.Duration
}

func (w *idleWriter) Write(p []byte) (int, error) {
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.idle))
	return w.ResponseWriter.Write(p)
}

func (w *idleWriter) FlushError() error {
	_ = w.rc.SetWriteDeadline(time.Now().Add(w.idle))
	return w.rc.Flush()
}

func (w *idleWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
