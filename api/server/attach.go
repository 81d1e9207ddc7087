package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/coder/websocket"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// attachEndWait bounds how long an attach session waits, after the
// workload's output ended, for its record to say how it ended.
const attachEndWait = 30 * time.Second

// attachWorkload serves GET /v1/workloads/{ref}/attach: a WebSocket
// session on the workload's own streams (docs/exec.md).
func (s *Server) attachWorkload(w http.ResponseWriter, r *http.Request) {
	before, err := s.be(r).Get(r.Context(), refParam(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	req, p := attachQuery(r.URL.Query())
	if p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	if p := checkHandshakeFor(r, api.AttachSubprotocol, "an attach session"); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	st := requestState(r)
	if st != nil {
		st.attach = &req
	}
	sess, err := s.be(r).Attach(r.Context(), refParam(r), req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer sess.Close()
	s.auditStart(r, st, "attach started")
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{api.AttachSubprotocol}})
	if err != nil {
		s.log.Debug("attach: websocket handshake failed", "err", err)
		return
	}
	defer c.CloseNow()
	if err := s.relayAttach(r, c, sess, before.RestartCount); err != nil {
		s.log.Debug("attach session ended", "path", r.URL.Path, "err", err)
	}
}

// attachQuery reads stdin, logs, rows and cols.
func attachQuery(q url.Values) (api.AttachRequest, *api.Problem) {
	var req api.AttachRequest
	var bad []api.FieldError
	req.Size, bad = sessionQuery(q, map[string]*bool{"stdin": &req.Stdin, "logs": &req.Logs}, bad)
	if len(bad) > 0 {
		return req, badRequest(api.ReasonInvalidArgument, "the request has invalid fields; see fields", bad...)
	}
	return req, nil
}

// relayAttach carries an attach session until the workload's output ends
// (then its exit is sent) or the client detaches (the workload runs on).
func (s *Server) relayAttach(r *http.Request, c *websocket.Conn, sess driver.AttachSession, restarts int) error {
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	c.SetReadLimit(1 << 20)
	outErr := make(chan error, 2)
	n := 0
	for stream, rd := range map[byte]io.Reader{api.StreamStdout: sess.Stdout(), api.StreamStderr: sess.Stderr()} {
		if rd == nil {
			continue
		}
		n++
		go func() {
			_, err := io.Copy(wsWriter{ctx: ctx, c: c, stream: stream}, rd)
			outErr <- err
		}()
	}
	clientGone := make(chan error, 1)
	go func() {
		clientGone <- readClient(ctx, c, clientControls{stdin: sess.Stdin(), resize: sess.Resize, signal: func(name string) {
			_, _ = s.be(r).Signal(ctx, refParam(r), name)
		}})
	}()
	go keepalive(ctx, c, cancel)
	var ended error
	for range n {
		select {
		case err := <-clientGone:
			return fmt.Errorf("client detached: %w", err)
		case err := <-outErr:
			if err != nil && ended == nil {
				ended = err
			}
		}
	}
	if ended != nil {
		p := &api.Problem{Status: http.StatusConflict, Reason: api.ReasonConflict, Title: "Attach session ended", Detail: ended.Error()}
		if errors.Is(ended, driver.ErrAttachSlow) {
			p.Detail = "the client did not keep up with the workload's output and was detached; its logs have everything"
		}
		return s.sendControl(ctx, c, api.ExecControl{Type: api.ControlError, Problem: p})
	}
	// The output ended with the workload: its record says how, once the
	// agent has seen the end.
	code := s.awaitEnd(ctx, r, restarts)
	if code == nil {
		return s.sendControl(ctx, c, api.ExecControl{Type: api.ControlError, Problem: &api.Problem{
			Status: http.StatusServiceUnavailable, Reason: api.ReasonUnavailable, Title: "Exit not known yet",
			Detail: "the workload's output ended but the agent has not recorded its end yet; GET the workload for it"}})
	}
	return s.sendControl(ctx, c, api.ExecControl{Type: api.ControlExit, ExitCode: code})
}

// awaitEnd waits (bounded) until the workload's record says how the run
// attached to ended: its exit code once it ended for good, or its last
// run's when it restarted (the restart count passed restarts).
func (s *Server) awaitEnd(ctx context.Context, r *http.Request, restarts int) *int {
	deadline := time.NewTimer(attachEndWait)
	defer deadline.Stop()
	for {
		_, changed := s.be(r).Index()
		wl, err := s.be(r).Get(ctx, refParam(r))
		if err != nil {
			return nil
		}
		switch {
		case wl.State.Terminal():
			return wl.ExitCode
		case wl.RestartCount > restarts:
			return wl.LastExitCode
		}
		select {
		case <-changed:
		case <-deadline.C:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

func (s *Server) sendControl(ctx context.Context, c *websocket.Conn, m api.ExecControl) error {
	msg, _ := json.Marshal(m)
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.Write(wctx, websocket.MessageText, msg); err != nil {
		return err
	}
	return c.Close(websocket.StatusNormalClosure, "")
}
