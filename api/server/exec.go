package server

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// Limits of the simple (non-interactive) form.
const (
	// ExecOutputCap is the most of each of stdout and stderr the simple
	// form answers with; the rest is dropped and marked truncated.
	ExecOutputCap = 1 << 20
	// ExecDefaultTimeout and ExecMaxTimeout bound a simple exec.
	ExecDefaultTimeout = time.Minute
	ExecMaxTimeout     = time.Hour
	// execDrain is how long output may still come after the process
	// ended (from what it left running) before the session is closed.
	execDrain = 2 * time.Second
	// execPing is how often a quiet WebSocket is probed: a client that
	// vanished without closing is found within two of these.
	execPing = 30 * time.Second
)

// execAudit is what the audit record says of an exec session: never its
// environment's values.
type execAudit struct {
	command  []string
	user     string
	tty      bool
	exitCode *int
	signal   string
}

// execWorkload answers POST /v1/workloads/{ref}/exec (the simple form)
// and the WebSocket handshake on the same path (the session).
func (s *Server) execWorkload(w http.ResponseWriter, r *http.Request) {
	// An unknown (or hidden) workload is a 404 whatever the request says.
	if _, err := s.be(r).Get(r.Context(), refParam(r)); err != nil {
		s.fail(w, r, err)
		return
	}
	if r.Method == http.MethodGet {
		s.execStream(w, r)
		return
	}
	s.execSimple(w, r)
}

// startExec starts the session, with an audit record written before the
// process exists.
func (s *Server) startExec(r *http.Request, req api.ExecRequest) (driver.ExecSession, *execAudit, error) {
	audit := &execAudit{command: req.Command, user: req.User, tty: req.TTY}
	ctx := r.Context()
	if st := requestState(r); st != nil {
		st.exec = audit
		ctx = driver.WithExecStart(ctx, func() { s.auditExecStart(r, st) })
	}
	sess, err := s.be(r).Exec(ctx, refParam(r), req)
	return sess, audit, err
}

func (a *execAudit) ended(res *driver.ExitResult) {
	if res != nil {
		code := res.ExitCode
		a.exitCode = &code
	}
}

// execSimple runs the process to its end and answers with its output.
func (s *Server) execSimple(w http.ResponseWriter, r *http.Request) {
	var req api.ExecRequest
	if p := s.decodeJSON(w, r, &req); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	var bad []api.FieldError
	if req.TTY {
		bad = append(bad, api.FieldError{Field: "tty", Detail: "a terminal needs the streaming form (a WebSocket session, docs/exec.md)"})
	}
	if req.Stdin && req.Input == "" {
		bad = append(bad, api.FieldError{Field: "stdin", Detail: "the simple form has no input stream: give input, or use the streaming form"})
	}
	timeout := ExecDefaultTimeout
	if req.TimeoutSeconds > 0 {
		timeout = time.Duration(req.TimeoutSeconds) * time.Second
	}
	if timeout > ExecMaxTimeout {
		bad = append(bad, api.FieldError{Field: "timeout_seconds", Detail: fmt.Sprintf("at most %d", int(ExecMaxTimeout/time.Second))})
	}
	if len(bad) > 0 {
		writeProblem(w, r, s.log, badRequest(api.ReasonInvalidArgument, "the request has invalid fields; see fields", bad...))
		return
	}
	req.Stdin = req.Input != ""
	// The body is read: the server's background read of the idle
	// connection must not end the request (and kill the process) before
	// the answer is due.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(timeout + s.opts.RequestTimeout))
	_ = rc.SetWriteDeadline(time.Now().Add(timeout + s.opts.RequestTimeout))
	sess, audit, err := s.startExec(r, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer sess.Close()
	if in := sess.Stdin(); in != nil {
		go func() {
			_, _ = io.WriteString(in, req.Input)
			_ = in.Close()
		}()
	}
	out, errOut := &cappedBuffer{max: ExecOutputCap}, &cappedBuffer{max: ExecOutputCap}
	pumps := pumpAll(map[io.Writer]io.Reader{out: sess.Stdout(), errOut: sess.Stderr()})
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	res, err := sess.Wait(ctx)
	timedOut := false
	if err != nil {
		if r.Context().Err() != nil {
			// The client left: Close (deferred) kills the process.
			return
		}
		timedOut = true
		_ = sess.Close()
		if res, err = sess.Wait(context.WithoutCancel(r.Context())); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	drain(pumps, sess)
	audit.ended(res)
	writeJSON(w, http.StatusOK, api.ExecResult{
		ExitCode: res.ExitCode, Signal: res.Signal, TimedOut: timedOut,
		Stdout: out.String(), Stderr: errOut.String(),
		StdoutTruncated: out.truncated, StderrTruncated: errOut.truncated,
	})
}

// pumpAll copies each reader to its writer; the channel closes when all
// are done.
func pumpAll(m map[io.Writer]io.Reader) <-chan struct{} {
	var wg sync.WaitGroup
	for w, r := range m {
		if r != nil {
			wg.Go(func() { _, _ = io.Copy(w, r) })
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	return done
}

// drain waits for the output of an ended process, then closes the
// session: what the process left running holds its output no longer.
func drain(pumps <-chan struct{}, sess driver.ExecSession) {
	select {
	case <-pumps:
	case <-time.After(execDrain):
		_ = sess.Close()
		<-pumps
	}
}

// cappedBuffer keeps the first max bytes written to it.
type cappedBuffer struct {
	mu        sync.Mutex
	buf       []byte
	max       int
	truncated bool
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	room := b.max - len(b.buf)
	if len(p) > room {
		b.buf = append(b.buf, p[:max(room, 0)]...)
		b.truncated = true
	} else {
		b.buf = append(b.buf, p...)
	}
	return len(p), nil
}

func (b *cappedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}

// execQuery reads a session's request from the handshake's query string:
// command (repeated, in order), env (repeated KEY=VALUE), workdir, user,
// stdin, tty, rows, cols.
func execQuery(q url.Values) (api.ExecRequest, *api.Problem) {
	req := api.ExecRequest{Command: q["command"], Workdir: q.Get("workdir"), User: q.Get("user")}
	var bad []api.FieldError
	for _, kv := range q["env"] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			bad = append(bad, api.FieldError{Field: "env", Detail: fmt.Sprintf("%q is not KEY=VALUE", k)})
			continue
		}
		if req.Env == nil {
			req.Env = map[string]string{}
		}
		req.Env[k] = v
	}
	req.Size, bad = sessionQuery(q, map[string]*bool{"stdin": &req.Stdin, "tty": &req.TTY}, bad)
	if len(bad) > 0 {
		return req, badRequest(api.ReasonInvalidArgument, "the request has invalid fields; see fields", bad...)
	}
	return req, nil
}

// sessionQuery reads what exec and attach sessions share in their
// handshake's query: boolean flags (into flags' targets) and a terminal
// size (rows and cols, together). Bad values are added to bad.
func sessionQuery(q url.Values, flags map[string]*bool, bad []api.FieldError) (*api.TermSize, []api.FieldError) {
	for name, dst := range flags {
		if v := q.Get(name); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				bad = append(bad, api.FieldError{Field: name, Detail: "must be true or false"})
			}
			*dst = b
		}
	}
	if !q.Has("rows") && !q.Has("cols") {
		return nil, bad
	}
	rows, err1 := strconv.ParseUint(q.Get("rows"), 10, 16)
	cols, err2 := strconv.ParseUint(q.Get("cols"), 10, 16)
	if err1 != nil || err2 != nil {
		bad = append(bad, api.FieldError{Field: "rows", Detail: "rows and cols go together, each a number up to 65535"})
	}
	return &api.TermSize{Rows: uint16(rows), Cols: uint16(cols)}, bad
}

// execStream serves an exec session over a WebSocket.
func (s *Server) execStream(w http.ResponseWriter, r *http.Request) {
	req, p := execQuery(r.URL.Query())
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	// Everything websocket.Accept checks is checked here first: a
	// handshake it would refuse must not have run the command already.
	if p := checkHandshakeFor(r, api.ExecSubprotocol, "an exec session"); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	sess, audit, err := s.startExec(r, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer sess.Close()
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{api.ExecSubprotocol}})
	if err != nil {
		s.log.Debug("exec: websocket handshake failed", "err", err)
		return
	}
	defer c.CloseNow()
	res, err := relay(r.Context(), c, sess)
	audit.ended(res)
	if err != nil {
		s.log.Debug("exec session ended early", "path", r.URL.Path, "err", err)
	}
}

// checkHandshakeFor refuses what is not a WebSocket handshake offering
// subprotocol (for what, "an exec session"), or one from a web page of
// another origin.
func checkHandshakeFor(r *http.Request, subprotocol, what string) *api.Problem {
	if !sameOrigin(r) {
		return &api.Problem{Status: http.StatusForbidden, Reason: api.ReasonPermissionDenied, Title: "Cross-origin request refused",
			Detail: fmt.Sprintf("Origin %q is not this agent (%s): %s is opened by berth's own pages or a client that is not a browser", r.Header.Get("Origin"), r.Host, what)}
	}
	var wrong string
	switch key := r.Header.Values("Sec-WebSocket-Key"); {
	case r.Method != http.MethodGet || r.ProtoMajor != 1 || r.ProtoMinor < 1:
		wrong = "the handshake is an HTTP/1.1 GET"
	case !headerHasToken(r.Header, "Connection", "upgrade") || !headerHasToken(r.Header, "Upgrade", "websocket"):
		wrong = "the handshake needs Connection: Upgrade and Upgrade: websocket"
	case r.Header.Get("Sec-WebSocket-Version") != "13":
		wrong = "only WebSocket version 13 is spoken"
	case len(key) != 1 || !validWebSocketKey(key[0]):
		wrong = "the handshake needs one Sec-WebSocket-Key of 16 base64-encoded bytes"
	case !slices.Contains(websocketProtocols(r), subprotocol):
		wrong = "the handshake must offer the subprotocol " + subprotocol
	default:
		return nil
	}
	return badRequest(api.ReasonInvalidArgument, what+" is a WebSocket with subprotocol "+subprotocol+" (docs/exec.md): "+wrong)
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func validWebSocketKey(k string) bool {
	v, err := base64.StdEncoding.DecodeString(strings.TrimSpace(k))
	return err == nil && len(v) == 16
}

func websocketProtocols(r *http.Request) []string {
	var out []string
	for _, h := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(h, ",") {
			out = append(out, strings.TrimSpace(p))
		}
	}
	return out
}

// relay carries one session between a driver and a WebSocket client, the
// same for every driver. It returns once the process ended and its exit
// was sent, or the client went away (the process is then killed: the
// caller's Close of the session), with the process's end when known.
func relay(parent context.Context, c *websocket.Conn, sess driver.ExecSession) (*driver.ExitResult, error) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	defer cancel()
	c.SetReadLimit(1 << 20)

	writer := func(stream byte) io.Writer {
		return wsWriter{ctx: ctx, c: c, stream: stream}
	}
	pumps := pumpAll(map[io.Writer]io.Reader{writer(api.StreamStdout): sess.Stdout(), writer(api.StreamStderr): sess.Stderr()})

	clientGone := make(chan error, 1)
	go func() {
		clientGone <- readClient(ctx, c, clientControls{stdin: sess.Stdin(), resize: sess.Resize, signal: func(name string) {
			if sig, err := driver.ParseSignal(name); err == nil {
				_ = sess.Signal(sig)
			}
		}})
	}()
	go keepalive(ctx, c, cancel)

	waited := make(chan *driver.ExitResult, 1)
	go func() {
		res, _ := sess.Wait(ctx)
		waited <- res
	}()
	select {
	case err := <-clientGone:
		cancel()
		_ = sess.Close()
		res := <-waited
		<-pumps
		return res, fmt.Errorf("client went away: %w", err)
	case res := <-waited:
		if res == nil {
			return nil, ctx.Err()
		}
		drain(pumps, sess)
		code := res.ExitCode
		msg, _ := json.Marshal(api.ExecControl{Type: api.ControlExit, ExitCode: &code, Signal: signalName(res.Signal)})
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		defer wcancel()
		if err := c.Write(wctx, websocket.MessageText, msg); err != nil {
			return res, err
		}
		return res, c.Close(websocket.StatusNormalClosure, "")
	}
}

func signalName(sig int) string {
	if sig == 0 {
		return ""
	}
	return unix.SignalName(syscall.Signal(sig))
}

// wsWriter sends what is written as binary messages of one stream.
type wsWriter struct {
	ctx    context.Context
	c      *websocket.Conn
	stream byte
}

func (w wsWriter) Write(p []byte) (int, error) {
	msg := make([]byte, 1+len(p))
	msg[0] = w.stream
	copy(msg[1:], p)
	if err := w.c.Write(w.ctx, websocket.MessageBinary, msg); err != nil {
		return 0, err
	}
	return len(p), nil
}

// clientControls is what a session's client may act on: its stdin,
// resize and signals.
type clientControls struct {
	stdin  io.WriteCloser
	resize func(driver.TermSize) error
	signal func(string)
}

// readClient applies the client's messages to the session until the
// client closes or fails.
func readClient(ctx context.Context, c *websocket.Conn, cc clientControls) error {
	stdin := cc.stdin
	for {
		typ, data, err := c.Read(ctx)
		if err != nil {
			return err
		}
		if typ == websocket.MessageBinary {
			if len(data) == 0 || data[0] != api.StreamStdin {
				return errors.New("a binary message from the client must be stdin (stream 0)")
			}
			if stdin != nil {
				if _, err := stdin.Write(data[1:]); err != nil {
					stdin = nil // the process closed its input; drop the rest
				}
			}
			continue
		}
		var m api.ExecControl
		if err := json.Unmarshal(data, &m); err != nil {
			return fmt.Errorf("control message: %w", err)
		}
		switch m.Type {
		case api.ControlResize:
			_ = cc.resize(driver.TermSize{Rows: m.Rows, Cols: m.Cols})
		case api.ControlSignal:
			cc.signal(m.Signal)
		case api.ControlStdinClose:
			if stdin != nil {
				_ = stdin.Close()
				stdin = nil
			}
		}
	}
}

// keepalive pings the client; one that does not answer ends the session.
func keepalive(ctx context.Context, c *websocket.Conn, cancel context.CancelFunc) {
	t := time.NewTicker(execPing)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			pctx, pcancel := context.WithTimeout(ctx, execPing)
			err := c.Ping(pctx)
			pcancel()
			if err != nil {
				c.CloseNow()
				cancel()
				return
			}
		}
	}
}

// signalWorkload answers POST /v1/workloads/{ref}/signal.
func (s *Server) signalWorkload(w http.ResponseWriter, r *http.Request) {
	if _, err := s.be(r).Get(r.Context(), refParam(r)); err != nil {
		s.fail(w, r, err)
		return
	}
	var req api.SignalRequest
	if p := s.decodeJSON(w, r, &req); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	wl, err := s.be(r).Signal(r.Context(), refParam(r), req.Signal)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, wl)
}
