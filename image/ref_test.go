package image

import (
	"errors"
	"testing"

	"github.com/berthd/berth/errdefs"
)

const testDigest = "sha256:c5246f4b8cd4e488243762927d047f426906951d0d664aa33bbedb2784ccad5f"

func TestNormalize(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"busybox", "docker.io/library/busybox:latest"},
		{"busybox:1.36", "docker.io/library/busybox:1.36"},
		{"library/busybox", "docker.io/library/busybox:latest"},
		{"docker.io/busybox", "docker.io/library/busybox:latest"},
		{"index.docker.io/library/busybox:latest", "docker.io/library/busybox:latest"},
		{"someone/tool:v2", "docker.io/someone/tool:v2"},
		{"ghcr.io/org/app", "ghcr.io/org/app:latest"},
		{"localhost:5000/a/b:c", "localhost:5000/a/b:c"},
		{"127.0.0.1:5000/a", "127.0.0.1:5000/a:latest"},
		{"busybox@" + testDigest, "docker.io/library/busybox@" + testDigest},
		{"busybox:1.36@" + testDigest, "docker.io/library/busybox@" + testDigest},
	} {
		got, err := Normalize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("Normalize(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
		// Normal forms are fixed points.
		if again, err := Normalize(got); err != nil || again != got {
			t.Errorf("Normalize(%q) = %q, %v; want it unchanged", got, again, err)
		}
	}
	for _, bad := range []string{"", "  ", "BusyBox", "a b", "busybox:", "busybox@sha256:abc", "-x/y", "x/y-", "a__-b/c", "x/y:.v1", "x/y:tag with space"} {
		if got, err := Normalize(bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Normalize(%q) = %q, %v; want ErrInvalidArgument", bad, got, err)
		}
	}
}

func TestRefRepository(t *testing.T) {
	for in, want := range map[string]string{
		"docker.io/library/busybox:latest":        "docker.io/library/busybox",
		"localhost:5000/a/b:c":                    "localhost:5000/a/b",
		"localhost:5000/a/b@" + testDigest:        "localhost:5000/a/b",
		"docker.io/library/busybox@" + testDigest: "docker.io/library/busybox",
	} {
		if got := refRepository(in); got != want {
			t.Errorf("refRepository(%q) = %q, want %q", in, got, want)
		}
	}
}
