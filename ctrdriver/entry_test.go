package ctrdriver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/seccomp/seccomptest"
	"github.com/berthd/berth/supervisor/monitor"
	"github.com/berthd/berth/supervisor/monitortest"
)

// startSleeper starts a container that sleeps on d and returns its init's
// host pid, after the process runs its own program.
func startSleeper(t *testing.T, d *Driver, prefix string) (*driver.TaskConfig, int) {
	t.Helper()
	cfg := &driver.TaskConfig{
		ID:        drivertest.NewID(prefix),
		Image:     driver.Image{RootfsDir: sharedRootfs(t)},
		Args:      []string{"sleep", "1000"},
		Resources: driver.Resources{MemoryBytes: 64 << 20, Pids: 16},
		Env:       []string{"PATH=/usr/bin:/bin"},
		LogDir:    t.TempDir(),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = d.Destroy(context.Background(), cfg.ID) })
	procs, err := cgroupProcs(cfg.ID)
	if err != nil || len(procs) != 1 {
		t.Fatalf("the container's processes: %v (%v)", procs, err)
	}
	return cfg, procs[0]
}

func bundleSpec(t *testing.T, d *Driver, id string) *specs.Spec {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(d.taskDir(id), "bundle", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var s specs.Spec
	if err := json.Unmarshal(data, &s); err != nil {
		t.Fatal(err)
	}
	return &s
}

// A container's process runs under exactly the filter berth compiled, and
// only it (runc installed none), with nothing of berth-entry's left open.
func TestSeccompFilterIsInstalledByBerthEntry(t *testing.T) {
	requireRunc(t)
	// In a user namespace, berth's default: berth-entry, on the host,
	// runs as the container's mapped root.
	d := newUserNSDriver(t, filepath.Join(searchableTempDir(t), "containers"), Options{})
	if got := d.Fingerprint(context.Background()).Details["userns"]; got != "on" {
		t.Fatalf("node status userns = %q, want on", got)
	}
	if got := d.Fingerprint(context.Background()).Details["seccomp"]; got != "berth-entry" {
		t.Fatalf("node status seccomp = %q (%s), want berth-entry", got, d.seccomp.reason)
	}
	cfg, pid := startSleeper(t, d, "dt-entry")

	s := bundleSpec(t, d, cfg.ID)
	if s.Linux.Seccomp != nil {
		t.Errorf("the bundle gives runc a seccomp profile too")
	}
	if want := monitor.EntryArgs(cfg.Args); !slices.Equal(s.Process.Args, want) {
		t.Errorf("bundle args %q, want %q", s.Process.Args, want)
	}
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	if statusField(string(status), "Seccomp") != "2" || statusField(string(status), "Seccomp_filters") != "1" || statusField(string(status), "NoNewPrivs") != "1" {
		t.Errorf("the container's process: Seccomp %q, Seccomp_filters %q, NoNewPrivs %q; want 2, 1, 1",
			statusField(string(status), "Seccomp"), statusField(string(status), "Seccomp_filters"), statusField(string(status), "NoNewPrivs"))
	}
	if cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); string(cmdline) != "sleep\x001000\x00" {
		t.Errorf("the container's process runs %q, want the workload's own sleep 1000", cmdline)
	}
	fds, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, fd := range fds {
		names = append(names, fd.Name())
	}
	if !slices.Equal(names, []string{"0", "1", "2"}) {
		t.Errorf("the workload holds fds %v, want only its stdio", names)
	}

	installed, err := seccomptest.ReadFilter(pid)
	if err != nil {
		t.Fatal(err)
	}
	compiled, err := os.ReadFile(d.seccomp.entry.Filter)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(installed, compiled) {
		t.Errorf("the installed filter (%d instructions) is not the compiled one (%d)", len(installed)/8, len(compiled)/8)
	}
}

// Without berth-entry runc installs the profile, as before; node status
// says so and why.
func TestSeccompWithoutBerthEntryIsRuncs(t *testing.T) {
	requireRunc(t)
	d, err := New(Options{Root: t.TempDir(), MonitorCmd: []string{monitortest.Path(t)}, Entry: "/nonexistent/berth-entry"})
	if err != nil {
		t.Fatal(err)
	}
	fp := d.Fingerprint(context.Background())
	if fp.Details["seccomp"] != "runc" || !strings.Contains(fp.Details["seccomp_reason"], "/nonexistent/berth-entry") {
		t.Errorf("node status seccomp %q, reason %q", fp.Details["seccomp"], fp.Details["seccomp_reason"])
	}
	cfg, pid := startSleeper(t, d, "dt-noentry")
	s := bundleSpec(t, d, cfg.ID)
	if s.Linux.Seccomp == nil || !slices.Equal(s.Process.Args, cfg.Args) {
		t.Errorf("bundle: seccomp %v, args %q; want the profile for runc and the workload's own args", s.Linux.Seccomp != nil, s.Process.Args)
	}
	if _, err := seccomptest.ReadFilter(pid); err != nil {
		t.Errorf("runc's filter: %v", err)
	}
}

// A program that is not there fails the start with runc's words, and
// leaves nothing behind.
func TestBerthEntryReportsAMissingProgram(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	for _, tc := range []struct{ arg0, want string }{
		{"no-such-program", `exec: "no-such-program": executable file not found in $PATH`},
		{"/no/such/program", `exec: "/no/such/program": stat /no/such/program: no such file or directory`},
		{"/etc/passwd", `exec: "/etc/passwd": permission denied`},
	} {
		cfg := &driver.TaskConfig{
			ID:     drivertest.NewID("dt-entry-missing"),
			Image:  driver.Image{RootfsDir: sharedRootfs(t)},
			Args:   []string{tc.arg0},
			Env:    []string{"PATH=/usr/bin:/bin"},
			LogDir: t.TempDir(),
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := d.Start(ctx, cfg)
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Start of %s: %v, want an error with %q", tc.arg0, err, tc.want)
		}
		if err := d.Destroy(context.Background(), cfg.ID); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Logf("Destroy %s: %v", cfg.ID, err)
		}
	}
	assertNoLeaks(t, root)
}

// capLines are the capability sets of a /proc/PID/status text.
func capLines(status string) string {
	var out []string
	for _, key := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters"} {
		out = append(out, key+"="+statusField(status, key))
	}
	return strings.Join(out, " ")
}

// A process started through berth-entry ends with the capabilities (and
// the rest of its hardening) runc gives it by itself, for root and for
// another user, as the container's process and as an exec; and a program
// only the bundle's capabilities reach (/ is 0700 in the test image: cat
// and sh) runs for another user as it does under runc.
func TestBerthEntryEndsWithRuncsCapabilities(t *testing.T) {
	requireRunc(t)
	got := map[string][]string{}
	for _, entry := range []string{"", "/nonexistent/berth-entry"} {
		d := newUserNSDriver(t, filepath.Join(searchableTempDir(t), "containers"), Options{Entry: entry})
		if want := map[string]string{"": "berth-entry", "/nonexistent/berth-entry": "runc"}[entry]; d.Fingerprint(context.Background()).Details["seccomp"] != want {
			t.Fatalf("driver with Entry %q: seccomp %q, want %s", entry, d.Fingerprint(context.Background()).Details["seccomp"], want)
		}
		for _, user := range []string{"", "1234:2345"} {
			// Relative to its working directory, and by the shell's
			// builtins: another user's process cannot reach /proc, nor
			// /bin/cat, through the test image's / (0700).
			cfg := userNSTask(t, "dt-caps", "sh", "-c", `while read -r l; do echo "$l"; done < status; read x`)
			cfg.User, cfg.Workdir, cfg.Stdin = user, "/proc/self", true
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if _, err := d.Start(ctx, cfg); err != nil {
				cancel()
				t.Fatalf("Start as %q: %v", user, err)
			}
			cancel()
			t.Cleanup(func() { _ = d.Destroy(context.Background(), cfg.ID) })
			var status string
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && !strings.Contains(status, "Seccomp_filters"); time.Sleep(20 * time.Millisecond) {
				status = drivertest.ReadLog(t, cfg, driver.StdoutLog)
			}
			got["process "+user] = append(got["process "+user], capLines(status))
			for _, execUser := range []string{"0:0", "1234:2345"} {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				sess, err := d.Exec(ctx, cfg.ID, &driver.ExecConfig{Args: []string{"cat", "status"}, User: execUser, Workdir: "/proc/self"})
				if err != nil {
					cancel()
					t.Fatalf("exec as %s (driver with Entry %q): %v", execUser, entry, err)
				}
				res, err := drivertest.Collect(ctx, sess)
				sess.Close()
				cancel()
				if err != nil || res.Exit.ExitCode != 0 {
					t.Fatalf("exec as %s: %+v %v; stderr %q", execUser, res.Exit, err, res.Stderr)
				}
				got["exec "+execUser] = append(got["exec "+execUser], capLines(res.Stdout))
			}
		}
	}
	for what, v := range got {
		if len(v) < 2 || v[0] != v[len(v)-1] || !strings.Contains(v[0], "Seccomp=2 Seccomp_filters=1") || !strings.Contains(v[0], "CapAmb=0000000000000000") {
			t.Errorf("%s: through berth-entry %q, runc alone %q", what, v[0], v[len(v)-1])
		}
	}
	if v := got["process 1234:2345"][0]; !strings.Contains(v, "CapEff=0000000000000000") {
		t.Errorf("another user's process holds capabilities: %s", v)
	}
}

// A process that never executes its program (berth-entry stuck, here a
// stand-in that sleeps holding the report pipe) fails the start at the
// start timeout, and nothing of it is left.
func TestHungBerthEntryStartTimesOut(t *testing.T) {
	requireRunc(t)
	stuck := filepath.Join(t.TempDir(), "berth-entry")
	if err := os.WriteFile(stuck, []byte("#!/bin/sh\nexec sleep 3600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	d, err := New(Options{Root: root, Entry: stuck, StartTimeout: 2 * time.Second, MonitorCmd: []string{monitortest.Path(t)}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := &driver.TaskConfig{ID: drivertest.NewID("dt-entry-hang"), Image: driver.Image{RootfsDir: sharedRootfs(t)},
		Args: []string{"true"}, Env: []string{"PATH=/bin"}, LogDir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	begin := time.Now()
	_, err = d.Start(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "did not start its program") {
		t.Fatalf("Start with a stuck berth-entry = %v, want a start timeout", err)
	}
	t.Logf("start failed after %v: %v", time.Since(begin).Round(time.Millisecond), err)
	if procs, _ := cgroupProcs(cfg.ID); len(procs) > 0 {
		t.Errorf("processes left in the container's cgroup: %v", procs)
	}
	if err := d.Destroy(context.Background(), cfg.ID); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Destroy after the failed start: %v", err)
	}
	assertNoLeaks(t, root)
}

// The program that starts a container's process runs non-dumpable from
// its exec: the monitor hands it over execute-only, owned by a user the
// container's user namespace does not map, so nothing in the container can
// trace it or open its memory before its filter is in place. Shown with a
// stand-in that only waits, in place of berth-entry (whose own first step,
// PR_SET_DUMPABLE, would hide what the kernel did): its /proc files belong
// to the host's root, where a dumpable process's, the workload's, belong
// to its user, the container's root.
func TestBerthEntryRunsNonDumpable(t *testing.T) {
	requireRunc(t)
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("no C compiler (cc) to build the stand-in; `make test` installs one")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "wait.c")
	const waiter = "void _start(void){for(;;)__asm__ volatile(\"mov $34,%eax\\nsyscall\");}\n" // pause()
	if err := os.WriteFile(src, []byte(waiter), 0o644); err != nil {
		t.Fatal(err)
	}
	stand := filepath.Join(dir, "berth-entry")
	if out, err := exec.Command(cc, "-static", "-nostdlib", "-Os", "-o", stand, src).CombinedOutput(); err != nil {
		t.Fatalf("build the stand-in: %v\n%s", err, out)
	}
	d := newUserNSDriver(t, filepath.Join(searchableTempDir(t), "containers"), Options{Entry: stand, StartTimeout: 20 * time.Second})
	cfg := userNSTask(t, "dt-entry-dump", "true")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	started := make(chan error, 1)
	go func() {
		_, err := d.Start(ctx, cfg)
		started <- err
	}()
	t.Cleanup(func() {
		cancel()
		<-started
		_ = d.Destroy(context.Background(), cfg.ID)
	})
	var pid int
	for deadline := time.Now().Add(15 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if procs, _ := cgroupProcs(cfg.ID); len(procs) == 1 {
			if exe, _ := os.Readlink("/proc/" + strconv.Itoa(procs[0]) + "/exe"); strings.HasPrefix(exe, "/memfd:berth-entry") {
				pid = procs[0]
			}
		}
	}
	if pid == 0 {
		t.Fatal("the stand-in did not start in the container")
	}
	owner := func(pid int) uint32 {
		var st unix.Stat_t
		if err := unix.Stat("/proc/"+strconv.Itoa(pid)+"/mem", &st); err != nil {
			t.Fatal(err)
		}
		return st.Uid
	}
	if uid := owner(pid); uid != 0 {
		t.Errorf("the starting process's /proc/%d/mem belongs to uid %d, want the host's root (non-dumpable)", pid, uid)
	}
	// The control: a workload that runs (dumpable) has its /proc files
	// owned by its user, the container's mapped root.
	_, wpid := startSleeper(t, newUserNSDriver(t, filepath.Join(searchableTempDir(t), "containers"), Options{}), "dt-entry-dump-ctl")
	if uid := owner(wpid); uid == 0 {
		t.Errorf("a running workload's /proc/%d/mem belongs to the host's root: the check above proves nothing", wpid)
	}
}
