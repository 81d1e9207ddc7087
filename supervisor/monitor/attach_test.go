package monitor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serveHub serves h on an attach socket in a fresh task directory (deeper
// than a socket address holds, as a data dir may be) and returns it.
func serveHub(t *testing.T, h *hub) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := listenUnix(filepath.Join(dir, AttachSocket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	fi, err := os.Stat(filepath.Join(dir, AttachSocket))
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("attach socket: %v, %v; want a socket of mode 0600", fi.Mode(), err)
	}
	go h.serve(ln)
	return dir
}

func dial(t *testing.T, dir string, hello AttachHello) (*AttachConn, *AttachReply) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, reply, err := DialAttach(ctx, dir, hello)
	if err != nil {
		t.Fatalf("DialAttach: %v", err)
	}
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, reply
}

// readAll reads a session's output frames until its last frame.
func readAll(c *AttachConn) (out []byte, last byte, err error) {
	for {
		typ, payload, err := c.ReadFrame()
		if err != nil {
			return out, 0, err
		}
		switch typ {
		case FrameStdout, FrameStderr:
			out = append(out, payload...)
		case FrameEnd, FrameSlow:
			return out, typ, nil
		default:
			return out, typ, fmt.Errorf("unexpected frame %q", typ)
		}
	}
}

// Clients attaching with replay while output flows each get an exact
// suffix of the output: the newest AttachReplayMax bytes before the
// attach, then everything after, no byte lost or repeated.
func TestAttachReplayIsExactWhileOutputFlows(t *testing.T) {
	h := newHub(false, nil, nil)
	dir := serveHub(t, h)
	var all bytes.Buffer
	const lines, clients = 40000, 8
	attachNow := make(chan struct{}, clients)
	attached := make(chan struct{})
	go func() {
		next, asked := AttachReplayMax+1, 0
		for i := range lines {
			line := fmt.Appendf(nil, "%08d\n", i)
			all.Write(line)
			_, _ = h.out.Write(line)
			// Ask for an attach at points through the output, and
			// write on while it happens.
			if all.Len() >= next && asked < clients {
				attachNow <- struct{}{}
				asked++
				next += 32 << 10
			}
		}
		close(attachNow)
		<-attached
		h.end()
	}()
	type result struct {
		out  []byte
		last byte
		err  error
	}
	var wg sync.WaitGroup
	results := make(chan result, clients)
	for range attachNow {
		c, reply := dial(t, dir, AttachHello{Replay: true})
		if c == nil {
			t.Fatalf("attach refused: %+v", reply)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, last, err := readAll(c)
			results <- result{out, last, err}
		}()
	}
	close(attached)
	wg.Wait()
	close(results)
	if len(results) < 3 {
		t.Fatalf("only %d clients attached", len(results))
	}
	for r := range results {
		if r.err != nil || r.last != FrameEnd {
			t.Errorf("client ended with %v, frame %q", r.err, r.last)
			continue
		}
		if len(r.out) < AttachReplayMax {
			t.Errorf("client got %d bytes, less than the replay of %d", len(r.out), AttachReplayMax)
		}
		if !bytes.HasSuffix(all.Bytes(), r.out) {
			t.Errorf("client's %d bytes are not a suffix of the output (a byte lost or repeated)", len(r.out))
		}
	}
}

// A client that does not read is dropped with FrameSlow once its queue
// is full; the output's writer never waits for it, and a reading client gets
// everything.
func TestAttachSlowClientIsDropped(t *testing.T) {
	h := newHub(false, nil, nil)
	dir := serveHub(t, h)
	slow, _ := dial(t, dir, AttachHello{})
	fast, _ := dial(t, dir, AttachHello{})
	const total = 8 << 20
	// The reading client reports what it got; the writer keeps pace
	// with it, so only the stalled client falls behind.
	progress := make(chan int, 1024)
	fastOut := make(chan []byte, 1)
	go func() {
		var out []byte
		for {
			typ, payload, err := fast.ReadFrame()
			if err != nil || typ == FrameSlow {
				close(progress)
				fastOut <- nil
				return
			}
			if typ == FrameEnd {
				fastOut <- out
				return
			}
			out = append(out, payload...)
			progress <- len(out)
		}
	}()
	chunk := bytes.Repeat([]byte("x"), 32<<10)
	published := make(chan struct{})
	go func() {
		defer close(published)
		got := 0
		for i := range total / len(chunk) {
			_, _ = h.out.Write(chunk)
			for got < (i+1)*len(chunk) {
				n, ok := <-progress
				if !ok {
					return
				}
				got = n
			}
		}
		h.end()
	}()
	select {
	case <-published:
	case <-time.After(time.Minute):
		t.Fatal("the output's writer waits for a client that does not read")
	}
	if out := <-fastOut; len(out) != total {
		t.Errorf("the reading client got %d bytes, want %d and the end", len(out), total)
	}
	out, last, err := readAll(slow)
	if err != nil || last != FrameSlow {
		t.Errorf("the stalled client ended with %v, frame %q after %d bytes; want FrameSlow", err, last, len(out))
	}
	if len(out) >= total {
		t.Errorf("the stalled client got everything")
	}
	h.flush()
}

// Input from a client with stdin reaches the workload's stdin, one
// without is ignored; closing stdin is the workload's end of file.
func TestAttachStdin(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := newHub(false, w, nil)
	dir := serveHub(t, h)
	reader, _ := dial(t, dir, AttachHello{})
	writer, reply := dial(t, dir, AttachHello{Stdin: true})
	if !reply.Stdin || reply.TTY {
		t.Errorf("reply %+v: want stdin, no terminal", reply)
	}
	if _, err := reader.WriteStdin([]byte("ignored ")); err != nil {
		t.Fatal(err)
	}
	if _, err := writer.WriteStdin([]byte("typed")); err != nil {
		t.Fatal(err)
	}
	if err := writer.CloseStdin(); err != nil {
		t.Fatal(err)
	}
	done := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(r); done <- b }()
	select {
	case got := <-done:
		// The reader's frame may arrive before or after the writer's
		// close: it must never arrive at all.
		if string(got) != "typed" {
			t.Errorf("stdin read %q, want %q and its end", got, "typed")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("stdin never ended")
	}
}

// What the monitor refuses, it refuses with a reason the driver maps.
func TestAttachRefusals(t *testing.T) {
	h := newHub(true, nil, nil)
	dir := serveHub(t, h)
	if c, reply := dial(t, dir, AttachHello{Stdin: true}); c != nil || reply.Reason != RefuseNoStdin {
		t.Errorf("stdin of a task without: %+v", reply)
	}
	// A peer that does not say hello.
	fd, err := unix.Open(filepath.Join(dir, AttachSocket), unix.O_PATH, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	conn, err := net.Dial("unix", fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		t.Fatal(err)
	} else {
		_ = writeFrame(conn, FrameStdin, []byte("x"))
		typ, payload, err := readFrame(conn)
		if err != nil || typ != FrameReply || !strings.Contains(string(payload), RefuseBadRequest) {
			t.Errorf("no hello: %q %q %v", typ, payload, err)
		}
		conn.Close()
	}
	h.end()
	if c, reply := dial(t, dir, AttachHello{}); c != nil || reply.Reason != RefuseEnded {
		t.Errorf("an ended task: %+v", reply)
	}
	if _, _, err := DialAttach(context.Background(), t.TempDir(), AttachHello{}); !errors.Is(err, ErrNoAttachSocket) {
		t.Errorf("no socket: %v, want ErrNoAttachSocket", err)
	}
}

// Input a client sent right before it left reaches the workload, even
// while output flows to the client (its writer failing on the closed
// connection must not drop what the client sent).
func TestAttachInputBeforeDetachIsKept(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	h := newHub(false, w, nil)
	dir := serveHub(t, h)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		line := bytes.Repeat([]byte("o"), 4096)
		for {
			select {
			case <-stop:
				return
			default:
				_, _ = h.out.Write(line)
			}
		}
	}()
	const rounds = 30
	got := make(chan string, 1)
	go func() {
		b := make([]byte, 0, rounds*8)
		buf := make([]byte, 64)
		for len(b) < rounds*len("word-00;") {
			n, err := r.Read(buf)
			if err != nil {
				break
			}
			b = append(b, buf[:n]...)
		}
		got <- string(b)
	}()
	var want strings.Builder
	for i := range rounds {
		c, _ := dial(t, dir, AttachHello{Stdin: true})
		word := fmt.Sprintf("word-%02d;", i)
		want.WriteString(word)
		if _, err := c.WriteStdin([]byte(word)); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	select {
	case s := <-got:
		// Each client's input once; the clients' readers may take
		// their turns in any order.
		words, wantWords := strings.SplitAfter(s, ";"), strings.SplitAfter(want.String(), ";")
		slices.Sort(words)
		slices.Sort(wantWords)
		if !slices.Equal(words, wantWords) {
			t.Errorf("stdin read %q, want each of %q once", s, want.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the input of detached clients never arrived")
	}
}
