package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/daemon"
)

const runcSecret = "runc-s3cr3t-5c2e0b"

// lockedLog is an agent log a test reads while the agent writes it.
type lockedLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *lockedLog) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.buf.Bytes())
}

// filesHolding lists the regular files under dir whose content holds s.
func filesHolding(t *testing.T, dir, s string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) || os.IsPermission(err) {
				return nil // a task's file that came and went
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err == nil && bytes.Contains(data, []byte(s)) {
			out = append(out, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rootOnly reports whether no host user but root can read path: the file
// is root's and not readable by others, or a directory on the way to it
// below dataDir is root's and closed to others (and to its group, unless
// the group is root's).
func rootOnly(dataDir, path string) bool {
	closed := func(p string, dir bool) bool {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil || st.Uid != 0 {
			return false
		}
		bits := uint32(0o004) // others read
		if dir {
			bits = 0o001 // others search
		}
		if st.Mode&bits != 0 {
			return false
		}
		if st.Gid != 0 && st.Mode&(bits<<3) != 0 {
			return false
		}
		return true
	}
	if closed(path, false) {
		return true
	}
	for d := filepath.Dir(path); strings.HasPrefix(d, dataDir+string(filepath.Separator)); d = filepath.Dir(d) {
		if closed(d, true) {
			return true
		}
	}
	return false
}

// TestSecretEnvOnRunc: a secret reaches a container on real runc (its
// output shows it), every file on the node that holds it is root's alone
// (the secrets file 0600 in a 0700 directory, the bundle's config.json,
// the output the workload itself printed), and it is absent from every
// answer (GET, list as JSON), the event stream, the audit log, the
// agent's log at debug and the state database. A delete removes its
// secrets file, and nothing under the data dir holds it after.
func TestSecretEnvOnRunc(t *testing.T) {
	requireRunc(t)
	dataDir := t.TempDir()
	cfg := testConfig(t, dataDir, "127.0.0.1:0")
	agentLogs := &lockedLog{}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, daemon.Options{Version: "test",
		Logger: slog.New(slog.NewJSONHandler(agentLogs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	c, err := client.New(d.Addr(), checked(t))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		deleteAll(t, c)
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	importBusybox(t, c)

	// The event stream, open before the submit.
	var evMu sync.Mutex
	var events bytes.Buffer
	evCtx, evCancel := context.WithCancel(context.Background())
	evDone := make(chan struct{})
	go func() {
		defer close(evDone)
		_ = c.Events(evCtx, client.EventOptions{}, nil, func(e api.Event) error {
			evMu.Lock()
			defer evMu.Unlock()
			events.WriteString(e.Type + " " + e.WorkloadID + " " + e.Message + " " + strings.Join(attrs(e), " ") + "\n")
			return nil
		})
	}()
	time.Sleep(100 * time.Millisecond)

	spec := sh(`echo "got=$TOKEN"; exec sleep 60`)
	spec.Name = "secretive"
	spec.SecretEnv = map[string]string{"TOKEN": runcSecret}
	w, err := c.Submit(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, w.ID)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, _ := logs(t, c, w.ID)
		if strings.Contains(out, "got="+runcSecret) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container printed %q, not the secret", out)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The secrets file, and every other file that holds the value.
	secretsDir := filepath.Join(dataDir, "secrets")
	secretsFile := filepath.Join(secretsDir, w.ID+".json")
	for p, want := range map[string]os.FileMode{secretsDir: os.ModeDir | 0o700, secretsFile: 0o600} {
		if fi, err := os.Stat(p); err != nil || fi.Mode() != want {
			t.Errorf("%s: %v %v, want %v", p, fi.Mode(), err, want)
		}
	}
	holders := filesHolding(t, dataDir, runcSecret)
	t.Logf("files holding the secret while it runs: %v", holders)
	var sawBundle bool
	for _, p := range holders {
		rel, _ := filepath.Rel(dataDir, p)
		switch {
		case rel == "state.db", rel == "audit.log":
			t.Errorf("%s holds the secret", rel)
		case strings.HasSuffix(rel, "/bundle/config.json"):
			sawBundle = true
		}
		if !rootOnly(dataDir, p) {
			t.Errorf("%s holds the secret and another host user may read it", rel)
		}
	}
	if !sawBundle {
		t.Errorf("no bundle config.json holds the secret (the container got it some other way?): %v", holders)
	}

	// Answers, as the wire has them.
	for _, path := range []string{"/v1/workloads/" + w.ID, "/v1/workloads/secretive", "/v1/workloads"} {
		resp, err := http.Get("http://" + d.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || bytes.Contains(body, []byte(runcSecret)) || !bytes.Contains(body, []byte(`"TOKEN":"\u003credacted\u003e"`)) {
			t.Errorf("GET %s: %d %s", path, resp.StatusCode, body)
		}
	}

	if err := c.Delete(context.Background(), w.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(secretsFile); !os.IsNotExist(err) {
		t.Errorf("the secrets file after delete: %v", err)
	}
	if left := filesHolding(t, dataDir, runcSecret); len(left) > 0 {
		t.Errorf("after delete, files still hold the secret: %v", left)
	}
	evCancel()
	<-evDone
	evMu.Lock()
	stream := events.String()
	evMu.Unlock()
	if !strings.Contains(stream, w.ID) {
		t.Errorf("the event stream showed nothing of %s:\n%s", w.ID, stream)
	}
	audit, err := os.ReadFile(filepath.Join(dataDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(audit, []byte(w.ID)) {
		t.Errorf("the audit log does not record the submit:\n%s", audit)
	}
	db, err := os.ReadFile(filepath.Join(dataDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	agentLog := agentLogs.Bytes()
	if !bytes.Contains(agentLog, []byte(w.ID)) {
		t.Errorf("the agent's log was not captured:\n%s", agentLog)
	}
	for what, data := range map[string][]byte{"the event stream": []byte(stream), "the audit log": audit, "the agent's log": agentLog, "the state database": db} {
		if bytes.Contains(data, []byte(runcSecret)) {
			t.Errorf("%s holds the secret", what)
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(agentLog))
	for sc.Scan() {
		if strings.Contains(sc.Text(), `"level":"ERROR"`) {
			t.Errorf("agent error: %s", sc.Text())
		}
	}
}

func attrs(e api.Event) []string {
	var out []string
	for k, v := range e.Attrs {
		out = append(out, k+"="+v)
	}
	return out
}
