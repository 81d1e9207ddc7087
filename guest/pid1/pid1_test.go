//go:build linux

package pid1

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/guest"
)

func writeFile(t *testing.T, path, content string, perm os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), perm); err != nil {
		t.Fatal(err)
	}
}

// fakeGuest lays out a sysfs and /dev the way a booted berth guest shows
// them: two virtio disks, three named ports, a power button.
func fakeGuest(t *testing.T) (sys, dev string) {
	root := t.TempDir()
	sys, dev = filepath.Join(root, "sys"), filepath.Join(root, "dev")
	writeFile(t, filepath.Join(sys, "block/vda/serial"), "berth-config\n", 0o444)
	writeFile(t, filepath.Join(sys, "block/vdb/serial"), "berth-root\n", 0o444)
	writeFile(t, filepath.Join(sys, "block/loop0/size"), "0\n", 0o444) // no serial: ignored
	writeFile(t, filepath.Join(sys, "class/virtio-ports/vport1p1/name"), "org.berth.stdout\n", 0o444)
	writeFile(t, filepath.Join(sys, "class/virtio-ports/vport1p2/name"), "org.berth.stderr\n", 0o444)
	writeFile(t, filepath.Join(sys, "class/virtio-ports/vport1p3/name"), "org.berth.status\n", 0o444)
	writeFile(t, filepath.Join(sys, "class/virtio-ports/vport1p4/name"), "", 0o444) // name not arrived yet
	writeFile(t, filepath.Join(sys, "class/input/event0/device/name"), "AT Translated Set 2 keyboard\n", 0o444)
	writeFile(t, filepath.Join(sys, "class/input/event1/device/name"), "Power Button\n", 0o444)
	for _, n := range []string{"vda", "vdb", "vport1p1", "vport1p2", "vport1p3", "input/event0", "input/event1"} {
		writeFile(t, filepath.Join(dev, n), "", 0o600)
	}
	return sys, dev
}

func TestFindDevices(t *testing.T) {
	sys, dev := fakeGuest(t)
	d, missing, err := scanDevices(sys, dev)
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 0 {
		t.Fatalf("missing = %q", missing)
	}
	want := map[string]string{guest.RootDiskSerial: dev + "/vdb", guest.ConfigDiskSerial: dev + "/vda"}
	for k, v := range want {
		if d.disks[k] != v {
			t.Errorf("disk %s = %q, want %q", k, d.disks[k], v)
		}
	}
	if d.ports[guest.StatusPort] != dev+"/vport1p3" || d.ports[guest.StdoutPort] != dev+"/vport1p1" || len(d.ports) != 3 {
		t.Errorf("ports = %v", d.ports)
	}
	if !slices.Equal(d.buttons, []string{dev + "/input/event1"}) {
		t.Errorf("buttons = %v", d.buttons)
	}
}

func TestScanDevicesWaitsForNodes(t *testing.T) {
	sys, dev := fakeGuest(t)
	// sysfs shows the disk but devtmpfs has not made its node yet.
	os.Remove(filepath.Join(dev, "vdb"))
	_, missing, err := scanDevices(sys, dev)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(missing, []string{"disk with serial berth-root"}) {
		t.Errorf("missing = %q", missing)
	}
}

func TestScanDevicesBeforeVirtioConsole(t *testing.T) {
	sys, dev := fakeGuest(t)
	os.RemoveAll(filepath.Join(sys, "class/virtio-ports"))
	_, missing, err := scanDevices(sys, dev)
	if err != nil {
		t.Fatal(err)
	}
	if len(missing) != 3 {
		t.Errorf("missing = %q, want the three ports", missing)
	}
}

func TestWaitDevices(t *testing.T) {
	t.Run("appear late", func(t *testing.T) {
		sys, dev := fakeGuest(t)
		os.Remove(filepath.Join(dev, "vport1p3"))
		go func() {
			time.Sleep(50 * time.Millisecond)
			os.WriteFile(filepath.Join(dev, "vport1p3"), nil, 0o600)
		}()
		d, err := waitDevices(context.Background(), sys, dev, 5*time.Millisecond, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if d.ports[guest.StatusPort] == "" {
			t.Error("status port not found")
		}
	})
	t.Run("no button", func(t *testing.T) {
		sys, dev := fakeGuest(t)
		os.RemoveAll(filepath.Join(sys, "class/input"))
		d, err := waitDevices(context.Background(), sys, dev, 5*time.Millisecond, 30*time.Millisecond)
		if err != nil || len(d.buttons) != 0 {
			t.Fatalf("waitDevices = %v, %v; want success without button", d.buttons, err)
		}
	})
	t.Run("missing disk", func(t *testing.T) {
		sys, dev := fakeGuest(t)
		os.RemoveAll(filepath.Join(sys, "block/vdb"))
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		d, err := waitDevices(ctx, sys, dev, 5*time.Millisecond, time.Second)
		if err == nil || !strings.Contains(err.Error(), "disk with serial berth-root") {
			t.Fatalf("err = %v", err)
		}
		// The status port is still returned so the failure can be reported.
		if d.ports[guest.StatusPort] == "" {
			t.Error("partial result lacks the status port")
		}
	})
}

func TestLookPath(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "bin/tool"), "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(root, "usr/bin/tool"), "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(root, "bin/data"), "x", 0o644)
	writeFile(t, filepath.Join(root, "usr/bin/only-later"), "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(root, "work/run.sh"), "#!/bin/sh\n", 0o755)
	os.MkdirAll(filepath.Join(root, "bin/adir"), 0o755)
	path := filepath.Join(root, "bin") + ":" + filepath.Join(root, "usr/bin")

	for _, tc := range []struct {
		file, dir string
		want      string
		code      int
	}{
		{file: "tool", want: root + "/bin/tool"},
		{file: "only-later", want: root + "/usr/bin/only-later"},
		{file: "nope", code: guest.ExitCodeNotFound},
		{file: "data", code: guest.ExitCodeCannotExec},
		{file: "adir", code: guest.ExitCodeCannotExec},
		{file: root + "/bin/tool", want: root + "/bin/tool"},
		{file: root + "/bin/missing", code: guest.ExitCodeNotFound},
		{file: root + "/bin/data", code: guest.ExitCodeCannotExec},
		{file: "./run.sh", dir: root + "/work", want: "./run.sh"},
		{file: "./run.sh", dir: root, code: guest.ExitCodeNotFound},
	} {
		got, err := lookPath(tc.file, path, tc.dir)
		if tc.code != 0 {
			if err == nil || exitCodeOf(err) != tc.code {
				t.Errorf("lookPath(%q) = %q, %v; want exit code %d", tc.file, got, err, tc.code)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("lookPath(%q) = %q, %v; want %q", tc.file, got, err, tc.want)
		}
	}
}

func TestLookPathPrefersEarlierMatchOverPermissionError(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "a/x"), "", 0o644)
	writeFile(t, filepath.Join(root, "b/x"), "", 0o755)
	got, err := lookPath("x", root+"/a:"+root+"/b", "/")
	if err != nil || got != root+"/b/x" {
		t.Fatalf("lookPath = %q, %v; want the executable one, like execvp", got, err)
	}
}

func TestExecErrorCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code int
	}{
		{&os.PathError{Op: "fork/exec", Path: "/x", Err: syscall.ENOENT}, 127},
		{&os.PathError{Op: "fork/exec", Path: "/x", Err: syscall.ENOTDIR}, 127},
		{&os.PathError{Op: "fork/exec", Path: "/x", Err: syscall.EACCES}, 126},
		{&os.PathError{Op: "fork/exec", Path: "/x", Err: syscall.ENOEXEC}, 126},
		{&os.PathError{Op: "fork/exec", Path: "/x", Err: syscall.ETXTBSY}, 126},
	} {
		if got := exitCodeOf(commandErrorFor("x", tc.err)); got != tc.code {
			t.Errorf("%v -> %d, want %d", tc.err, got, tc.code)
		}
	}
	if got := exitCodeOf(fmt.Errorf("mount: %w", syscall.EINVAL)); got != guest.ExitCodeInitFailure {
		t.Errorf("init failure -> %d, want %d", got, guest.ExitCodeInitFailure)
	}
}

func TestExitStatus(t *testing.T) {
	// Real statuses from real processes rather than hand-built bit patterns.
	run := func(args ...string) syscall.WaitStatus {
		t.Helper()
		p, err := os.StartProcess("/bin/sh", append([]string{"sh"}, args...), &os.ProcAttr{})
		if err != nil {
			t.Skipf("no /bin/sh: %v", err)
		}
		st, err := p.Wait()
		if err != nil {
			t.Fatal(err)
		}
		return st.Sys().(syscall.WaitStatus)
	}
	if code, sig := exitStatus(run("-c", "exit 7")); code != 7 || sig != 0 {
		t.Errorf("exit 7 -> %d, %d", code, sig)
	}
	if code, sig := exitStatus(run("-c", "kill -TERM $$")); code != 143 || sig != 15 {
		t.Errorf("SIGTERM -> %d, %d; want 143, 15", code, sig)
	}
	if code, sig := exitStatus(run("-c", "kill -KILL $$")); code != 137 || sig != 9 {
		t.Errorf("SIGKILL -> %d, %d; want 137, 9", code, sig)
	}
}

func TestResolveUser(t *testing.T) {
	root := t.TempDir()
	passwd, group := filepath.Join(root, "passwd"), filepath.Join(root, "group")
	writeFile(t, passwd, "root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1001:App:/home/app:/bin/sh\n", 0o644)
	writeFile(t, group, "root:x:0:\napp:x:1001:\nwheel:x:10:root,app\naudio:x:29:other\ndocker:x:999:app\n", 0o644)

	for _, tc := range []struct {
		user   string
		uid    uint32
		gid    uint32
		groups []uint32
		home   string
	}{
		{"", 0, 0, []uint32{10}, "/root"},
		{"1000", 1000, 1001, []uint32{10, 999}, "/home/app"},
		{"1000:5", 1000, 5, []uint32{10, 999}, "/home/app"},
		{"4242", 4242, 0, nil, "/"},
		{"4242:7", 4242, 7, nil, "/"},
	} {
		u, err := resolveUser(tc.user, passwd, group)
		if err != nil {
			t.Errorf("resolveUser(%q): %v", tc.user, err)
			continue
		}
		if u.uid != tc.uid || u.gid != tc.gid || !slices.Equal(u.groups, tc.groups) || u.home != tc.home {
			t.Errorf("resolveUser(%q) = %+v, want uid %d gid %d groups %v home %s", tc.user, u, tc.uid, tc.gid, tc.groups, tc.home)
		}
	}
	// Minimal images have no passwd at all.
	u, err := resolveUser("1000", filepath.Join(root, "none"), filepath.Join(root, "none"))
	if err != nil || u.uid != 1000 || u.gid != 0 || u.home != "/" {
		t.Errorf("without passwd: %+v, %v", u, err)
	}
}

func TestWorkloadEnv(t *testing.T) {
	got := workloadEnv([]string{"A=1", "PATH=/x", "A=2", "B=="}, "/root")
	want := []string{"A=2", "PATH=/x", "B==", "HOME=/root"}
	if !slices.Equal(got, want) {
		t.Errorf("env = %q, want %q", got, want)
	}
	got = workloadEnv(nil, "/home/app")
	if getenv(got, "PATH") != guest.DefaultPath || getenv(got, "HOME") != "/home/app" {
		t.Errorf("defaults = %q", got)
	}
	if getenv(workloadEnv([]string{"HOME=/h"}, "/root"), "HOME") != "/h" {
		t.Error("configured HOME overridden")
	}
}

func TestLoadModules(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "modules")
	writeFile(t, list, "# load order\n/lib/a.ko\n\n/lib/b.ko\n/lib/c.ko\n/lib/d.ko\n", 0o644)
	noCPU := filepath.Join(dir, "no-modalias")
	var loaded, warned []string
	err := loadModules(list, noCPU, func(p string) error {
		loaded = append(loaded, p)
		switch p {
		case "/lib/b.ko":
			return unix.EEXIST
		case "/lib/c.ko":
			return unix.ENODEV
		}
		return nil
	}, func(msg string) { warned = append(warned, msg) })
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(loaded, []string{"/lib/a.ko", "/lib/b.ko", "/lib/c.ko", "/lib/d.ko"}) {
		t.Errorf("loaded %q", loaded)
	}
	if len(warned) != 1 || !strings.Contains(warned[0], "c.ko") {
		t.Errorf("warnings %q", warned)
	}

	err = loadModules(list, noCPU, func(p string) error { return unix.ENOEXEC }, func(string) {})
	if !errors.Is(err, unix.ENOEXEC) || !strings.Contains(err.Error(), "/lib/a.ko") {
		t.Errorf("failing load: %v", err)
	}
	if err := loadModules(filepath.Join(t.TempDir(), "none"), noCPU, nil, nil); err != nil {
		t.Errorf("no list: %v", err)
	}
}

// A module for CPU features is loaded only on a CPU that has one of them
// (as the CPU's modalias says), quietly skipped elsewhere; with the
// modalias unreadable every module is tried, and the kernel decides.
func TestLoadModulesForCPU(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "modules")
	writeFile(t, list, "/lib/crc32c-intel.ko cpu:type:x86,ven*fam*mod*:feature:*0094*\n"+
		"/lib/aes.ko cpu:type:x86,ven*fam*mod*:feature:*0099* cpu:type:x86,ven*fam*mod*:feature:*00A0*\n"+
		"/lib/crc32c_generic.ko\n", 0o644)
	tcg := filepath.Join(dir, "tcg")   // qemu64: no SSE4.2 (0094), no AES (0099)
	host := filepath.Join(dir, "host") // both
	writeFile(t, tcg, "cpu:type:x86,ven0002fam000Fmod006B:feature:,0000,0001,0002,0003,0080,0081,00A0\n", 0o644)
	writeFile(t, host, "cpu:type:x86,ven0002fam0019mod0011:feature:,0000,0001,0080,0094,0099\n", 0o644)
	for _, tc := range []struct {
		cpu  string
		want []string
	}{
		{tcg, []string{"/lib/aes.ko", "/lib/crc32c_generic.ko"}},
		{host, []string{"/lib/crc32c-intel.ko", "/lib/aes.ko", "/lib/crc32c_generic.ko"}},
		{filepath.Join(dir, "unreadable"), []string{"/lib/crc32c-intel.ko", "/lib/aes.ko", "/lib/crc32c_generic.ko"}},
	} {
		var loaded, warned []string
		err := loadModules(list, tc.cpu, func(p string) error { loaded = append(loaded, p); return nil },
			func(msg string) { warned = append(warned, msg) })
		if err != nil || !slices.Equal(loaded, tc.want) || len(warned) != 0 {
			t.Errorf("cpu %s: loaded %q (warnings %q, %v), want %q", filepath.Base(tc.cpu), loaded, warned, err, tc.want)
		}
	}
}

func inputEvent(typ, code uint16, value int32) []byte {
	b := make([]byte, inputEventSize)
	tail := b[inputEventSize-8:]
	binary.NativeEndian.PutUint16(tail[0:], typ)
	binary.NativeEndian.PutUint16(tail[2:], code)
	binary.NativeEndian.PutUint32(tail[4:], uint32(value))
	return b
}

func TestPowerPresses(t *testing.T) {
	if inputEventSize != 24 && unix.SizeofPtr == 8 {
		t.Fatalf("input_event size %d, want 24 on 64-bit", inputEventSize)
	}
	var buf []byte
	buf = append(buf, inputEvent(unix.EV_KEY, keyPower, 1)...) // press
	buf = append(buf, inputEvent(0, 0, 0)...)                  // EV_SYN
	buf = append(buf, inputEvent(unix.EV_KEY, keyPower, 0)...) // release
	buf = append(buf, inputEvent(unix.EV_KEY, 30, 1)...)       // KEY_A
	buf = append(buf, inputEvent(unix.EV_KEY, keyPower, 2)...) // autorepeat
	buf = append(buf, inputEvent(unix.EV_KEY, keyPower, 1)...) // press
	if n := powerPresses(buf); n != 2 {
		t.Errorf("presses = %d, want 2", n)
	}
	if n := powerPresses(buf[:inputEventSize-1]); n != 0 {
		t.Errorf("partial event counted: %d", n)
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	presses := 0
	done := make(chan struct{})
	go func() { watchPowerButton(r, func() { presses++ }); close(done) }()
	w.Write(buf)
	w.Close()
	<-done
	if presses != 2 {
		t.Errorf("watchPowerButton pressed %d times, want 2", presses)
	}
}

type failingWriter struct{ writes int }

func (w *failingWriter) Write(p []byte) (int, error) {
	w.writes++
	return 0, errors.New("port gone")
}

func TestCopyOutputDrainsAfterPortFailure(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	in := &initProc{console: &strings.Builder{}}
	dst := &failingWriter{}
	done := make(chan struct{})
	go func() { in.copyOutput(dst, io.Discard, r, "stdout"); close(done) }()
	// More than a pipe buffer: the writer would block forever if the copy
	// stopped reading when the port failed.
	chunk := make([]byte, 64<<10)
	for range 8 {
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("copy did not drain the pipe")
	}
	if dst.writes != 1 {
		t.Errorf("port written %d times after failing, want 1", dst.writes)
	}
	if !strings.Contains(in.console.(*strings.Builder).String(), "port gone") {
		t.Error("port failure not logged")
	}
}

func TestReadConfig(t *testing.T) {
	data, err := guest.EncodeConfig(guest.Config{Args: []string{"true"}, Hostname: "h"})
	if err != nil {
		t.Fatal(err)
	}
	// A disk larger than the config, as a host may round it up.
	disk := filepath.Join(t.TempDir(), "config.img")
	writeFile(t, disk, string(append(data, make([]byte, 8192)...)), 0o644)
	c, err := readConfig(disk)
	if err != nil || c.Hostname != "h" || c.Args[0] != "true" {
		t.Fatalf("readConfig = %+v, %v", c, err)
	}
	writeFile(t, disk, "garbage", 0o644)
	if _, err := readConfig(disk); err == nil || exitCodeOf(err) != guest.ExitCodeInitFailure {
		t.Errorf("bad config: %v", err)
	}
}
