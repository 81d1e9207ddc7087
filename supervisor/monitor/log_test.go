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

// A log whose file cannot be created at its first write (its directory
// went away meanwhile) drops that output without failing the stream, and
// is created by a later write once it can be.
func TestLogCreatedOnceItCanBe(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "logs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "stdout.log")
	w, err := NewLogWriter(path, 1<<10, 2, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("lost\n")); err == nil {
		t.Error("a write with nowhere to go reported success")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("kept\n")); err != nil {
		t.Fatalf("write once the directory is back: %v", err)
	}
	if data, err := os.ReadFile(path); err != nil || string(data) != "kept\n" {
		t.Errorf("log %q %v, want %q", data, err, "kept\n")
	}
}
