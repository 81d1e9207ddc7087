// Package filewatch keeps a configuration file in step with the process:
// it watches the file and its directory and calls a reload function once
// per burst of changes. The policy file and the tokens file both use it.
package filewatch

import (
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Debounce is how long a watcher waits after the last file event before it
// reloads. Editors and config managers write a file in several steps
// (truncate and write, or write a temporary file and rename it over);
// reading after the burst sees the finished file once.
const Debounce = 100 * time.Millisecond

// Watcher watches one file.
type Watcher struct {
	file   string
	w      *fsnotify.Watcher
	reload func()
	onErr  func(error)
	stop   chan struct{}
	done   chan struct{}
}

// Watch starts watching file (an absolute path) and its directory, calls
// reload once (a change between the caller's first read and the watch would
// go unseen otherwise), then again after every burst of changes. Watching
// the directory is what makes atomic replacement work: a rename over the
// file replaces the inode a watch on the file alone would follow, and a
// Kubernetes ConfigMap volume swaps a symlink next to it. The file itself is
// watched too: when it is a symlink, writes to its target show up only
// there. onErr hears of watcher errors.
func Watch(file string, reload func(), onErr func(error)) (*Watcher, error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	if err := w.Add(filepath.Dir(file)); err != nil {
		w.Close()
		return nil, err
	}
	_ = w.Add(file)
	fw := &Watcher{file: file, w: w, reload: reload, onErr: onErr, stop: make(chan struct{}), done: make(chan struct{})}
	reload()
	go fw.loop()
	return fw, nil
}

func (fw *Watcher) loop() {
	defer close(fw.done)
	var (
		timer *time.Timer
		fire  <-chan time.Time
	)
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		select {
		case <-fw.stop:
			return
		case ev, ok := <-fw.w.Events:
			if !ok {
				return
			}
			if ev.Op == fsnotify.Chmod {
				// Touching permissions or times changes no content.
				continue
			}
			if timer == nil {
				timer = time.NewTimer(Debounce)
			} else {
				timer.Reset(Debounce)
			}
			fire = timer.C
		case err, ok := <-fw.w.Errors:
			if !ok {
				return
			}
			if fw.onErr != nil {
				fw.onErr(err)
			}
		case <-fire:
			fire = nil
			fw.reload()
			// A rename over the file dropped the watch on the old inode;
			// watch the new one (the directory watch covers a missing file).
			_ = fw.w.Add(fw.file)
		}
	}
}

// Done is closed when the watcher has stopped.
func (fw *Watcher) Done() <-chan struct{} { return fw.done }

// Close stops watching and waits until no reload runs.
func (fw *Watcher) Close() error {
	close(fw.stop)
	<-fw.done
	return fw.w.Close()
}
