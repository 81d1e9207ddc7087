package volume

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/berthd/berth/errdefs"
)

// Detach takes a volume out of the store at once (not found, its name
// free again) and leaves its files for Purge; trash a crash left before
// Purge is deleted by the next Open, and other volumes are untouched.
func TestDetachThenPurge(t *testing.T) {
	s, _ := newStore(t)
	v, _, err := s.Create("t", "big", 0, nil)
	must(t, err)
	for i := range 100 {
		must(t, os.WriteFile(filepath.Join(s.DataPath(v), strconv.Itoa(i)), []byte("x"), 0o644))
	}
	trash, err := s.Detach("t", "big")
	must(t, err)
	if _, err := s.Get("t", "big"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("after Detach: %v, want not found", err)
	}
	if _, err := s.Detach("t", "big"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("second Detach: %v, want not found", err)
	}
	if _, err := os.Stat(s.dir(v)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("volume directory after Detach: %v", err)
	}
	if _, err := os.Stat(filepath.Join(trash, dataDir, "99")); err != nil {
		t.Errorf("files before Purge: %v", err)
	}
	// The name is free while the old files wait.
	again, created, err := s.Create("t", "big", 0, nil)
	if err != nil || !created || again.ID == v.ID {
		t.Fatalf("create again: %+v %v %v", again, created, err)
	}
	must(t, os.WriteFile(filepath.Join(s.DataPath(again), "keep"), []byte("k"), 0o644))
	if err := s.Purge(filepath.Join(s.opts.Root, again.ID)); err == nil {
		t.Error("Purge of a live volume's directory accepted")
	}

	// A crash before Purge: the next Open deletes the trash and keeps
	// the live volume.
	s2, err := Open(s.opts)
	must(t, err)
	if _, err := os.Stat(trash); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("trash after reopening: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(s2.DataPath(again), "keep")); err != nil || string(b) != "k" {
		t.Errorf("live volume after reopening: %q %v", b, err)
	}

	// Remove is Detach then Purge: nothing is left.
	must(t, s2.Remove("t", "big"))
	s.vols = map[string]*Volume{}
	entries, err := os.ReadDir(s.opts.Root)
	must(t, err)
	for _, e := range entries {
		if e.Name() != mountsDir {
			t.Errorf("left in the store after Remove: %s", e.Name())
		}
	}
}
