package agent

import (
	"os"
	"path/filepath"
	"testing"
	"time"
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
