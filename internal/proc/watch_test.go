package proc

import (
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A watch of a live process never reports it gone because a signal
// interrupted its check: the agent killed live containers when it did (a
// re-attached monitor taken for dead while SIGCHLDs of other children
// arrived). Each round watches a live process 100 times under a flood of
// signals, checks that no watch ended, then ends the process and checks
// that every watch saw it.
func TestWatchIsNotEndedBySignals(t *testing.T) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// Signals of the kinds an agent gets all the time, as fast as they go.
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				_ = syscall.Kill(syscall.Getpid(), syscall.SIGCHLD)
				_ = syscall.Kill(syscall.Getpid(), syscall.SIGURG)
			}
		}
	})
	defer func() {
		close(stop)
		wg.Wait()
	}()
	watches := 0
	for round := range 20 {
		cmd := exec.Command("sleep", "30")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		id, err := Identify(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		var chans []<-chan struct{}
		for range 100 {
			ch, err := Watch(id)
			if err != nil {
				t.Fatalf("round %d: watch a live process: %v", round, err)
			}
			chans = append(chans, ch)
		}
		watches += len(chans)
		time.Sleep(20 * time.Millisecond)
		for _, ch := range chans {
			select {
			case <-ch:
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("round %d: a watch reported the process gone while it runs", round)
			default:
			}
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		for _, ch := range chans {
			select {
			case <-ch:
			case <-time.After(10 * time.Second):
				t.Fatalf("round %d: the process's end was not seen", round)
			}
		}
	}
	t.Logf("%d watches of live processes under signals", watches)
}
