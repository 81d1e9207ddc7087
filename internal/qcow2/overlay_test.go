package qcow2

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func needQemuTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (qemu-utils)", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// QEMU's own tools accept the overlays CreateOverlay writes: qemu-img check
// finds no error before and after writes, info shows the backing file and
// format, reads fall through to the backing image and writes stay in the
// overlay.
func TestCreateOverlayIsWhatQEMUReads(t *testing.T) {
	needQemuTools(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(raw, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(raw, 1536<<20); err != nil { // 1.5 GiB: three L2 tables' worth
		t.Fatal(err)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", raw)
	base2 := filepath.Join(dir, "base.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base2, "100G")

	for _, c := range []struct {
		backing, format string
		size            int64
	}{{raw, "raw", 1536 << 20}, {base2, "qcow2", 100 << 30}} {
		ov := filepath.Join(dir, "over-"+c.format+".qcow2")
		if err := CreateOverlay(ov, c.backing, c.format, c.size); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(run(t, "qemu-img", "check", ov), "No errors were found") {
			t.Errorf("%s: qemu-img check found errors", ov)
		}
		var info struct {
			Format         string `json:"format"`
			VirtualSize    int64  `json:"virtual-size"`
			Backing        string `json:"backing-filename"`
			BackingFormat  string `json:"backing-filename-format"`
			FormatSpecific struct {
				Data struct {
					Compat string `json:"compat"`
				} `json:"data"`
			} `json:"format-specific"`
		}
		if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", ov)), &info); err != nil {
			t.Fatal(err)
		}
		if info.Format != "qcow2" || info.VirtualSize != c.size || info.Backing != c.backing || info.BackingFormat != c.format || info.FormatSpecific.Data.Compat != "1.1" {
			t.Errorf("%s: qemu-img info %+v", ov, info)
		}
		if got, err := VirtualSize(ov); err != nil || got != c.size {
			t.Errorf("VirtualSize = %d, %v; want %d", got, err, c.size)
		}
		if c.format == "raw" {
			// A read falls through to the base; a write lands in the
			// overlay, and the base is untouched.
			run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", ov)
			run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 1M 64k", "-c", "write -P 0x11 1500M 64k", ov)
			run(t, "qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 1M 64k", "-c", "read -P 0x11 1500M 64k", ov)
			run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k", raw)
			if !strings.Contains(run(t, "qemu-img", "check", ov), "No errors were found") {
				t.Errorf("%s: qemu-img check found errors after writes", ov)
			}
		}
	}
}

func TestCreateOverlayRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "exists")
	if err := os.WriteFile(existing, []byte("disk"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"relative backing": CreateOverlay(filepath.Join(dir, "a"), "base.raw", "raw", 1<<20),
		"zero size":        CreateOverlay(filepath.Join(dir, "b"), "/base.raw", "raw", 0),
		"unaligned size":   CreateOverlay(filepath.Join(dir, "c"), "/base.raw", "raw", 1000),
		"no format":        CreateOverlay(filepath.Join(dir, "d"), "/base.raw", "", 1<<20),
		"existing path":    CreateOverlay(existing, "/base.raw", "raw", 1<<20),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if b, _ := os.ReadFile(existing); string(b) != "disk" {
		t.Errorf("an existing file was changed: %q", b)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "[abcd]"))
	if len(left) != 0 {
		t.Errorf("refused overlays left files: %v", left)
	}
}
