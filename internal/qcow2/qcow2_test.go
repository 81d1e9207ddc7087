package qcow2

import (
	"os"
	"path/filepath"
	"testing"
)

func TestIs(t *testing.T) {
	for _, c := range []struct {
		head string
		want bool
	}{
		{Magic + "\x00\x00\x00\x03", true},
		{Magic, true},
		{"QFI", false},
		{"", false},
		{"\x1f\x8b\x08\x00", false}, // a gzip'd image archive
	} {
		if got := Is([]byte(c.head)); got != c.want {
			t.Errorf("Is(%q) = %v, want %v", c.head, got, c.want)
		}
	}
}

func TestIsFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, c := range []struct {
		path string
		want bool
	}{
		{write("disk", Magic+"\x00\x00\x00\x03rest"), true},
		{write("raw", "\x00\x00\x00\x00\x00"), false},
		{write("short", "QF"), false},
		{write("empty", ""), false},
	} {
		got, err := IsFile(c.path)
		if err != nil || got != c.want {
			t.Errorf("IsFile(%s) = %v, %v; want %v", filepath.Base(c.path), got, err, c.want)
		}
	}
	if _, err := IsFile(filepath.Join(dir, "missing")); !os.IsNotExist(err) {
		t.Errorf("IsFile of a missing file: %v, want not-exist", err)
	}
}
