package ctrdriver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor"
	"github.com/berthd/berth/supervisor/monitor"
	"github.com/berthd/berth/supervisor/monitortest"
)

// spareMonitors lists the pids of this process's children that are
// monitors waiting for a task.
func spareMonitors(t *testing.T) []int {
	t.Helper()
	files, _ := filepath.Glob("/proc/self/task/*/children")
	var pids []int
	for _, f := range files {
		data, _ := os.ReadFile(f)
		for _, p := range strings.Fields(string(data)) {
			cmdline, _ := os.ReadFile("/proc/" + p + "/cmdline")
			args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
			if len(args) == 3 && strings.HasSuffix(args[0], "berth-monitor") && args[1] == monitor.SpareArg {
				pid, _ := strconv.Atoi(p)
				pids = append(pids, pid)
			}
		}
	}
	slices.Sort(pids)
	return pids
}

// threadNices reads the niceness of each thread of pid (field 19 of
// /proc/PID/task/TID/stat).
func threadNices(t *testing.T, pid int) []int {
	t.Helper()
	stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	var nices []int
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		_, rest, _ := strings.Cut(string(b), ") ")
		fields := strings.Fields(rest)
		if len(fields) < 17 {
			t.Fatalf("%s: %q", f, b)
		}
		n, _ := strconv.Atoi(fields[16])
		nices = append(nices, n)
	}
	if len(nices) == 0 {
		t.Fatalf("no threads of %d", pid)
	}
	return nices
}

// waitSpares waits until n spare monitors wait, and returns their pids.
func waitSpares(t *testing.T, d *Driver, n int) []int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids := spareMonitors(t)
		if len(pids) == n && strings.HasPrefix(d.sup.SpareStatus(), strconv.Itoa(n)+" of ") {
			return pids
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d spare monitors (%v), node status %q; want %d", len(pids), pids, d.sup.SpareStatus(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Monitors made ahead: a start hands one its task (the task's monitor is a
// process that existed before the start), the spares are made again, a
// spare that died is replaced by a monitor started for the task, and Close
// lets the spares go (they exit) without touching a running task's
// monitor.
func TestSpareMonitorsServeStartsAndAreReleased(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d, err := New(Options{Root: root, MonitorCmd: []string{monitortest.Path(t)}, Monitors: 2})
	if err != nil {
		t.Fatal(err)
	}
	before := waitSpares(t, d, 2)

	ctx := context.Background()
	cfg := userNSTask(t, "dt-spare", "sh", "-c", "echo from a spare; exit 3")
	if _, err := d.Start(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	var rec monitor.PidRecord
	if err := fileutil.ReadJSON(filepath.Join(d.taskDir(cfg.ID), monitor.PidFile), &rec); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(before, rec.Pid) {
		t.Errorf("the task's monitor %d is none of the spares %v", rec.Pid, before)
	}
	res, err := d.Wait(ctx, cfg.ID)
	if err != nil || res.ExitCode != 3 {
		t.Fatalf("wait: %+v %v", res, err)
	}
	if out, _ := os.ReadFile(filepath.Join(cfg.LogDir, "stdout.log")); string(out) != "from a spare\n" {
		t.Errorf("stdout %q", out)
	}
	if log, _ := os.ReadFile(filepath.Join(d.taskDir(cfg.ID), monitor.LogFile)); len(log) != 0 {
		t.Errorf("monitor.log of a clean run: %q", log)
	}
	if err := d.Destroy(ctx, cfg.ID); err != nil {
		t.Fatal(err)
	}
	spares := waitSpares(t, d, 2)

	// The spares die (someone killed them): starts still run, on monitors
	// started for them.
	for _, pid := range spares {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	time.Sleep(100 * time.Millisecond)
	long := userNSTask(t, "dt-spare", "sleep", "60")
	if _, err := d.Start(ctx, long); err != nil {
		t.Fatalf("start after the spares died: %v", err)
	}
	t.Cleanup(func() { _ = d.Destroy(context.Background(), long.ID) })
	if err := fileutil.ReadJSON(filepath.Join(d.taskDir(long.ID), monitor.PidFile), &rec); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(spares, rec.Pid) {
		t.Errorf("the task's monitor %d is a spare that was killed", rec.Pid)
	}
	spares = waitSpares(t, d, 2)

	// A spare that took its task names it on its command line, as a
	// monitor started for it does (ps, a search for a data directory's
	// processes).
	named := userNSTask(t, "dt-spare", "sleep", "60")
	if _, err := d.Start(ctx, named); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Destroy(context.Background(), named.ID) })
	var namedRec monitor.PidRecord
	if err := fileutil.ReadJSON(filepath.Join(d.taskDir(named.ID), monitor.PidFile), &namedRec); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(spares, namedRec.Pid) {
		t.Errorf("the task's monitor %d is none of the spares %v", namedRec.Pid, spares)
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", namedRec.Pid))
	if args := strings.Fields(strings.ReplaceAll(string(cmdline), "\x00", " ")); len(args) != 2 || args[1] != d.taskDir(named.ID) {
		t.Errorf("the monitor's command line is %q, want it to name %s", cmdline, d.taskDir(named.ID))
	}
	// Spares wait in the background; the one handed its task, and the
	// container it started, run at the agent's niceness.
	agentNice, err := proc.Nice()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range threadNices(t, namedRec.Pid) {
		if n != agentNice {
			t.Errorf("a thread of the task's monitor runs at niceness %d, want the agent's %d", n, agentNice)
		}
	}
	st, err := supervisor.Status(d.taskDir(named.ID))
	if err != nil || st.Pid == 0 {
		t.Fatalf("status of the running task: %+v %v", st, err)
	}
	for _, n := range threadNices(t, st.Pid) {
		if n != agentNice {
			t.Errorf("the container runs at niceness %d, want the agent's %d", n, agentNice)
		}
	}
	for _, pid := range waitSpares(t, d, 2) {
		for _, n := range threadNices(t, pid) {
			if n != proc.BackgroundNice {
				t.Errorf("a thread of spare monitor %d runs at niceness %d, want %d", pid, n, proc.BackgroundNice)
			}
		}
	}
	waitSpares(t, d, 2)
	if fp := d.Fingerprint(ctx); !strings.HasPrefix(fp.Details["prepared_monitors"], "2 of 2 ready, ") {
		t.Errorf("node status says prepared_monitors %q", fp.Details["prepared_monitors"])
	}

	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if pids := spareMonitors(t); len(pids) != 0 {
		t.Errorf("spare monitors left after Close: %v", pids)
	}
	if unix.Kill(rec.Pid, 0) != nil {
		t.Errorf("Close ended the running task's monitor %d", rec.Pid)
	}
	for _, id := range []string{long.ID, named.ID} {
		if err := d.Destroy(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	assertNoLeaks(t, root)
}

// A monitor binary that cannot be started (missing) fails the starts that
// need one, says why in node status, and crashes nothing: the spares'
// filler and a start release what they made.
func TestMissingMonitorFailsStartsWithoutACrash(t *testing.T) {
	root := t.TempDir()
	missing := filepath.Join(t.TempDir(), "berth-monitor")
	d, err := New(Options{Root: root, MonitorCmd: []string{missing}, Monitors: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(context.Background())
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(d.sup.SpareStatus(), "last failure") {
		if time.Now().After(deadline) {
			t.Fatalf("node status says prepared_monitors %q, want the spares' failure", d.sup.SpareStatus())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if fp := d.Fingerprint(context.Background()); fp.Healthy || !strings.Contains(fp.Reason, "monitor") {
		t.Errorf("fingerprint with the monitor missing: healthy %v, reason %q", fp.Healthy, fp.Reason)
	}
	if os.Geteuid() != 0 {
		return
	}
	requireRunc(t)
	cfg := userNSTask(t, "dt-nomon", "true")
	if _, err := d.Start(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Start with the monitor missing = %v, want an error naming it", err)
	}
	assertNoLeaks(t, root)
}
