package volume

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// mountTmpfs mounts a small tmpfs at dir (made) with flags, unmounted
// when the test ends.
func mountTmpfs(t *testing.T, dir string, flags uintptr) {
	t.Helper()
	must(t, os.MkdirAll(dir, 0o755))
	must(t, unix.Mount("tmpfs", dir, "tmpfs", flags, "size=1m"))
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
}

// bindMount bind-mounts src at dst (made), unmounted when the test ends.
func bindMount(t *testing.T, src, dst string) {
	t.Helper()
	must(t, os.MkdirAll(dst, 0o755))
	must(t, unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""))
	t.Cleanup(func() { _ = unix.Unmount(dst, unix.MNT_DETACH) })
}

func wantRefused(t *testing.T, err error, why ...string) {
	t.Helper()
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("%v, want refused (invalid argument) with %q", err, why)
		return
	}
	for _, w := range why {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%v, want %q in it", err, w)
		}
	}
}

// A host path a workload may write must be on a nosuid (or noexec)
// mount of the host: what the workload creates there belongs to the host
// (as root: a container's root through its id-mapped mount, virtiofsd as
// itself), and a setuid-root file it made would work through any suid,
// exec mount. Where the workload's side makes device nodes as root (a
// VM's virtiofsd) the mount must be nodev too. Read-only ones may be on
// any mount; the workload's own mount is nosuid,nodev either way.
// Staging checks again: a remount between submit and start is seen.
func TestWritableHostPathNeedsNosuidNodev(t *testing.T) {
	needRoot(t)
	allowed := filepath.Join(t.TempDir(), "allowed")
	suid := filepath.Join(allowed, "suid")
	safe := filepath.Join(allowed, "safe")
	nosuid := filepath.Join(allowed, "nosuid")
	noexec := filepath.Join(allowed, "noexec") // as Nomad's secrets tmpfs
	mountTmpfs(t, suid, 0)
	mountTmpfs(t, safe, unix.MS_NOSUID|unix.MS_NODEV)
	mountTmpfs(t, nosuid, unix.MS_NOSUID)
	mountTmpfs(t, noexec, unix.MS_NOEXEC)
	s, _ := newStore(t, allowed)

	wantRefused(t, s.CheckHostPath(suid, false, false), "is not nosuid (", "mount -o remount,bind,nosuid,nodev "+suid, "read-only")
	wantRefused(t, s.CheckHostPath(suid, false, true), "is not nosuid and nodev")
	wantRefused(t, s.CheckHostPath(nosuid, false, true), "is not nodev")
	wantRefused(t, s.CheckHostPath(noexec, false, true), "is not nodev")
	for _, ok := range []struct {
		p           string
		ro, devices bool
	}{
		{suid, true, false}, {suid, true, true}, {safe, false, false}, {safe, false, true}, {safe, true, true},
		{nosuid, false, false}, {nosuid, true, true}, {noexec, false, false},
	} {
		if err := s.CheckHostPath(ok.p, ok.ro, ok.devices); err != nil {
			t.Errorf("%s read-only %v devices %v: %v, want allowed", ok.p, ok.ro, ok.devices, err)
		}
	}
	if _, err := s.Stage("wsuid", []Source{{HostPath: suid, Target: "/x"}}); err == nil {
		t.Error("a writable host path on a suid mount staged")
	}
	if _, err := s.Stage("wdev", []Source{{HostPath: nosuid, Target: "/x", Devices: true}}); err == nil {
		t.Error("a writable host path on a dev mount staged for a workload that makes device nodes")
	}

	// Through an allowed one, a setuid-root file is made, and stays
	// harmless: the host's own mount of it is nosuid.
	mounts, err := s.Stage("wsafe", []Source{{HostPath: safe, Target: "/x", Devices: true}, {HostPath: suid, Target: "/y", ReadOnly: true}})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		var st unix.Statfs_t
		must(t, unix.Statfs(m.Source, &st))
		if st.Flags&(unix.ST_NOSUID|unix.ST_NODEV) != unix.ST_NOSUID|unix.ST_NODEV {
			t.Errorf("staged %s (read-only %v): flags %#x, want nosuid,nodev", m.Source, m.ReadOnly, st.Flags)
		}
	}
	planted := filepath.Join(mounts[0].Source, "sh")
	must(t, os.WriteFile(planted, []byte("#!/bin/sh\n"), 0o755))
	must(t, os.Chmod(planted, 0o4755))
	var sfs unix.Statfs_t
	must(t, unix.Statfs(filepath.Join(safe, "sh"), &sfs))
	if sfs.Flags&unix.ST_NOSUID == 0 {
		t.Error("the host's mount of the planted file honours setuid")
	}
	if err := os.WriteFile(filepath.Join(mounts[1].Source, "z"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("a read-only host path written: %v", err)
	}
	must(t, s.Release("wsafe"))

	// Allowed at submit, remounted suid before the task starts: refused
	// at staging.
	must(t, s.CheckHostPath(safe, false, false))
	must(t, unix.Mount("", safe, "", unix.MS_REMOUNT, "size=1m"))
	if _, err := s.Stage("wlater", []Source{{HostPath: safe, Target: "/x"}}); err == nil || !strings.Contains(err.Error(), "is not nosuid") {
		t.Errorf("a host path remounted suid after the check: staged (%v)", err)
	}
}

// The data directory is found by what it is, not by its name: a
// symlinked data directory, a bind mount of it or of a directory inside
// it below an allowed directory are refused, and so are the kernel's
// pseudo filesystems mounted below an allowed directory (a bind mount of
// /proc, /sys or /dev; a procfs of its own).
func TestHostPathIdentity(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	srv := filepath.Join(base, "srv")
	real := filepath.Join(srv, "berth-data")
	pub := filepath.Join(srv, "pub")
	must(t, os.MkdirAll(filepath.Join(real, "volumes"), 0o711))
	must(t, os.MkdirAll(pub, 0o755))
	link := filepath.Join(base, "berth")
	must(t, os.Symlink(real, link))
	opts := Options{Root: filepath.Join(link, "volumes"), DataDir: link}

	// /var/lib/berth -> /srv/berth-data with /srv allowed: the agent
	// refuses to start.
	opts.HostPaths = []string{srv}
	if _, err := Open(opts); err == nil || !strings.Contains(err.Error(), "holds berth's data directory") {
		t.Errorf("allowlist holding the symlinked data directory: %v", err)
	}
	opts.HostPaths = []string{pub}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	wantRefused(t, s.CheckHostPath(real, true, false), "data directory")

	bindMount(t, real, filepath.Join(pub, "data"))
	bindMount(t, filepath.Join(real, "volumes"), filepath.Join(pub, "vols"))
	bindMount(t, srv, filepath.Join(pub, "srv"))
	bindMount(t, "/proc", filepath.Join(pub, "proc"))
	bindMount(t, "/sys", filepath.Join(pub, "sys"))
	bindMount(t, "/dev", filepath.Join(pub, "dev"))
	must(t, os.MkdirAll(filepath.Join(pub, "procfs"), 0o755))
	must(t, unix.Mount("proc", filepath.Join(pub, "procfs"), "proc", 0, ""))
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(pub, "procfs"), unix.MNT_DETACH) })
	must(t, os.MkdirAll(filepath.Join(pub, "ok"), 0o755))

	for _, c := range []struct{ p, why string }{
		{filepath.Join(pub, "data"), "berth's data directory"},
		{filepath.Join(pub, "data", "volumes"), "inside berth's data directory"},
		{filepath.Join(pub, "vols"), "inside berth's data directory"},
		{filepath.Join(pub, "srv"), "holds berth's data directory"},
		{filepath.Join(pub, "proc"), "procfs"},
		{filepath.Join(pub, "proc", "sys"), "procfs"},
		{filepath.Join(pub, "procfs"), "procfs"},
		{filepath.Join(pub, "sys"), "sysfs"},
		{filepath.Join(pub, "sys", "kernel"), "sysfs"},
		{filepath.Join(pub, "dev"), "filesystem of /dev"},
	} {
		for _, ro := range []bool{true, false} {
			err := s.CheckHostPath(c.p, ro, !ro)
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), c.why) {
				t.Errorf("%s (read-only %v): %v, want refused with %q", c.p, ro, err, c.why)
			}
		}
	}
	if err := s.CheckHostPath(filepath.Join(pub, "ok"), true, false); err != nil {
		t.Errorf("a plain directory: %v", err)
	}
	if _, err := s.Stage("wproc", []Source{{HostPath: filepath.Join(pub, "proc"), Target: "/p", ReadOnly: true}}); err == nil {
		t.Error("a bind mount of /proc staged")
		_ = s.Release("wproc")
	}
}
