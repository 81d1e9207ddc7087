package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/berthd/berth/api"
)

// CreateVolume creates a named volume (or returns the one of that name,
// size and labels).
func (c *Client) CreateVolume(ctx context.Context, spec api.VolumeSpec) (*api.Volume, error) {
	var v api.Volume
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/volumes", nil, spec, &v)
	return &v, err
}

// Volume returns a volume by NAME or TENANT/NAME.
func (c *Client) Volume(ctx context.Context, ref string) (*api.Volume, error) {
	var v api.Volume
	_, err := c.doJSON(ctx, http.MethodGet, "/v1/volumes/"+url.PathEscape(ref), nil, nil, &v)
	return &v, err
}

// Volumes lists the volumes the caller may see.
func (c *Client) Volumes(ctx context.Context) ([]api.Volume, error) {
	var l api.VolumeList
	_, err := c.doJSON(ctx, http.MethodGet, "/v1/volumes", nil, nil, &l)
	return l.Volumes, err
}

// DeleteVolume removes a volume and its data; one a workload mounts is a
// conflict (409) naming the workloads.
func (c *Client) DeleteVolume(ctx context.Context, ref string) error {
	_, err := c.doJSON(ctx, http.MethodDelete, "/v1/volumes/"+url.PathEscape(ref), nil, nil, nil)
	return err
}
