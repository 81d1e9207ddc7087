package fileutil

import (
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFileAndRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	if err := WriteFile(path, []byte("one"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(path, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil || string(data) != "two" {
		t.Fatalf("read back %q, %v", data, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}

	// What a crash between create and rename leaves, next to a file of
	// another name that must stay.
	stale, err := os.CreateTemp(dir, tempPrefix(path)+"*")
	if err != nil {
		t.Fatal(err)
	}
	stale.Close()
	other := filepath.Join(dir, "state.json.other")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := RemoveTemps(path); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) != 2 || names[0] != "state.json" || names[1] != "state.json.other" {
		t.Errorf("after RemoveTemps: %v, want state.json and state.json.other", names)
	}
}
