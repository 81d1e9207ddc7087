package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/berthd/berth/api"
)

// IndexHeader carries the state index of a response, for blocking queries.
const IndexHeader = "X-Berth-Index"

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decodeJSON reads exactly one JSON document of at most MaxBodyBytes into
// dst, rejecting unknown fields. It returns the problem to send, or nil.
func (s *Server) decodeJSON(w http.ResponseWriter, r *http.Request, dst any) *api.Problem {
	// The media type is required: a browser's cross-site form or no-cors
	// fetch can send only text/plain, form encodings or none, never
	// application/json, so this keeps a web page from submitting to an
	// agent it can reach (loopback without tokens, client certificates).
	ct := r.Header.Get("Content-Type")
	mt, _, err := mime.ParseMediaType(ct)
	if ct == "" || err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
		return &api.Problem{Status: http.StatusUnsupportedMediaType, Reason: api.ReasonUnsupportedMedia, Title: "Unsupported media type",
			Detail: fmt.Sprintf("Content-Type %q: send the body as application/json (Content-Type: application/json)", ct)}
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, s.opts.MaxBodyBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return jsonProblem(err)
	}
	if err := dec.Decode(&struct{}{}); !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return jsonProblem(err)
		}
		return badRequest(api.ReasonMalformedBody, "the body holds more than one JSON document")
	}
	return nil
}

// jsonProblem explains a decoding error with the offending field when the
// decoder names one.
func jsonProblem(err error) *api.Problem {
	var (
		mbe *http.MaxBytesError
		se  *json.SyntaxError
		te  *json.UnmarshalTypeError
	)
	switch {
	case errors.As(err, &mbe):
		return &api.Problem{Status: http.StatusRequestEntityTooLarge, Reason: api.ReasonBodyTooLarge, Title: "Request body too large",
			Detail: fmt.Sprintf("the body exceeds %d bytes", mbe.Limit)}
	case errors.Is(err, io.EOF):
		return badRequest(api.ReasonMalformedBody, "the body is empty; send a JSON document")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest(api.ReasonMalformedBody, "the JSON document is truncated")
	case errors.As(err, &se):
		return badRequest(api.ReasonMalformedBody, fmt.Sprintf("malformed JSON at byte %d: %v", se.Offset, se))
	case errors.As(err, &te):
		field := te.Field
		if field == "" {
			field = "(body)"
		}
		return badRequest(api.ReasonInvalidArgument, "a field has the wrong type",
			api.FieldError{Field: field, Detail: fmt.Sprintf("expected %s, got JSON %s", te.Type, te.Value)})
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		name := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		return badRequest(api.ReasonInvalidArgument, "the body has a field berth does not know",
			api.FieldError{Field: name, Detail: "unknown field"})
	default:
		return badRequest(api.ReasonMalformedBody, err.Error())
	}
}

// refParam is the {ref} of a workload route: an id, NAME or TENANT/NAME
// (api.Ref), whose '/' arrives escaped (%2F) inside the one path segment.
// chi then matches the escaped path (RawPath), so the segment is
// unescaped here; one that does not unescape is taken as it is, and
// matches no workload.
func refParam(r *http.Request) string {
	raw := chi.URLParam(r, "ref")
	if r.URL.RawPath == "" {
		return raw // chi matched the decoded path
	}
	if ref, err := url.PathUnescape(raw); err == nil {
		return ref
	}
	return raw
}

func (s *Server) createWorkload(w http.ResponseWriter, r *http.Request) {
	var spec api.WorkloadSpec
	if p := s.decodeJSON(w, r, &spec); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	wl, created, err := s.be(r).Submit(r.Context(), spec)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/v1/workloads/"+wl.ID)
	w.Header().Set(IndexHeader, strconv.FormatUint(wl.ModifyIndex, 10))
	status := http.StatusCreated
	if !created {
		status = http.StatusOK
	}
	writeJSON(w, status, wl)
}

// blockingParams parses ?index=N&wait=D. wait defaults to 5 minutes and is
// capped at MaxWait, with up to 1/16 of it added at random so that many
// pollers do not come back in lockstep.
func (s *Server) blockingParams(r *http.Request) (index uint64, wait time.Duration, p *api.Problem) {
	q := r.URL.Query()
	if v := q.Get("index"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, badRequest(api.ReasonInvalidArgument, "bad blocking query", api.FieldError{Field: "index", Detail: "must be a non-negative integer"})
		}
		index = n
	}
	wait = s.opts.MaxWait
	if v := q.Get("wait"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d < 0 {
			return 0, 0, badRequest(api.ReasonInvalidArgument, "bad blocking query", api.FieldError{Field: "wait", Detail: "must be a duration such as 30s or 5m"})
		}
		wait = min(d, s.opts.MaxWait)
	}
	if wait > 0 {
		wait += time.Duration(rand.Int64N(int64(wait/16) + 1))
	}
	return index, wait, nil
}

// parseDuration accepts Go durations ("30s") and plain seconds ("30").
func parseDuration(v string) (time.Duration, error) {
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(v)
}

// block waits until current() reports an index above index, the wait ends
// or the client goes away. It costs the waiting request nothing but a
// parked goroutine: the agent closes one channel per change.
func (s *Server) block(r *http.Request, index uint64, wait time.Duration, current func() (uint64, bool)) {
	if index == 0 {
		return
	}
	s.waitUntil(r, wait, func(global uint64) bool {
		if global < index {
			// The client holds an index from the future: the agent's
			// state was reset. Answer at once so it starts over.
			return true
		}
		cur, ok := current()
		return !ok || cur > index
	})
}

// waitUntil waits until done, asked again at each change of the agent's
// state (global is its index), holds, the wait ends or the client goes
// away.
func (s *Server) waitUntil(r *http.Request, wait time.Duration, done func(global uint64) bool) {
	if wait == 0 {
		return
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		global, changed := s.b.Index()
		if done(global) {
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (s *Server) listWorkloads(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := api.ListFilter{State: api.State(q.Get("state")), Isolation: api.Isolation(q.Get("isolation"))}
	switch f.State {
	case "", api.StatePending, api.StateStarting, api.StateRunning, api.StateStopping, api.StateExited, api.StateFailed:
	default:
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad filter", api.FieldError{Field: "state", Detail: fmt.Sprintf("%q is not a workload state", f.State)}))
		return
	}
	switch f.Isolation {
	case "", api.IsolationContainer, api.IsolationVM:
	default:
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad filter", api.FieldError{Field: "isolation", Detail: fmt.Sprintf("%q is not container or vm", f.Isolation)}))
		return
	}
	for _, l := range q["label"] {
		k, v, _ := strings.Cut(l, "=")
		if k == "" {
			writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad filter", api.FieldError{Field: "label", Detail: "use label=KEY or label=KEY=VALUE"}))
			return
		}
		if f.Labels == nil {
			f.Labels = map[string]string{}
		}
		f.Labels[k] = v
	}
	index, wait, p := s.blockingParams(r)
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	s.block(r, index, wait, func() (uint64, bool) {
		cur, _ := s.b.Index()
		return cur, true
	})
	cur, _ := s.b.Index()
	list := s.be(r).List(r.Context(), f)
	w.Header().Set(IndexHeader, strconv.FormatUint(cur, 10))
	writeJSON(w, http.StatusOK, api.WorkloadList{Workloads: list})
}

// getWorkload answers with the workload; a blocking query (?index=N)
// waits for a change past N, and ?until=ended for the run's end (exited or
// failed: what a client that only wants the exit waits for, in one
// request instead of one per state on the way).
func (s *Server) getWorkload(w http.ResponseWriter, r *http.Request) {
	ref := refParam(r)
	index, wait, p := s.blockingParams(r)
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	switch until := r.URL.Query().Get("until"); until {
	case "":
		s.block(r, index, wait, func() (uint64, bool) {
			wl, err := s.be(r).Get(r.Context(), ref)
			if err != nil {
				return 0, false
			}
			return wl.ModifyIndex, true
		})
	case "ended":
		s.waitUntil(r, wait, func(uint64) bool {
			wl, err := s.be(r).Get(r.Context(), ref)
			return err != nil || wl.State.Terminal()
		})
	default:
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad blocking query",
			api.FieldError{Field: "until", Detail: fmt.Sprintf("%q is not ended (the only condition)", until)}))
		return
	}
	wl, err := s.be(r).Get(r.Context(), ref)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set(IndexHeader, strconv.FormatUint(wl.ModifyIndex, 10))
	writeJSON(w, http.StatusOK, wl)
}

// deleteWorkload answers 204 once the workload is gone, or with
// ?wait=false 202 and the workload (deleting) as soon as the delete is
// recorded. Either way the agent finishes the delete when the client
// leaves.
func (s *Server) deleteWorkload(w http.ResponseWriter, r *http.Request) {
	force, p := boolParam(r, "force", false)
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	wait, p := boolParam(r, "wait", true)
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	ref := refParam(r)
	if !wait {
		wl, err := s.be(r).RequestDelete(r.Context(), ref, force)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		w.Header().Set(IndexHeader, strconv.FormatUint(wl.ModifyIndex, 10))
		writeJSON(w, http.StatusAccepted, wl)
		return
	}
	if err := s.be(r).Delete(r.Context(), ref, force); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// boolParam reads a true/false query parameter, def when it is absent.
func boolParam(r *http.Request, name string, def bool) (bool, *api.Problem) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: name, Detail: "must be true or false"})
	}
	return b, nil
}

// maxStopTimeout bounds a stop's grace period.
const maxStopTimeout = time.Hour

func (s *Server) stopWorkload(w http.ResponseWriter, r *http.Request) {
	var timeout time.Duration
	if v := r.URL.Query().Get("timeout"); v != "" {
		d, err := parseDuration(v)
		if err != nil || d < 0 || d > maxStopTimeout {
			writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: "timeout", Detail: "must be a duration between 0s and 1h, such as 10s"}))
			return
		}
		timeout = d
	}
	wait, p := boolParam(r, "wait", true)
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	ref := refParam(r)
	if !wait {
		wl, err := s.be(r).RequestStop(r.Context(), ref, timeout)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		w.Header().Set(IndexHeader, strconv.FormatUint(wl.ModifyIndex, 10))
		writeJSON(w, http.StatusAccepted, wl)
		return
	}
	wl, err := s.be(r).Stop(r.Context(), ref, timeout)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, wl)
}

func (s *Server) workloadStats(w http.ResponseWriter, r *http.Request) {
	st, err := s.be(r).Stats(r.Context(), refParam(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// workloadLogs streams output as plain text (lines of both streams) or, with
// format=ndjson (or Accept: application/x-ndjson), one api.LogLine per line.
func (s *Server) workloadLogs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	opts := api.LogOptions{Tail: -1, Stream: q.Get("stream")}
	if opts.Stream == "all" {
		opts.Stream = ""
	}
	if opts.Stream != "" && opts.Stream != "stdout" && opts.Stream != "stderr" {
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: "stream", Detail: "must be stdout, stderr or all"}))
		return
	}
	var p *api.Problem
	if opts.Follow, p = boolParam(r, "follow", false); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	if v := q.Get("tail"); v != "" && v != "all" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: "tail", Detail: "must be a non-negative number of lines or all"}))
			return
		}
		opts.Tail = n
	}
	if v := q.Get("since"); v != "" {
		since, err := api.ParseSince(v, time.Now())
		if err != nil {
			writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: "since", Detail: err.Error()}))
			return
		}
		opts.Since = since
	}
	if opts.Timestamps, p = boolParam(r, "timestamps", false); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	ndjson := q.Get("format") == "ndjson" || strings.Contains(r.Header.Get("Accept"), "application/x-ndjson")
	if f := q.Get("format"); f != "" && f != "ndjson" && f != "text" {
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: "format", Detail: "must be text or ndjson"}))
		return
	}
	ref := refParam(r)
	if _, err := s.be(r).Get(r.Context(), ref); err != nil {
		s.fail(w, r, err)
		return
	}
	if ndjson {
		w.Header().Set("Content-Type", "application/x-ndjson")
	} else {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	var stamp []byte
	err := s.be(r).Logs(r.Context(), ref, opts, func(stream string, line []byte, at time.Time) error {
		var err error
		if ndjson {
			l := api.LogLine{Stream: stream, Line: string(line)}
			if opts.Timestamps && !at.IsZero() {
				l.Time = &at
			}
			err = enc.Encode(l)
		} else {
			if opts.Timestamps && !at.IsZero() {
				// docker logs -t: the time, a space, the line.
				stamp = append(at.UTC().AppendFormat(stamp[:0], api.LogTimeFormat), ' ')
				_, err = w.Write(stamp)
			}
			if err == nil {
				if _, err = w.Write(line); err == nil {
					_, err = w.Write([]byte{'\n'})
				}
			}
		}
		if err == nil && opts.Follow {
			err = rc.Flush()
		}
		return err
	})
	if err != nil && r.Context().Err() == nil {
		// The status is sent; all that is left is to say so in the log.
		s.log.Warn("log stream ended early", "workload", ref, "err", err)
	}
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, api.ImageList{Images: s.be(r).ListImages(r.Context())})
}

// importImage takes an OCI-layout or docker-archive tarball as the body.
func (s *Server) importImage(w http.ResponseWriter, r *http.Request) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/x-tar" && mt != "application/octet-stream") {
			writeProblem(w, r, s.log, &api.Problem{Status: http.StatusUnsupportedMediaType, Reason: api.ReasonUnsupportedMedia, Title: "Unsupported media type",
				Detail: fmt.Sprintf("Content-Type %q: send the image archive as application/x-tar", ct)})
			return
		}
	}
	body := http.MaxBytesReader(w, r.Body, s.opts.MaxImageBytes)
	imgs, err := s.be(r).ImportImage(r.Context(), body, r.URL.Query().Get("ref"))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeProblem(w, r, s.log, jsonProblem(mbe))
			return
		}
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, api.ImageList{Images: imgs})
}

func (s *Server) pullImage(w http.ResponseWriter, r *http.Request) {
	var req api.PullRequest
	if p := s.decodeJSON(w, r, &req); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	if req.Ref == "" {
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "the request has invalid fields; see fields", api.FieldError{Field: "ref", Detail: "required: the image reference to pull"}))
		return
	}
	img, err := s.be(r).PullImage(r.Context(), req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (s *Server) removeImage(w http.ResponseWriter, r *http.Request) {
	ref := r.URL.Query().Get("ref")
	if ref == "" {
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "bad query parameter", api.FieldError{Field: "ref", Detail: "required: the image reference to remove"}))
		return
	}
	if err := s.be(r).RemoveImage(r.Context(), ref); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
