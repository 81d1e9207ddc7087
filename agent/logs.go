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

// logReader reads complete lines from a growing log file.
type logReader struct {
	path    string
	stream  string
	f       *os.File
	br      *bufio.Reader
	partial []byte
}

func openLogReader(path, stream string, tail int) (*logReader, error) {
	lr := &logReader{path: path, stream: stream}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return lr, nil // not written yet; opened on a later drain
	}
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	lr.f, lr.br = f, bufio.NewReaderSize(f, 32<<10)
	if tail >= 0 {
		off, err := tailOffset(f, tail)
		if err != nil {
			f.Close()
			return nil, err
		}
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return nil, err
		}
		lr.br.Reset(f)
	}
	return lr, nil
}

func (lr *logReader) close() {
	if lr.f != nil {
		lr.f.Close()
	}
}

// drain emits every complete line available now; with final it also emits
// a trailing line that has no newline.
func (lr *logReader) drain(emit func(string, []byte) error, final bool) error {
	if lr.f == nil {
		f, err := os.Open(lr.path)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		lr.f, lr.br = f, bufio.NewReaderSize(f, 32<<10)
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
			if final {
				return lr.flushPartial(emit)
			}
			return nil
		default:
			return err
		}
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
// blocks so a large log costs only what is returned.
func tailOffset(f *os.File, n int) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	size := fi.Size()
	if n == 0 {
		return size, nil
	}
	const block = 32 << 10
	buf := make([]byte, block)
	end := size
	found := 0
	for end > 0 {
		start := max(end-block, 0)
		chunk := buf[:end-start]
		if _, err := f.ReadAt(chunk, start); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		for i := len(chunk) - 1; i >= 0; i-- {
			if chunk[i] != '\n' {
				continue
			}
			if start+int64(i) == size-1 {
				continue // the final newline ends the last line; it starts none
			}
			if found++; found == n {
				return start + int64(i) + 1, nil
			}
		}
		end = start
	}
	return 0, nil
}
