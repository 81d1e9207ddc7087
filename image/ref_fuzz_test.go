package image

import (
	"errors"
	"testing"

	"github.com/berthd/berth/errdefs"
)

// FuzzNormalize: any string either normalizes or is an invalid argument
// (never another error, never a panic), and a normal form is a fixed
// point that names no other image.
func FuzzNormalize(f *testing.F) {
	for _, s := range []string{
		"busybox", "busybox:1.36", "library/busybox", "docker.io/busybox", "ghcr.io/org/app",
		"localhost:5000/a/b:c", "127.0.0.1:5000/a", "busybox@" + testDigest, "busybox:1.36@" + testDigest,
		"[::1]:5000/x:y", "a/b/c/d/e:f", "", "BusyBox", "x/y:.v1", "x@sha256:", "../../etc/passwd", "a:b:c",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		got, err := Normalize(ref)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("Normalize(%q): %v is not an invalid argument", ref, err)
			}
			return
		}
		again, err := Normalize(got)
		if err != nil || again != got {
			t.Fatalf("Normalize(%q) = %q, but Normalize(%q) = %q, %v", ref, got, got, again, err)
		}
	})
}
