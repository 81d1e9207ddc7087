package server_test

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
)

// The simple form's body must arrive within the request timeout: a client
// that sends headers and then a trickle (or nothing) is cut off, and
// nothing starts. A process that runs longer than the request timeout
// still gets its answer.
func TestExecSimpleBodyHasReadDeadline(t *testing.T) {
	e := newEnv(t)
	hs := httptest.NewServer(server.New(e.agent, server.Options{RequestTimeout: 2 * time.Second, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}))
	defer hs.Close()
	e.srv = hs
	w := e.sleeper("")

	conn, err := net.Dial("tcp", strings.TrimPrefix(hs.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	partial := `{"command":["true"`
	fmt.Fprintf(conn, "POST /v1/workloads/%s/exec HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n%s", w.ID, partial)
	// Bounded only so a regression fails instead of hanging the suite.
	_ = conn.SetReadDeadline(time.Now().Add(time.Minute))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	switch {
	case err == nil:
		resp.Body.Close()
		if resp.StatusCode < 400 || resp.StatusCode >= 500 || resp.StatusCode == http.StatusForbidden {
			t.Errorf("a body that never came = %s, want a 4xx about the body", resp.Status)
		}
	case strings.Contains(err.Error(), "i/o timeout"):
		t.Fatal("the agent still waits for the body of a stalled request")
	}
	if n := e.execCalls(); n != 0 {
		t.Errorf("%d exec calls reached the driver", n)
	}

	code, res, p := e.execSimple(w.ID, api.ExecRequest{Command: []string{"sh", "-c", "sleep 4; echo done"}})
	if code != http.StatusOK || res.Stdout != "done\n" {
		t.Errorf("an exec longer than the request timeout = %d %+v %+v", code, res, p)
	}
}
