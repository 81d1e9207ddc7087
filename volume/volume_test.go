package volume

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: volumes are mounts (loop devices, bind mounts)")
	}
}

func newStore(t *testing.T, hostPaths ...string) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(Options{Root: filepath.Join(dir, "data", "volumes"), DataDir: filepath.Join(dir, "data"), HostPaths: hostPaths})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ids, _ := s.Staged()
		for _, id := range ids {
			_ = s.Release(id)
		}
		for _, v := range s.List() {
			_ = s.Remove(v.Tenant, v.Name)
		}
	})
	return s, dir
}

// Host paths: only below the allowlist, never /, /proc, /sys, /dev or the
// data directory, and no symlink leads out of an allowed directory.
func TestHostPaths(t *testing.T) {
	base := t.TempDir()
	allowed := filepath.Join(base, "allowed")
	outside := filepath.Join(base, "outside")
	for _, d := range []string{filepath.Join(allowed, "sub", "deep"), outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	must(t, os.Symlink("/etc", filepath.Join(allowed, "abs-escape")))
	must(t, os.Symlink("../outside", filepath.Join(allowed, "rel-escape")))
	must(t, os.Symlink("sub/deep", filepath.Join(allowed, "inside")))
	must(t, os.WriteFile(filepath.Join(allowed, "file"), nil, 0o644))
	s, dir := newStore(t, allowed)

	for _, ok := range []string{allowed, filepath.Join(allowed, "sub"), filepath.Join(allowed, "inside")} {
		if err := s.CheckHostPath(ok, true, false); err != nil {
			t.Errorf("%s: %v, want allowed", ok, err)
		}
	}
	for _, c := range []struct{ path, why string }{
		{"/", "whole host"},
		{"/proc", "never shared"},
		{"/sys/kernel", "never shared"},
		{"/dev", "never shared"},
		{filepath.Join(dir, "data"), "data directory"},
		{filepath.Join(dir, "data", "volumes"), "data directory"},
		{outside, "not under the operator's volumes.host_paths"},
		{base, "not under"},
		{filepath.Join(allowed, "abs-escape"), "through a symlink"},
		{filepath.Join(allowed, "rel-escape"), "through a symlink"},
		{filepath.Join(allowed, "missing"), "does not exist"},
		{filepath.Join(allowed, "file"), "not a directory"},
		{allowed + "/sub/..", "clean absolute"},
		{"relative", "clean absolute"},
	} {
		err := s.CheckHostPath(c.path, true, false)
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%s: %v, want refused with %q", c.path, err, c.why)
		}
	}
	for _, bad := range [][]string{{"/"}, {"/proc"}, {"/dev/shm"}, {"relative"}, {filepath.Dir(dir)}} {
		if _, err := Open(Options{Root: filepath.Join(dir, "data", "volumes"), DataDir: filepath.Join(dir, "data"), HostPaths: bad}); err == nil {
			t.Errorf("allowlist %v accepted", bad)
		}
	}
}

// A staged host path is the directory that was checked: a symlink
// swapped in afterwards does not move the mount; read-only is read-only
// on the host side; Release leaves nothing mounted.
func TestStage(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	allowed := filepath.Join(base, "allowed")
	must(t, os.MkdirAll(filepath.Join(allowed, "share"), 0o755))
	must(t, os.WriteFile(filepath.Join(allowed, "share", "hello"), []byte("hi"), 0o644))
	s, _ := newStore(t, allowed)
	if _, _, err := s.Create("", "data", 0, nil); err != nil {
		t.Fatal(err)
	}
	mounts, err := s.Stage("w1", []Source{
		{Name: "data", Target: "/data"},
		{HostPath: filepath.Join(allowed, "share"), Target: "/share", ReadOnly: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) != 2 || mounts[0].Target != "/data" || !mounts[1].ReadOnly {
		t.Fatalf("mounts %+v", mounts)
	}
	must(t, os.WriteFile(filepath.Join(mounts[0].Source, "f"), []byte("x"), 0o644))
	v, _ := s.Get("", "data")
	if b, err := os.ReadFile(filepath.Join(s.DataPath(v), "f")); err != nil || string(b) != "x" {
		t.Errorf("a write through the staged mount: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(mounts[1].Source, "g"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write into a read-only staged mount: %v, want EROFS", err)
	}
	// Swap the checked directory for a symlink to /etc: the mount stays
	// on what was checked.
	must(t, os.Rename(filepath.Join(allowed, "share"), filepath.Join(allowed, "old")))
	must(t, os.Symlink("/etc", filepath.Join(allowed, "share")))
	if b, err := os.ReadFile(filepath.Join(mounts[1].Source, "hello")); err != nil || string(b) != "hi" {
		t.Errorf("after the swap the staged mount shows %q %v", b, err)
	}
	if _, err := s.Stage("w2", []Source{{HostPath: filepath.Join(allowed, "share"), Target: "/x"}}); err == nil {
		t.Error("a symlink to /etc staged")
	}
	must(t, s.Release("w1"))
	for _, m := range mounts {
		if _, err := os.Stat(m.Source); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after release: %v", m.Source, err)
		}
	}
	if ids, _ := s.Staged(); len(ids) != 0 {
		t.Errorf("staged after release: %v", ids)
	}
}

// A sized volume is a filesystem of its own: writing past its size is
// ENOSPC inside it, the node's disk keeps its space, and it is mounted
// again after a reboot (here: unmounted behind the store's back).
func TestSizedVolume(t *testing.T) {
	needRoot(t)
	s, dir := newStore(t)
	if _, _, err := s.Create("", "small", 1<<20, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("a 1 MiB volume: %v, want invalid", err)
	}
	v, created, err := s.Create("t", "small", 16<<20, map[string]string{"k": "v"})
	if err != nil || !created {
		t.Fatal(created, err)
	}
	if _, created, err := s.Create("t", "small", 16<<20, map[string]string{"k": "v"}); err != nil || created {
		t.Errorf("retry: created %v %v", created, err)
	}
	if _, _, err := s.Create("t", "small", 32<<20, nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("same name, other size: %v", err)
	}
	data := s.DataPath(v)
	f, err := os.Create(filepath.Join(data, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{1}, 1<<20)
	var werr error
	written := 0
	for i := 0; i < 64 && werr == nil; i++ {
		var n int
		n, werr = f.Write(chunk)
		written += n
	}
	f.Close()
	if !errors.Is(werr, unix.ENOSPC) {
		t.Fatalf("writing 64 MiB into a 16 MiB volume: %v after %d bytes, want ENOSPC", werr, written)
	}
	if written > 16<<20 {
		t.Errorf("wrote %d bytes into a 16 MiB volume", written)
	}
	// Unmount as a reboot would; Open mounts it again.
	must(t, unmountAll(data))
	s2, err := Open(Options{Root: filepath.Join(dir, "data", "volumes"), DataDir: filepath.Join(dir, "data")})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(filepath.Join(data, "fill")); err != nil || st.Size() != int64(written) {
		t.Errorf("after the remount: %v %v, want the %d bytes written", st, err, written)
	}
	if got, err := s2.Get("t", "small"); err != nil || got.Labels["k"] != "v" || got.SizeBytes != 16<<20 {
		t.Errorf("reopened: %+v %v", got, err)
	}
	must(t, s2.Remove("t", "small"))
	s.vols = map[string]*Volume{}
	if _, err := os.Stat(filepath.Dir(data)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("volume directory after remove: %v", err)
	}
	if mounted(t, data) {
		t.Error("still mounted after remove")
	}
}

// A create that crashed before its record leaves a directory the next
// Open removes.
func TestHalfCreatedVolumeRemoved(t *testing.T) {
	s, _ := newStore(t)
	half := filepath.Join(s.opts.Root, "0123456789abcdef")
	must(t, os.MkdirAll(filepath.Join(half, dataDir), 0o755))
	if _, err := Open(s.opts); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(half); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("half-created volume: %v", err)
	}
	if st, err := os.Stat(s.opts.Root); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("store root: %v %v, want 0700", st.Mode(), err)
	}
}

func mounted(t *testing.T, p string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), " "+p+" ")
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
