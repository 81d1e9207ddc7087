package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver/fake"
)

// A write into a watched log directory wakes its followers (and only
// theirs); the last follower to leave ends the watch.
func TestLogWatchWakesFollowers(t *testing.T) {
	var lw logWatch
	defer lw.close()
	a, b := t.TempDir(), t.TempDir()
	wakeA1, unsubA1 := lw.subscribe(a)
	wakeA2, unsubA2 := lw.subscribe(a)
	wakeB, unsubB := lw.subscribe(b)
	if wakeA1 == nil || wakeA2 == nil || wakeB == nil {
		t.Fatalf("no inotify watcher: %v", lw.err)
	}
	if err := os.WriteFile(filepath.Join(a, "stdout.log"), []byte("line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i, w := range []<-chan struct{}{wakeA1, wakeA2} {
		select {
		case <-w:
		case <-time.After(10 * time.Second):
			t.Fatalf("follower %d of the written directory was not woken", i)
		}
	}
	select {
	case <-wakeB:
		t.Error("a follower of another directory was woken")
	case <-time.After(100 * time.Millisecond):
	}
	if n := lw.watching(); n != 2 {
		t.Errorf("watching %d directories, want 2", n)
	}
	unsubA1()
	unsubA2()
	unsubB()
	if n := lw.watching(); n != 0 {
		t.Errorf("watching %d directories after every follower left, want 0", n)
	}
}

// A follower that starts before its workload's log directory exists (a
// client right after its submit) polls at first, then watches the
// directory once it is there: its output is not left to the poll.
func TestFollowerStartedBeforeTheLogsWatchesThem(t *testing.T) {
	e := newEnv(t)
	e.ctr.Delay("Start", time.Second)
	w := e.submit(sh("echo first; sleep 1000"))
	// The directory is made before the driver's Start is called (which
	// then takes a second): take it away once Start is called, as it is
	// for a follower that comes before the start.
	for deadline := time.Now().Add(10 * time.Second); !slices.Contains(e.ctr.Calls(), fake.Call{Method: "Start", ID: w.ID}); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the driver's Start was never called")
		}
	}
	dir := e.agent.logDir(w.ID)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lines := make(chan string, 10)
	done := make(chan error, 1)
	go func() {
		done <- e.agent.Logs(ctx, w.ID, api.LogOptions{Tail: -1, Follow: true}, func(_ string, l []byte, _ time.Time) error {
			lines <- string(l)
			return nil
		})
	}()
	time.Sleep(100 * time.Millisecond) // the follower runs, with nothing to watch
	if n := e.agent.logWatch.watching(); n != 0 {
		t.Fatalf("watching %d directories before the log directory exists", n)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-lines:
		if l != "first" {
			t.Errorf("first line %q", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the follower never saw the output")
	}
	if n := e.agent.logWatch.watching(); n != 1 {
		t.Errorf("watching %d directories once the log directory exists, want 1", n)
	}
	cancel()
	<-done
}
