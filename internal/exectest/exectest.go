// Package exectest drives exec sessions through berth's Go client, for the
// tests of the API (over the fake driver) and of the daemon (over runc).
package exectest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// Sessions runs n exec sessions into workload id at once and returns what
// went wrong: even ones the simple form, odd ones WebSocket sessions
// (every other one on a terminal), a third of those leaving at once (the
// agent then kills their process). Session i prints i, then sleeps for
// 0.MARKER seconds, so a test finds its processes by "sleep 0.MARKER".
func Sessions(ctx context.Context, c *client.Client, id string, n int, marker string) []error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			cmd := []string{"sh", "-c", fmt.Sprintf("echo %d; sleep 0.%s", i, marker)}
			if i%2 == 0 {
				res, err := c.Exec(ctx, id, api.ExecRequest{Command: cmd})
				if err == nil && (res.ExitCode != 0 || res.Stdout != fmt.Sprintf("%d\n", i)) {
					err = fmt.Errorf("simple exec %d: %+v", i, res)
				}
				errs <- err
				return
			}
			sess, err := c.ExecStream(ctx, id, api.ExecRequest{Command: cmd, TTY: i%4 == 1, Stdin: true})
			if err != nil {
				errs <- err
				return
			}
			defer sess.Close()
			if i%3 == 0 {
				return
			}
			var out bytes.Buffer
			exit, err := sess.Wait(&out, io.Discard)
			if err == nil && (*exit.ExitCode != 0 || !strings.Contains(out.String(), fmt.Sprint(i))) {
				err = fmt.Errorf("session %d: %+v %q", i, exit, out.String())
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	var out []error
	for err := range errs {
		if err != nil {
			out = append(out, err)
		}
	}
	return out
}

// ReadUntil reads r until what it read contains want.
func ReadUntil(t testing.TB, r io.Reader, want string) {
	t.Helper()
	var seen []byte
	buf := make([]byte, 1024)
	for !strings.Contains(string(seen), want) {
		n, err := r.Read(buf)
		seen = append(seen, buf[:n]...)
		if err != nil {
			t.Fatalf("output %q ended (%v) before %q", seen, err, want)
		}
	}
}
