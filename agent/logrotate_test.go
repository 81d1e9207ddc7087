package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/supervisor/monitor"
)

// rotateLike moves a log as the monitor rotates it (path.1 the newest).
func rotateLike(t *testing.T, path string, files int) {
	t.Helper()
	_ = os.Remove(monitor.RotatedLog(path, files))
	for i := files - 1; i >= 1; i-- {
		_ = os.Rename(monitor.RotatedLog(path, i), monitor.RotatedLog(path, i+1))
	}
	if err := os.Rename(path, monitor.RotatedLog(path, 1)); err != nil {
		t.Fatal(err)
	}
}

func appendLog(t *testing.T, path, s string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(s); err != nil {
		t.Fatal(err)
	}
}

// logs reads across the rotated files: everything in order, a tail that
// reaches into older files, a line the rotation split emitted whole, and
// a follower that sees the output written after a rotation.
func TestLogsAcrossRotation(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	path := filepath.Join(e.agent.logDir(w.ID), "stdout.log")
	_ = os.Remove(path)
	appendLog(t, path, "one\ntwo\n")
	rotateLike(t, path, 2)
	appendLog(t, path, "three\nfo")
	rotateLike(t, path, 2)
	appendLog(t, path, "ur\nfive\n")

	read := func(tail int) string {
		var out []string
		err := e.agent.Logs(context.Background(), w.ID, api.LogOptions{Stream: "stdout", Tail: tail}, func(_ string, l []byte, _ time.Time) error {
			out = append(out, string(l))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(out, ",")
	}
	if got := read(-1); got != "one,two,three,four,five" {
		t.Errorf("all: %s", got)
	}
	if got := read(3); got != "three,four,five" {
		t.Errorf("tail 3: %s", got)
	}
	if got := read(1); got != "five" {
		t.Errorf("tail 1: %s", got)
	}

	// Follow, then rotate under the follower and write on.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var seen []string
	done := make(chan error, 1)
	go func() {
		done <- e.agent.Logs(ctx, w.ID, api.LogOptions{Stream: "stdout", Tail: 0, Follow: true}, func(_ string, l []byte, _ time.Time) error {
			mu.Lock()
			seen = append(seen, string(l))
			mu.Unlock()
			return nil
		})
	}()
	time.Sleep(200 * time.Millisecond)
	appendLog(t, path, "six\n")
	rotateLike(t, path, 2)
	for i := range 3 {
		appendLog(t, path, fmt.Sprintf("after-%d\n", i))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		got := strings.Join(seen, ",")
		mu.Unlock()
		if got == "six,after-0,after-1,after-2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("follower saw %q", got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	<-done
}

// A spec's log rotation is the node's default where it names none, and
// may not pass the operator's maxima.
func TestLogSpecWithinTheOperatorsMaximum(t *testing.T) {
	def := defaultsLikeConfig
	def.Logs = LogDefaults{MaxBytes: 16 << 20, MaxFiles: 3, MaxBytesLimit: 256 << 20, MaxFilesLimit: 10}
	spec := sh("true")
	spec.Image = testImage
	got, err := normalize(spec, def)
	if err != nil || got.Logs == nil || *got.Logs != (api.LogSpec{MaxBytes: 16 << 20, MaxFiles: 3}) {
		t.Fatalf("default: %+v %v", got.Logs, err)
	}
	spec.Logs = &api.LogSpec{MaxFiles: 5}
	if got, err = normalize(spec, def); err != nil || *got.Logs != (api.LogSpec{MaxBytes: 16 << 20, MaxFiles: 5}) {
		t.Errorf("max_files 5: %+v %v", got.Logs, err)
	}
	for field, l := range map[string]api.LogSpec{
		"logs.max_bytes": {MaxBytes: 1 << 30},
		"logs.max_files": {MaxFiles: 11},
	} {
		spec.Logs = &l
		_, err := normalize(spec, def)
		var v *errdefs.ValidationError
		if !errors.As(err, &v) || len(v.Fields) != 1 || v.Fields[0].Field != field {
			t.Errorf("%+v: %v, want a bad %s", l, err, field)
		}
	}
}
