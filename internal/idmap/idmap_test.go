package idmap

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// children lists this process's child processes.
func children(t testing.TB) []string {
	t.Helper()
	tasks, err := filepath.Glob("/proc/self/task/*/children")
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, f := range tasks {
		data, _ := os.ReadFile(f)
		kids = append(kids, strings.Fields(string(data))...)
	}
	return kids
}

// ownerThrough returns the owner of dir/f as a mount of dir id-mapped into
// ns shows it.
func ownerThrough(t *testing.T, dir string, ns *os.File) (uint32, uint32) {
	t.Helper()
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		t.Skipf("open_tree: %v", err)
	}
	defer unix.Close(fd)
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_IDMAP, Userns_fd: uint64(ns.Fd())}
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		t.Fatalf("id-map a mount through the namespace: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(fd, "f", &st, 0); err != nil {
		t.Fatal(err)
	}
	return st.Uid, st.Gid
}

// Both ways of making a namespace give it the ids asked for (a file of
// the host's root shows as the range's first ids through it), and leave
// no process behind.
func TestUserNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: writes a user namespace's id maps and id-maps a mount")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "f"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, newNS := range map[string]func(uid, gid, size uint32) (*os.File, error){"UserNS": UserNS, "fork": forkUserNS} {
		t.Run(name, func(t *testing.T) {
			before := len(children(t))
			for i := range uint32(20) {
				uid, gid := 1<<30+i*65536, 1<<30+(i+100)*65536
				ns, err := newNS(uid, gid, 65536)
				if err != nil {
					t.Fatal(err)
				}
				u, g := ownerThrough(t, dir, ns)
				ns.Close()
				if u != uid || g != gid {
					t.Fatalf("root's file shows as %d:%d through the namespace, want %d:%d", u, g, uid, gid)
				}
			}
			if kids := children(t); len(kids) != before {
				t.Errorf("%d child processes after 20 namespaces, %d before: %v", len(kids), before, kids)
			}
		})
	}
}

// BenchmarkUserNS makes a namespace from a process holding 64 MiB, as the
// agent does: by clone sharing the caller's memory (UserNS) and, the
// baseline, by a fork that stops at its exec.
func BenchmarkUserNS(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	ballast := make([]byte, 64<<20)
	for i := range ballast {
		ballast[i] = byte(i)
	}
	for name, newNS := range map[string]func(uid, gid, size uint32) (*os.File, error){"clone": UserNS, "fork": forkUserNS} {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				ns, err := newNS(1<<30, 1<<30, 65536)
				if err != nil {
					b.Fatal(err)
				}
				ns.Close()
			}
		})
	}
	_ = ballast[len(ballast)-1]
}
