package monitor

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"time"
)

// A log's time index records when its bytes were written, beside the log
// (whose format other readers rely on, so it stays raw bytes): the file
// LogIndex(path) holds a header and then fixed-size entries, each the
// offset in the log at which a write began and the wall-clock time of that
// write (Unix nanoseconds, never decreasing within a file). Writes less
// than IndexGranularity after the last entry add none: their bytes carry
// that entry's time, so a flood of tiny writes costs at most one entry per
// millisecond. An index rotates with its log (path.1.idx beside path.1)
// and is bounded like it: at most indexMaxEntries(max) entries per file,
// and a file whose index is full rotates early. The entry is written
// before the bytes it describes, so a reader that sees the bytes finds
// their time.
const (
	// IndexSuffix names a log's index: path + IndexSuffix.
	IndexSuffix = ".idx"
	// IndexGranularity is the coalescing window of an index: a byte's
	// recorded time is at most this much before the write that carried it.
	IndexGranularity = time.Millisecond

	indexEntrySize  = 16
	indexHeaderSize = 16
	indexMinEntries = 256
)

var indexMagic = []byte("BERTHIX1")

// LogIndex is the path of the time index of the log file at path (a live
// or a rotated one).
func LogIndex(path string) string { return path + IndexSuffix }

// indexMaxEntries bounds one index file: a quarter of its log's size, and
// never below indexMinEntries; 0 (no size limit) leaves it unbounded like
// the log.
func indexMaxEntries(max int64) int64 {
	if max <= 0 {
		return 0
	}
	return int64(indexMinEntries) + max/4/indexEntrySize
}

// indexWriter appends entries to one log file's index. It never fails its
// log's writes: an index that cannot be written is dropped (its log's
// later bytes then have no recorded time). A new index is created with
// its first entry, not with its log: a workload that writes nothing to a
// stream costs no index file (two inodes fewer on every start of a
// short-lived workload), and a log without bytes needs no times.
type indexWriter struct {
	path  string   // the index's own path
	f     *os.File // nil until the first entry creates the file
	n     int64    // entries in the file
	lastT int64    // time of the last entry (Unix ns)
}

// openIndex opens the index of the log at path, continuing what an
// earlier monitor wrote: a torn last entry is cut off, and a file that is
// not an index is started again. A missing index is created by the first
// entry (add).
func openIndex(path string) *indexWriter {
	w := &indexWriter{path: LogIndex(path)}
	f, err := os.OpenFile(w.path, os.O_RDWR|os.O_APPEND, 0)
	if errors.Is(err, os.ErrNotExist) {
		return w
	}
	if err != nil {
		return nil
	}
	w.f = f
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil
	}
	if fi.Size() >= indexHeaderSize {
		hdr := make([]byte, indexHeaderSize)
		if _, err := f.ReadAt(hdr, 0); err == nil && bytes.Equal(hdr[:len(indexMagic)], indexMagic) {
			w.n = (fi.Size() - indexHeaderSize) / indexEntrySize
			if err := f.Truncate(indexHeaderSize + w.n*indexEntrySize); err != nil {
				f.Close()
				return nil
			}
			if w.n > 0 {
				e := make([]byte, indexEntrySize)
				if _, err := f.ReadAt(e, indexHeaderSize+(w.n-1)*indexEntrySize); err == nil {
					w.lastT = int64(binary.LittleEndian.Uint64(e[8:]))
				}
			}
			return w
		}
	}
	if err := w.start(); err != nil {
		f.Close()
		return nil
	}
	return w
}

// start makes w.f an empty index: its header and no entry.
func (w *indexWriter) start() error {
	if err := w.f.Truncate(0); err != nil {
		return err
	}
	hdr := make([]byte, indexHeaderSize)
	copy(hdr, indexMagic)
	_, err := w.f.Write(hdr)
	return err
}

// due reports whether a write at now (Unix ns) needs an entry of its own.
func (w *indexWriter) due(now int64) bool {
	return w != nil && (w.n == 0 || now-w.lastT >= int64(IndexGranularity))
}

// add records that the bytes from off on were written at now (kept from
// going back when the wall clock steps back), creating the index with its
// first entry. It reports false when the index could not be written and
// is closed.
func (w *indexWriter) add(off, now int64) bool {
	if w.f == nil {
		f, err := os.OpenFile(w.path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return false
		}
		w.f = f
		if err := w.start(); err != nil {
			return false
		}
	}
	now = max(now, w.lastT)
	var e [indexEntrySize]byte
	binary.LittleEndian.PutUint64(e[:8], uint64(off))
	binary.LittleEndian.PutUint64(e[8:], uint64(now))
	if _, err := w.f.Write(e[:]); err != nil {
		// A torn entry is cut off by the next opener.
		return false
	}
	w.n++
	w.lastT = now
	return true
}

func (w *indexWriter) close() {
	if w != nil && w.f != nil {
		w.f.Close()
	}
}

// IndexReader reads the index of one log file: binary search by time
// (Seek) and, for a reader going forward through the log, the time of
// each offset (TimeAt).
type IndexReader struct {
	f *os.File
	// first is the first entry, when the index holds one.
	first    IndexEntry
	hasFirst bool
	// cur is the entry the cursor is on (cursor < 0: none yet) and next
	// the one after it, if read.
	cursor  int64
	cur     IndexEntry
	next    IndexEntry
	hasNext bool
	// blk caches whole entries read from entry blkStart on: entries are
	// never changed once written, so a reader going forward reads the
	// index a block at a time.
	blk      []byte
	blkStart int64
}

// indexBlock is how many bytes of entries a reader reads at once.
const indexBlock = 256 * indexEntrySize

// IndexEntry is one entry of an index: the bytes from Offset on were
// written at Time (to IndexGranularity).
type IndexEntry struct {
	Offset int64
	Time   time.Time
}

// ErrNoIndex says a log has no time index (written by a monitor that
// recorded none).
var ErrNoIndex = errors.New("the log has no time index")

// OpenIndex opens the index of the log file at path; ErrNoIndex when
// there is none or it is not one.
func OpenIndex(path string) (*IndexReader, error) {
	f, err := os.Open(LogIndex(path))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoIndex
	}
	if err != nil {
		return nil, fmt.Errorf("open log index: %w", err)
	}
	hdr := make([]byte, indexHeaderSize)
	if _, err := io.ReadFull(f, hdr); err != nil || !bytes.Equal(hdr[:len(indexMagic)], indexMagic) {
		f.Close()
		return nil, ErrNoIndex
	}
	r := &IndexReader{f: f, cursor: -1}
	r.first, r.hasFirst = r.entry(0)
	return r, nil
}

// Close closes the index.
func (r *IndexReader) Close() error { return r.f.Close() }

// entry reads entry i, if the index holds it yet.
func (r *IndexReader) entry(i int64) (IndexEntry, bool) {
	if i < r.blkStart || i >= r.blkStart+int64(len(r.blk)/indexEntrySize) {
		if r.blk == nil {
			r.blk = make([]byte, indexBlock)
		}
		n, _ := r.f.ReadAt(r.blk[:cap(r.blk)], indexHeaderSize+i*indexEntrySize)
		r.blk, r.blkStart = r.blk[:n/indexEntrySize*indexEntrySize], i
		if len(r.blk) == 0 {
			return IndexEntry{}, false
		}
	}
	b := r.blk[(i-r.blkStart)*indexEntrySize:]
	return IndexEntry{
		Offset: int64(binary.LittleEndian.Uint64(b[:8])),
		Time:   time.Unix(0, int64(binary.LittleEndian.Uint64(b[8:]))).UTC(),
	}, true
}

// entries is how many whole entries the index holds now.
func (r *IndexReader) entries() int64 {
	fi, err := r.f.Stat()
	if err != nil || fi.Size() < indexHeaderSize {
		return 0
	}
	return (fi.Size() - indexHeaderSize) / indexEntrySize
}

// Seek returns the offset of the first byte written at or after t, by
// binary search; ok is false when every recorded write is before t (the
// bytes written from then on come after the ones already written).
// Bytes before the first entry (written by an older monitor) count as
// written before it.
func (r *IndexReader) Seek(t time.Time) (off int64, ok bool) {
	n := r.entries()
	i := sort.Search(int(n), func(i int) bool {
		e, ok := r.entry(int64(i))
		return !ok || !e.Time.Before(t)
	})
	e, ok := r.entry(int64(i))
	if int64(i) >= n || !ok {
		return 0, false
	}
	return e.Offset, true
}

// First returns the index's first entry, if it holds one yet.
func (r *IndexReader) First() (IndexEntry, bool) {
	if !r.hasFirst {
		r.first, r.hasFirst = r.entry(0)
	}
	return r.first, r.hasFirst
}

// TimeAt returns the recorded time of the byte at off: that of the last
// entry at or before it. Calls must not go back in off (the cursor only
// moves forward). ok is false for a byte before the first entry.
func (r *IndexReader) TimeAt(off int64) (time.Time, bool) {
	if !r.hasFirst {
		r.first, r.hasFirst = r.entry(0)
		if !r.hasFirst {
			return time.Time{}, false
		}
	}
	if off < r.first.Offset {
		return time.Time{}, false
	}
	if r.cursor < 0 {
		r.cursor, r.cur = 0, r.first
	}
	for {
		if !r.hasNext {
			r.next, r.hasNext = r.entry(r.cursor + 1)
			if !r.hasNext {
				return r.cur.Time, true
			}
		}
		if r.next.Offset > off {
			return r.cur.Time, true
		}
		r.cursor, r.cur, r.hasNext = r.cursor+1, r.next, false
	}
}
