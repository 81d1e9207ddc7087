package agent

import (
	"path/filepath"
	"strings"
	"sync"

	"github.com/fsnotify/fsnotify"

	"github.com/berthd/berth/supervisor/monitor"
)

// logWatch tells log followers when a workload's log directory changes,
// through one inotify instance for the whole agent (the kernel allows a
// user few instances, and followers may be many): a follower reads new
// output as soon as it is written instead of on the next poll.
type logWatch struct {
	mu   sync.Mutex
	w    *fsnotify.Watcher
	err  error // why there is no watcher; followers then poll
	subs map[string]map[chan struct{}]struct{}
}

// subscribe returns a channel that receives (coalesced) whenever something
// in dir changes, and the function that ends the subscription. Without
// inotify it returns a nil channel: the caller polls.
func (lw *logWatch) subscribe(dir string) (<-chan struct{}, func()) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	if lw.w == nil && lw.err == nil {
		lw.w, lw.err = fsnotify.NewWatcher()
		if lw.err == nil {
			lw.subs = map[string]map[chan struct{}]struct{}{}
			go lw.run(lw.w)
		}
	}
	if lw.err != nil {
		return nil, func() {}
	}
	dir = filepath.Clean(dir)
	if lw.subs[dir] == nil {
		if err := lw.w.Add(dir); err != nil {
			return nil, func() {}
		}
		lw.subs[dir] = map[chan struct{}]struct{}{}
	}
	ch := make(chan struct{}, 1)
	lw.subs[dir][ch] = struct{}{}
	return ch, func() {
		lw.mu.Lock()
		defer lw.mu.Unlock()
		delete(lw.subs[dir], ch)
		if len(lw.subs[dir]) == 0 {
			delete(lw.subs, dir)
			_ = lw.w.Remove(dir) // gone already when the workload was deleted
		}
	}
}

// watching says how many directories have followers (tests).
func (lw *logWatch) watching() int {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return len(lw.subs)
}

func (lw *logWatch) run(w *fsnotify.Watcher) {
	for {
		select {
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if strings.HasSuffix(ev.Name, monitor.IndexSuffix) {
				// An index entry is written just before the output it
				// times: the output's own event wakes the followers.
				continue
			}
			lw.mu.Lock()
			for ch := range lw.subs[filepath.Dir(ev.Name)] {
				select {
				case ch <- struct{}{}:
				default: // a wake is pending: the follower reads it all
				}
			}
			lw.mu.Unlock()
		case _, ok := <-w.Errors:
			if !ok {
				return
			}
			// An overflow loses events, not output: followers also
			// read on a slow tick and on every state change.
		}
	}
}

// close stops the watcher.
func (lw *logWatch) close() {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	if lw.w != nil {
		_ = lw.w.Close()
	}
}
