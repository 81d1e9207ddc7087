package agent

import (
	"context"
	"fmt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// place decides where a workload runs.
func (a *Agent) place(spec api.WorkloadSpec) (*api.Placement, error) {
	iso := api.IsolationContainer
	if spec.Isolation == api.IsolationVM || spec.Privileged {
		iso = api.IsolationVM
	}
	fp, ok := a.fingerprint(context.Background(), iso)
	if !ok {
		return nil, fmt.Errorf("workload needs isolation %s, which this node does not provide yet: %w", iso, errdefs.ErrNotImplemented)
	}
	if !fp.Healthy {
		return nil, fmt.Errorf("workload needs isolation %s, and the %s driver is unhealthy: %s: %w", iso, iso, fp.Reason, errdefs.ErrUnavailable)
	}
	return &api.Placement{Isolation: iso, DecidingRule: "builtin", PolicyVersion: "builtin", Explanation: fmt.Sprintf("%s: built-in placement", iso)}, nil
}
