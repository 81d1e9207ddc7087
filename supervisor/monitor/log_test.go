package monitor

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A log written far past its size rotates: the live file and max_files
// rotated ones remain, each at most about the size, and together they end
// with the latest output.
func TestLogRotates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	l, err := openLog(path, 1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 500 {
		if _, err := fmt.Fprintf(l, "line %04d\n", i); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	var all string
	for _, p := range []string{RotatedLog(path, 2), RotatedLog(path, 1), path} {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if len(data) > 1000 {
			t.Errorf("%s holds %d bytes, above the size 1000", p, len(data))
		}
		all += string(data)
	}
	if _, err := os.Stat(RotatedLog(path, 3)); !os.IsNotExist(err) {
		t.Errorf("a third rotated file is kept: %v", err)
	}
	if !strings.HasSuffix(all, "line 0499\n") || strings.Contains(all, "line 0000\n") || !strings.HasPrefix(all, "line ") {
		t.Errorf("the kept files hold %q...%q", all[:20], all[len(all)-20:])
	}
	// A monitor that starts again continues the live file.
	l, err = openLog(path, 1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	if l.written == 0 {
		t.Error("a reopened log counts nothing of what it holds")
	}
	l.Close()
}

// Reads of the workload's pipe end anywhere, inside a line too: a
// rotation waits for that line's end, so every kept file starts with a
// whole line and ends with one (a file may run past its size by the rest
// of a line), and the files together hold the lines whole, in order. The
// same for a monitor that continues a file ending inside a line.
func TestLogRotatesAtLineEnds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	var out strings.Builder
	for i := range 400 {
		fmt.Fprintf(&out, "line %04d of the flood\n", i)
	}
	stream := out.String()
	l, err := openLog(path, 1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	// Chunks of 37 bytes: most end inside a line.
	for i := 0; i < len(stream); i += 37 {
		if i == 20*37 {
			// A respawned monitor: the file it continues ends mid-line.
			l.Close()
			if l, err = openLog(path, 1000, 2); err != nil {
				t.Fatal(err)
			}
			if !l.midLine {
				t.Fatal("a reopened log that ends inside a line is not seen as such")
			}
		}
		if _, err := l.Write([]byte(stream[i:min(i+37, len(stream))])); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	const lineLen = len("line 0000 of the flood\n")
	var all string
	for _, p := range []string{RotatedLog(path, 2), RotatedLog(path, 1), path} {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(data), "line ") || !strings.HasSuffix(string(data), "\n") {
			t.Errorf("%s starts %q and ends %q: not at line boundaries", p, data[:min(10, len(data))], data[max(0, len(data)-10):])
		}
		if len(data) > 1000+lineLen {
			t.Errorf("%s holds %d bytes, past the size and a line's rest", p, len(data))
		}
		all += string(data)
	}
	if !strings.HasSuffix(stream, all) {
		t.Errorf("the kept files are not the stream's end, whole: %q...", all[:40])
	}
}

// Files 0 is the monitor of an older agent: capped, not rotated.
func TestLogCappedWithoutFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stdout.log")
	l, err := openLog(path, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	for range 50 {
		fmt.Fprintf(l, "0123456789\n")
	}
	l.Close()
	data, _ := os.ReadFile(path)
	if !strings.Contains(string(data), "log limit of 100 bytes") {
		t.Errorf("capped log: %q", data)
	}
	if _, err := os.Stat(RotatedLog(path, 1)); !os.IsNotExist(err) {
		t.Errorf("a capped log rotated: %v", err)
	}
}
