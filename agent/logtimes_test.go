package agent

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/supervisor/monitor"
)

// stepClock is the clock of a log writer in a test: the time it is set to.
type stepClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *stepClock) now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *stepClock) set(t time.Time) { c.mu.Lock(); c.t = t; c.mu.Unlock() }

// timedLine is a line as Logs emits it.
type timedLine struct {
	line string
	at   time.Time
}

func readTimed(t *testing.T, e *env, id string, opts api.LogOptions) []timedLine {
	t.Helper()
	var out []timedLine
	err := e.agent.Logs(context.Background(), id, opts, func(_ string, l []byte, at time.Time) error {
		out = append(out, timedLine{string(l), at})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func linesOf(ls []timedLine) string {
	s := make([]string, len(ls))
	for i, l := range ls {
		s[i] = l.line
	}
	return strings.Join(s, ",")
}

// newMonitorLog replaces a running workload's stdout log with one written
// as the monitor writes it (index included), rotating at max bytes.
func newMonitorLog(t *testing.T, e *env, id string, max int64, clock func() time.Time) (string, io.WriteCloser) {
	t.Helper()
	path := filepath.Join(e.agent.logDir(id), "stdout.log")
	_ = os.Remove(path)
	w, err := monitor.NewLogWriter(path, max, 10, clock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return path, w
}

// Lines written at distinct times, across several rotations: since leaves
// out exactly the earlier ones (with and without a tail), each line has
// the time of the write that completed it, and a line the rotation split
// has the time of its second half.
func TestLogsSinceAndTimestampsAcrossRotation(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	base := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	clk := &stepClock{t: base}
	path, lw := newMonitorLog(t, e, w.ID, 40, clk.now) // about 5 lines a file
	at := func(i int) time.Time { return base.Add(time.Duration(i) * time.Second) }
	for i := range 20 {
		clk.set(at(i))
		if i == 12 {
			// A line in two writes: its time is the second's.
			fmt.Fprint(lw, "line-")
			clk.set(at(i).Add(500 * time.Millisecond))
			fmt.Fprint(lw, "12\n")
			continue
		}
		fmt.Fprintf(lw, "line-%d\n", i)
	}
	if _, err := os.Stat(monitor.RotatedLog(path, 3)); err != nil {
		t.Fatalf("the log did not rotate thrice: %v", err)
	}

	all := readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Timestamps: true})
	if len(all) != 20 {
		t.Fatalf("read %d lines: %s", len(all), linesOf(all))
	}
	for i, l := range all {
		want := at(i)
		if i == 12 {
			want = want.Add(500 * time.Millisecond)
		}
		if l.line != fmt.Sprintf("line-%d", i) || !l.at.Equal(want) {
			t.Errorf("line %d: %q at %v, want at %v", i, l.line, l.at, want)
		}
	}

	for _, tc := range []struct {
		since time.Time
		tail  int
		want  string
	}{
		{at(17), -1, "line-17,line-18,line-19"},
		{at(16).Add(time.Millisecond), -1, "line-17,line-18,line-19"},
		{at(12).Add(100 * time.Millisecond), -1, "line-12,line-13,line-14,line-15,line-16,line-17,line-18,line-19"},
		{at(3), 2, "line-18,line-19"},           // the tail is the later start
		{at(17), 10, "line-17,line-18,line-19"}, // since is
		{at(20), -1, ""},
		{base.Add(-time.Hour), -1, ""}, // everything kept; checked below
	} {
		got := linesOf(readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: tc.tail, Since: tc.since}))
		if tc.since.Before(base) {
			if got != linesOf(all) {
				t.Errorf("since before everything: %s", got)
			}
			continue
		}
		if got != tc.want {
			t.Errorf("since %v tail %d: %s, want %s", tc.since.Sub(base), tc.tail, got, tc.want)
		}
	}
	if got := linesOf(readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Since: at(1)})); got != linesOf(all[1:]) {
		t.Errorf("since the second line, in the oldest file: %s", got)
	}
}

// Follow with since: the history since then, then new lines as they are
// written, each timed by the real clock within the window of its write,
// in order.
func TestLogsFollowSinceWithRealTimes(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	_, lw := newMonitorLog(t, e, w.ID, 1<<20, nil)
	fmt.Fprintln(lw, "old")
	time.Sleep(20 * time.Millisecond)
	since := time.Now()
	time.Sleep(20 * time.Millisecond)
	type window struct{ from, to time.Time }
	var windows []window
	write := func(s string) {
		from := time.Now()
		fmt.Fprint(lw, s)
		windows = append(windows, window{from, time.Now()})
	}
	write("recent\n")

	seen := followTimed(t, e, w.ID, since)
	for i := range 3 {
		time.Sleep(30 * time.Millisecond)
		write(fmt.Sprintf("new-%d\n", i))
	}
	got := awaitLines(t, seen, "recent,new-0,new-1,new-2")
	for i, l := range got {
		// The index keeps the wall clock to the nanosecond; the
		// window's ends carry a monotonic reading beside it.
		if l.at.Before(windows[i].from.Round(0)) || l.at.After(windows[i].to.Round(0)) {
			t.Errorf("%s at %v, written in [%v, %v]", l.line, l.at, windows[i].from, windows[i].to)
		}
		if i > 0 && l.at.Before(got[i-1].at) {
			t.Errorf("%s at %v, before the line above it (%v)", l.line, l.at, got[i-1].at)
		}
	}
}

// followTimed follows a workload's stdout with times from since until the
// test ends; seen returns the lines it has had so far.
func followTimed(t *testing.T, e *env, id string, since time.Time) (seen func() []timedLine) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	var lines []timedLine
	done := make(chan error, 1)
	go func() {
		done <- e.agent.Logs(ctx, id, api.LogOptions{Stream: "stdout", Tail: -1, Follow: true, Since: since, Timestamps: true}, func(_ string, l []byte, at time.Time) error {
			mu.Lock()
			lines = append(lines, timedLine{string(l), at})
			mu.Unlock()
			return nil
		})
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return func() []timedLine {
		mu.Lock()
		defer mu.Unlock()
		return append([]timedLine(nil), lines...)
	}
}

// awaitLines waits until a follower has seen exactly want (its lines,
// comma-joined) and returns them.
func awaitLines(t *testing.T, seen func() []timedLine, want string) []timedLine {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := seen()
		if linesOf(got) == want {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("follower saw %q, want %q", linesOf(got), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A monitor creates a log's index with its first output: a follower that
// opened the log before there was any (and so found no index) times the
// lines written after, and since still leaves nothing out of them.
func TestLogsFollowTimesALogThatBeganEmpty(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	path, lw := newMonitorLog(t, e, w.ID, 1<<20, nil)
	if _, err := os.Stat(monitor.LogIndex(path)); !os.IsNotExist(err) {
		t.Fatalf("the empty log has an index: %v", err)
	}
	since := time.Now()
	seen := followTimed(t, e, w.ID, since)
	time.Sleep(100 * time.Millisecond) // the follower holds the empty log
	var from, to []time.Time
	for i := range 3 {
		from = append(from, time.Now())
		fmt.Fprintf(lw, "line-%d\n", i)
		to = append(to, time.Now())
		time.Sleep(20 * time.Millisecond)
	}
	for i, l := range awaitLines(t, seen, "line-0,line-1,line-2") {
		if l.at.Before(from[i].Round(0)) || l.at.After(to[i].Round(0)) {
			t.Errorf("%s at %v, written in [%v, %v]", l.line, l.at, from[i], to[i])
		}
	}
}

// A log an older monitor wrote (no index) is read as before: no times,
// and since goes by the file's modification time (the time of its last
// write), all of the file or none of it.
func TestLogsWithoutIndex(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	path := filepath.Join(e.agent.logDir(w.ID), "stdout.log")
	_ = os.Remove(path)
	appendLog(t, path, "a\nb\n")
	mtime := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	all := readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Timestamps: true})
	if linesOf(all) != "a,b" || !all[0].at.IsZero() || !all[1].at.IsZero() {
		t.Errorf("untimed log read as %+v", all)
	}
	if got := linesOf(readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Since: mtime.Add(-time.Second)})); got != "a,b" {
		t.Errorf("since before its last write: %q", got)
	}
	if got := linesOf(readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Since: mtime.Add(time.Second)})); got != "" {
		t.Errorf("since after its last write: %q", got)
	}

	// A new monitor continues it with an index: the old lines stay
	// untimed (written before the index's first entry, when exactly is
	// unknown, so since keeps them unless it is after that entry), the new
	// ones are timed.
	clk := &stepClock{t: mtime.Add(time.Hour)}
	lw, err := monitor.NewLogWriter(path, 0, 0, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	defer lw.Close()
	fmt.Fprintln(lw, "c")
	all = readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Timestamps: true})
	if linesOf(all) != "a,b,c" || !all[1].at.IsZero() || !all[2].at.Equal(clk.now()) {
		t.Errorf("continued log read as %+v", all)
	}
	if got := linesOf(readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Since: mtime.Add(time.Minute)})); got != "a,b,c" {
		t.Errorf("since between the two monitors: %q", got)
	}
	if got := linesOf(readTimed(t, e, w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Since: clk.now().Add(time.Second)})); got != "" {
		t.Errorf("since after the new monitor's write: %q", got)
	}
}
