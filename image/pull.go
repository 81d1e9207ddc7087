package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/berthd/berth/errdefs"
)

// platform is what this node runs: an index is resolved to this manifest.
var platform = v1.Platform{OS: "linux", Architecture: runtime.GOARCH}

// Pull fetches ref from its registry, stores the manifest for this node's
// platform with its config and layers, unpacks its root filesystem, and
// tags it as the normalized ref. Blobs already in the store are not
// fetched again; a tag that moved is re-pointed. Credentials come from the
// Docker config of the user running berth (~/.docker/config.json and its
// credential helpers).
//
// Only registries the operator allows are used (WithRegistries), over
// HTTPS unless listed as insecure; an image that passes a budget
// (WithLimits) or a pull under disk pressure is refused and leaves nothing.
// Errors never carry what a registry sent: a client of the agent reads
// berth's words, the registry's HTTP status and its known error codes; the
// rest goes to the log.
func (s *Store) Pull(ctx context.Context, ref string) (*Image, error) {
	return s.PullWith(ctx, ref, PullOptions{})
}

// PullOptions refine a pull.
type PullOptions struct {
	// Digest, when set, pulls that manifest of ref's repository (the one
	// a Resolve saw) and tags it as ref, even if the tag moved since.
	Digest string
	// Progress, when set, is called as layers arrive with the bytes of
	// layers stored so far and in all (layers already in the store
	// count as done).
	Progress func(done, total int64)
	// Auth, when set, are this pull's credentials, in place of the
	// store's keychain.
	Auth *Credentials
	// Owners, when not nil, make the image private to these tenants ("" is
	// the node's namespace): set it for a pull with Auth. Nil: the node's
	// image, seen by everyone (owners.go).
	Owners []string
}

// PullWith is Pull with options.
func (s *Store) PullWith(ctx context.Context, ref string, o PullOptions) (*Image, error) {
	f, err := s.fetchManifest(ctx, ref, o.Digest, o.Auth)
	if err != nil {
		return nil, err
	}
	defer f.g.close()
	f.rec.Owners = normOwners(o.Owners)
	return s.fetchLayers(ctx, f, o.Progress)
}

// fetched is an image whose manifest and config were read from its
// registry, checked for this node, and not yet stored.
type fetched struct {
	canon     string
	img       v1.Image
	digest    v1.Hash
	manifest  []byte
	mf        *v1.Manifest
	rawConfig []byte
	rec       record
	g         *guard
	fail      func(error) error
}

// fetchManifest reads ref's manifest for this node's platform (at digest,
// when set) and its config, refusing what this node cannot or may not
// run. The caller closes f.g.
func (s *Store) fetchManifest(ctx context.Context, ref, digest string, auth *Credentials) (*fetched, error) {
	canon, err := Normalize(ref)
	if err != nil {
		return nil, err
	}
	at := canon
	if digest != "" {
		d, err := v1.NewHash(digest)
		if err != nil {
			return nil, errdefs.Invalid("digest", "%q is not a sha256 digest", digest)
		}
		at = refRepository(canon) + "@" + d.String()
	}
	r, err := s.remoteRef(at)
	if err != nil {
		return nil, err
	}
	if err := s.policy.check(r.Context().RegistryStr()); err != nil {
		return nil, fmt.Errorf("pull %s: %w", canon, err)
	}
	if err := s.DiskPressure(); err != nil {
		return nil, fmt.Errorf("pull %s: %w", canon, err)
	}
	g := newGuard(s.policy)
	f := &fetched{canon: canon, g: g}
	ok := false
	defer func() {
		if !ok {
			g.close()
		}
	}()
	opts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithPlatform(platform),
		s.authOption(auth),
		remote.WithTransport(g),
		remote.WithRetryBackoff(s.retry),
	}
	f.fail = func(err error) error { return s.remoteError(ctx, canon, g, err) }
	desc, err := remote.Get(r, opts...)
	if err != nil {
		return nil, f.fail(err)
	}
	switch desc.MediaType {
	case types.OCIManifestSchema1, types.DockerManifestSchema2, types.OCIImageIndex, types.DockerManifestList:
	default:
		return nil, fmt.Errorf("pull %s: %w: manifest type %s is not supported (berth runs OCI and Docker schema 2 images)", canon, errdefs.ErrInvalidArgument, quoteShort(string(desc.MediaType)))
	}
	img, err := desc.Image()
	if err != nil {
		var terr *transport.Error
		var nerr net.Error
		if desc.MediaType.IsIndex() && ctx.Err() == nil && g.refused() == nil && !errors.As(err, &terr) && !errors.As(err, &nerr) {
			s.logFailure(canon, err)
			return nil, fmt.Errorf("pull %s: %w: the image has no %s variant", canon, errdefs.ErrNotFound, platform)
		}
		return nil, f.fail(err)
	}
	f.img = img
	if f.manifest, err = img.RawManifest(); err != nil {
		return nil, f.fail(err)
	}
	if f.digest, err = img.Digest(); err != nil {
		return nil, f.fail(err)
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return nil, f.fail(err)
	}
	if f.mf, err = v1.ParseManifest(bytes.NewReader(f.manifest)); err != nil {
		s.logFailure(canon, err)
		return nil, fmt.Errorf("pull %s: %w: the registry sent an unreadable manifest", canon, errdefs.ErrInvalidArgument)
	}
	if f.rawConfig, err = img.RawConfigFile(); err != nil {
		return nil, f.fail(err)
	}
	// Refuse an image this node cannot run before fetching its layers.
	if f.rec, err = newRecord(canon, f.digest, mediaType, f.manifest, f.mf, f.rawConfig); err != nil {
		return nil, fmt.Errorf("pull %s: %w", canon, err)
	}
	ok = true
	return f, nil
}

// fetchLayers stores what fetchManifest read and the layers it names,
// unpacks the root filesystem and tags the image.
func (s *Store) fetchLayers(ctx context.Context, f *fetched, progress func(done, total int64)) (*Image, error) {
	canon, digest, mf := f.canon, f.digest, f.mf
	release := s.lease(blobDigests(digest, mf)...)
	ok := false
	defer func() {
		release()
		if !ok {
			// Whatever this pull stored and no image uses goes again.
			_ = s.gc(blobDigests(digest, mf))
		}
	}()
	if err := s.writeBlob(ctx, mf.Config.Digest, mf.Config.Size, bytes.NewReader(f.rawConfig)); err != nil {
		return nil, fmt.Errorf("pull %s: config: %w", canon, err)
	}
	var done, total int64
	for _, l := range mf.Layers {
		total += l.Size
		if s.hasBlob(l.Digest) {
			done += l.Size
		}
	}
	report := func(n int64) {
		done += n
		if progress != nil {
			progress(done, total)
		}
	}
	report(0)
	for _, l := range mf.Layers {
		if s.hasBlob(l.Digest) {
			continue
		}
		layer, err := f.img.LayerByDigest(l.Digest)
		if err != nil {
			return nil, f.fail(err)
		}
		rc, err := layer.Compressed()
		if err != nil {
			return nil, f.fail(err)
		}
		err = s.writeBlob(ctx, l.Digest, l.Size, &countingReader{r: rc, report: report})
		rc.Close()
		if err != nil {
			return nil, f.fail(fmt.Errorf("layer %s: %w", l.Digest, err))
		}
	}
	// The manifest goes last: a stored manifest means its blobs are stored.
	if err := s.writeBlob(ctx, digest, int64(len(f.manifest)), bytes.NewReader(f.manifest)); err != nil {
		return nil, fmt.Errorf("pull %s: manifest: %w", canon, err)
	}
	// Unpack now, within the budgets: an image that would fill the disk is
	// refused here, not at its first workload.
	if _, err := s.rootfs(ctx, digest, canon); err != nil {
		return nil, fmt.Errorf("pull %s: %w", canon, err)
	}
	if err := s.commit(f.rec); err != nil {
		return nil, err
	}
	ok = true
	return s.Get(canon)
}

// countingReader reports what it reads (in chunks of at least 256 KiB, and
// the rest at EOF), for pull progress.
type countingReader struct {
	r       io.Reader
	report  func(n int64)
	pending int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.pending += int64(n)
	if c.pending >= 256<<10 || (err != nil && c.pending > 0) {
		c.report(c.pending)
		c.pending = 0
	}
	return n, err
}

// blobDigests lists every blob an image needs: manifest, config, layers.
func blobDigests(manifest v1.Hash, mf *v1.Manifest) []string {
	out := []string{manifest.String(), mf.Config.Digest.String()}
	for _, l := range mf.Layers {
		out = append(out, l.Digest.String())
	}
	return out
}

// newRecord builds the index entry of an image from its manifest and
// config, refusing images this node cannot run.
func newRecord(canon string, digest v1.Hash, mediaType types.MediaType, manifest []byte, mf *v1.Manifest, rawConfig []byte) (record, error) {
	cf, err := v1.ParseConfigFile(bytes.NewReader(rawConfig))
	if err != nil {
		return record{}, fmt.Errorf("%w: image config %s is not valid JSON: %w", errdefs.ErrInvalidArgument, mf.Config.Digest, err)
	}
	if (cf.OS != "" && cf.OS != platform.OS) || (cf.Architecture != "" && cf.Architecture != platform.Architecture) {
		return record{}, fmt.Errorf("%w: the image is built for %s/%s, this node runs %s", errdefs.ErrInvalidArgument, cf.OS, cf.Architecture, platform)
	}
	for _, l := range mf.Layers {
		if !l.MediaType.IsLayer() {
			return record{}, fmt.Errorf("%w: layer %s has media type %q, which is not a filesystem layer", errdefs.ErrInvalidArgument, l.Digest, l.MediaType)
		}
	}
	size := int64(len(manifest)) + int64(len(rawConfig))
	blobs := []string{mf.Config.Digest.String()}
	for _, l := range mf.Layers {
		size += l.Size
		blobs = append(blobs, l.Digest.String())
	}
	return record{
		Image: Image{
			Ref:       canon,
			Digest:    digest.String(),
			Size:      size,
			CreatedAt: time.Now().UTC(),
			Config: Config{
				Entrypoint: cf.Config.Entrypoint,
				Cmd:        cf.Config.Cmd,
				Env:        cf.Config.Env,
				WorkingDir: cf.Config.WorkingDir,
				User:       cf.Config.User,
			},
		},
		MediaType: string(mediaType),
		Blobs:     blobs,
	}, nil
}
