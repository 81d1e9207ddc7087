package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
)

const cliSecret = "cli-s3cr3t-91aa"

func TestSecretEnvFlags(t *testing.T) {
	t.Setenv("FROM_ENV", cliSecret+"-env")
	file := write(t, t.TempDir(), "s.env", "# comment\n\nFILE_A="+cliSecret+"-file\r\nFILE_B=a=b\n")
	got, err := secretEnv([]string{"FROM_ENV", "LITERAL=" + cliSecret, "EMPTY="}, file, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"FROM_ENV": cliSecret + "-env", "LITERAL": cliSecret, "EMPTY": "", "FILE_A": cliSecret + "-file", "FILE_B": "a=b"}
	if len(got) != len(want) {
		t.Errorf("got %d variables, want %d", len(got), len(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: got a different value", k)
		}
	}
	if got, err := secretEnv(nil, "-", strings.NewReader("S="+cliSecret+"\n")); err != nil || got["S"] != cliSecret {
		t.Errorf("from stdin: %v", err)
	}
	if got, err := secretEnv(nil, "", nil); err != nil || got != nil {
		t.Errorf("none: %v %v", got, err)
	}
	// Errors name the flag, the line or the variable, never a value.
	for _, c := range []struct {
		flags []string
		stdin string
	}{
		{[]string{"=" + cliSecret}, ""},
		{[]string{"NOT_SET_ANYWHERE_91aa"}, ""},
		{nil, "GOOD=x\n" + cliSecret + "\n"},
		{nil, " =" + cliSecret + "\n"},
	} {
		file := ""
		if c.stdin != "" {
			file = "-"
		}
		_, err := secretEnv(c.flags, file, strings.NewReader(c.stdin))
		if err == nil {
			t.Errorf("%v %q: no error", c.flags, c.stdin)
		} else if strings.Contains(err.Error(), cliSecret) {
			t.Errorf("the error quotes the value: %v", err)
		}
	}
}

// berth run --secret-env-file - sends the secrets, the workload gets them,
// and nothing the CLI prints holds one.
func TestRunWithSecretEnv(t *testing.T) {
	dir := t.TempDir()
	imgs, err := image.New(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(ociimage.WriteOCIArchive(pw, img, "berth.test/busybox:latest")) }()
	if _, err := imgs.Import(context.Background(), pr, ""); err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), agent.Options{
		DataDir:  dir,
		Drivers:  []driver.Driver{fake.New("container", fake.NewNode())},
		Images:   imgs,
		Capacity: &api.NodeResources{CPU: 64, MemoryMB: 1 << 16},
		Defaults: agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// Record what the CLI sends.
	var mu sync.Mutex
	var sent []string
	srv := server.New(a, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/v1/workloads" {
			body, _ := io.ReadAll(r.Body)
			mu.Lock()
			sent = append(sent, string(body))
			mu.Unlock()
			r.Body = io.NopCloser(strings.NewReader(string(body)))
		}
		srv.ServeHTTP(w, r)
	}))
	defer hs.Close()

	t.Setenv("FROM_ENV", cliSecret+"-env")
	var err2 error
	out, errOut := captureStdio(t, func() {
		err2, _, _ = berth(t, "A="+cliSecret+"\n", "--addr", hs.URL, "-o", "json", "run", "--name", "s",
			"--secret-env-file", "-", "--secret-env", "FROM_ENV", "berth.test/busybox:latest", "--", "sh", "-c", "echo $A $FROM_ENV")
	})
	if err2 != nil {
		t.Fatalf("run: %v\n%s", err2, errOut)
	}
	if !strings.Contains(out, `"secret_env"`) || strings.Contains(out+errOut, cliSecret) {
		t.Errorf("the CLI printed a secret, or not the workload:\n%s\n%s", out, errOut)
	}
	mu.Lock()
	if len(sent) != 1 || !strings.Contains(sent[0], `"secret_env":{`) || !strings.Contains(sent[0], cliSecret+"-env") {
		t.Errorf("the CLI sent %q", sent)
	}
	mu.Unlock()
	w, err := a.Get(context.Background(), "s")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(w.Spec.SecretEnv)
	if string(data) != `{"A":"\u003credacted\u003e","FROM_ENV":"\u003credacted\u003e"}` {
		t.Errorf("the workload's secret_env: %s", data)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !w.State.Terminal() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		w, _ = a.Get(context.Background(), w.ID)
	}
	var lines []string
	_ = a.Logs(context.Background(), w.ID, api.LogOptions{Tail: -1}, func(_ string, l []byte, _ time.Time) error {
		lines = append(lines, string(l))
		return nil
	})
	if len(lines) != 1 || lines[0] != cliSecret+" "+cliSecret+"-env" {
		t.Errorf("the workload printed %q", lines)
	}
	// inspect names the secrets, and prints no value.
	out, _ = captureStdio(t, func() { err, _, _ = berth(t, "", "--addr", hs.URL, "inspect", "s") })
	if err != nil || strings.Contains(out, cliSecret) || !strings.Contains(out, "A, FROM_ENV (values not shown)") {
		t.Errorf("inspect: %v\n%s", err, out)
	}
	_ = a.Delete(context.Background(), w.ID, true)
}

// captureStdio runs fn with os.Stdout and os.Stderr going to pipes (the
// workload commands print there directly) and returns what it printed.
func captureStdio(t *testing.T, fn func()) (stdout, stderr string) {
	t.Helper()
	read := func(f **os.File) (func() string, error) {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		old := *f
		*f = w
		done := make(chan string)
		go func() {
			data, _ := io.ReadAll(r)
			r.Close()
			done <- string(data)
		}()
		return func() string {
			*f = old
			w.Close()
			return <-done
		}, nil
	}
	outDone, err := read(&os.Stdout)
	if err != nil {
		t.Fatal(err)
	}
	errDone, err := read(&os.Stderr)
	if err != nil {
		outDone()
		t.Fatal(err)
	}
	fn()
	return outDone(), errDone()
}
