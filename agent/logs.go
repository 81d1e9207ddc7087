package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/supervisor/monitor"
)

// followPoll is how often a followed log is checked for new output where
// inotify cannot tell (logWatch); followTick is the safety tick where it
// can: a follower is woken by writes to the log directory and by every
// change of state.
const (
	followPoll = 100 * time.Millisecond
	followTick = time.Second
)

// maxLine bounds one emitted line; longer output is split.
const maxLine = 64 << 10

// Logs streams a workload's output to emit, one line at a time (without the
// newline). Lines of stdout and stderr are each in order; between the two
// streams, order is only as good as the wake-ups (each a read of both).
func (a *Agent) Logs(ctx context.Context, ref string, opts api.LogOptions, emit func(stream string, line []byte) error) error {
	r, err := a.get(ref)
	if err != nil {
		return err
	}
	id := r.Workload.ID
	var streams []string
	switch opts.Stream {
	case "":
		streams = []string{"stdout", "stderr"}
	case "stdout", "stderr":
		streams = []string{opts.Stream}
	default:
		return errdefs.Invalid("stream", "%q is not one of stdout, stderr", opts.Stream)
	}
	readers := make([]*logReader, len(streams))
	for i, s := range streams {
		name := driver.StdoutLog
		if s == "stderr" {
			name = driver.StderrLog
		}
		lr, err := openLogReader(filepath.Join(a.logDir(id), name), s, opts.Tail)
		if err != nil {
			return err
		}
		defer lr.close()
		readers[i] = lr
	}
	for _, lr := range readers {
		if err := lr.drain(emit, false); err != nil {
			return err
		}
	}
	if !opts.Follow {
		for _, lr := range readers {
			if err := lr.flushPartial(emit); err != nil {
				return err
			}
		}
		return nil
	}
	wake, unsubscribe := a.logWatch.subscribe(a.logDir(id))
	defer unsubscribe()
	tick := followTick
	if wake == nil {
		tick = followPoll
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	for {
		// Read the state before the files: output written before the end
		// is then certain to be read by the final drain.
		_, changed := a.Index()
		ended := true
		if cur, err := a.get(id); err == nil {
			ended = cur.Workload.State.Terminal()
		}
		for _, lr := range readers {
			if err := lr.drain(emit, ended); err != nil {
				return err
			}
		}
		if ended {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		case <-wake:
		case <-changed:
		}
	}
}

// logReader reads complete lines from a growing log file and the files
// its monitor rotated it into (path.1 the newest; see monitor.RotatedLog):
// the older files first, then the live one, which it follows across
// rotations.
type logReader struct {
	path   string
	stream string
	// older are rotated files still to read, oldest first; the first is
	// read from olderOff.
	older    []string
	olderOff int64
	f        *os.File
	live     bool // f is the live file (not a rotated one)
	br       *bufio.Reader
	partial  []byte
}

// maxRotated bounds the rotated files a reader looks for.
const maxRotated = 1000

func openLogReader(path, stream string, tail int) (*logReader, error) {
	lr := &logReader{path: path, stream: stream}
	// Newest first: the live file, then path.1, path.2, ...
	files := []string{path}
	for i := 1; i <= maxRotated; i++ {
		p := monitor.RotatedLog(path, i)
		if _, err := os.Stat(p); err != nil {
			break
		}
		files = append(files, p)
	}
	first, off := len(files)-1, int64(0) // everything
	if tail >= 0 {
		first, off = 0, -1
		need := tail
		for i, p := range files {
			o, found, err := tailOffsetOf(p, need)
			if err != nil {
				return nil, err
			}
			first, off = i, o
			if found >= need {
				break
			}
			need -= found
			first, off = i, 0
			if i+1 < len(files) && !endsLine(files[i+1]) {
				// The older file's last line goes on in this one: counted
				// here already, it is counted there again.
				need++
			}
		}
	}
	for i := first; i >= 1; i-- {
		lr.older = append(lr.older, files[i])
	}
	if first > 0 {
		lr.olderOff = off
		return lr, nil
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return lr, nil // not written yet; opened on a later drain
	}
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	if off < 0 {
		off = 0
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	lr.f, lr.live, lr.br = f, true, bufio.NewReaderSize(f, 32<<10)
	return lr, nil
}

// tailOffsetOf is tailOffset of the file at path, with how many lines it
// found there (fewer than n when the file holds fewer); a missing file
// holds none.
func tailOffsetOf(path string, n int) (int64, int, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("open log: %w", err)
	}
	defer f.Close()
	return tailOffset(f, n)
}

// endsLine reports whether the file at path is empty or ends with a
// newline (a rotation may split a line between two files).
func endsLine(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return true
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return true
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, fi.Size()-1); err != nil {
		return true
	}
	return b[0] == '\n'
}

func (lr *logReader) close() {
	if lr.f != nil {
		lr.f.Close()
	}
}

// next opens the file to read after the current one: the next rotated
// file, or the live file. It reports false when there is none yet.
func (lr *logReader) next() (bool, error) {
	if lr.f != nil {
		lr.f.Close()
		lr.f = nil
	}
	for len(lr.older) > 0 {
		p, off := lr.older[0], lr.olderOff
		lr.older, lr.olderOff = lr.older[1:], 0
		f, err := os.Open(p)
		if errors.Is(err, os.ErrNotExist) {
			continue // rotated away meanwhile: its lines are lost to this reader
		}
		if err != nil {
			return false, err
		}
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return false, err
		}
		lr.f, lr.live, lr.br = f, false, bufio.NewReaderSize(f, 32<<10)
		return true, nil
	}
	f, err := os.Open(lr.path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	lr.f, lr.live, lr.br = f, true, bufio.NewReaderSize(f, 32<<10)
	return true, nil
}

// rotated reports whether the live file this reader holds was rotated
// away (path now names a newer file). The monitor writes nothing to a
// file after it renamed it, so what the reader's descriptor yields then is
// all it will ever hold.
func (lr *logReader) rotated() bool {
	held, err := lr.f.Stat()
	if err != nil {
		return false
	}
	cur, err := os.Stat(lr.path)
	return err == nil && !os.SameFile(held, cur)
}

// drain emits every complete line available now; with final it also emits
// a trailing line that has no newline. A line the rotation split between
// two files is emitted whole.
func (lr *logReader) drain(emit func(string, []byte) error, final bool) error {
	if lr.f == nil {
		if ok, err := lr.next(); !ok {
			return err
		}
	}
	for {
		chunk, err := lr.br.ReadSlice('\n')
		lr.partial = append(lr.partial, chunk...)
		switch {
		case err == nil:
			line := bytes.TrimSuffix(lr.partial, []byte{'\n'})
			if e := emit(lr.stream, line); e != nil {
				return e
			}
			lr.partial = lr.partial[:0]
		case errors.Is(err, bufio.ErrBufferFull):
			if len(lr.partial) >= maxLine {
				if e := emit(lr.stream, lr.partial); e != nil {
					return e
				}
				lr.partial = lr.partial[:0]
			}
		case errors.Is(err, io.EOF):
			if lr.live && !lr.rotated() {
				if final {
					return lr.flushPartial(emit)
				}
				return nil
			}
			if lr.live {
				// Rotated away: what was written before the rename is
				// read now, then the new live file.
				if err := lr.drainRest(emit); err != nil {
					return err
				}
			}
			if ok, err := lr.next(); !ok {
				if err == nil && final {
					return lr.flushPartial(emit)
				}
				return err
			}
		default:
			return err
		}
	}
}

// drainRest reads what is left of a file rotated away, to its end.
func (lr *logReader) drainRest(emit func(string, []byte) error) error {
	rest, err := io.ReadAll(lr.br)
	if err != nil {
		return err
	}
	lr.partial = append(lr.partial, rest...)
	for {
		i := bytes.IndexByte(lr.partial, '\n')
		if i < 0 {
			return nil
		}
		if err := emit(lr.stream, lr.partial[:i]); err != nil {
			return err
		}
		lr.partial = append(lr.partial[:0], lr.partial[i+1:]...)
	}
}

func (lr *logReader) flushPartial(emit func(string, []byte) error) error {
	if len(lr.partial) == 0 {
		return nil
	}
	err := emit(lr.stream, lr.partial)
	lr.partial = lr.partial[:0]
	return err
}

// tailOffset finds where the last n lines of f begin, reading backwards in
// blocks so a large log costs only what is returned, and how many lines it
// found (fewer than n: all of f's, from offset 0).
func tailOffset(f *os.File, n int) (int64, int, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, 0, err
	}
	size := fi.Size()
	if n == 0 {
		return size, 0, nil
	}
	const block = 32 << 10
	buf := make([]byte, block)
	end := size
	found := 0
	for end > 0 {
		start := max(end-block, 0)
		chunk := buf[:end-start]
		if _, err := f.ReadAt(chunk, start); err != nil && !errors.Is(err, io.EOF) {
			return 0, 0, err
		}
		for i := len(chunk) - 1; i >= 0; i-- {
			if chunk[i] != '\n' {
				continue
			}
			if start+int64(i) == size-1 {
				continue // the final newline ends the last line; it starts none
			}
			if found++; found == n {
				return start + int64(i) + 1, found, nil
			}
		}
		end = start
	}
	if size > 0 {
		found++ // the first line starts at 0
	}
	return 0, min(found, n), nil
}
