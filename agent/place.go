package agent

import (
	"context"
	"fmt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/placement"
)

// place decides where a normalized spec runs under the active policy. Only
// an allowed decision returns a placement; every other verdict is an error
// carrying the decision's explanation:
//
//   - deny: errdefs.ErrDenied (the policy forbids the workload);
//   - refused (container requested where the policy requires vm):
//     errdefs.ErrDenied too, since it is the policy that says no; the
//     explanation names the rule, and asking for auto or vm succeeds;
//   - unschedulable: errdefs.ErrFailedPrecondition when the node has no
//     driver for the required isolation (retrying here will not help; place
//     the workload on another node), errdefs.ErrUnavailable when the driver
//     is configured but unhealthy (it may recover).
//
// berth never runs a workload with less isolation than the policy requires.
func (a *Agent) place(ctx context.Context, spec api.WorkloadSpec) (*api.Placement, error) {
	d, _ := a.decide(ctx, spec)
	p := toPlacement(d)
	switch d.Verdict {
	case placement.VerdictAllow:
		return p, nil
	case placement.VerdictDeny, placement.VerdictRefused:
		return nil, fmt.Errorf("%s: %w", d.Explanation, errdefs.ErrDenied)
	case placement.VerdictUnschedulable:
		if _, ok := a.drivers[api.Isolation(d.Isolation)]; !ok {
			return nil, fmt.Errorf("%s: %w", d.Explanation, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("%s: %w", d.Explanation, errdefs.ErrUnavailable)
	}
	return nil, fmt.Errorf("placement returned verdict %q: %s", d.Verdict, d.Explanation)
}

// decide runs the active policy over a normalized spec on this node.
func (a *Agent) decide(ctx context.Context, spec api.WorkloadSpec) (placement.Decision, placement.NodeFacts) {
	n := a.nodeFacts(ctx)
	return placement.Decide(placementWorkload(spec), a.pol.current().policy, n), n
}

// Place answers POST /v1/placements: it validates spec as Submit does and
// returns what the active policy decides for it on this node, whatever the
// verdict, without creating anything. The image need not be on the node.
func (a *Agent) Place(ctx context.Context, spec api.WorkloadSpec) (*api.PlacementDecision, error) {
	spec, err := normalize(spec, a.opts.Defaults)
	if err != nil {
		return nil, err
	}
	pol, n := a.pol.current().policy, a.nodeFacts(ctx)
	return decisionFor(spec, placement.Decide(placementWorkload(spec), pol, n), pol, n), nil
}

// Policy describes the active isolation policy and its reloads.
func (a *Agent) Policy(ctx context.Context) api.PolicyStatus { return a.pol.status() }

// Explain is Place without an agent, for offline tools (berth policy
// explain): it validates spec with the given defaults and decides it under
// p on a node described by n.
func Explain(spec api.WorkloadSpec, p *placement.Policy, n placement.NodeFacts, def Defaults) (*api.PlacementDecision, error) {
	spec, err := normalize(spec, def)
	if err != nil {
		return nil, err
	}
	return decisionFor(spec, placement.Decide(placementWorkload(spec), p, n), p, n), nil
}

// decisionFor is the dry run's answer: the placement d under p, and what p
// says of exec into such a workload.
func decisionFor(spec api.WorkloadSpec, d placement.Decision, p *placement.Policy, n placement.NodeFacts) *api.PlacementDecision {
	e := placement.DecideExec(placementWorkload(spec), p, n)
	return &api.PlacementDecision{
		Exec:      &api.ExecDecision{Allowed: e.Allowed, Rule: e.Rule, Reason: e.Reason, Explanation: e.Explanation},
		Placement: *toPlacement(d),
		Verdict:   string(d.Verdict),
		Spec:      spec,
		Node: api.NodeFacts{
			ContainerAvailable: n.ContainerAvailable, ContainerReason: n.ContainerReason,
			VMAvailable: n.VMAvailable, VMReason: n.VMReason, Accel: n.Accel,
		},
	}
}

// nodeFacts describes the drivers from their cached fingerprints: a driver
// is available when it is configured and healthy.
func (a *Agent) nodeFacts(ctx context.Context) placement.NodeFacts {
	var n placement.NodeFacts
	n.ContainerAvailable, n.ContainerReason = a.available(ctx, api.IsolationContainer)
	n.VMAvailable, n.VMReason = a.available(ctx, api.IsolationVM)
	if fp, ok := a.fingerprint(ctx, api.IsolationVM); ok {
		n.Accel = fp.Details["accel"]
	}
	n.Labels = a.opts.NodeLabels
	return n
}

func (a *Agent) available(ctx context.Context, iso api.Isolation) (bool, string) {
	fp, ok := a.fingerprint(ctx, iso)
	switch {
	case !ok:
		return false, fmt.Sprintf("no %s driver is configured on this node", iso)
	case !fp.Healthy:
		return false, fmt.Sprintf("the %s driver is unhealthy: %s", iso, fp.Reason)
	}
	return true, ""
}

// placementWorkload is what placement sees of a normalized spec.
func placementWorkload(spec api.WorkloadSpec) placement.Workload {
	var hostPaths []string
	for _, m := range spec.Volumes {
		if m.HostPath != "" {
			hostPaths = append(hostPaths, m.HostPath)
		}
	}
	return placement.Workload{
		HostPaths:  hostPaths,
		Name:       spec.Name,
		Image:      spec.Image,
		Labels:     spec.Labels,
		Privileged: spec.Privileged,
		Isolation:  placement.Isolation(spec.Isolation),
		Resources: placement.Resources{
			CPU:      spec.Resources.CPU,
			MemoryMB: spec.Resources.MemoryMB,
			Pids:     spec.Resources.Pids,
		},
		Network: spec.Network,
		Ports:   len(spec.Ports),
	}
}

func toPlacement(d placement.Decision) *api.Placement {
	p := &api.Placement{
		Isolation:     api.Isolation(d.Isolation),
		Denied:        d.Verdict == placement.VerdictDeny,
		DecidingRule:  d.DecidingRule,
		PolicyVersion: d.PolicyVersion,
		Explanation:   d.Explanation,
		Network:       d.Network,
	}
	for _, m := range d.Matched {
		p.Matched = append(p.Matched, api.RuleMatch{Rule: m.Rule, Outcome: string(m.Outcome), Reason: m.Reason})
	}
	return p
}
