package supervisor

import "sync"

// Ended is a task's end as its monitor reports it: Done is closed once the
// monitor says the end is recorded (or has exited), and the function given
// to Then runs then, on the goroutine that saw the end. A running task so
// costs the agent one goroutine to follow it, not one more per party that
// waits for its end.
type Ended struct {
	done chan struct{}
	mu   sync.Mutex
	then func()
	over bool
}

func newEnded() *Ended { return &Ended{done: make(chan struct{})} }

// EndedAlready is an Ended whose end has come.
func EndedAlready() *Ended {
	e := newEnded()
	e.end()
	return e
}

// Done is closed when the task's end is recorded.
func (e *Ended) Done() <-chan struct{} { return e.done }

// Then has f run once the task has ended: on the goroutine that sees the
// end, or on a goroutine of its own when the end has come already. Only
// the last function given runs.
func (e *Ended) Then(f func()) {
	e.mu.Lock()
	if !e.over {
		e.then = f
		e.mu.Unlock()
		return
	}
	e.mu.Unlock()
	go f()
}

// end records the end: Done closes, then the function given to Then runs.
func (e *Ended) end() {
	e.mu.Lock()
	e.over = true
	f := e.then
	e.mu.Unlock()
	close(e.done)
	if f != nil {
		f()
	}
}
