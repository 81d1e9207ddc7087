package daemon_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/supervisor/monitor"
)

// A container that writes far past its log size keeps running; the log
// rotates (the live file and two rotated ones, none much past the size),
// and logs returns the latest output across the rotated files.
func TestLogRotationKeepsTheWorkloadRunning(t *testing.T) {
	c, dataDir := startAgent(t)
	ctx := context.Background()
	spec := sh(`i=0; while [ $i -lt 20000 ]; do echo "line $i of the flood"; i=$((i+1)); done; echo done-writing; sleep 1000`)
	spec.Logs = &api.LogSpec{MaxBytes: 64 << 10, MaxFiles: 2}
	w, err := c.Submit(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, _ := logs(t, c, w.ID)
		if strings.Contains(out, "done-writing") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workload never finished writing; its log ends %q", out[max(len(out)-200, 0):])
		}
		time.Sleep(200 * time.Millisecond)
	}
	got, _, err := c.Get(ctx, w.ID, nil)
	if err != nil || got.State != api.StateRunning {
		t.Fatalf("after writing 500 KiB into a 64 KiB log: %v %+v", err, got)
	}
	var tail []string
	if err := c.Logs(ctx, w.ID, api.LogOptions{Stream: "stdout", Tail: 3}, func(l api.LogLine) error { tail = append(tail, l.Line); return nil }); err != nil {
		t.Fatal(err)
	}
	if want := []string{"line 19998 of the flood", "line 19999 of the flood", "done-writing"}; fmt.Sprint(tail) != fmt.Sprint(want) {
		t.Errorf("tail 3: %q, want %q", tail, want)
	}
	// Every kept line carries the time the monitor recorded, in order,
	// within the workload's life so far, across the rotated files.
	var prev time.Time
	n := 0
	err = c.Logs(ctx, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Timestamps: true}, func(l api.LogLine) error {
		n++
		switch {
		case l.Time == nil:
			t.Errorf("%q has no time", l.Line)
		case l.Time.Before(prev) || l.Time.Before(w.CreatedAt) || l.Time.After(time.Now()):
			t.Errorf("%q at %v: after %v, or outside [%v, now]", l.Line, l.Time, prev, w.CreatedAt)
		default:
			prev = *l.Time
		}
		return nil
	})
	if err != nil || n < 3000 {
		t.Fatalf("logs with timestamps: %d lines, %v", n, err)
	}
	all, _ := logs(t, c, w.ID)
	lines := strings.Split(strings.TrimSuffix(all, "\n"), "\n")
	if len(lines) < 3000 || strings.Contains(all, "line 0 of the flood\n") {
		t.Errorf("all the kept output: %d lines; want the latest ~190 KiB and not the first line", len(lines))
	}
	// The oldest kept file may begin with the rest of a line whose start
	// went with a rotated-away file (a rotation falls between two reads of
	// the workload's pipe, and a read may end inside a line): that
	// fragment is what is kept of that line.
	var first int
	if _, err := fmt.Sscanf(lines[0], "line %d of the flood", &first); err != nil && len(lines) > 1 {
		lines = lines[1:]
		fmt.Sscanf(lines[0], "line %d of the flood", &first)
	}
	// Consecutive: no line lost between the files.
	for i, l := range lines[:len(lines)-1] {
		if l != fmt.Sprintf("line %d of the flood", first+i) {
			t.Fatalf("line %d of the kept output is %q, want line %d", i, l, first+i)
		}
	}
	matches, _ := filepath.Glob(filepath.Join(dataDir, "logs", w.ID, "stdout.log*"))
	var files []string
	for _, f := range matches {
		if !strings.HasSuffix(f, monitor.IndexSuffix) {
			files = append(files, f)
		}
	}
	if len(files) != 3 {
		t.Errorf("log files %v, want stdout.log and two rotated", files)
	}
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil && fi.Size() > 64<<10+32<<10 {
			t.Errorf("%s is %d bytes", f, fi.Size())
		}
	}
}

// since and timestamps on a real container's output: lines written a
// second apart are told apart, and since keeps exactly the later ones,
// also for a follower.
func TestLogsSinceOnAContainer(t *testing.T) {
	c, _ := startAgent(t)
	ctx := context.Background()
	w, err := c.Submit(ctx, sh(`echo first; sleep 1; echo second; sleep 2; echo third; sleep 1000`))
	if err != nil {
		t.Fatal(err)
	}
	read := func(opts api.LogOptions) []api.LogLine {
		t.Helper()
		var out []api.LogLine
		opts.Stream, opts.Timestamps = "stdout", true
		if err := c.Logs(ctx, w.ID, opts, func(l api.LogLine) error { out = append(out, l); return nil }); err != nil {
			t.Fatal(err)
		}
		return out
	}
	var got []api.LogLine
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		if got = read(api.LogOptions{Tail: -1}); len(got) >= 2 {
			got = got[:2]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workload wrote %+v", got)
		}
	}
	if got[0].Time == nil || got[1].Time == nil || !got[1].Time.After(got[0].Time.Add(500*time.Millisecond)) {
		t.Fatalf("lines a second apart: %+v", got)
	}
	later := read(api.LogOptions{Tail: -1, Since: got[0].Time.Add(time.Nanosecond)})
	if len(later) != 1 || later[0].Line != "second" {
		t.Errorf("since just after the first line: %+v", later)
	}
	if again := read(api.LogOptions{Tail: -1, Since: *got[0].Time}); len(again) < 2 || again[0].Line != "first" {
		t.Errorf("since the first line's own time: %+v", again)
	}
	// A follower since the second line sees it, then the third when it
	// comes.
	fctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var followed []string
	err = c.Logs(fctx, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Follow: true, Since: *got[1].Time}, func(l api.LogLine) error {
		followed = append(followed, l.Line)
		if l.Line == "third" {
			cancel()
		}
		return nil
	})
	if err != nil || strings.Join(followed, ",") != "second,third" {
		t.Errorf("follower since the second line: %q %v", followed, err)
	}
}
