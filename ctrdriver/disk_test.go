package ctrdriver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver/drivertest"
)

// diskBudgetScript fills the root filesystem far past a 16 MiB budget,
// then shows the container still works once it freed the space.
const diskBudgetScript = `dd if=/dev/zero of=/fill bs=1M count=64 2>&1; echo dd=$?; rm -f /fill; echo fine > /after && cat /after`

func TestDiskBudgetIsENOSPCInTheContainer(t *testing.T) {
	requireRunc(t)
	for _, userns := range []bool{false, true} {
		name := map[bool]string{false: "host-ids", true: "userns"}[userns]
		t.Run(name, func(t *testing.T) {
			root := searchableTempDir(t)
			var d *Driver
			if userns {
				d = newUserNSDriver(t, root, Options{})
			} else {
				d = newDriver(t, root)
			}
			cfg := userNSTask(t, "dt-disk", "sh", "-c", diskBudgetScript)
			cfg.Resources.DiskBytes = 16 << 20
			cfg.ID = drivertest.NewID("dt-disk")
			out := runToEnd(t, d, cfg)
			if !strings.Contains(out, "No space left on device") || strings.Contains(out, "dd=0") {
				t.Errorf("writing 64 MiB under a 16 MiB budget: want ENOSPC and a failed dd, got %q", out)
			}
			if !strings.Contains(out, "fine") {
				t.Errorf("the container could not write once it freed its space: %q", out)
			}
			var st unix.Stat_t
			if err := unix.Stat(filepath.Join(d.layerDir(cfg.ID), scratchImage), &st); err != nil {
				t.Fatal(err)
			}
			if used := st.Blocks * 512; used > 16<<20 {
				t.Errorf("the writable layer takes %d bytes of the node's disk, more than its 16 MiB budget", used)
			}
			if err := d.Destroy(t.Context(), cfg.ID); err != nil {
				t.Fatal(err)
			}
			assertNoLeaks(t, root)
		})
	}
}

// TestNoDiskBudgetKeepsTheLayerInItsDirectory: a task without a budget
// (one recorded before budgets existed) runs as before, with no
// filesystem of its own: its layer is a directory on the data disk.
func TestNoDiskBudgetKeepsTheLayerInItsDirectory(t *testing.T) {
	requireRunc(t)
	root := t.TempDir()
	d := newDriver(t, root)
	cfg := userNSTask(t, "dt-nodisk", "sh", "-c", "echo data > /file && cat /file")
	if out := runToEnd(t, d, cfg); out != "data\n" {
		t.Fatalf("output %q", out)
	}
	if _, err := os.Stat(filepath.Join(d.layerDir(cfg.ID), scratchImage)); !os.IsNotExist(err) {
		t.Errorf("a task without a disk budget got a filesystem of its own: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(d.layerDir(cfg.ID), "upper", "file")); err != nil || string(b) != "data\n" {
		t.Errorf("the writable layer is not in its directory: %q %v", b, err)
	}
}
