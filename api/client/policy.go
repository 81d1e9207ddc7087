package client

import (
	"context"
	"net/http"

	"github.com/berthd/berth/api"
)

// Place asks the agent what its isolation policy decides for spec, without
// creating anything. Every verdict (allow, deny, refused, unschedulable) is
// an answer, not an error; an invalid spec is an error.
func (c *Client) Place(ctx context.Context, spec api.WorkloadSpec) (*api.PlacementDecision, error) {
	var d api.PlacementDecision
	if _, err := c.doJSON(ctx, http.MethodPost, "/v1/placements", nil, spec, &d); err != nil {
		return nil, err
	}
	return &d, nil
}

// Policy returns the agent's active isolation policy and its reload status.
func (c *Client) Policy(ctx context.Context) (*api.PolicyStatus, error) {
	var st api.PolicyStatus
	if _, err := c.doJSON(ctx, http.MethodGet, "/v1/policy", nil, nil, &st); err != nil {
		return nil, err
	}
	return &st, nil
}
