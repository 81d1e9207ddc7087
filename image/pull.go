package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
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
	canon, err := Normalize(ref)
	if err != nil {
		return nil, err
	}
	r, err := s.remoteRef(canon)
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
	defer g.close()
	opts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithPlatform(platform),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithTransport(g),
		remote.WithRetryBackoff(s.retry),
	}
	fail := func(err error) error { return s.remoteError(ctx, canon, g, err) }
	desc, err := remote.Get(r, opts...)
	if err != nil {
		return nil, fail(err)
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
		return nil, fail(err)
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return nil, fail(err)
	}
	digest, err := img.Digest()
	if err != nil {
		return nil, fail(err)
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return nil, fail(err)
	}
	mf, err := v1.ParseManifest(bytes.NewReader(manifest))
	if err != nil {
		s.logFailure(canon, err)
		return nil, fmt.Errorf("pull %s: %w: the registry sent an unreadable manifest", canon, errdefs.ErrInvalidArgument)
	}

	rawConfig, err := img.RawConfigFile()
	if err != nil {
		return nil, fail(err)
	}
	// Refuse an image this node cannot run before fetching its layers.
	rec, err := newRecord(canon, digest, mediaType, manifest, mf, rawConfig)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", canon, err)
	}

	release := s.lease(blobDigests(digest, mf)...)
	ok := false
	defer func() {
		release()
		if !ok {
			// Whatever this pull stored and no image uses goes again.
			_ = s.gc(blobDigests(digest, mf))
		}
	}()
	if err := s.writeBlob(ctx, mf.Config.Digest, mf.Config.Size, bytes.NewReader(rawConfig)); err != nil {
		return nil, fmt.Errorf("pull %s: config: %w", canon, err)
	}
	for _, l := range mf.Layers {
		if s.hasBlob(l.Digest) {
			continue
		}
		layer, err := img.LayerByDigest(l.Digest)
		if err != nil {
			return nil, fail(err)
		}
		rc, err := layer.Compressed()
		if err != nil {
			return nil, fail(err)
		}
		err = s.writeBlob(ctx, l.Digest, l.Size, rc)
		rc.Close()
		if err != nil {
			return nil, fail(fmt.Errorf("layer %s: %w", l.Digest, err))
		}
	}
	// The manifest goes last: a stored manifest means its blobs are stored.
	if err := s.writeBlob(ctx, digest, int64(len(manifest)), bytes.NewReader(manifest)); err != nil {
		return nil, fmt.Errorf("pull %s: manifest: %w", canon, err)
	}
	// Unpack now, within the budgets: an image that would fill the disk is
	// refused here, not at its first workload.
	if _, err := s.rootfs(ctx, digest, canon); err != nil {
		return nil, fmt.Errorf("pull %s: %w", canon, err)
	}
	if err := s.commit(rec); err != nil {
		return nil, err
	}
	ok = true
	return s.Get(canon)
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
