package monitor

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fakeClock hands out the times a test sets.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

// Each write far enough from the last gets an entry with its offset and
// time; Seek finds the first write at or after a time, TimeAt the time of
// any byte.
func TestLogIndexRecordsWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clk := &fakeClock{t: base}
	w, err := NewLogWriter(path, 0, 0, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		clk.t = base.Add(time.Duration(i) * time.Second)
		fmt.Fprintf(w, "line %d\n", i) // 7 bytes each
	}
	w.Close()
	r, err := OpenIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for i := range 5 {
		off, ok := r.Seek(base.Add(time.Duration(i)*time.Second - time.Millisecond))
		if !ok || off != int64(7*i) {
			t.Errorf("seek to write %d: %d %v, want %d", i, off, ok, 7*i)
		}
	}
	if _, ok := r.Seek(base.Add(5 * time.Second)); ok {
		t.Error("seek past the last write found one")
	}
	for off := range int64(35) {
		got, ok := r.TimeAt(off)
		if want := base.Add(time.Duration(off/7) * time.Second); !ok || !got.Equal(want) {
			t.Errorf("time of byte %d: %v %v, want %v", off, got, ok, want)
		}
	}
}

// A log and its index are made by the log's first write: a stream that is
// never written has neither (a start creates no log files), the first
// write creates both, the index with that write's time, and a rotated
// file's successor gets its own index with its own first write. A log
// whose directory is missing fails at once, not at its first output.
func TestLogCreatedByTheFirstWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "stdout.log")
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clk := &fakeClock{t: base}
	quiet, err := NewLogWriter(filepath.Join(dir, "stderr.log"), 16, 2, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	w, err := NewLogWriter(path, 16, 2, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, LogIndex(path)} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s before any output: %v", p, err)
		}
	}
	if _, err := NewLogWriter(filepath.Join(dir, "missing", "stdout.log"), 16, 2, nil); err == nil {
		t.Error("a log in a missing directory opened")
	}
	if _, err := OpenIndex(path); err != ErrNoIndex {
		t.Fatalf("open the index of an empty log: %v", err)
	}
	fmt.Fprint(w, "0123456789\n") // 11 bytes
	r, err := OpenIndex(path)
	if err != nil {
		t.Fatalf("no index after the first write: %v", err)
	}
	if got, ok := r.TimeAt(0); !ok || !got.Equal(base) {
		t.Errorf("first byte at %v %v, want %v", got, ok, base)
	}
	r.Close()
	clk.t = base.Add(time.Second)
	fmt.Fprint(w, "abcdefghij\n") // past 16 bytes: rotates first
	w.Close()
	quiet.Close()
	for _, p := range []string{path, RotatedLog(path, 1)} {
		r, err := OpenIndex(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		want := base
		if p == path {
			want = base.Add(time.Second)
		}
		if got, ok := r.TimeAt(0); !ok || !got.Equal(want) {
			t.Errorf("%s: first byte at %v %v, want %v", p, got, ok, want)
		}
		r.Close()
	}
	for _, p := range []string{filepath.Join(dir, "stderr.log"), LogIndex(filepath.Join(dir, "stderr.log"))} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("a stream never written has %s: %v", p, err)
		}
	}
	// A monitor started again continues the index the first one made.
	clk.t = base.Add(2 * time.Second)
	w, err = NewLogWriter(path, 1<<10, 2, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(w, "more\n")
	w.Close()
	r, err = OpenIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got, ok := r.TimeAt(0); !ok || !got.Equal(base.Add(time.Second)) {
		t.Errorf("byte 0 after the restart at %v %v, want %v", got, ok, base.Add(time.Second))
	}
	if got, ok := r.TimeAt(11); !ok || !got.Equal(base.Add(2*time.Second)) {
		t.Errorf("the restarted monitor's byte at %v %v, want %v", got, ok, base.Add(2*time.Second))
	}
}

// A flood of writes within the granularity costs one entry; the clock
// stepping back does not make the index go back.
func TestLogIndexCoalescesAndStaysMonotonic(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clk := &fakeClock{t: base}
	w, err := NewLogWriter(path, 0, 0, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 1000 {
		clk.t = base.Add(time.Duration(i) * time.Microsecond / 2)
		w.Write([]byte("x"))
	}
	clk.t = base.Add(time.Second)
	w.Write([]byte("y"))
	clk.t = base.Add(-time.Hour) // the wall clock stepped back
	w.Write([]byte("z"))
	w.Close()
	fi, err := os.Stat(LogIndex(path))
	if err != nil {
		t.Fatal(err)
	}
	if n := (fi.Size() - indexHeaderSize) / indexEntrySize; n != 2 {
		t.Errorf("index holds %d entries, want 2 (the flood, then y and z)", n)
	}
	r, err := OpenIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got, _ := r.TimeAt(999); !got.Equal(base) {
		t.Errorf("the flood's last write is timed %v, want %v", got, base)
	}
	if got, _ := r.TimeAt(1001); !got.Equal(base.Add(time.Second)) {
		t.Errorf("the write after a clock step back is timed %v, want %v", got, base.Add(time.Second))
	}
}

// Indexes rotate with their logs, a full index rotates its log early, and
// a respawned monitor continues an index whose last entry was torn.
func TestLogIndexRotatesAndIsBounded(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clk := &fakeClock{t: base}
	const max = 4096
	w, err := NewLogWriter(path, max, 2, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3000 {
		clk.t = base.Add(time.Duration(i) * time.Second)
		w.Write([]byte("x\n")) // tiny writes far apart: an entry each
	}
	w.Close()
	limit := int64(indexHeaderSize) + indexMaxEntries(max)*indexEntrySize
	for _, p := range []string{path, RotatedLog(path, 1), RotatedLog(path, 2)} {
		lfi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		ifi, err := os.Stat(LogIndex(p))
		if err != nil {
			t.Fatal(err)
		}
		if ifi.Size() > limit || lfi.Size() > max {
			t.Errorf("%s: log %d bytes (max %d), index %d bytes (max %d)", p, lfi.Size(), max, ifi.Size(), limit)
		}
		// Each file's index times its own bytes: entry i at offset 2i.
		r, err := OpenIndex(p)
		if err != nil {
			t.Fatal(err)
		}
		first, _ := r.First()
		last, ok := r.TimeAt(lfi.Size() - 1)
		r.Close()
		if !ok || first.Offset != 0 || last.Sub(first.Time) != time.Duration(lfi.Size()/2-1)*time.Second {
			t.Errorf("%s: first entry %+v, last byte at %v: not its own writes", p, first, last)
		}
	}
	if _, err := os.Stat(LogIndex(RotatedLog(path, 3))); !os.IsNotExist(err) {
		t.Errorf("a third rotated index is kept: %v", err)
	}

	// A torn entry (a monitor killed mid-write) is cut off by the next.
	f, err := os.OpenFile(LogIndex(path), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte{1, 2, 3})
	f.Close()
	clk.t = base.Add(time.Hour * 24)
	w, err = NewLogWriter(path, max, 2, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	w.Write([]byte("after\n"))
	w.Close()
	fi, _ := os.Stat(path)
	r, err := OpenIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if off, ok := r.Seek(base.Add(time.Hour * 23)); !ok || off != fi.Size()-6 {
		t.Errorf("the respawned monitor's write is at %d %v, want %d", off, ok, fi.Size()-6)
	}
}

// A log an older monitor wrote has no index; one it began has entries
// only from where the index starts.
func TestLogIndexMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	if err := os.WriteFile(path, []byte("old\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenIndex(path); err != ErrNoIndex {
		t.Fatalf("open a missing index: %v", err)
	}
	w, err := NewLogWriter(path, 0, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	w.Write([]byte("new\n"))
	after := time.Now()
	w.Close()
	r, err := OpenIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, ok := r.TimeAt(2); ok {
		t.Error("a byte the older monitor wrote has a time")
	}
	if got, ok := r.TimeAt(5); !ok || got.Before(before.Truncate(0)) || got.After(after) {
		t.Errorf("the new write's time %v %v is outside [%v, %v]", got, ok, before, after)
	}
}

// An index that cannot be written never fails or stops the log: the
// output is all there, untimed.
func TestLogIndexUnwritableLeavesTheLogAlone(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	if err := os.Mkdir(LogIndex(path), 0o755); err != nil { // not a file
		t.Fatal(err)
	}
	w, err := NewLogWriter(path, 64, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if _, err := fmt.Fprintf(w, "line %02d\n", i); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	w.Close()
	data, err := os.ReadFile(path)
	if err != nil || len(data) == 0 {
		t.Fatalf("the live log: %q %v", data, err)
	}
	if _, err := os.Stat(RotatedLog(path, 1)); err != nil {
		t.Errorf("the log did not rotate: %v", err)
	}
}

// The cost of timing a log: writes of one line each without the index
// (the baseline), with it (a flood: writes within a millisecond share an
// entry), and with an entry for every write (a clock that moves 1 ms a
// write: the worst case), in the same run.
func BenchmarkLogWrite(b *testing.B) {
	line := []byte("a line of output of an ordinary length, as services write them\n")
	for _, mode := range []string{"untimed", "timed", "timed-entry-per-write"} {
		b.Run(mode, func(b *testing.B) {
			l, err := openLog(filepath.Join(b.TempDir(), "stdout.log"), 64<<20, 3)
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			switch mode {
			case "untimed":
				l.idx.close()
				l.idx = nil
			case "timed-entry-per-write":
				t := time.Now()
				l.now = func() time.Time { t = t.Add(IndexGranularity); return t }
			}
			b.SetBytes(int64(len(line)))
			for b.Loop() {
				if _, err := l.Write(line); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Reading every byte's time of a log of 100,000 entries, forward, as the
// agent does for --timestamps.
func BenchmarkIndexTimeAt(b *testing.B) {
	path := filepath.Join(b.TempDir(), "stdout.log")
	t := time.Now()
	w, err := NewLogWriter(path, 0, 0, func() time.Time { t = t.Add(IndexGranularity); return t })
	if err != nil {
		b.Fatal(err)
	}
	const n = 100_000
	for range n {
		w.Write([]byte("a line\n"))
	}
	w.Close()
	b.ResetTimer()
	for b.Loop() {
		r, err := OpenIndex(path)
		if err != nil {
			b.Fatal(err)
		}
		for off := int64(6); off < 7*n; off += 7 {
			if _, ok := r.TimeAt(off); !ok {
				b.Fatal("no time")
			}
		}
		r.Close()
	}
}
