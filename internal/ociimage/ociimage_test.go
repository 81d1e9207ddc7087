package ociimage

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path"
	"runtime"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func busybox(t *testing.T) v1.Image {
	t.Helper()
	if _, err := os.Stat(BusyboxPath); err != nil {
		t.Skipf("%s missing (apt-get install -y busybox-static): %v", BusyboxPath, err)
	}
	img, err := Busybox()
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// files lists the flattened content of img by path.
func files(t *testing.T, img v1.Image) map[string]*tar.Header {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	out := map[string]*tar.Header{}
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[path.Clean(hdr.Name)] = hdr
	}
}

func TestBusyboxContent(t *testing.T) {
	img := busybox(t)
	fs := files(t, img)

	bb, ok := fs["bin/busybox"]
	if !ok || bb.Typeflag != tar.TypeReg || bb.Mode != 0o755 {
		t.Fatalf("bin/busybox = %+v, want a 0755 regular file", bb)
	}
	host, err := os.Stat(BusyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	if bb.Size != host.Size() {
		t.Errorf("bin/busybox is %d bytes, host binary %d", bb.Size, host.Size())
	}
	for _, applet := range []string{"bin/sh", "bin/echo", "bin/cat", "bin/ls", "bin/sleep", "bin/true", "bin/false", "usr/bin/env", "bin/pwd", "usr/bin/id", "bin/mount", "usr/sbin/httpd", "usr/bin/wget", "bin/dd", "usr/bin/head", "usr/bin/tail", "usr/bin/yes", "bin/ps", "bin/kill", "bin/mkdir", "bin/rm", "bin/touch", "bin/hostname", "sbin/ip", "sbin/ifconfig", "usr/bin/nc", "sbin/insmod"} {
		h, ok := fs[applet]
		if !ok {
			t.Errorf("applet %s missing", applet)
			continue
		}
		if h.Typeflag != tar.TypeSymlink || h.Linkname != "/bin/busybox" {
			t.Errorf("%s = type %c -> %q, want a symlink to /bin/busybox", applet, h.Typeflag, h.Linkname)
		}
	}
	if tmp := fs["tmp"]; tmp == nil || tmp.Typeflag != tar.TypeDir || tmp.Mode != 0o1777 {
		t.Errorf("tmp = %+v, want a 1777 directory", tmp)
	}
	for _, f := range []string{"etc/passwd", "etc/group"} {
		if fs[f] == nil {
			t.Errorf("%s missing", f)
		}
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform = %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if len(cf.Config.Cmd) != 1 || cf.Config.Cmd[0] != "sh" {
		t.Errorf("Cmd = %q, want [sh]", cf.Config.Cmd)
	}
	if len(cf.Config.Env) != 1 || cf.Config.Env[0] != "PATH=/usr/sbin:/usr/bin:/sbin:/bin" {
		t.Errorf("Env = %q", cf.Config.Env)
	}
}

func TestBusyboxDeterministic(t *testing.T) {
	a := busybox(t)
	b, err := BusyboxFrom(BusyboxPath) // built again, not the cached one
	if err != nil {
		t.Fatal(err)
	}
	da, err := a.Digest()
	if err != nil {
		t.Fatal(err)
	}
	db, err := b.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if da != db {
		t.Fatalf("two builds differ: %s vs %s", da, db)
	}
}

func TestDockerArchiveLoads(t *testing.T) {
	img := busybox(t)
	var buf bytes.Buffer
	if err := WriteDockerArchive(&buf, img, "berth.local/demo/busybox:1"); err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag("berth.local/demo/busybox:1")
	if err != nil {
		t.Fatal(err)
	}
	raw := buf.Bytes()
	loaded, err := tarball.Image(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil }, &tag)
	if err != nil {
		t.Fatalf("go-containerregistry cannot read the archive: %v", err)
	}
	want, _ := img.ConfigName()
	got, err := loaded.ConfigName()
	if err != nil || got != want {
		t.Fatalf("config digest = %s, %v; want %s", got, err, want)
	}
	if _, ok := files(t, loaded)["bin/busybox"]; !ok {
		t.Fatal("loaded image has no bin/busybox")
	}
}

func TestOCIArchiveIndex(t *testing.T) {
	img := busybox(t)
	var buf bytes.Buffer
	if err := WriteOCIArchive(&buf, img, "berth.local/demo/busybox:latest"); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	entries := map[string][]byte{}
	tr := tar.NewReader(&buf)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		entries[hdr.Name] = body
	}
	if _, ok := entries["blobs/sha256/"+digest.Hex]; !ok {
		t.Fatalf("manifest blob missing; archive holds %d entries", len(entries))
	}
	var idx v1.IndexManifest
	if err := json.Unmarshal(entries["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != 1 || idx.Manifests[0].Digest != digest ||
		idx.Manifests[0].Annotations[AnnotationRefName] != "berth.local/demo/busybox:latest" {
		t.Fatalf("index.json = %s", entries["index.json"])
	}
}
