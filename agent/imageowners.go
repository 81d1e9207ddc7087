package agent

import (
	"context"
	"slices"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/auth"
)

// Images pulled with credentials of their own (POST /v1/images/pull auth)
// are private to the tenant the pull was for: another tenant does not list
// them, its workloads cannot run them (a submit treats them as missing)
// and it cannot remove them. Images pulled with the node's credentials
// (images.auth_file) or anonymously, and imported ones, are the node's and
// serve every tenant. Operators and admins see every image.

// imageViewer is who the caller of an image operation is to the store: a
// submitter sees the node's images and its tenants' own; every other role,
// and the node itself (no identity in ctx), sees all.
func imageViewer(ctx context.Context) image.Viewer {
	id := auth.FromContext(ctx)
	if id == nil || !id.Scoped() {
		return image.NodeViewer
	}
	return image.Viewer{Tenants: slices.Clone(id.Tenants)}
}

// viewedImage is img as v may see it: whether it is private, and of its
// owners those v sees (the node's namespace is never named).
func viewedImage(v image.Viewer, img *image.Image) api.Image {
	out := apiImage(img)
	if !img.Private() {
		return out
	}
	out.Private = true
	for _, t := range img.Owners {
		if t != "" && v.Sees([]string{t}) {
			out.Tenants = append(out.Tenants, t)
		}
	}
	return out
}

// checkPullTenant checks the tenant a pull with credentials is for.
func checkPullTenant(tenant string) error {
	if tenant != "" && (len(tenant) > maxTenantLen || !tenantRE.MatchString(tenant)) {
		return errdefs.Invalid("tenant", "%q is not a tenant name: lower-case letters, digits, '-', '_' and '.', at most %d characters, starting and ending with a letter or digit", tenant, maxTenantLen)
	}
	return nil
}
