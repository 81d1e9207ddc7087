package ociimage

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"io"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations that name an image in an OCI image layout. The OCI one is meant
// to hold only a tag, but many tools (and this package) write the full
// reference; containerd writes the full reference into its own.
const (
	AnnotationRefName       = "org.opencontainers.image.ref.name"
	AnnotationContainerdRef = "io.containerd.image.name"
)

// WriteOCIArchive writes img as an OCI image layout in a tar stream (what
// "skopeo copy ... oci-archive:" produces). When ref is not empty the index
// entry carries it in both naming annotations.
func WriteOCIArchive(w io.Writer, img v1.Image, ref string) error {
	manifest, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("read manifest: %w", err)
	}
	digest, err := img.Digest()
	if err != nil {
		return fmt.Errorf("compute manifest digest: %w", err)
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return fmt.Errorf("read manifest media type: %w", err)
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	configName, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("compute config digest: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("read layers: %w", err)
	}

	tw := tar.NewWriter(w)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: dir, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: Epoch}); err != nil {
			return err
		}
	}
	if err := writeBytes(tw, "oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return err
	}
	seen := map[v1.Hash]bool{}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return fmt.Errorf("compute layer digest: %w", err)
		}
		if seen[d] {
			continue
		}
		seen[d] = true
		size, err := l.Size()
		if err != nil {
			return fmt.Errorf("compute layer size: %w", err)
		}
		rc, err := l.Compressed()
		if err != nil {
			return fmt.Errorf("read layer %s: %w", d, err)
		}
		err = writeStream(tw, blobName(d), size, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	if err := writeBytes(tw, blobName(configName), config); err != nil {
		return err
	}
	if err := writeBytes(tw, blobName(digest), manifest); err != nil {
		return err
	}
	desc := v1.Descriptor{MediaType: mediaType, Size: int64(len(manifest)), Digest: digest}
	if ref != "" {
		desc.Annotations = map[string]string{AnnotationRefName: ref, AnnotationContainerdRef: ref}
	}
	index, err := json.Marshal(v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Manifests:     []v1.Descriptor{desc},
	})
	if err != nil {
		return fmt.Errorf("encode index.json: %w", err)
	}
	if err := writeBytes(tw, "index.json", index); err != nil {
		return err
	}
	return tw.Close()
}

// dockerManifest is one entry of a "docker save" manifest.json.
type dockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// WriteDockerArchive writes img in the classic "docker save" format:
// uncompressed <diff_id>/layer.tar files, <config digest>.json and a
// manifest.json listing ref (a tag reference) in RepoTags. An empty ref
// writes an untagged image, as "docker save <image id>" does.
func WriteDockerArchive(w io.Writer, img v1.Image, ref string) error {
	var tags []string
	if ref != "" {
		if _, err := name.NewTag(ref); err != nil {
			return fmt.Errorf("docker archives name images by tag: %w", err)
		}
		tags = []string{ref}
	}
	config, err := img.RawConfigFile()
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	configName, err := img.ConfigName()
	if err != nil {
		return fmt.Errorf("compute config digest: %w", err)
	}
	layers, err := img.Layers()
	if err != nil {
		return fmt.Errorf("read layers: %w", err)
	}

	tw := tar.NewWriter(w)
	entry := dockerManifest{Config: configName.Hex + ".json", RepoTags: tags}
	seen := map[v1.Hash]bool{}
	for _, l := range layers {
		diffID, err := l.DiffID()
		if err != nil {
			return fmt.Errorf("compute layer diff id: %w", err)
		}
		file := diffID.Hex + "/layer.tar"
		entry.Layers = append(entry.Layers, file)
		if seen[diffID] {
			continue
		}
		seen[diffID] = true
		// A tar header needs the size up front: count, then copy.
		size, err := uncompressedSize(l)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Name: diffID.Hex + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: Epoch}); err != nil {
			return err
		}
		rc, err := l.Uncompressed()
		if err != nil {
			return fmt.Errorf("read layer %s: %w", diffID, err)
		}
		err = writeStream(tw, file, size, rc)
		rc.Close()
		if err != nil {
			return err
		}
	}
	if err := writeBytes(tw, entry.Config, config); err != nil {
		return err
	}
	manifest, err := json.Marshal([]dockerManifest{entry})
	if err != nil {
		return fmt.Errorf("encode manifest.json: %w", err)
	}
	if err := writeBytes(tw, "manifest.json", manifest); err != nil {
		return err
	}
	return tw.Close()
}

func uncompressedSize(l v1.Layer) (int64, error) {
	rc, err := l.Uncompressed()
	if err != nil {
		return 0, fmt.Errorf("read layer: %w", err)
	}
	defer rc.Close()
	n, err := io.Copy(io.Discard, rc)
	if err != nil {
		return 0, fmt.Errorf("read layer: %w", err)
	}
	return n, nil
}

func blobName(h v1.Hash) string { return "blobs/" + h.Algorithm + "/" + h.Hex }

func writeBytes(tw *tar.Writer, name string, body []byte) error {
	if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)), ModTime: Epoch}); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := tw.Write(body); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

func writeStream(tw *tar.Writer, name string, size int64, r io.Reader) error {
	if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: Epoch}); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := io.CopyN(tw, r, size); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}
