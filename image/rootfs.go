package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
)

// Rootfs returns the directory holding img's flattened root filesystem.
// Pull and Import unpack it already; an image stored by an older berth is
// unpacked here on first use, within the same budgets. Every later call, and
// every concurrent one, for the same manifest digest gets the same directory
// without copying anything. The tree is shared: treat it as read-only.
//
// Only img.Digest matters. An image removed meanwhile is an ErrNotFound,
// unless workloads still use it (see WithInUse) and its content was kept.
func (s *Store) Rootfs(ctx context.Context, img *Image) (string, error) {
	if img == nil {
		return "", errdefs.Invalid("image", "an image is required")
	}
	if img.Kind == KindDisk {
		return "", errdefs.Invalid("image", "%s is a whole-disk image: it boots in a VM and has no root filesystem to unpack", img.Ref)
	}
	digest, err := v1.NewHash(img.Digest)
	if err != nil || digest.Algorithm != "sha256" {
		return "", errdefs.Invalid("digest", "%q is not a valid sha256 image digest", img.Digest)
	}
	return s.rootfs(ctx, digest, img.Ref)
}

// rootfs returns the unpacked tree of the image with manifest digest,
// unpacking it first if needed; ref names the image in errors.
func (s *Store) rootfs(ctx context.Context, digest v1.Hash, ref string) (string, error) {
	// The lease keeps a concurrent Remove from collecting the tree or the
	// blobs while we look at them.
	release := s.lease(digest.String())
	defer release()
	dir := filepath.Join(s.rootfsDir(), digest.Hex)
	if isDir(dir) {
		return dir, nil
	}

	unlock, err := s.unpackLocks.lock(ctx, digest.Hex)
	if err != nil {
		return "", fmt.Errorf("unpack image %s: %w", ref, err)
	}
	defer unlock()
	// Whoever held the lock before us may have unpacked it.
	if isDir(dir) {
		return dir, nil
	}
	if !s.hasBlob(digest) {
		return "", fmt.Errorf("image %s (%s): %w; it was removed, pull or import it again", ref, digest, errdefs.ErrNotFound)
	}
	if err := s.DiskPressure(); err != nil {
		return "", fmt.Errorf("unpack image %s: %w", ref, err)
	}
	if err := s.unpack(ctx, digest, dir); err != nil {
		return "", fmt.Errorf("unpack image %s (%s): %w", ref, digest, err)
	}
	return dir, nil
}

func isDir(p string) bool {
	fi, err := os.Lstat(p)
	return err == nil && fi.IsDir()
}

// unpack extracts the image with manifest digest into tmp/ and renames the
// finished tree to dir, so dir either does not exist or is complete.
func (s *Store) unpack(ctx context.Context, digest v1.Hash, dir string) error {
	s.unpacks.Add(1)
	img, err := s.image(digest)
	if err != nil {
		return err
	}
	mf, err := img.Manifest()
	if err != nil {
		return err
	}
	release := s.lease(blobDigests(digest, mf)...)
	defer release()
	tmp, err := os.MkdirTemp(s.tmpDir(), "unpack-"+digest.Hex[:12]+"-")
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			_ = os.RemoveAll(tmp)
		}
	}()
	// MkdirTemp makes 0700; a root filesystem must be traversable by any
	// user of the workload. The image's own "./" entry, if any, overrides
	// this. Host users other than root cannot reach it: tmp/ and rootfs/
	// are 0700.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := extract(ctx, img, tmp, &budget{s: s}); err != nil {
		return err
	}
	if err := syncFS(tmp); err != nil {
		return fmt.Errorf("flush unpacked files to disk: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return err
	}
	done = true
	return fileutil.SyncDir(s.rootfsDir())
}

// image rebuilds a v1.Image from stored blobs, without the network.
func (s *Store) image(digest v1.Hash) (v1.Image, error) {
	manifest, err := s.readBlob(digest)
	if err != nil {
		return nil, err
	}
	mf, err := v1.ParseManifest(bytes.NewReader(manifest))
	if err != nil {
		return nil, fmt.Errorf("stored manifest %s: %w", digest, err)
	}
	return partial.CompressedToImage(&storedImage{s: s, manifest: manifest, mf: mf})
}

// storedImage is a partial.CompressedImageCore backed by the blob store.
type storedImage struct {
	s        *Store
	manifest []byte
	mf       *v1.Manifest
}

func (i *storedImage) RawConfigFile() ([]byte, error) { return i.s.readBlob(i.mf.Config.Digest) }
func (i *storedImage) RawManifest() ([]byte, error)   { return i.manifest, nil }

func (i *storedImage) MediaType() (types.MediaType, error) {
	if i.mf.MediaType != "" {
		return i.mf.MediaType, nil
	}
	return types.OCIManifestSchema1, nil
}

func (i *storedImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	for _, l := range i.mf.Layers {
		if l.Digest == h {
			p, err := i.s.blobPath(h)
			if err != nil {
				return nil, err
			}
			return &storedLayer{path: p, desc: l}, nil
		}
	}
	return nil, fmt.Errorf("layer %s is not part of this image", h)
}

// storedLayer is a partial.CompressedLayer read from a blob file, verified
// against its digest as it is read.
type storedLayer struct {
	path string
	desc v1.Descriptor
}

func (l *storedLayer) Digest() (v1.Hash, error)            { return l.desc.Digest, nil }
func (l *storedLayer) Size() (int64, error)                { return l.desc.Size, nil }
func (l *storedLayer) MediaType() (types.MediaType, error) { return l.desc.MediaType, nil }

func (l *storedLayer) Compressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("layer %s is missing from the image store; remove the image and pull or import it again: %w", l.desc.Digest, err)
	}
	if err != nil {
		return nil, err
	}
	return newVerifyReader(f, l.desc.Digest, l.desc.Size), nil
}

// keyedMutex is a set of mutexes by key whose Lock honours a context;
// entries live only while someone holds or waits for them.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	sem  chan struct{}
	refs int
}

func (k *keyedMutex) lock(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{sem: make(chan struct{}, 1)}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()

	drop := func() {
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
	select {
	case e.sem <- struct{}{}:
		return func() { <-e.sem; drop() }, nil
	case <-ctx.Done():
		drop()
		return nil, context.Cause(ctx)
	}
}
