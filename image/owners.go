package image

import (
	"slices"
)

// Ownership of images.
//
// An image pulled with credentials of its own (PullOptions.Auth) is
// private to the tenants it was pulled for (PullOptions.Owners): others
// neither list it, nor run it by reference or digest, nor remove it; the
// store answers them as if it were absent. An image pulled with the
// store's keychain (the node's credentials) or anonymously, or imported,
// is the node's: everyone sees it. The owners are kept with each ref in
// refs.json. The same ref and digest pulled privately for another tenant
// adds that tenant to its owners; pulled node-wide it becomes the node's.

// Viewer is who asks the store for images.
type Viewer struct {
	// All sees every image: the node itself, its operators and admins.
	All bool
	// Tenants sees the node's images and those private to one of these
	// tenants ("" is the node's own namespace: workloads without a
	// tenant).
	Tenants []string
}

// NodeViewer sees every image.
var NodeViewer = Viewer{All: true}

// TenantViewer sees what a workload of tenant ("" the node's namespace)
// may run: the node's images and tenant's own.
func TenantViewer(tenant string) Viewer { return Viewer{Tenants: []string{tenant}} }

// Sees reports whether v may see an image with these owners (nil: the
// node's).
func (v Viewer) Sees(owners []string) bool {
	if v.All || owners == nil {
		return true
	}
	for _, t := range v.Tenants {
		if slices.Contains(owners, t) {
			return true
		}
	}
	return false
}

// Private reports whether the image belongs to tenants rather than to the
// node.
func (img *Image) Private() bool { return img.Owners != nil }

// mergeOwners is the owners of an image stored again under the same ref
// and digest: a node-wide pull (nil) makes it the node's, a private one
// adds its tenants.
func mergeOwners(old, added []string) []string {
	if old == nil || added == nil {
		return nil
	}
	out := slices.Clone(old)
	for _, t := range added {
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return out
}

// normOwners is owners as a record keeps them: nil for the node's, else
// sorted, without duplicates, never empty.
func normOwners(owners []string) []string {
	if owners == nil {
		return nil
	}
	out := slices.Clone(owners)
	slices.Sort(out)
	out = slices.Compact(out)
	if len(out) == 0 {
		out = []string{""}
	}
	return out
}
