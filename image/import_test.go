package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/ociimage"
)

func ociArchive(t *testing.T, img v1.Image, ref string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, ref); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func dockerArchive(t *testing.T, img v1.Image, ref string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := ociimage.WriteDockerArchive(&buf, img, ref); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestImportFormats(t *testing.T) {
	requireRoot(t)
	img := busybox(t)
	ociDigest := digestOf(t, img)
	gz := func(b []byte) []byte {
		var buf bytes.Buffer
		zw := gzip.NewWriter(&buf)
		zw.Write(b)
		zw.Close()
		return buf.Bytes()
	}
	for _, tc := range []struct {
		name    string
		archive []byte
		ref     string // Import's ref argument
		wantRef string
		// Docker archives carry no manifest, so the store writes one: the
		// digest is stable but not the registry's.
		sameDigest bool
	}{
		{"oci", ociArchive(t, img, "berth.local/demo/busybox:latest"), "", "berth.local/demo/busybox:latest", true},
		{"oci short name", ociArchive(t, img, "busybox"), "", "docker.io/library/busybox:latest", true},
		{"oci untagged with ref", ociArchive(t, img, ""), "busybox:1.0", "docker.io/library/busybox:1.0", true},
		{"oci ref overrides", ociArchive(t, img, "berth.local/demo/busybox:latest"), "berth.local/other:2", "berth.local/other:2", true},
		{"docker", dockerArchive(t, img, "berth.local/demo/busybox:latest"), "", "berth.local/demo/busybox:latest", false},
		{"docker untagged with ref", dockerArchive(t, img, ""), "berth.local/x/y:z", "berth.local/x/y:z", false},
		{"docker gzipped", gz(dockerArchive(t, img, "berth.local/demo/busybox:gz")), "", "berth.local/demo/busybox:gz", false},
		{"oci gzipped", gz(ociArchive(t, img, "berth.local/demo/busybox:gz")), "", "berth.local/demo/busybox:gz", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, t.TempDir())
			got, err := s.Import(context.Background(), bytes.NewReader(tc.archive), tc.ref)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || got[0].Ref != tc.wantRef {
				t.Fatalf("Import = %+v, want one image %s", got, tc.wantRef)
			}
			if tc.sameDigest && got[0].Digest != ociDigest {
				t.Errorf("digest = %s, want the image's %s", got[0].Digest, ociDigest)
			}
			if got[0].Config.Cmd[0] != "sh" || got[0].Size <= 0 {
				t.Errorf("Import = %+v", got[0])
			}
			// Found by its short form, and it unpacks.
			found, err := s.Get(strings.TrimSuffix(strings.TrimPrefix(tc.wantRef, "docker.io/library/"), ":latest"))
			if err != nil || found.Digest != got[0].Digest {
				t.Fatalf("Get = %+v, %v", found, err)
			}
			dir, err := s.Rootfs(context.Background(), found)
			if err != nil {
				t.Fatal(err)
			}
			checkMode(t, dir, "bin/busybox", 0o755, 0, 0)
			// Survives a restart.
			if _, err := newStore(t, s.Root()).Get(tc.wantRef); err != nil {
				t.Errorf("after restart: %v", err)
			}
		})
	}
}

func TestImportDockerDigestIsStable(t *testing.T) {
	img := busybox(t)
	a := newStore(t, t.TempDir())
	b := newStore(t, t.TempDir())
	ia, err := a.Import(context.Background(), bytes.NewReader(dockerArchive(t, img, "x/y:1")), "")
	if err != nil {
		t.Fatal(err)
	}
	ib, err := b.Import(context.Background(), bytes.NewReader(dockerArchive(t, img, "x/y:1")), "")
	if err != nil {
		t.Fatal(err)
	}
	if ia[0].Digest != ib[0].Digest {
		t.Errorf("the same docker archive got digests %s and %s", ia[0].Digest, ib[0].Digest)
	}
}

func TestImportMultiImage(t *testing.T) {
	img := busybox(t)
	small := mkImage(t, []ociimage.File{{Name: "hello", Body: "world"}})
	// An OCI layout naming two images the containerd way: full name in
	// io.containerd.image.name, only the tag in the OCI annotation.
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, body []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))})
		tw.Write(body)
	}
	add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	var idx v1.IndexManifest
	idx.SchemaVersion = 2
	for ref, im := range map[string]v1.Image{"docker.io/library/busybox:latest": img, "berth.local/small:1": small} {
		addBlobs(t, add, im)
		raw, _ := im.RawManifest()
		d, _ := im.Digest()
		mt, _ := im.MediaType()
		idx.Manifests = append(idx.Manifests, v1.Descriptor{
			MediaType: mt, Digest: d, Size: int64(len(raw)),
			Annotations: map[string]string{"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": "latest"},
		})
	}
	raw, _ := json.Marshal(idx)
	add("index.json", raw)
	tw.Close()
	archive := buf.Bytes()

	s := newStore(t, t.TempDir())
	if _, err := s.Import(context.Background(), bytes.NewReader(archive), "one/ref"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Import(two images, one ref) = %v, want ErrInvalidArgument", err)
	}
	got, err := s.Import(context.Background(), bytes.NewReader(archive), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("Import = %+v, want 2 images", got)
	}
	for _, ref := range []string{"busybox", "berth.local/small:1"} {
		if _, err := s.Get(ref); err != nil {
			t.Error(err)
		}
	}
}

func TestImportIndexPicksPlatform(t *testing.T) {
	img := busybox(t)
	foreign, err := mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "s390x"})
	if err != nil {
		t.Fatal(err)
	}
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: foreign, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}},
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &platform}},
	)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, body []byte) {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))})
		tw.Write(body)
	}
	add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`))
	addBlobs(t, add, img)
	addBlobs(t, add, foreign)
	rawIdx, _ := idx.RawManifest()
	idxDigest, _ := idx.Digest()
	add("blobs/sha256/"+idxDigest.Hex, rawIdx)
	top, _ := json.Marshal(v1.IndexManifest{SchemaVersion: 2, Manifests: []v1.Descriptor{{
		MediaType: "application/vnd.oci.image.index.v1+json", Digest: idxDigest, Size: int64(len(rawIdx)),
		Annotations: map[string]string{"org.opencontainers.image.ref.name": "berth.local/multi:1"},
	}}})
	add("index.json", top)
	tw.Close()

	s := newStore(t, t.TempDir())
	got, err := s.Import(context.Background(), &buf, "")
	if err != nil {
		t.Fatal(err)
	}
	if want := digestOf(t, img); len(got) != 1 || got[0].Digest != want {
		t.Fatalf("Import = %+v, want the %s image %s", got, platform, want)
	}
}

// addBlobs writes an image's blobs into an OCI layout being built.
func addBlobs(t *testing.T, add func(string, []byte), img v1.Image) {
	t.Helper()
	raw, _ := img.RawManifest()
	d, _ := img.Digest()
	add("blobs/sha256/"+d.Hex, raw)
	cfg, _ := img.RawConfigFile()
	cd, _ := img.ConfigName()
	add("blobs/sha256/"+cd.Hex, cfg)
	layers, _ := img.Layers()
	for _, l := range layers {
		ld, _ := l.Digest()
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(rc)
		rc.Close()
		add("blobs/sha256/"+ld.Hex, body)
	}
}

func TestImportRejectsBadArchives(t *testing.T) {
	img := busybox(t)
	oci := ociArchive(t, img, "berth.local/demo/busybox:latest")
	docker := dockerArchive(t, img, "berth.local/demo/busybox:latest")
	garbage := make([]byte, 64<<10)
	rand.Read(garbage)

	// A blob whose content no longer matches its name.
	corrupt := rewriteTar(t, oci, func(name string, body []byte) []byte {
		if strings.HasPrefix(name, "blobs/") && len(body) > 1000 {
			body = bytes.Clone(body)
			body[len(body)/2] ^= 0xff
		}
		return body
	})
	// A layer missing from the archive.
	missing := rewriteTar(t, docker, func(name string, body []byte) []byte {
		if strings.HasSuffix(name, "layer.tar") {
			return nil
		}
		return body
	})

	for _, tc := range []struct {
		name    string
		archive []byte
		ref     string
	}{
		{"garbage", garbage, "x/y:1"},
		{"empty", nil, "x/y:1"},
		{"truncated oci", oci[:len(oci)/2], ""},
		{"truncated docker", docker[:len(docker)/2], ""},
		{"truncated at an entry boundary", oci[:512], "x/y:1"},
		{"truncated gzip", gzipped(docker)[:len(gzipped(docker))/2], ""},
		{"not an image archive", rawTar(t, []ociimage.File{{Name: "hello", Body: "world"}}).Bytes(), "x/y:1"},
		{"corrupt blob", corrupt, ""},
		{"missing layer", missing, ""},
		{"unnamed image without ref", ociArchive(t, img, ""), ""},
		{"invalid name in archive", ociArchive(t, img, "Not/Valid:Ref!"), ""},
		{"invalid ref argument", oci, "UPPER/case"},
		{"foreign platform", ociArchive(t, mustConfig(t, img, "s390x"), "x/y:1"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "store")
			s := newStore(t, root)
			// One good image, so "nothing left behind" also means "nothing
			// of the store's own content was touched".
			importImage(t, s, mkImage(t, []ociimage.File{{Name: "keep", Body: "me"}}), "berth.local/keep:1")
			before := snapshot(t, root)

			_, err := s.Import(context.Background(), bytes.NewReader(tc.archive), tc.ref)
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("Import = %v, want ErrInvalidArgument", err)
			}
			t.Log(err)
			if after := snapshot(t, root); strings.Join(after, "\n") != strings.Join(before, "\n") {
				t.Errorf("a failed import changed the store:\nbefore %q\nafter  %q", before, after)
			}
			if l := s.List(); len(l) != 1 {
				t.Errorf("List = %+v, want only the image stored before", l)
			}
		})
	}
}

func TestImportSizeLimit(t *testing.T) {
	img := busybox(t)
	s := newStore(t, t.TempDir())
	s.maxImport = 64 << 10
	before := snapshot(t, s.Root())
	_, err := s.Import(context.Background(), bytes.NewReader(ociArchive(t, img, "x/y:1")), "")
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("Import(oversized) = %v, want ErrInvalidArgument about the size", err)
	}
	if after := snapshot(t, s.Root()); strings.Join(after, "\n") != strings.Join(before, "\n") {
		t.Errorf("an oversized import changed the store: %q", after)
	}
}

func TestImportSourceErrorIsNotInvalid(t *testing.T) {
	s := newStore(t, t.TempDir())
	broken := io.MultiReader(bytes.NewReader(ociArchive(t, busybox(t), "x/y:1")[:4096]), errReader{})
	_, err := s.Import(context.Background(), broken, "")
	if err == nil || errors.Is(err, errdefs.ErrInvalidArgument) || !errors.Is(err, errConnReset) {
		t.Fatalf("Import(failing source) = %v, want the source's error, not ErrInvalidArgument", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Import(ctx, bytes.NewReader(ociArchive(t, busybox(t), "x/y:1")), ""); !errors.Is(err, context.Canceled) {
		t.Fatalf("Import(cancelled) = %v, want context.Canceled", err)
	}
	if l := s.List(); len(l) != 0 {
		t.Errorf("List = %+v", l)
	}
	if entries, _ := os.ReadDir(filepath.Join(s.Root(), "tmp")); len(entries) != 0 {
		t.Errorf("tmp/ holds leftovers: %v", entries)
	}
}

var errConnReset = errors.New("connection reset by peer")

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errConnReset }

func mustConfig(t *testing.T, img v1.Image, arch string) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = arch
	out, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func gzipped(b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

// rewriteTar copies a tar, passing each regular file through edit; a nil
// result drops the entry.
func rewriteTar(t *testing.T, archive []byte, edit func(name string, body []byte) []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		if hdr.Typeflag == tar.TypeReg {
			if body = edit(hdr.Name, body); body == nil {
				continue
			}
			hdr.Size = int64(len(body))
		}
		tw.WriteHeader(hdr)
		tw.Write(body)
	}
	tw.Close()
	return out.Bytes()
}

// TestImportDockerLayerSymlink covers archives from older "docker save",
// which store a layer shared between images once and symlink the others.
func TestImportDockerLayerSymlink(t *testing.T) {
	img := busybox(t)
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	tr := tar.NewReader(bytes.NewReader(dockerArchive(t, img, "berth.local/linked:1")))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		if strings.HasSuffix(hdr.Name, "/layer.tar") {
			// Move the layer away and leave a relative symlink in its place.
			moved := *hdr
			moved.Name = "shared/layer.tar"
			tw.WriteHeader(&moved)
			tw.Write(body)
			tw.WriteHeader(&tar.Header{Name: hdr.Name, Typeflag: tar.TypeSymlink, Linkname: "../shared/layer.tar"})
			continue
		}
		tw.WriteHeader(hdr)
		tw.Write(body)
	}
	tw.Close()

	s := newStore(t, t.TempDir())
	got, err := s.Import(context.Background(), &out, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Ref != "berth.local/linked:1" {
		t.Fatalf("Import = %+v", got)
	}
}
