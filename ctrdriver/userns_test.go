package ctrdriver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/testrootfs"
	"github.com/berthd/berth/supervisor/monitortest"
)

// searchableTempDir is a temporary directory that other users may pass
// through (o+x), as a container's mapped ids must to reach its root
// filesystem; t.TempDir's parent is closed to them.
func searchableTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "berth-userns-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	return dir
}

// newUserNSDriver is a driver whose containers run in user namespaces.
// It skips only where the kernel lacks id-mapped mounts on overlayfs.
func newUserNSDriver(t *testing.T, root string, opts Options) *Driver {
	t.Helper()
	requireRunc(t)
	opts.Root = root
	if opts.MonitorCmd == nil {
		opts.MonitorCmd = []string{monitortest.Path(t)}
	}
	d, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if on, reason := d.userns.enabled(); !on {
		if strings.Contains(reason, "the kernel cannot") {
			t.Skipf("user namespaces are off on this machine: %s", reason)
		}
		t.Fatalf("user namespaces are off: %s", reason)
	}
	return d
}

func userNSTask(t *testing.T, prefix string, args ...string) *driver.TaskConfig {
	return &driver.TaskConfig{
		ID:     drivertest.NewID(prefix),
		Image:  driver.Image{RootfsDir: sharedRootfs(t)},
		Args:   args,
		Env:    []string{"PATH=/bin"},
		LogDir: t.TempDir(),
	}
}

// procIDs reads the Uid: and Gid: lines of /proc/PID/status on the host.
func procIDs(t *testing.T, pid int) (uids, gids []string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 5 && f[0] == "Uid:" {
			uids = f[1:]
		}
		if len(f) == 5 && f[0] == "Gid:" {
			gids = f[1:]
		}
	}
	return uids, gids
}

// The container's root is an unprivileged host uid: the first of its
// range, in every one of real, effective, saved and file system ids.
func TestUserNSRootIsUnprivilegedOnHost(t *testing.T) {
	// The range directories next to the driver's root, as the agent has
	// them: the root itself stays closed.
	top := searchableTempDir(t)
	root := filepath.Join(top, "containers")
	d := newUserNSDriver(t, root, Options{UserNS: UserNSOptions{Dir: filepath.Join(top, "userns")}})
	if fi, err := os.Stat(root); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("driver root: %v %v, want mode 0700", fi.Mode(), err)
	}
	cfg := userNSTask(t, "dt-uns", "sh", "-c", "id; cat /proc/self/uid_map; sleep 30")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer d.Destroy(context.Background(), cfg.ID)
	st, err := d.Inspect(ctx, cfg.ID)
	if err != nil || st.Pid == 0 {
		t.Fatalf("Inspect: %+v %v", st, err)
	}
	m, err := readIDMap(d.taskDir(cfg.ID))
	if err != nil || m == nil {
		t.Fatalf("no range recorded: %v", err)
	}
	if m.UID < DefaultUserNSBase || m.GID < DefaultUserNSBase || m.Size != DefaultUserNSRangeSize {
		t.Fatalf("range %+v is not from the default ids", m)
	}
	fi, err := os.Stat(d.userns.rangeDir(*m))
	if sys, ok := fi.Sys().(*syscall.Stat_t); err != nil || !ok || fi.Mode().Perm() != 0o710 || sys.Uid != m.UID || sys.Gid != m.GID {
		t.Errorf("range directory %s: %v %v, want mode 0710 owned by %d:%d", d.userns.rangeDir(*m), fi.Mode(), err, m.UID, m.GID)
	}
	// The range's root reaches the root filesystem through the data
	// directory; nobody else does, another container's root included.
	busybox := filepath.Join(d.userns.rangeDir(*m), "rootfs", "bin", "busybox")
	for _, who := range []struct {
		uid, gid uint32
		reach    bool
	}{{m.UID, m.GID, true}, {65534, 65534, false}, {m.UID + m.Size, m.GID + m.Size, false}} {
		out, err := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", who.uid), fmt.Sprintf("--regid=%d", who.gid), "--clear-groups", "/bin/busybox", "stat", "-c", "%u", busybox).CombinedOutput()
		if reached := err == nil; reached != who.reach {
			t.Errorf("host uid %d reaches %s: %v (%v: %s), want %v", who.uid, busybox, reached, err, out, who.reach)
		}
	}
	uids, gids := procIDs(t, st.Pid)
	want := []string{fmt.Sprint(m.UID), fmt.Sprint(m.UID), fmt.Sprint(m.UID), fmt.Sprint(m.UID)}
	if strings.Join(uids, " ") != strings.Join(want, " ") {
		t.Errorf("container root's host uids %v, want %v", uids, want)
	}
	if gids[0] != fmt.Sprint(m.GID) || gids[1] != fmt.Sprint(m.GID) {
		t.Errorf("container root's host gids %v, want %d", gids, m.GID)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(drivertest.ReadLog(t, cfg, driver.StdoutLog), "uid_map") && time.Now().Before(deadline) {
		out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
		if strings.Count(out, "\n") >= 2 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
	if !strings.Contains(out, "uid=0(root) gid=0(root)") || !strings.Contains(strings.Join(strings.Fields(out), " "), fmt.Sprintf("0 %d %d", m.UID, m.Size)) {
		t.Errorf("inside the container: %q (stderr %q)", out, drivertest.ReadLog(t, cfg, driver.StderrLog))
	}
}

// The conformance suite with every container in a user namespace.
func TestConformanceUserNS(t *testing.T) {
	root := filepath.Join(searchableTempDir(t), "containers")
	newUserNSDriver(t, root, Options{})
	drivertest.Run(t, drivertest.Harness{
		New:         func(t *testing.T) driver.Driver { return newUserNSDriver(t, root, Options{}) },
		Image:       driver.Image{Ref: "test/busybox", Digest: "sha256:test", RootfsDir: sharedRootfs(t)},
		StopTimeout: 2 * time.Second,
		Slack:       15 * time.Second,
		Parallel:    20,
	})
	assertNoLeaks(t, root)
	assertNoRanges(t, root)
}

// assertNoRanges checks that no range directory is left.
func assertNoRanges(t *testing.T, root string) {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(root, "userns"))
	for _, e := range entries {
		if e.Name() != ".lock" {
			t.Errorf("left in %s: %s", filepath.Join(root, "userns"), e.Name())
		}
	}
}

// runToEnd starts cfg, waits for its end and for its monitor's exit (the
// container released) and returns its stdout; the task is destroyed when
// the test ends.
func runToEnd(t *testing.T, d *Driver, cfg *driver.TaskConfig) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { d.Destroy(context.Background(), cfg.ID) })
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
	if res.ExitCode != 0 {
		t.Fatalf("exit %d: stdout %q stderr %q", res.ExitCode, out, drivertest.ReadLog(t, cfg, driver.StderrLog))
	}
	awaitMonitorExit(t, d, cfg.ID)
	return out
}

// testNetns makes a network namespace the way the agent's network does
// (in the host's user namespace), with loopback up.
func testNetns(t *testing.T) string {
	t.Helper()
	name := drivertest.NewID("berth-uns")
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set lo up: %v: %s", err, out)
	}
	return "/run/netns/" + name
}

// Root in the container binds port 80 in a network namespace the host's
// user namespace owns (where its CAP_NET_BIND_SERVICE does not count), and
// its /sys shows that namespace's interfaces, not the host's.
func TestUserNSJoinedNetwork(t *testing.T) {
	d := newUserNSDriver(t, searchableTempDir(t), Options{})
	hostIfaces, _ := os.ReadDir("/sys/class/net")
	script := "nc -l -p 80 </dev/null >/dev/null & sleep 0.5; netstat -ltn; echo start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start); echo net: $(ls /sys/class/net); kill $!"

	t.Run("Bridge", func(t *testing.T) {
		cfg := userNSTask(t, "dt-uns-br", "sh", "-c", script)
		cfg.Network = &driver.Network{Mode: driver.NetworkBridge, Netns: testNetns(t)}
		out := runToEnd(t, d, cfg)
		if !strings.Contains(out, ":80 ") || !strings.Contains(out, "start=0") {
			t.Errorf("root did not bind port 80: %q (stderr %q)", out, drivertest.ReadLog(t, cfg, driver.StderrLog))
		}
		if !strings.Contains(out, "net: lo\n") {
			t.Errorf("/sys/class/net is not the container's namespace's (only lo): %q", out)
		}
	})
	t.Run("None", func(t *testing.T) {
		cfg := userNSTask(t, "dt-uns-none", "sh", "-c", script)
		out := runToEnd(t, d, cfg)
		if !strings.Contains(out, ":80 ") || !strings.Contains(out, "net: lo\n") {
			t.Errorf("network none: %q (stderr %q)", out, drivertest.ReadLog(t, cfg, driver.StderrLog))
		}
	})
	t.Run("Host", func(t *testing.T) {
		cfg := userNSTask(t, "dt-uns-host", "sh", "-c", "echo net: $(ls /sys/class/net); echo start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)")
		cfg.Network = &driver.Network{Mode: driver.NetworkHost}
		out := runToEnd(t, d, cfg)
		// Other tests make and remove interfaces meanwhile: only those
		// there before and after must show.
		after, _ := os.ReadDir("/sys/class/net")
		still := map[string]bool{}
		for _, e := range after {
			still[e.Name()] = true
		}
		for _, e := range hostIfaces {
			if !still[e.Name()] {
				continue
			}
			if !strings.Contains(out+" ", " "+e.Name()+" ") && !strings.Contains(out, " "+e.Name()+"\n") {
				t.Errorf("host network: /sys/class/net lacks the host's %s: %q", e.Name(), out)
			}
		}
		host, _ := os.ReadFile(unprivilegedPortStart)
		if !strings.Contains(out, "start="+strings.TrimSpace(string(host))) {
			t.Errorf("host network: the host's ip_unprivileged_port_start was changed: %q, host %q", out, host)
		}
	})
}

// A file the container's root writes, and one it copies up from the
// image, are owned by its mapped ids in the upper layer; the shared image
// is untouched.
func TestUserNSUpperLayerOwnedByMappedIDs(t *testing.T) {
	d := newUserNSDriver(t, searchableTempDir(t), Options{})
	cfg := userNSTask(t, "dt-uns-up", "sh", "-c", "echo x > /written; chown 1000:1000 /written2 2>/dev/null; touch /written2 && chown 1000:1000 /written2; echo '# more' >> /etc/group; cp /bin/busybox /suid && chmod 4755 /suid")
	runToEnd(t, d, cfg)
	m, err := readIDMap(d.taskDir(cfg.ID))
	if err != nil || m == nil {
		t.Fatalf("no range: %v", err)
	}
	upper := filepath.Join(d.layerDir(cfg.ID), "upper")
	for name, want := range map[string]uint32{"written": m.UID, "written2": m.UID + 1000, "etc/group": m.UID, "suid": m.UID, ".": m.UID} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(upper, name), &st); err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if st.Uid != want || st.Gid != want-m.UID+m.GID {
			t.Errorf("upper/%s is owned by %d:%d on the host, want %d:%d", name, st.Uid, st.Gid, want, want-m.UID+m.GID)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(sharedRootfs(t), "etc/group"), &st); err != nil || st.Uid != 0 {
		t.Errorf("the image's etc/group: owner %d, %v; want root, unchanged", st.Uid, err)
	}
	if b, _ := os.ReadFile(filepath.Join(sharedRootfs(t), "etc/group")); strings.Contains(string(b), "# more") {
		t.Error("the container wrote into the shared image")
	}
}

// Containers started at once, by two drivers on one root (as two agent
// processes would), get disjoint ranges, and their roots distinct host uids.
func TestUserNSDisjointRanges(t *testing.T) {
	root := searchableTempDir(t)
	drivers := []*Driver{newUserNSDriver(t, root, Options{}), newUserNSDriver(t, root, Options{})}
	const n = 8
	cfgs := make([]*driver.TaskConfig, n)
	errs := make(chan error, n)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range cfgs {
		cfgs[i] = userNSTask(t, "dt-uns-dis", "sleep", "30")
		go func(d *Driver, cfg *driver.TaskConfig) {
			_, err := d.Start(ctx, cfg)
			errs <- err
		}(drivers[i%2], cfgs[i])
	}
	for range cfgs {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	defer func() {
		for i, cfg := range cfgs {
			drivers[i%2].Destroy(context.Background(), cfg.ID)
		}
		assertNoRanges(t, root)
	}()
	seen := map[uint32]string{}
	hostUIDs := map[string]bool{}
	for i, cfg := range cfgs {
		m, err := readIDMap(drivers[i%2].taskDir(cfg.ID))
		if err != nil || m == nil {
			t.Fatalf("%s: no range: %v", cfg.ID, err)
		}
		for base, id := range seen {
			if overlaps(base, DefaultUserNSRangeSize, m.UID, m.Size) {
				t.Errorf("%s and %s share host uids from %d", id, cfg.ID, m.UID)
			}
		}
		seen[m.UID] = cfg.ID
		st, err := drivers[i%2].Inspect(ctx, cfg.ID)
		if err != nil {
			t.Fatal(err)
		}
		uids, _ := procIDs(t, st.Pid)
		if hostUIDs[uids[1]] || uids[1] != fmt.Sprint(m.UID) {
			t.Errorf("%s runs as host uid %s (range %d)", cfg.ID, uids[1], m.UID)
		}
		hostUIDs[uids[1]] = true
	}
}

// Destroy releases the range; so does Recover of a task of an earlier
// boot, and of a task whose start died right after its range was taken.
func TestUserNSRangeReleased(t *testing.T) {
	root := searchableTempDir(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	held := func(d *Driver) int {
		used, err := d.userns.used()
		if err != nil {
			t.Fatal(err)
		}
		return len(used)
	}

	d := newUserNSDriver(t, root, Options{BootID: "boot-1"})
	cfg := userNSTask(t, "dt-uns-rel", "sleep", "30")
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if held(d) != 1 {
		t.Fatalf("%d ranges held with one container", held(d))
	}
	if err := d.Destroy(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	if n := held(d); n != 0 {
		t.Errorf("%d ranges held after Destroy", n)
	}
	assertNoRanges(t, root)

	// A reboot: the container and its mounts are gone (simulated by
	// killing it and unmounting), its task directory and record are not.
	cfg = userNSTask(t, "dt-uns-boot", "sleep", "30")
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	m, _ := readIDMap(d.taskDir(cfg.ID))
	if err := d.runc.kill(ctx, cfg.ID, "KILL"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Wait(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	if err := d.unmountRootfs(d.taskDir(cfg.ID)); err != nil {
		t.Fatal(err)
	}
	// A start that died after taking its range, before anything else.
	crashed := drivertest.NewID("dt-uns-crash")
	if err := os.Mkdir(d.taskDir(crashed), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := d.userns.allocate(ctx, d.taskDir(crashed)); err != nil {
		t.Fatal(err)
	}
	after := newUserNSDriver(t, root, Options{BootID: "boot-2"})
	if n := held(after); n != 2 {
		t.Fatalf("%d ranges held by the tasks of the earlier boot, want 2 until they are recovered", n)
	}
	if err := after.Recover(ctx, &driver.Handle{ID: cfg.ID, Driver: Name}); !errors.Is(err, driver.ErrRebooted) {
		t.Errorf("Recover of a task of an earlier boot = %v, want ErrRebooted", err)
	}
	if err := after.Recover(ctx, &driver.Handle{ID: crashed, Driver: Name}); err == nil {
		t.Errorf("Recover of a task that never started = nil, want an error")
	}
	if n := held(after); n != 0 {
		t.Errorf("%d ranges held after Recover of the rebooted tasks", n)
	}
	if _, err := os.Stat(after.userns.rangeDir(*m)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("range directory of the rebooted task: %v, want it gone", err)
	}
	assertNoLeaks(t, root)
	assertNoRanges(t, root)
}

// The host ids come from the configured base and size, or from a user's
// subordinate ids; ids that belong to someone else turn user namespaces
// off with a reason that names them.
func TestUserNSIDs(t *testing.T) {
	etc := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("passwd", "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nodd:x:3000000000:100::/:/bin/sh\n")
	write("group", "root:x:0:\nalice:x:1000:\n")
	write("subuid", "alice:100000:65536\nberth:200000:196608\n")
	write("subgid", "alice:100000:65536\nberth:300000:131072\n")
	for _, tc := range []struct {
		name   string
		opts   UserNSOptions
		reason string // empty: on
		uid    uint32
		gid    uint32
		slots  uint32
	}{
		{name: "defaults", uid: DefaultUserNSBase, gid: DefaultUserNSBase, slots: 16384},
		{name: "base and size", opts: UserNSOptions{Base: 500000, Size: 200000}, uid: 500000, gid: 500000, slots: 3},
		{name: "subid user", opts: UserNSOptions{SubIDUser: "berth"}, uid: 200000, gid: 300000, slots: 2},
		{name: "subid user unknown", opts: UserNSOptions{SubIDUser: "bob"}, reason: `container.userns.subid_user "bob" has no entry in ` + filepath.Join(etc, "subuid")},
		{name: "overlaps a user's subuids", opts: UserNSOptions{Base: 150000, Size: 65536}, reason: "container.userns.base and size overlap alice's subordinate uids 100000-165535"},
		{name: "holds a host user", opts: UserNSOptions{Base: 65536 * 40000, Size: 65536 * 10000}, reason: "container.userns.base and size include host user odd (uid 3000000000)"},
		{name: "past the last id", opts: UserNSOptions{Base: 1 << 31, Size: 1<<31 + 10}, reason: "reach past the last host id"},
		{name: "smaller than a range", opts: UserNSOptions{Base: 500000, Size: 1000}, reason: "hold fewer than container.userns.range_size (65536) ids"},
		{name: "off", opts: UserNSOptions{Mode: UserNSOff}, reason: "turned off by container.userns.mode: off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.etc = etc
			u := newUserNS(tc.opts, t.TempDir(), t.TempDir(), slog.Default())
			var err error
			if tc.opts.Mode == UserNSOff {
				err = u.probe()
			} else {
				err = u.resolveIDs()
			}
			if tc.reason != "" {
				if err == nil || !strings.Contains(err.Error(), tc.reason) {
					t.Fatalf("got %v, want an error containing %q", err, tc.reason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if u.uid != tc.uid || u.gid != tc.gid || u.slots != tc.slots {
				t.Errorf("uids from %d, gids from %d, %d ranges; want %d, %d, %d", u.uid, u.gid, u.slots, tc.uid, tc.gid, tc.slots)
			}
		})
	}
}

// Fingerprint says whether user namespaces are on, and why not.
func TestUserNSFingerprint(t *testing.T) {
	requireRunc(t)
	on := newUserNSDriver(t, searchableTempDir(t), Options{}).Fingerprint(context.Background())
	if on.Details["userns"] != "on" || on.Details["userns_reason"] != "" || !strings.Contains(on.Details["userns_ids"], "16384 ranges of 65536") {
		t.Errorf("on: details %v", on.Details)
	}
	for name, opts := range map[string]Options{
		"off":                   {Root: searchableTempDir(t), UserNS: UserNSOptions{Mode: UserNSOff}},
		"closed path":           {Root: t.TempDir()}, // t.TempDir's parent is 0700
		"no ranges in the size": {Root: searchableTempDir(t), UserNS: UserNSOptions{Size: 100}},
	} {
		d, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		fp := d.Fingerprint(context.Background())
		if fp.Details["userns"] != "off" || fp.Details["userns_reason"] == "" {
			t.Errorf("%s: details %v, want userns off with a reason", name, fp.Details)
		}
		if name == "closed path" && !strings.Contains(fp.Details["userns_reason"], "does not let other users through") {
			t.Errorf("closed path: reason %q", fp.Details["userns_reason"])
		}
	}
}

// Allocation is exhausted with a reason, and a range is given again
// only after its task directory is gone.
func TestUserNSAllocation(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	root := searchableTempDir(t)
	tasks := filepath.Join(root, "tasks")
	os.MkdirAll(filepath.Join(root, "userns"), 0o711)
	opts := UserNSOptions{Base: 1 << 30, Size: 3 * 65536, etc: t.TempDir()}
	// Two allocators on one root: two agent processes.
	a, b := newUserNS(opts, root, tasks, slog.Default()), newUserNS(opts, root, tasks, slog.Default())
	for _, u := range []*userns{a, b} {
		if err := u.resolveIDs(); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	got := make(chan idMap, 3)
	errc := make(chan error, 4)
	for i := range 4 {
		go func() {
			dir := filepath.Join(tasks, fmt.Sprint("t", i))
			os.MkdirAll(dir, 0o700)
			m, err := []*userns{a, b}[i%2].allocate(ctx, dir)
			if err == nil {
				got <- m
			}
			errc <- err
		}()
	}
	var exhausted error
	for range 4 {
		if err := <-errc; err != nil {
			exhausted = err
		}
	}
	if !errors.Is(exhausted, errdefs.ErrResourceExhausted) || !strings.Contains(exhausted.Error(), "all 3 user namespace id ranges are in use") {
		t.Errorf("fourth allocation of three ranges: %v", exhausted)
	}
	close(got)
	seen := map[uint32]bool{}
	for m := range got {
		if seen[m.UID] || m.UID != m.GID || (m.UID-opts.Base)%65536 != 0 {
			t.Errorf("range %+v given twice or misaligned", m)
		}
		seen[m.UID] = true
	}
	if len(seen) != 3 {
		t.Fatalf("%d distinct ranges, want 3", len(seen))
	}
	entries, _ := os.ReadDir(tasks)
	for _, e := range entries {
		if m, _ := readIDMap(filepath.Join(tasks, e.Name())); m != nil && m.UID == opts.Base+65536 {
			os.RemoveAll(filepath.Join(tasks, e.Name()))
		}
	}
	dir := filepath.Join(tasks, "again")
	os.MkdirAll(dir, 0o700)
	m, err := a.allocate(ctx, dir)
	if err != nil || m.UID != opts.Base+65536 {
		t.Errorf("allocation after a task went: %+v %v, want the range it held", m, err)
	}
}

// BenchmarkStartUserNS times Start (to running) of /bin/true with user
// namespaces on and off; Wait and Destroy are not timed.
func BenchmarkStartUserNS(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	top, err := os.MkdirTemp("", "berth-userns-bench-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(top)
	os.Chmod(top, 0o711)
	rootfs, err := os.MkdirTemp("", "berth-userns-bench-rootfs-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(rootfs)
	if err := testrootfs.Build(rootfs); err != nil {
		b.Fatal(err)
	}
	for _, mode := range []UserNSMode{UserNSAuto, UserNSOff} {
		b.Run("userns="+string(mode), func(b *testing.B) {
			d, err := New(Options{Root: filepath.Join(top, string(mode)), MonitorCmd: []string{monitortest.Path(b)}, UserNS: UserNSOptions{Mode: mode}})
			if err != nil {
				b.Fatal(err)
			}
			if on, reason := d.userns.enabled(); on != (mode == UserNSAuto) {
				b.Fatalf("user namespaces on=%v: %s", on, reason)
			}
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				cfg := &driver.TaskConfig{ID: drivertest.NewID("dt-bench"), Image: driver.Image{RootfsDir: rootfs},
					Args: []string{"true"}, Env: []string{"PATH=/bin"}, LogDir: b.TempDir()}
				if _, err := d.Start(ctx, cfg); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				d.Wait(ctx, cfg.ID)
				if err := d.Destroy(ctx, cfg.ID); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// BenchmarkUserNSAllocate gives and releases a range on a node already
// running 500 containers: what the range allocation adds to a start.
func BenchmarkUserNSAllocate(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	root, err := os.MkdirTemp("", "berth-userns-alloc-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(root)
	tasks := filepath.Join(root, "tasks")
	etc := b.TempDir()
	u := newUserNS(UserNSOptions{Base: 1 << 30, Size: 1024 * 65536, etc: etc}, root, tasks, slog.Default())
	if err := u.resolveIDs(); err != nil {
		b.Fatal(err)
	}
	if err := os.MkdirAll(u.dir, 0o711); err != nil {
		b.Fatal(err)
	}
	u.pool.close() // the namespaces made ahead are not what is measured
	ctx := context.Background()
	for i := range 500 {
		dir := filepath.Join(tasks, fmt.Sprint("running", i))
		os.MkdirAll(dir, 0o700)
		if _, err := u.allocate(ctx, dir); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		dir := filepath.Join(tasks, fmt.Sprint("new", i))
		os.MkdirAll(dir, 0o700)
		if _, err := u.allocate(ctx, dir); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		os.RemoveAll(dir)
		b.StartTimer()
	}
}
