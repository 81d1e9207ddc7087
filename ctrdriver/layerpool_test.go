package ctrdriver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/internal/loopfs"
)

// poolMounts counts the mounts under the pool's directory.
func poolMounts(t *testing.T, root string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), " "+filepath.Join(root, poolDir)+"/")
}

// waitPoolReady waits until d's pool holds want filesystems.
func waitPoolReady(t *testing.T, d *Driver, want int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		d.layers.mu.Lock()
		n, why := len(d.layers.ready), d.layers.lastErr
		d.layers.mu.Unlock()
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pool holds %d prepared layers after 20s, want %d (last error %q)", n, want, why)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A start with the default budget takes a prepared filesystem (and the
// budget holds on it exactly as on one made at the start), the pool makes
// the next, a start with another budget makes its own, and Close releases
// every filesystem, device and mount of the pool.
func TestLayerPoolServesStartsAndIsReleased(t *testing.T) {
	requireRunc(t)
	root := searchableTempDir(t)
	d := newUserNSDriver(t, root, Options{LayerPool: 2, LayerPoolBytes: 16 << 20})
	waitPoolReady(t, d, 2)
	if n := poolMounts(t, root); n != 2 {
		t.Fatalf("%d mounts under the pool, want 2", n)
	}

	cfg := userNSTask(t, "dt-pool", "sh", "-c", diskBudgetScript)
	cfg.Resources.DiskBytes = 16 << 20
	out := runToEnd(t, d, cfg)
	if !strings.Contains(out, "No space left on device") || strings.Contains(out, "dd=0") || !strings.Contains(out, "fine") {
		t.Errorf("a prepared layer of 16 MiB: want ENOSPC past it and writes after freeing, got %q", out)
	}
	if d.layers.taken != 1 {
		t.Fatalf("%d starts served from the pool, want 1", d.layers.taken)
	}
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(d.layerDir(cfg.ID), scratchImage), &st); err != nil {
		t.Fatalf("the task's filesystem is not in its layer directory: %v", err)
	}
	if used := st.Blocks * 512; used > 16<<20 {
		t.Errorf("the prepared layer takes %d bytes of the node's disk, past its 16 MiB budget", used)
	}
	waitPoolReady(t, d, 2)

	// Another size: made at the start, the pool untouched.
	other := userNSTask(t, "dt-pool", "sh", "-c", "echo x > /f && cat /f")
	other.Resources.DiskBytes = 32 << 20
	if out := runToEnd(t, d, other); out != "x\n" {
		t.Errorf("output %q", out)
	}
	if d.layers.taken != 1 {
		t.Errorf("a start with another budget took from the pool")
	}
	for _, id := range []string{cfg.ID, other.ID} {
		if err := d.Destroy(t.Context(), id); err != nil {
			t.Fatal(err)
		}
	}
	fp := d.Fingerprint(t.Context())
	if s := fp.Details["prepared_layers"]; !strings.HasPrefix(s, "2 of 2 ready (16 MiB each), 1 starts served") {
		t.Errorf("node status says prepared_layers %q", s)
	}
	if err := d.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	assertNoLeaks(t, root)
	if entries, _ := os.ReadDir(filepath.Join(root, poolDir)); len(entries) != 0 {
		t.Errorf("the pool's directory keeps %d entries after Close", len(entries))
	}
}

// A driver made over the root of one that died (an agent killed with its
// pool mounted) or of a node that rebooted (files left, nothing mounted)
// releases what was left and makes its pool afresh: the pool never grows
// past its bound, and nothing is leaked.
func TestLayerPoolIsRebuiltAfterACrashAndAReboot(t *testing.T) {
	requireRunc(t)
	root := searchableTempDir(t)
	opts := Options{LayerPool: 2, LayerPoolBytes: 16 << 20}
	dead := newUserNSDriver(t, root, opts)
	waitPoolReady(t, dead, 2)
	// The agent dies: nothing is closed.
	dead.layers.mu.Lock()
	dead.layers.closed = true // its filler must not race the new driver
	dead.layers.mu.Unlock()
	dead.layers.wg.Wait()

	d := newUserNSDriver(t, root, opts)
	waitPoolReady(t, d, 2)
	if n := poolMounts(t, root); n != 2 {
		t.Errorf("%d mounts under the pool after a crash and a new driver, want 2", n)
	}
	if n := len(loopsUnder(root)); n != 2 {
		t.Errorf("%d loop devices under the root after a crash and a new driver, want 2", n)
	}

	// A reboot: the files stay, their mounts and devices are gone.
	d.layers.mu.Lock()
	d.layers.closed = true
	names := d.layers.ready
	d.layers.mu.Unlock()
	d.layers.wg.Wait()
	for _, n := range names {
		if err := unmountAll(d.layers.mnt(n)); err != nil {
			t.Fatal(err)
		}
	}
	// An unfinished entry of the crash: a file and a directory only.
	if err := loopfs.Create(filepath.Join(root, poolDir, "99.img"), 16<<20, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(root, poolDir, "99"), 0o700); err != nil {
		t.Fatal(err)
	}
	after := newUserNSDriver(t, root, opts)
	waitPoolReady(t, after, 2)
	entries, _ := os.ReadDir(filepath.Join(root, poolDir))
	if len(entries) != 4 { // two files and their mount points
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("the pool's directory after a reboot holds %v, want 2 filesystems and their mount points", names)
	}
	cfg := userNSTask(t, "dt-pool", "sh", "-c", "echo ok")
	cfg.Resources.DiskBytes = 16 << 20
	cfg.ID = drivertest.NewID("dt-pool")
	if out := runToEnd(t, after, cfg); out != "ok\n" || after.layers.taken != 1 {
		t.Errorf("a start after the rebuild: output %q, %d served from the pool", out, after.layers.taken)
	}
	if err := after.Destroy(t.Context(), cfg.ID); err != nil {
		t.Fatal(err)
	}
	if err := after.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	assertNoLeaks(t, root)
}
