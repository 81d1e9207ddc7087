package daemon_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// TestAttachContainerAndVMAlike runs `berth run -it` and `berth run -i` as
// the API sees them, in a container and in a VM of the same spec, and
// expects the same: a shell on a terminal of the attach's size whose typed
// commands run and whose exit code is the session's end, its output in the
// log too; and a stdin pipe that ends at the client's end of file.
func TestAttachContainerAndVMAlike(t *testing.T) {
	requireLibvirt(t)
	c, addr := serve(t, withVMs(t, testConfig(t, vmDataDir(t), "127.0.0.1:0")))
	importBusybox(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	// The OpenAPI checker of c reads HTTP bodies; a WebSocket is none.
	ws, err := client.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	type pair struct{ shell, pipe string }
	ids := map[api.Isolation]pair{}
	for _, iso := range []api.Isolation{api.IsolationContainer, api.IsolationVM} {
		shell := api.WorkloadSpec{Image: testImage, Command: []string{"sh"}, Stdin: true, TTY: true, Isolation: iso, Network: api.NetworkNone}
		pipe := api.WorkloadSpec{Image: testImage, Command: []string{"sh", "-c", "cat; echo cat-ended; echo to-stderr >&2; exit 3"}, Stdin: true, Isolation: iso, Network: api.NetworkNone}
		var p pair
		for _, s := range []struct {
			spec api.WorkloadSpec
			id   *string
		}{{shell, &p.shell}, {pipe, &p.pipe}} {
			w, err := c.Submit(ctx, s.spec)
			if err != nil {
				t.Fatalf("submit %s: %v", iso, err)
			}
			*s.id = w.ID
		}
		ids[iso] = p
	}
	got := map[api.Isolation]string{}
	for iso, p := range ids {
		waitRunning(t, c, p.shell)
		waitRunning(t, c, p.pipe)

		s, err := ws.Attach(ctx, p.shell, api.AttachRequest{Stdin: true, Logs: true, Size: &api.TermSize{Rows: 30, Cols: 100}})
		if err != nil {
			t.Fatalf("%s: attach: %v", iso, err)
		}
		// The quotes tell the commands' output from the terminal's echo.
		if _, err := s.Write([]byte("test -t 0 && echo is-a-'tty'; stty size; echo hel''lo-$((6*7)); exit 7\n")); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		end, err := s.Wait(&out, &out)
		s.Close()
		if err != nil {
			t.Fatalf("%s: attach session: %v (output %q)", iso, err, out.String())
		}
		term := out.String()
		summary := fmt.Sprintf("exit %d tty %v size %v hello %v", *end.ExitCode,
			strings.Contains(term, "is-a-tty"), strings.Contains(term, "30 100"), strings.Contains(term, "hello-42"))
		if log, _ := logs(t, c, p.shell); !strings.Contains(log, "hello-42") {
			t.Errorf("%s: the shell's log %q lacks its terminal output", iso, log)
		}

		s, err = ws.Attach(ctx, p.pipe, api.AttachRequest{Stdin: true})
		if err != nil {
			t.Fatalf("%s: attach to the pipe: %v", iso, err)
		}
		if _, err := s.Write([]byte("line one\n")); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseStdin(); err != nil {
			t.Fatal(err)
		}
		var stdout, stderr bytes.Buffer
		end, err = s.Wait(&stdout, &stderr)
		s.Close()
		if err != nil {
			t.Fatalf("%s: pipe session: %v", iso, err)
		}
		got[iso] = summary + fmt.Sprintf("; pipe exit %d stdout %q stderr %q", *end.ExitCode, stdout.String(), stderr.String())
	}
	want := `exit 7 tty true size true hello true; pipe exit 3 stdout "line one\ncat-ended\n" stderr "to-stderr\n"`
	for iso, g := range got {
		if g != want {
			t.Errorf("%s:\n got  %s\n want %s", iso, g, want)
		}
	}
}
