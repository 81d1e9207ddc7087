package monitor

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// cappedLog appends to a log file up to a size, then rotates it (path
// becomes path.1, path.1 path.2, ..., and the oldest beyond files goes),
// so the node's disk holds at most (files+1) times max per stream and the
// workload's writes never block on it: a rotation is two renames and an
// open between two reads of the workload's pipe. With files 0 (a monitor
// configured before rotation), output past max is dropped instead, with
// one marker line. Beside each file it keeps the file's time index (see
// LogIndex), rotated with it.
type cappedLog struct {
	path    string
	f       *os.File
	max     int64
	files   int
	written int64
	capped  bool
	// createFailed: the file could not be created at a first write (said
	// once).
	createFailed bool
	idx          *indexWriter
	idxMax       int64
	now          func() time.Time
}

// openLog opens path for appending, so a respawned monitor continues the
// same file and the size counts what earlier monitors wrote. A log that
// does not exist yet is created by its first write: a workload that
// writes nothing to a stream costs no file (an inode fewer on every start
// of a short-lived workload; readers take a missing log for an empty
// one). Its directory must be one the monitor can write in.
func openLog(path string, max int64, files int) (*cappedLog, error) {
	l := &cappedLog{path: path, max: max, files: files, idxMax: indexMaxEntries(max), now: time.Now}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	switch {
	case err == nil:
		if err := l.take(f); err != nil {
			return nil, err
		}
	case errors.Is(err, os.ErrNotExist):
		// Fail now, not at the first output, where nobody would hear of
		// it: the directory must be there and writable.
		if err := unix.Access(filepath.Dir(path), unix.W_OK|unix.X_OK); err != nil {
			return nil, fmt.Errorf("open log: %s: %w", filepath.Dir(path), err)
		}
	default:
		return nil, fmt.Errorf("open log: %w", err)
	}
	l.idx = openIndex(path)
	return l, nil
}

// take makes f, opened for appending, the file the log writes to.
func (l *cappedLog) take(f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open log: %w", err)
	}
	l.f, l.written = f, fi.Size()
	return nil
}

// create creates the log's file at its first write.
func (l *cappedLog) create() error {
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	return l.take(f)
}

// NewLogWriter opens the log at path as the monitor writes it: rotated at
// max bytes with files rotated files kept, its writes timed in its index
// by clock (time.Now when nil). It is how tests and fakes write a log the
// agent reads as it reads a monitor's.
func NewLogWriter(path string, max int64, files int, clock func() time.Time) (io.WriteCloser, error) {
	l, err := openLog(path, max, files)
	if err != nil {
		return nil, err
	}
	if clock != nil {
		l.now = clock
	}
	return l, nil
}

func (l *cappedLog) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if l.f == nil {
		if err := l.create(); err != nil {
			// Tried again at the next write (the disk may have room
			// then); said once, in the monitor's own log.
			if !l.createFailed {
				l.createFailed = true
				fmt.Fprintf(os.Stderr, "berth-monitor: %v; output is dropped until it can be created\n", err)
			}
			return 0, err
		}
	}
	now := l.now().UnixNano()
	due := l.idx.due(now)
	idxFull := due && l.idxMax > 0 && l.idx.n >= l.idxMax
	if l.max > 0 && l.written > 0 && (l.written+int64(len(p)) > l.max || (idxFull && l.files > 0)) {
		if l.files > 0 {
			l.rotate()
		} else {
			if !l.capped {
				l.capped = true
				fmt.Fprintf(l.f, "\n[berth: log limit of %d bytes reached; further output is dropped]\n", l.max)
			}
			return len(p), nil
		}
	}
	// The entry goes first: a reader that sees the bytes finds their time.
	if l.idx.due(now) && (l.idxMax == 0 || l.idx.n < l.idxMax) && !l.idx.add(l.written, now) {
		l.idx.close()
		l.idx = nil
	}
	n, err := l.f.Write(p)
	l.written += int64(n)
	return n, err
}

// rotate moves the current file to path.1 (and each older one up a
// number) and starts an empty one. A rename that fails leaves the file
// where it is: the log then grows on rather than lose output.
// Each file's index moves with it.
func (l *cappedLog) rotate() {
	oldest := RotatedLog(l.path, l.files)
	_ = os.Remove(oldest)
	_ = os.Remove(LogIndex(oldest))
	for i := l.files - 1; i >= 1; i-- {
		from, to := RotatedLog(l.path, i), RotatedLog(l.path, i+1)
		if os.Rename(from, to) == nil {
			_ = os.Rename(LogIndex(from), LogIndex(to))
		}
	}
	if err := os.Rename(l.path, RotatedLog(l.path, 1)); err != nil {
		return
	}
	_ = os.Rename(LogIndex(l.path), LogIndex(RotatedLog(l.path, 1)))
	l.idx.close()
	l.idx = openIndex(l.path)
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		// Write on into the renamed file (untimed); the next write tries
		// again.
		l.idx.close()
		l.idx = nil
		return
	}
	l.f.Close()
	l.f, l.written = f, 0
}

// RotatedLog is the name of a log's i-th rotated file (1 is the newest).
func RotatedLog(path string, i int) string { return path + "." + strconv.Itoa(i) }

func (l *cappedLog) Close() error {
	l.idx.close()
	if l.f == nil {
		return nil
	}
	return l.f.Close()
}

// errOverflow is returned by a durable file written past its cap.
var errOverflow = fmt.Errorf("over its size limit")

// durableFile syncs every write (its last record is the workload's result)
// and refuses to grow past max: a guest that floods it is misbehaving.
type durableFile struct {
	f       *os.File
	max     int64
	written int64
}

func openDurable(path string, max int64) (*durableFile, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open output: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &durableFile{f: f, max: max, written: fi.Size()}, nil
}

func (d *durableFile) Write(p []byte) (int, error) {
	if d.max > 0 && d.written+int64(len(p)) > d.max {
		return 0, fmt.Errorf("%s: %d bytes written, limit %d: %w", d.f.Name(), d.written+int64(len(p)), d.max, errOverflow)
	}
	n, err := d.f.Write(p)
	d.written += int64(n)
	if err == nil {
		err = d.f.Sync()
	}
	return n, err
}

func (d *durableFile) Close() error { return d.f.Close() }
