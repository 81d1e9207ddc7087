package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
)

func apiImage(img *image.Image) api.Image {
	return api.Image{Ref: img.Ref, Digest: img.Digest, Size: img.Size, CreatedAt: img.CreatedAt, Kind: img.Kind}
}

// ListImages lists the node's images the caller sees (imageViewer).
func (a *Agent) ListImages(ctx context.Context) []api.Image {
	v := imageViewer(ctx)
	imgs := a.images.ListAs(v)
	out := make([]api.Image, len(imgs))
	for i, img := range imgs {
		out[i] = viewedImage(v, img)
	}
	return out
}

// ImportImage stores the images of an OCI-layout or docker-archive tarball.
func (a *Agent) ImportImage(ctx context.Context, r io.Reader, ref string) ([]api.Image, error) {
	// A qcow2 file is a whole-disk VM image; anything else an archive.
	br := bufio.NewReader(r)
	if head, _ := br.Peek(4); image.IsDiskImage(head) {
		img, err := a.images.ImportDisk(ctx, br, ref)
		if err != nil {
			return nil, err
		}
		a.log.Info("disk image imported", "ref", img.Ref, "digest", img.Digest, "size", img.Size)
		return []api.Image{apiImage(img)}, nil
	}
	imgs, err := a.images.Import(ctx, br, ref)
	if err != nil {
		return nil, err
	}
	out := make([]api.Image, len(imgs))
	for i, img := range imgs {
		out[i] = apiImage(img)
		a.log.Info("image imported", "ref", img.Ref, "digest", img.Digest)
	}
	return out, nil
}

// PullImage fetches req.Ref from its registry. With req.Auth, the
// credentials of this pull alone, the image is private to req.Tenant ("":
// the node's namespace); without, it is the node's (imageowners.go).
func (a *Agent) PullImage(ctx context.Context, req api.PullRequest) (*api.Image, error) {
	var o image.PullOptions
	if auth := req.Auth; auth != nil {
		if err := checkPullTenant(req.Tenant); err != nil {
			return nil, err
		}
		o.Auth = &image.Credentials{Username: auth.Username, Password: auth.Password, IdentityToken: auth.IdentityToken, RegistryToken: auth.RegistryToken}
		o.Owners = []string{req.Tenant}
	}
	var img *image.Image
	var err error
	if o.Auth == nil {
		img, err = a.pullNodeImage(ctx, req.Ref)
	} else {
		// A pull's own credentials never ride on another pull's: the
		// registry checks them.
		o.Progress = a.pullEvents("", req.Ref, "")
		img, err = a.images.PullWith(ctx, req.Ref, o)
	}
	if err != nil {
		return nil, err
	}
	a.log.Info("image pulled", "ref", img.Ref, "digest", img.Digest, "private", img.Private(), "tenant", req.Tenant)
	out := viewedImage(imageViewer(ctx), img)
	return &out, nil
}

// RemoveImage removes an image the caller sees that no workload on the
// node uses.
func (a *Agent) RemoveImage(ctx context.Context, ref string) error {
	v := imageViewer(ctx)
	img, err := a.images.GetAs(v, ref)
	if err != nil {
		return err
	}
	a.mu.Lock()
	var users []string
	for _, r := range a.recs {
		if r.Workload.ImageDigest == img.Digest {
			users = append(users, r.Workload.ID)
		}
	}
	a.mu.Unlock()
	if len(users) > 0 {
		return fmt.Errorf("image %s is used by workloads %s; delete them first: %w", img.Ref, strings.Join(users, ", "), errdefs.ErrFailedPrecondition)
	}
	return a.images.RemoveAs(v, ref)
}

// Ready reports why the agent cannot take workloads now, or nil.
func (a *Agent) Ready(ctx context.Context) error {
	if err := a.commits.healthy(); err != nil {
		// Memory is ahead of the disk: a restart recovers from the disk.
		return fmt.Errorf("%w; restart the agent", err)
	}
	var reasons []string
	healthy := 0
	for iso := range a.drivers {
		fp, _ := a.fingerprint(ctx, iso)
		if fp.Healthy {
			healthy++
		} else {
			reasons = append(reasons, fmt.Sprintf("%s driver: %s", iso, fp.Reason))
		}
	}
	if healthy == 0 {
		if len(reasons) == 0 {
			reasons = append(reasons, "no driver is configured")
		}
		return errors.New(strings.Join(reasons, "; "))
	}
	return nil
}

// UsesImage reports whether a workload the agent knows runs from the image
// with this manifest digest. The image store asks before it drops content.
func (a *Agent) UsesImage(digest string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.admitting[digest] > 0 {
		return true
	}
	for _, r := range a.recs {
		if r.Workload.ImageDigest == digest {
			return true
		}
	}
	return false
}
