package vmdriver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
)

// TestDiskBudgetIsENOSPCInTheGuest: a VM workload writing far past its
// disk budget gets ENOSPC in the guest; its overlay stays within the
// budget on the node.
func TestDiskBudgetIsENOSPCInTheGuest(t *testing.T) {
	setup(t)
	d := newDriver(t, fixtures.root)
	cfg := newTask(t, "sh", "-c", `dd if=/dev/zero of=/fill bs=1M count=96 2>&1; echo dd=$?; sync; rm -f /fill; echo fine > /after && cat /after`)
	cfg.Resources.DiskBytes = 24 << 20
	res := run(t, d, cfg)
	out := drivertest.ReadLog(t, cfg, driver.StdoutLog)
	if res.ExitCode != 0 {
		t.Fatalf("exit %d: stdout %q stderr %q", res.ExitCode, out, drivertest.ReadLog(t, cfg, driver.StderrLog))
	}
	if !strings.Contains(out, "No space left on device") || strings.Contains(out, "dd=0") {
		t.Errorf("writing 96 MiB under a 24 MiB budget: want ENOSPC and a failed dd, got %q", out)
	}
	if !strings.Contains(out, "fine") {
		t.Errorf("the guest could not write once it freed its space: %q", out)
	}
	disks := []string{filepath.Join(d.taskDir(cfg.ID), rootDiskFile)}
	if len(disks) == 0 {
		t.Fatalf("no overlay in %s", d.taskDir(cfg.ID))
	}
	for _, p := range disks {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		// The guest's writes land in the overlay: beyond the budget only
		// qcow2's own tables may take space.
		if used := st.Blocks * 512; used > 24<<20+8<<20 {
			t.Errorf("%s takes %d bytes of the node's disk, past its 24 MiB budget", filepath.Base(p), used)
		}
	}
	if _, err := os.Stat(d.taskDir(cfg.ID)); err != nil {
		t.Fatal(err)
	}
}
