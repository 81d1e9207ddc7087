package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/berthd/berth/api"
)

// getNode is GET /v1/node, the node-status document, with blocking
// queries: ?index=N&wait=30s holds the request until the node's index
// passes N.
func (s *Server) getNode(w http.ResponseWriter, r *http.Request) {
	index, wait, p := s.blockingParams(r)
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	s.block(r, index, wait, func() (uint64, bool) {
		idx, _ := s.b.Index()
		return idx, true
	})
	body, idx := s.nodeDocument(r.Context())
	h := w.Header()
	h.Set(IndexHeader, strconv.FormatUint(idx, 10))
	h.Set("Content-Type", "application/json")
	// Its length, so the answer goes out in one piece rather than chunks.
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

// nodeDocAge is how long an encoded node document is served again to
// requests at the same index: a change wakes every parked blocking query
// at once (fleet controllers park thousands), and one encoding then
// serves them all. Only its uptime can be this much behind.
const nodeDocAge = time.Second

// encodedNode is a node document as served, and when it was encoded.
type encodedNode struct {
	body  []byte
	index uint64
	at    time.Time
}

// fresh says whether d may be served at the agent's current index.
func (d *encodedNode) fresh(idx uint64) bool {
	return d != nil && d.index == idx && time.Since(d.at) < nodeDocAge
}

// nodeDocument returns the node document, encoded, and its index. The
// cached encoding is read without a lock: thousands of pollers woken by
// one change read it at once, and only one of them encodes.
func (s *Server) nodeDocument(ctx context.Context) ([]byte, uint64) {
	if d := s.nodeDoc.Load(); d.fresh(s.indexNow()) {
		return d.body, d.index
	}
	s.nodeMu.Lock()
	defer s.nodeMu.Unlock()
	if d := s.nodeDoc.Load(); d.fresh(s.indexNow()) {
		return d.body, d.index
	}
	n := s.b.Node(ctx)
	body, err := json.Marshal(n)
	if err != nil {
		// Node status is plain data: this cannot happen; say so rather
		// than serve nothing.
		body = []byte(`{}`)
	}
	d := &encodedNode{body: append(body, '\n'), index: n.Index, at: time.Now()}
	s.nodeDoc.Store(d)
	return d.body, d.index
}

func (s *Server) indexNow() uint64 {
	idx, _ := s.b.Index()
	return idx
}

// sseKeepAlive is how often an idle event stream gets a comment line, so
// proxies and clients can tell a quiet stream from a dead one.
const sseKeepAlive = 15 * time.Second

// events is GET /v1/events: server-sent events. ?workload=ID and
// ?type=T (repeatable; "workload." matches a whole family) filter; a
// client that reconnects with Last-Event-ID (or ?since=ID) gets what it
// missed while the agent still holds it.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := api.EventFilter{WorkloadID: q.Get("workload")}
	for _, t := range q["type"] {
		for _, t := range strings.Split(t, ",") {
			if t = strings.TrimSpace(t); t != "" {
				f.Types = append(f.Types, t)
			}
		}
	}
	var last uint64
	for _, v := range []string{r.Header.Get("Last-Event-ID"), q.Get("since")} {
		if v == "" {
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad event id", api.FieldError{Field: "Last-Event-ID", Detail: "must be the id of an event this agent sent"}))
			return
		}
		last = n
	}
	if err := s.checkEventScope(r.Context(), requestState(r), f.WorkloadID); err != nil {
		s.fail(w, r, err)
		return
	}
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	// Keep-alives come from a ticker in this goroutine's select, through
	// a channel the emit callback also serializes on: writes never race.
	writes := make(chan func() error)
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(r.Context())
	defer func() {
		cancel()
		<-done
	}()
	go func() {
		done <- s.be(r).Events(ctx, last, f, func() {
			select {
			case writes <- func() error {
				_, err := fmt.Fprint(w, ": some events were dropped before this point; resynchronize from GET /v1/workloads\n\n")
				return err
			}:
			case <-ctx.Done():
			}
		}, func(e api.Event) error {
			data, err := json.Marshal(e)
			if err != nil {
				return err
			}
			errc := make(chan error, 1)
			select {
			case writes <- func() error {
				_, err := fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", e.ID, e.Type, data)
				errc <- err
				return err
			}:
			case <-ctx.Done():
				return ctx.Err()
			}
			return <-errc
		})
	}()
	tick := time.NewTicker(sseKeepAlive)
	defer tick.Stop()
	for {
		select {
		case write := <-writes:
			if write() != nil || rc.Flush() != nil {
				return
			}
		case <-tick.C:
			if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil || rc.Flush() != nil {
				return
			}
		case err := <-done:
			done <- err // for the deferred wait
			return
		}
	}
}
