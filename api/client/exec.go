package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"

	"github.com/coder/websocket"

	"github.com/berthd/berth/api"
)

// Exec runs a command in a running workload to its end and returns its
// output and exit code (the simple form: no terminal, output capped).
func (c *Client) Exec(ctx context.Context, ref string, req api.ExecRequest) (*api.ExecResult, error) {
	var res api.ExecResult
	if _, err := c.doJSON(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(ref)+"/exec", nil, req, &res); err != nil {
		return nil, err
	}
	return &res, nil
}

// Signal sends a signal (a name such as HUP, or a number) to a running
// workload's main process.
func (c *Client) Signal(ctx context.Context, ref, sig string) (*api.Workload, error) {
	var w api.Workload
	if _, err := c.doJSON(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(ref)+"/signal", nil, api.SignalRequest{Signal: sig}, &w); err != nil {
		return nil, err
	}
	return &w, nil
}

// ExecSession is an interactive exec session (a WebSocket, docs/exec.md).
// Write sends standard input; Wait copies the output and returns the exit.
type ExecSession struct {
	c       *websocket.Conn
	ctx     context.Context
	cancel  context.CancelFunc
	writeMu sync.Mutex
}

// ExecStream starts an interactive session. Refusals (400, 403, 404, 409)
// are *api.Problem as for every call.
func (c *Client) ExecStream(ctx context.Context, ref string, req api.ExecRequest) (*ExecSession, error) {
	q := url.Values{"command": req.Command}
	for k, v := range req.Env {
		q.Add("env", k+"="+v)
	}
	set := func(k, v string) {
		if v != "" {
			q.Set(k, v)
		}
	}
	set("workdir", req.Workdir)
	set("user", req.User)
	if req.Stdin {
		q.Set("stdin", "true")
	}
	if req.TTY {
		q.Set("tty", "true")
	}
	if req.Size != nil {
		q.Set("rows", strconv.Itoa(int(req.Size.Rows)))
		q.Set("cols", strconv.Itoa(int(req.Size.Cols)))
	}
	return c.dialSession(ctx, ref, "exec", q, api.ExecSubprotocol)
}

// Attach attaches to a running workload's own streams (its terminal with
// tty, its stdin with stdin). The session is an ExecSession whose process
// is the workload: Wait returns when the workload ended (with its exit
// code); Close detaches, and the workload runs on.
func (c *Client) Attach(ctx context.Context, ref string, req api.AttachRequest) (*ExecSession, error) {
	q := url.Values{}
	if req.Stdin {
		q.Set("stdin", "true")
	}
	if req.Logs {
		q.Set("logs", "true")
	}
	if req.Size != nil {
		q.Set("rows", strconv.Itoa(int(req.Size.Rows)))
		q.Set("cols", strconv.Itoa(int(req.Size.Cols)))
	}
	return c.dialSession(ctx, ref, "attach", q, api.AttachSubprotocol)
}

// dialSession opens the WebSocket of a workload's exec or attach session.
func (c *Client) dialSession(ctx context.Context, ref, what string, q url.Values, subprotocol string) (*ExecSession, error) {
	conn, resp, err := websocket.Dial(ctx, c.url("/v1/workloads/"+url.PathEscape(ref)+"/"+what, q), &websocket.DialOptions{
		HTTPClient: c.http, Subprotocols: []string{subprotocol},
	})
	if err != nil {
		if resp != nil && resp.StatusCode >= 300 && resp.Body != nil {
			return nil, decodeProblem(resp)
		}
		return nil, fmt.Errorf("berth agent at %s: %s session: %w", c.base.Host, what, err)
	}
	conn.SetReadLimit(1 << 20)
	sctx, cancel := context.WithCancel(context.Background())
	return &ExecSession{c: conn, ctx: sctx, cancel: cancel}, nil
}

// Write sends p to the process's standard input.
func (s *ExecSession) Write(p []byte) (int, error) {
	msg := append([]byte{api.StreamStdin}, p...)
	if err := s.c.Write(s.ctx, websocket.MessageBinary, msg); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (s *ExecSession) control(m api.ExecControl) error {
	data, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return s.c.Write(s.ctx, websocket.MessageText, data)
}

// CloseStdin gives the process end of file.
func (s *ExecSession) CloseStdin() error {
	return s.control(api.ExecControl{Type: api.ControlStdinClose})
}

// Resize changes the session's terminal size.
func (s *ExecSession) Resize(rows, cols uint16) error {
	return s.control(api.ExecControl{Type: api.ControlResize, Rows: rows, Cols: cols})
}

// Signal sends a signal (name or number) to the exec'd process.
func (s *ExecSession) Signal(sig string) error {
	return s.control(api.ExecControl{Type: api.ControlSignal, Signal: sig})
}

// ErrSessionLost is returned by Wait when the session ended without an
// exit message: the agent went away, and with it the process.
var ErrSessionLost = errors.New("the exec session ended before the process did")

// Wait copies the process's output to stdout and stderr until it ends,
// and returns its exit message (exit code and, for a killed process, the
// signal's name).
func (s *ExecSession) Wait(stdout, stderr io.Writer) (*api.ExecControl, error) {
	for {
		typ, data, err := s.c.Read(s.ctx)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrSessionLost, err)
		}
		if typ == websocket.MessageBinary {
			if len(data) == 0 {
				continue
			}
			var w io.Writer
			switch data[0] {
			case api.StreamStdout:
				w = stdout
			case api.StreamStderr:
				w = stderr
			}
			if w != nil {
				if _, err := w.Write(data[1:]); err != nil {
					return nil, err
				}
			}
			continue
		}
		var m api.ExecControl
		if err := json.Unmarshal(data, &m); err != nil {
			return nil, fmt.Errorf("exec session: bad control message: %w", err)
		}
		switch m.Type {
		case api.ControlExit:
			if m.ExitCode == nil {
				return nil, errors.New("exec session: exit message without an exit code")
			}
			return &m, nil
		case api.ControlError:
			if m.Problem != nil {
				return nil, m.Problem
			}
			return nil, errors.New("exec session failed")
		}
	}
}

// Close ends the session; a process still running is killed by the agent.
func (s *ExecSession) Close() error {
	defer s.cancel()
	return s.c.Close(websocket.StatusNormalClosure, "")
}

// CloseIdleConnections closes the client's idle connections to the agent.
func (c *Client) CloseIdleConnections() { c.tr.CloseIdleConnections() }
