package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
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
// platform with its config and layers, and tags it as the normalized ref.
// Blobs already in the store are not fetched again; a tag that moved is
// re-pointed. Credentials come from the Docker config of the user running
// berth (~/.docker/config.json and its credential helpers).
func (s *Store) Pull(ctx context.Context, ref string) (*Image, error) {
	canon, err := Normalize(ref)
	if err != nil {
		return nil, err
	}
	r, err := remoteRef(canon)
	if err != nil {
		return nil, err
	}
	opts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithPlatform(platform),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithTransport(httpsOnly{next: remote.DefaultTransport}),
		remote.WithRetryBackoff(s.retry),
	}
	desc, err := remote.Get(r, opts...)
	if err != nil {
		return nil, remoteError(ctx, canon, err)
	}
	switch desc.MediaType {
	case types.OCIManifestSchema1, types.DockerManifestSchema2, types.OCIImageIndex, types.DockerManifestList:
	default:
		return nil, fmt.Errorf("pull %s: %w: manifest type %q is not supported (berth runs OCI and Docker schema 2 images)", canon, errdefs.ErrInvalidArgument, desc.MediaType)
	}
	img, err := desc.Image()
	if err != nil {
		var terr *transport.Error
		var nerr net.Error
		if desc.MediaType.IsIndex() && ctx.Err() == nil && !errors.As(err, &terr) && !errors.As(err, &nerr) {
			return nil, fmt.Errorf("pull %s: %w: the image has no %s variant: %w", canon, errdefs.ErrNotFound, platform, err)
		}
		return nil, remoteError(ctx, canon, err)
	}
	manifest, err := img.RawManifest()
	if err != nil {
		return nil, remoteError(ctx, canon, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return nil, remoteError(ctx, canon, err)
	}
	mediaType, err := img.MediaType()
	if err != nil {
		return nil, remoteError(ctx, canon, err)
	}
	mf, err := v1.ParseManifest(bytes.NewReader(manifest))
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w: registry sent an unreadable manifest: %w", canon, errdefs.ErrInvalidArgument, err)
	}

	rawConfig, err := img.RawConfigFile()
	if err != nil {
		return nil, remoteError(ctx, canon, err)
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
			return nil, remoteError(ctx, canon, err)
		}
		rc, err := layer.Compressed()
		if err != nil {
			return nil, remoteError(ctx, canon, err)
		}
		err = s.writeBlob(ctx, l.Digest, l.Size, rc)
		rc.Close()
		if err != nil {
			return nil, remoteError(ctx, canon, fmt.Errorf("layer %s: %w", l.Digest, err))
		}
	}
	// The manifest goes last: a stored manifest means its blobs are stored.
	if err := s.writeBlob(ctx, digest, int64(len(manifest)), bytes.NewReader(manifest)); err != nil {
		return nil, fmt.Errorf("pull %s: manifest: %w", canon, err)
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

// remoteError gives a registry failure its error class and a hint.
func remoteError(ctx context.Context, canon string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("pull %s: %w", canon, context.Cause(ctx))
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		if class, hint := registryClass(terr); class != nil {
			return fmt.Errorf("pull %s: %w: %s: %w", canon, class, hint, err)
		}
		return fmt.Errorf("pull %s: %w", canon, err)
	}
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		return fmt.Errorf("pull %s: the registry sent bad content: %w", canon, err)
	}
	var nerr net.Error
	if errors.As(err, &nerr) {
		hint := "check the registry address and that it is up"
		if r, perr := parse(canon); perr == nil && !isLoopback(r.Context().RegistryStr()) {
			hint += "; berth speaks HTTPS to every registry not on a loopback address"
		}
		return fmt.Errorf("pull %s: %w: cannot reach the registry (%s): %w", canon, errdefs.ErrUnavailable, hint, err)
	}
	return fmt.Errorf("pull %s: %w", canon, err)
}

// registryClass maps a registry's answer to an error class and what to do
// about it, by its error code first and its HTTP status second.
func registryClass(terr *transport.Error) (error, string) {
	const (
		notFound = "the registry has no such image; check the name and tag"
		login    = "log in to the registry (docker login) as the user berth runs as"
		denied   = "the registry denies access to this repository"
		later    = "the registry is rate limiting or failing; retry later"
	)
	for _, d := range terr.Errors {
		switch d.Code {
		case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
			return errdefs.ErrNotFound, notFound
		case transport.UnauthorizedErrorCode:
			return errdefs.ErrUnauthenticated, login
		case transport.DeniedErrorCode:
			return errdefs.ErrPermissionDenied, denied
		case transport.TooManyRequestsErrorCode, transport.UnavailableErrorCode:
			return errdefs.ErrUnavailable, later
		}
	}
	switch {
	case terr.StatusCode == http.StatusNotFound:
		return errdefs.ErrNotFound, notFound
	case terr.StatusCode == http.StatusUnauthorized:
		return errdefs.ErrUnauthenticated, login
	case terr.StatusCode == http.StatusForbidden:
		return errdefs.ErrPermissionDenied, denied
	case terr.StatusCode == http.StatusTooManyRequests || terr.StatusCode >= 500:
		return errdefs.ErrUnavailable, later
	}
	return nil, ""
}

// httpsOnly upgrades plain-HTTP requests to anything but loopback to HTTPS.
// go-containerregistry also speaks plain HTTP to private (RFC 1918) and
// .local registries; berth does not, so a registry on the LAN cannot be
// impersonated by anyone on the path.
type httpsOnly struct{ next http.RoundTripper }

func (t httpsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !isLoopback(req.URL.Host) {
		req = req.Clone(req.Context())
		req.URL.Scheme = "https"
	}
	return t.next.RoundTrip(req)
}
