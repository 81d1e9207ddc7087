package initramfs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/berthd/berth/errdefs"
)

func TestCompareReleases(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"6.1.0-56-amd64", "6.1.0-9-amd64", 1},
		{"6.10.0-1-amd64", "6.9.0-1-amd64", 1},
		{"6.1.0-56-amd64", "6.1.0-56-amd64", 0},
		{"5.10.0-28-amd64", "6.1.0-1-amd64", -1},
		{"6.1.0-56-cloud-amd64", "6.1.0-56-amd64", 1},
		{"6.1.1", "6.1", 1},
		{"6.1.10-rc1", "6.1.9", 1},
	} {
		if got := compareReleases(tc.a, tc.b); got != tc.want {
			t.Errorf("compareReleases(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if got := compareReleases(tc.b, tc.a); got != -tc.want {
			t.Errorf("compareReleases(%q, %q) = %d, want %d", tc.b, tc.a, got, -tc.want)
		}
	}
}

func TestFindKernel(t *testing.T) {
	root := t.TempDir()
	boot, mods := filepath.Join(root, "boot"), filepath.Join(root, "lib/modules")
	kernel := func(release string, withModules bool) {
		os.MkdirAll(boot, 0o755)
		os.WriteFile(filepath.Join(boot, "vmlinuz-"+release), []byte("kernel"), 0o644)
		if withModules {
			os.MkdirAll(filepath.Join(mods, release), 0o755)
			os.WriteFile(filepath.Join(mods, release, "modules.dep"), nil, 0o644)
		}
	}
	if _, err := FindKernel(boot, mods); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("empty: err = %v, want ErrNotFound", err)
	}
	kernel("6.1.0-9-amd64", true)
	kernel("6.1.0-56-amd64", true)
	kernel("6.1.0-60-amd64", false) // newest, but its modules are gone
	kernel("5.10.0-28-amd64", true)
	os.WriteFile(filepath.Join(boot, "vmlinuz-6.1.0-56-amd64.bak"), nil, 0o644) // no modules either
	k, err := FindKernel(boot, mods)
	if err != nil {
		t.Fatal(err)
	}
	want := Kernel{Path: filepath.Join(boot, "vmlinuz-6.1.0-56-amd64"), Release: "6.1.0-56-amd64", ModulesDir: filepath.Join(mods, "6.1.0-56-amd64")}
	if k != want {
		t.Errorf("FindKernel = %+v, want %+v", k, want)
	}
}
