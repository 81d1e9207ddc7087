package loopfs

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkCreateMountUnmount is what a 1 GiB filesystem costs one
// workload start (create and mount) and its end (unmount).
func BenchmarkCreateMountUnmount(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("loop devices need root")
	}
	dir := b.TempDir()
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		b.Fatal(err)
	}
	tpl, err := NewTemplates(filepath.Join(dir, "templates"))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("mkfs", func(b *testing.B) { createMountUnmount(b, dir, mnt, Create) })
	b.Run("template", func(b *testing.B) { createMountUnmount(b, dir, mnt, tpl.Create) })
}

func createMountUnmount(b *testing.B, dir, mnt string, create func(string, int64, int, int) error) {
	for i := 0; b.Loop(); i++ {
		img := filepath.Join(dir, "fs.img")
		if err := create(img, 1<<30, 0, 0); err != nil {
			b.Fatal(err)
		}
		if err := Mount(img, mnt, 0); err != nil {
			b.Fatal(err)
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			b.Fatal(err)
		}
		os.Remove(img)
	}
}
