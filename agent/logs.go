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

// LogEmit receives one line of a workload's output: its stream, the line
// without its newline (valid only during the call) and the time it was
// written (zero when unknown).
type LogEmit = func(stream string, line []byte, at time.Time) error

// Logs streams a workload's output to emit, one line at a time (without the
// newline), with the time of the write that completed the line (zero when
// the log records none: see monitor.LogIndex). Lines of stdout and stderr
// are each in order; between the two streams, order is only as good as the
// wake-ups (each a read of both). With opts.Since, lines written before it
// are left out.
func (a *Agent) Logs(ctx context.Context, ref string, opts api.LogOptions, emit LogEmit) error {
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
		lr, err := openLogReader(filepath.Join(a.logDir(id), name), s, opts.Tail, opts.Since, opts.Timestamps || !opts.Since.IsZero())
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
	// A follower that starts before the workload does (berth run, a
	// client right after its submit) finds no log directory to watch yet:
	// it polls, and watches as soon as the directory is there.
	wake, unsubscribe := a.logWatch.subscribe(a.logDir(id))
	defer func() { unsubscribe() }()
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
		if wake == nil {
			if w, u := a.logWatch.subscribe(a.logDir(id)); w != nil {
				// Watched from now on; what was written before the
				// watch began is read by draining once more.
				wake, unsubscribe = w, u
				ticker.Reset(followTick)
				continue
			}
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
// rotations. A timed reader also reads each file's time index, to give
// each line the time of the write that completed it and to leave out the
// lines written before since.
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
	timed    bool
	since    time.Time
	idx      *monitor.IndexReader // f's index (nil: none, or untimed)
	// idxLooked: this drain looked for the live file's index already.
	idxLooked bool
	pos       int64 // f's offset of the next byte br yields
}

// maxRotated bounds the rotated files a reader looks for.
const maxRotated = 1000

func openLogReader(path, stream string, tail int, since time.Time, timed bool) (*logReader, error) {
	lr := &logReader{path: path, stream: stream, timed: timed, since: since}
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
		off = max(off, 0)
	}
	if !since.IsZero() {
		si, so, err := sinceOffset(files, since)
		if err != nil {
			return nil, err
		}
		if si < first || (si == first && so > off) {
			first, off = si, so // the later of the two starts
		}
	}
	for i := first; i >= 1; i-- {
		lr.older = append(lr.older, files[i])
	}
	if first > 0 {
		lr.olderOff = off
		return lr, nil
	}
	if err := lr.open(path, off, true); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return lr, nil // not written yet; opened on a later drain
		}
		return nil, err
	}
	return lr, nil
}

// sinceOffset finds where in files (newest first) the first line written
// at or after since begins, by binary search in each file's index from the
// newest back. A file without an index (an older monitor's) counts as
// written at its modification time: all before since when that is, else
// all of it is read.
func sinceOffset(files []string, since time.Time) (int, int64, error) {
	ci, co := 0, int64(0) // nothing before now: the live file's end
	if fi, err := os.Stat(files[0]); err == nil {
		co = fi.Size()
	}
	for i, p := range files {
		off, all, err := sinceInFile(p, since)
		if err != nil {
			return 0, 0, err
		}
		if off < 0 {
			break // all before since
		}
		if all {
			ci, co = i, 0
			continue
		}
		ci, co = i, off
		break
	}
	return lineStart(files, ci, co)
}

// sinceInFile says where in the log at path the bytes written at or after
// since begin: -1 when none are, and all when every byte of it is (or may
// be: bytes an older monitor wrote before the index began).
func sinceInFile(path string, since time.Time) (off int64, all bool, err error) {
	idx, err := monitor.OpenIndex(path)
	if err != nil && !errors.Is(err, monitor.ErrNoIndex) {
		return 0, false, err
	}
	if idx != nil {
		defer idx.Close()
		if first, ok := idx.First(); ok {
			off, ok := idx.Seek(since)
			if !ok {
				return -1, false, nil
			}
			return off, off <= first.Offset, nil
		}
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, true, nil
	}
	if err != nil {
		return 0, false, err
	}
	if fi.ModTime().Before(since) {
		return -1, false, nil
	}
	return 0, true, nil
}

// lineStart moves an offset in files[i] back to the start of its line,
// into the older file where the rotation split that line.
func lineStart(files []string, i int, off int64) (int, int64, error) {
	if off > 0 {
		f, err := os.Open(files[i])
		if errors.Is(err, os.ErrNotExist) {
			return i, 0, nil
		}
		if err != nil {
			return 0, 0, fmt.Errorf("open log: %w", err)
		}
		defer f.Close()
		const block = 32 << 10
		buf := make([]byte, block)
		for end := off; end > 0; {
			start := max(end-block, 0)
			chunk := buf[:end-start]
			if _, err := f.ReadAt(chunk, start); err != nil && !errors.Is(err, io.EOF) {
				return 0, 0, err
			}
			if j := bytes.LastIndexByte(chunk, '\n'); j >= 0 {
				return i, start + int64(j) + 1, nil
			}
			end = start
		}
	}
	if i+1 < len(files) && !endsLine(files[i+1]) {
		o, _, err := tailOffsetOf(files[i+1], 1)
		return i + 1, o, err
	}
	return i, 0, nil
}

// open makes the file at p, from off, the one the reader reads, with its
// index when timed. The log and its index are opened by name, so a
// rotation between the two opens would pair a file with its successor's
// index: the reader checks that p still names the file it opened, and
// tries again when not.
func (lr *logReader) open(p string, off int64, live bool) error {
	var f *os.File
	var idx *monitor.IndexReader
	for range 3 {
		var err error
		if f, err = os.Open(p); err != nil {
			return err
		}
		if !lr.timed {
			break
		}
		if idx, err = monitor.OpenIndex(p); err != nil {
			if !errors.Is(err, monitor.ErrNoIndex) {
				f.Close()
				return err
			}
			idx = nil
		}
		held, err1 := f.Stat()
		cur, err2 := os.Stat(p)
		if err1 == nil && err2 == nil && os.SameFile(held, cur) {
			break
		}
		if idx != nil {
			idx.Close()
			idx = nil
		}
		f.Close()
		f = nil
	}
	if f == nil {
		// Rotated under us each time: read the file untimed.
		var err error
		if f, err = os.Open(p); err != nil {
			return err
		}
	}
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		f.Close()
		if idx != nil {
			idx.Close()
		}
		return err
	}
	lr.f, lr.idx, lr.live, lr.pos, lr.idxLooked = f, idx, live, off, false
	lr.br = bufio.NewReaderSize(f, 32<<10)
	return nil
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

func (lr *logReader) closeFile() {
	if lr.f != nil {
		lr.f.Close()
		lr.f = nil
	}
	if lr.idx != nil {
		lr.idx.Close()
		lr.idx = nil
	}
}

func (lr *logReader) close() { lr.closeFile() }

// next opens the file to read after the current one: the next rotated
// file, or the live file. It reports false when there is none yet.
func (lr *logReader) next() (bool, error) {
	lr.closeFile()
	for len(lr.older) > 0 {
		p, off := lr.older[0], lr.olderOff
		lr.older, lr.olderOff = lr.older[1:], 0
		err := lr.open(p, off, false)
		if errors.Is(err, os.ErrNotExist) {
			continue // rotated away meanwhile: its lines are lost to this reader
		}
		if err != nil {
			return false, err
		}
		return true, nil
	}
	err := lr.open(lr.path, 0, true)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
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

// findIndex looks again for the index of the live file the reader holds:
// the monitor creates a log's index with its first entry, written before
// the bytes it times, so a reader that opened the file before any output
// finds the index once there is output to time. An index found after the
// file was rotated away belongs to its successor and is left alone.
func (lr *logReader) findIndex() {
	idx, err := monitor.OpenIndex(lr.path)
	if err != nil {
		return
	}
	held, err1 := lr.f.Stat()
	cur, err2 := os.Stat(lr.path)
	if err1 != nil || err2 != nil || !os.SameFile(held, cur) {
		idx.Close()
		return
	}
	lr.idx = idx
}

// emitLine emits the pending line, which ends at lr.pos (exclusive), with
// the time of its last byte; a line written before since is left out.
func (lr *logReader) emitLine(emit LogEmit, line []byte) error {
	var at time.Time
	if lr.idx == nil && lr.timed && lr.live && !lr.idxLooked {
		// Looked for after the line's bytes were read: an index is
		// written before the bytes it times.
		lr.idxLooked = true
		lr.findIndex()
	}
	if lr.idx != nil && lr.pos > 0 {
		at, _ = lr.idx.TimeAt(lr.pos - 1)
	}
	if !at.IsZero() && at.Before(lr.since) {
		return nil
	}
	return emit(lr.stream, line, at)
}

// drain emits every complete line available now; with final it also emits
// a trailing line that has no newline. A line the rotation split between
// two files is emitted whole.
func (lr *logReader) drain(emit LogEmit, final bool) error {
	if lr.f == nil {
		if ok, err := lr.next(); !ok {
			return err
		}
	}
	lr.idxLooked = false
	for {
		chunk, err := lr.br.ReadSlice('\n')
		lr.partial = append(lr.partial, chunk...)
		lr.pos += int64(len(chunk))
		switch {
		case err == nil:
			line := bytes.TrimSuffix(lr.partial, []byte{'\n'})
			if e := lr.emitLine(emit, line); e != nil {
				return e
			}
			lr.partial = lr.partial[:0]
		case errors.Is(err, bufio.ErrBufferFull):
			if len(lr.partial) >= maxLine {
				if e := lr.emitLine(emit, lr.partial); e != nil {
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
func (lr *logReader) drainRest(emit LogEmit) error {
	rest, err := io.ReadAll(lr.br)
	if err != nil {
		return err
	}
	// Offsets of what rest adds to partial end at pos+len(rest).
	end := lr.pos + int64(len(rest))
	base := end - int64(len(lr.partial)) - int64(len(rest)) // f's offset of partial[0]
	lr.partial = append(lr.partial, rest...)
	for {
		i := bytes.IndexByte(lr.partial, '\n')
		if i < 0 {
			lr.pos = end
			return nil
		}
		lr.pos = base + int64(i) + 1
		if err := lr.emitLine(emit, lr.partial[:i]); err != nil {
			return err
		}
		base += int64(i) + 1
		lr.partial = append(lr.partial[:0], lr.partial[i+1:]...)
	}
}

func (lr *logReader) flushPartial(emit LogEmit) error {
	if len(lr.partial) == 0 {
		return nil
	}
	err := lr.emitLine(emit, lr.partial)
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
