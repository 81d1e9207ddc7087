package supervisor

import (
	"testing"
	"time"
)

// The function given to Then runs once the end comes, after Done is
// closed, whether it was given before the end or after.
func TestEndedThen(t *testing.T) {
	e := newEnded()
	ran := make(chan bool, 1)
	e.Then(func() {
		select {
		case <-e.Done():
			ran <- true
		default:
			ran <- false
		}
	})
	select {
	case <-ran:
		t.Fatal("ran before the end")
	case <-e.Done():
		t.Fatal("done before the end")
	case <-time.After(20 * time.Millisecond):
	}
	e.end()
	if !<-ran {
		t.Error("ran before Done was closed")
	}

	late := EndedAlready()
	<-late.Done()
	got := make(chan struct{})
	late.Then(func() { close(got) })
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("a function given after the end never ran")
	}
}
