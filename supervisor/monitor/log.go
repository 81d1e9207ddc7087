package monitor

import (
	"fmt"
	"os"
)

// cappedLog appends to a log file up to a size cap, then drops output (with
// one marker line) rather than fill the node's disk or block the workload.
type cappedLog struct {
	f       *os.File
	max     int64
	written int64
	capped  bool
}

// openLog opens path for appending, so a respawned monitor continues the
// same file and the cap counts what earlier monitors wrote.
func openLog(path string, max int64) (*cappedLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &cappedLog{f: f, max: max, written: fi.Size()}, nil
}

func (l *cappedLog) Write(p []byte) (int, error) {
	if l.max > 0 && l.written+int64(len(p)) > l.max {
		if !l.capped {
			l.capped = true
			fmt.Fprintf(l.f, "\n[berth: log limit of %d bytes reached; further output is dropped]\n", l.max)
		}
		return len(p), nil
	}
	n, err := l.f.Write(p)
	l.written += int64(n)
	return n, err
}

func (l *cappedLog) Close() error { return l.f.Close() }

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
