// Package ociimage builds OCI images from nothing outside the machine: a
// single-layer busybox image made from the host's busybox-static binary
// (the quickstart's demo image, built by hack/mkimage, and the image of
// the tests and the bench), small hand-written layers, and archives in
// both import formats. The in-memory registry tests pull from is
// internal/testimage, which ships in nothing.
//
// Everything it builds is deterministic (fixed timestamps, sorted entries),
// so an image's digest only changes when its inputs change.
package ociimage

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"runtime"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BusyboxPath is where Debian's busybox-static installs its binary.
const BusyboxPath = "/bin/busybox"

// Epoch is the timestamp of every file and config the package writes. A fixed
// value keeps digests stable across runs and machines.
var Epoch = time.Date(2024, time.January, 1, 0, 0, 0, 0, time.UTC)

// DefaultEnv is the environment of images built here.
var DefaultEnv = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}

// Busybox returns a single-layer OCI image for linux/<host arch> holding the
// host's static busybox as /bin/busybox, a symlink for every applet it
// provides, /tmp (1777), and /etc/passwd and /etc/group with root and nobody.
// Its config runs "sh" with a standard PATH.
//
// The image is built once per process; v1.Image values are immutable, so
// sharing it between tests is safe.
func Busybox() (v1.Image, error) { return busyboxOnce() }

var busyboxOnce = sync.OnceValues(func() (v1.Image, error) { return BusyboxFrom(BusyboxPath) })

// BusyboxFrom is Busybox with the busybox binary taken from bin.
func BusyboxFrom(bin string) (v1.Image, error) {
	body, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("read busybox binary: %w (install it with: apt-get install -y busybox-static)", err)
	}
	if err := checkStatic(bin); err != nil {
		return nil, err
	}
	out, err := exec.Command(bin, "--list-full").Output()
	if err != nil {
		return nil, fmt.Errorf("list busybox applets with %s --list-full: %w", bin, err)
	}

	files := []File{
		{Name: "bin", Type: tar.TypeDir, Mode: 0o755},
		{Name: "dev", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc", Type: tar.TypeDir, Mode: 0o755},
		{Name: "proc", Type: tar.TypeDir, Mode: 0o755},
		{Name: "root", Type: tar.TypeDir, Mode: 0o700},
		{Name: "sbin", Type: tar.TypeDir, Mode: 0o755},
		{Name: "sys", Type: tar.TypeDir, Mode: 0o755},
		{Name: "tmp", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "usr", Type: tar.TypeDir, Mode: 0o755},
		{Name: "usr/bin", Type: tar.TypeDir, Mode: 0o755},
		{Name: "usr/sbin", Type: tar.TypeDir, Mode: 0o755},
		{Name: "var", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Type: tar.TypeReg, Mode: 0o755, Body: string(body)},
		{Name: "etc/passwd", Type: tar.TypeReg, Mode: 0o644, Body: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"},
		{Name: "etc/group", Type: tar.TypeReg, Mode: 0o644, Body: "root:x:0:\nnobody:x:65534:\n"},
	}
	seen := map[string]bool{}
	for _, f := range files {
		seen[f.Name] = true
	}
	for _, applet := range strings.Fields(string(out)) {
		applet = path.Clean(strings.TrimPrefix(applet, "/"))
		if seen[applet] || strings.HasPrefix(applet, "..") {
			continue
		}
		if !seen[path.Dir(applet)] {
			// Every applet lives in one of the directories above today; a
			// future busybox may add another, which must exist before it.
			files = append(files, File{Name: path.Dir(applet), Type: tar.TypeDir, Mode: 0o755})
			seen[path.Dir(applet)] = true
		}
		// Absolute targets, as "busybox --install -s" makes them: they resolve
		// inside the container's root, wherever the rootfs sits on the host.
		files = append(files, File{Name: applet, Type: tar.TypeSymlink, Linkname: "/bin/busybox"})
		seen[applet] = true
	}

	layer, err := Layer(files...)
	if err != nil {
		return nil, err
	}
	return Image(v1.Config{Env: DefaultEnv, Cmd: []string{"sh"}}, layer)
}

// checkStatic refuses a dynamically linked busybox: it would not run inside
// an image that has no libc.
func checkStatic(bin string) error {
	f, err := elf.Open(bin)
	if err != nil {
		return fmt.Errorf("%s is not an ELF binary: %w", bin, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; install the static build with: apt-get install -y busybox-static", bin)
		}
	}
	return nil
}

// File is one entry of a layer built by Layer. Type is a tar type flag
// (tar.TypeReg when zero). Names are written exactly as given, so tests can
// build hostile layers ("../x", "/abs", whiteouts).
type File struct {
	Name     string
	Type     byte
	Mode     int64 // permission and setuid/setgid/sticky bits, as in a tar header
	UID, GID int
	Body     string // content of a regular file
	Linkname string // target of a symlink or hardlink
}

// Layer returns a gzip-compressed OCI layer holding files in the order given.
func Layer(files ...File) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		hdr := &tar.Header{
			Name:     f.Name,
			Typeflag: f.Type,
			Mode:     f.Mode,
			Uid:      f.UID,
			Gid:      f.GID,
			Linkname: f.Linkname,
			ModTime:  Epoch,
			Format:   tar.FormatPAX,
		}
		switch f.Type {
		case 0, tar.TypeReg:
			hdr.Typeflag = tar.TypeReg
			hdr.Size = int64(len(f.Body))
			if hdr.Mode == 0 {
				hdr.Mode = 0o644
			}
		case tar.TypeDir:
			if !strings.HasSuffix(hdr.Name, "/") {
				hdr.Name += "/"
			}
		case tar.TypeSymlink, tar.TypeLink:
			if hdr.Mode == 0 {
				hdr.Mode = 0o777
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("write layer entry %q: %w", f.Name, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, f.Body); err != nil {
				return nil, fmt.Errorf("write layer entry %q: %w", f.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("finish layer: %w", err)
	}
	raw := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(raw)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
}

// Image returns an OCI image for linux/<host arch> made of layers (bottom
// first) with the given runtime config.
func Image(cfg v1.Config, layers ...v1.Layer) (v1.Image, error) {
	base, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Created:      v1.Time{Time: Epoch},
		Config:       cfg,
		RootFS:       v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, fmt.Errorf("set image config: %w", err)
	}
	img := mutate.ConfigMediaType(mutate.MediaType(base, types.OCIManifestSchema1), types.OCIConfigJSON)
	adds := make([]mutate.Addendum, len(layers))
	for i, l := range layers {
		adds[i] = mutate.Addendum{
			Layer:     l,
			MediaType: types.OCILayer,
			History:   v1.History{Created: v1.Time{Time: Epoch}, CreatedBy: "berth internal/testimage"},
		}
	}
	img, err = mutate.Append(img, adds...)
	if err != nil {
		return nil, fmt.Errorf("append layers: %w", err)
	}
	return img, nil
}
