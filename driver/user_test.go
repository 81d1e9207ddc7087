package driver

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

const (
	imagePasswd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"
	imageGroup  = "root:x:0:\napp:x:1001:\nstaff:x:50:\n"
	// hostPasswd is what a host file holds that an image must never read.
	hostPasswd = "app:x:4242:4242::/:/bin/sh\nhostonly:x:4343:4343::/:/bin/sh\n"
)

// rootfs makes an image tree with etc/passwd and etc/group as given
// (nothing for ""), and a host directory beside it holding host files.
func rootfs(t *testing.T, passwd, group string) (root, host string) {
	t.Helper()
	dir := t.TempDir()
	root, host = filepath.Join(dir, "rootfs"), filepath.Join(dir, "host")
	for _, d := range []string{filepath.Join(root, "etc"), host} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, body := range map[string]string{"etc/passwd": passwd, "etc/group": group} {
		if body != "" {
			if err := os.WriteFile(filepath.Join(root, name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.WriteFile(filepath.Join(host, "passwd"), []byte(hostPasswd), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, host
}

func TestResolveUser(t *testing.T) {
	root, _ := rootfs(t, imagePasswd, imageGroup)
	for _, tc := range []struct {
		user     string
		uid, gid uint32
		wantErr  bool
	}{
		{"", 0, 0, false},
		{"root", 0, 0, false},
		{"app", 1000, 1001, false},
		{"1000", 1000, 1001, false},
		{"2000", 2000, 0, false}, // not listed: the number stands
		{"app:staff", 1000, 50, false},
		{"app:77", 1000, 77, false},
		{"1234:5678", 1234, 5678, false},
		{"nobody", 0, 0, true},
		{"app:nogroup", 0, 0, true},
	} {
		uid, gid, err := ResolveUser(root, tc.user)
		if tc.wantErr {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("ResolveUser(%q) = %d:%d, %v; want ErrInvalidArgument", tc.user, uid, gid, err)
			}
			continue
		}
		if err != nil || uid != tc.uid || gid != tc.gid {
			t.Errorf("ResolveUser(%q) = %d:%d, %v; want %d:%d", tc.user, uid, gid, err, tc.uid, tc.gid)
		}
	}

	// An image without the files: numbers still work, names do not.
	bare, _ := rootfs(t, "", "")
	if uid, gid, err := ResolveUser(bare, "1000:1000"); err != nil || uid != 1000 || gid != 1000 {
		t.Errorf("numeric user without /etc/passwd = %d:%d, %v", uid, gid, err)
	}
	if _, _, err := ResolveUser(bare, "app"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("named user without /etc/passwd: %v, want ErrInvalidArgument", err)
	}
}

// TestResolveUserStaysInImage plants what a hostile image could: symlinks
// to host files (absolute and climbing out), a FIFO (which would block a
// plain open for ever), a huge file and a directory. None reads a host
// file, blocks, or reads more than the bound.
func TestResolveUserStaysInImage(t *testing.T) {
	for _, tc := range []struct {
		name  string
		plant func(t *testing.T, passwd, host string)
		// noFile: the image's passwd resolves to nothing in the image.
		noFile bool
	}{
		{"absolute symlink to a host file", func(t *testing.T, passwd, host string) {
			must(t, os.Symlink(filepath.Join(host, "passwd"), passwd))
		}, true},
		{"relative symlink climbing to a host file", func(t *testing.T, passwd, host string) {
			must(t, os.Symlink("../../../../../../../../.."+filepath.Join(host, "passwd"), passwd))
		}, true},
		{"symlinked directory to the host", func(t *testing.T, passwd, host string) {
			etc := filepath.Dir(passwd)
			must(t, os.Remove(filepath.Join(etc, "group")))
			must(t, os.Remove(etc))
			must(t, os.Symlink(host, etc))
		}, true},
		{"FIFO", func(t *testing.T, passwd, host string) {
			must(t, unix.Mkfifo(passwd, 0o644))
		}, false},
		{"symlink to a host FIFO", func(t *testing.T, passwd, host string) {
			fifo := filepath.Join(host, "fifo")
			must(t, unix.Mkfifo(fifo, 0o644))
			must(t, os.Symlink(fifo, passwd))
		}, true},
		{"huge file", func(t *testing.T, passwd, host string) {
			f, err := os.Create(passwd)
			must(t, err)
			must(t, f.Truncate(1<<40)) // sparse: a terabyte of nothing
			must(t, f.Close())
		}, false},
		{"directory", func(t *testing.T, passwd, host string) {
			must(t, os.Mkdir(passwd, 0o755))
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, host := rootfs(t, "", imageGroup)
			tc.plant(t, filepath.Join(root, "etc", "passwd"), host)
			type result struct {
				uid, gid uint32
				err      error
			}
			done := make(chan result, 1)
			go func() {
				uid, gid, err := ResolveUser(root, "hostonly")
				done <- result{uid, gid, err}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("ResolveUser blocks")
			}
			if r.err == nil || r.uid == 4343 {
				t.Fatalf("ResolveUser(hostonly) = %d:%d, %v: read a host file", r.uid, r.gid, r.err)
			}
			if !errors.Is(r.err, errdefs.ErrInvalidArgument) {
				t.Errorf("ResolveUser = %v, want ErrInvalidArgument", r.err)
			}
			t.Log(r.err)
			// A numeric user needs no file: it works where a missing file
			// is what the image holds, and is refused where the file is
			// there but unreadable.
			_, _, err := ResolveUser(root, "1000")
			if tc.noFile && err != nil {
				t.Errorf("ResolveUser(1000) = %v, want the number", err)
			}
			if !tc.noFile && !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("ResolveUser(1000) = %v, want ErrInvalidArgument", err)
			}
		})
	}
}

// TestResolveUserSymlinksResolveInImage: an absolute symlink inside the
// image points into the image, as it would inside the container.
func TestResolveUserSymlinksResolveInImage(t *testing.T) {
	root, _ := rootfs(t, "", imageGroup)
	must(t, os.MkdirAll(filepath.Join(root, "usr/share/base"), 0o755))
	must(t, os.WriteFile(filepath.Join(root, "usr/share/base/passwd"), []byte(imagePasswd), 0o644))
	must(t, os.Symlink("/usr/share/base/passwd", filepath.Join(root, "etc/passwd")))
	if uid, gid, err := ResolveUser(root, "app"); err != nil || uid != 1000 || gid != 1001 {
		t.Errorf("ResolveUser(app) through an absolute in-image symlink = %d:%d, %v; want 1000:1001", uid, gid, err)
	}
}

func TestReadImageFileBound(t *testing.T) {
	root, _ := rootfs(t, imagePasswd, "")
	if data, err := ReadImageFile(root, "etc/passwd", int64(len(imagePasswd))); err != nil || string(data) != imagePasswd {
		t.Errorf("ReadImageFile at the bound = %q, %v", data, err)
	}
	if _, err := ReadImageFile(root, "etc/passwd", int64(len(imagePasswd))-1); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ReadImageFile over the bound = %v, want ErrInvalidArgument", err)
	}
	if _, err := ReadImageFile(root, "etc/nothing", 100); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ReadImageFile(missing) = %v, want ErrNotExist", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
