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
	all, _ := logs(t, c, w.ID)
	lines := strings.Split(strings.TrimSuffix(all, "\n"), "\n")
	if len(lines) < 3000 || strings.Contains(all, "line 0 of the flood\n") {
		t.Errorf("all the kept output: %d lines; want the latest ~190 KiB and not the first line", len(lines))
	}
	// Consecutive: no line lost between the files.
	var first int
	fmt.Sscanf(lines[0], "line %d of the flood", &first)
	for i, l := range lines[:len(lines)-1] {
		if l != fmt.Sprintf("line %d of the flood", first+i) {
			t.Fatalf("line %d of the kept output is %q, want line %d", i, l, first+i)
		}
	}
	files, _ := filepath.Glob(filepath.Join(dataDir, "logs", w.ID, "stdout.log*"))
	if len(files) != 3 {
		t.Errorf("log files %v, want stdout.log and two rotated", files)
	}
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil && fi.Size() > 64<<10+32<<10 {
			t.Errorf("%s is %d bytes", f, fi.Size())
		}
	}
}
