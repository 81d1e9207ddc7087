package client

import (
	"context"
	"net/http"
	"time"

	"github.com/berthd/berth/api"
)

// Cordon makes the node refuse new workloads (reason is shown to those it
// refuses) and returns the node's status.
func (c *Client) Cordon(ctx context.Context, reason string) (*api.Node, error) {
	var n api.Node
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/node/cordon", nil, api.CordonRequest{Reason: reason}, &n)
	return &n, err
}

// Drain cordons the node and asks every workload to stop with timeout as
// its grace period (0: the agent's default).
func (c *Client) Drain(ctx context.Context, reason string, timeout time.Duration) (*api.Node, error) {
	var n api.Node
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/node/drain", nil, api.CordonRequest{Reason: reason, TimeoutSeconds: int(timeout / time.Second)}, &n)
	return &n, err
}

// Uncordon lets the node take new workloads again.
func (c *Client) Uncordon(ctx context.Context) (*api.Node, error) {
	var n api.Node
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/node/uncordon", nil, nil, &n)
	return &n, err
}

// PruneImages removes images no workload uses: all of them with all, else
// least recently used first down to the agent's low watermark.
func (c *Client) PruneImages(ctx context.Context, all bool) ([]api.RemovedImage, error) {
	var res api.PruneResult
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/images/prune", nil, api.PruneRequest{All: all}, &res)
	return res.Removed, err
}
