package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/network"
)

// checkPortsLocked refuses published ports another workload holds, or that
// something on the host already listens on. The caller holds a.writeMu, so
// two submits cannot take the same port together.
func (a *Agent) checkPortsLocked(w *api.Workload) error {
	if len(w.Spec.Ports) == 0 {
		return nil
	}
	if w.Network == nil || w.Network.Mode != api.NetworkBridge {
		return fmt.Errorf("workload publishes ports but does not get the bridge network: %w", errdefs.ErrFailedPrecondition)
	}
	if a.opts.Network == nil {
		return fmt.Errorf("this node has no bridge network to publish ports from (network.enabled is false): %w", errdefs.ErrFailedPrecondition)
	}
	taken := map[string]string{}
	a.mu.Lock()
	for _, r := range a.recs {
		if !holdsResources(r) {
			continue
		}
		for _, p := range r.Workload.Spec.Ports {
			taken[strconv.Itoa(p.HostPort)+"/"+p.Protocol] = r.Workload.ID
		}
	}
	a.mu.Unlock()
	for _, p := range w.Spec.Ports {
		key := strconv.Itoa(p.HostPort) + "/" + p.Protocol
		if owner, ok := taken[key]; ok {
			return fmt.Errorf("host port %s is already published by workload %s: %w", key, owner, errdefs.ErrConflict)
		}
		if err := portFree(p); err != nil {
			return fmt.Errorf("host port %s is in use on the node (%v): %w", key, err, errdefs.ErrConflict)
		}
	}
	return nil
}

// portFree reports whether a host process already listens on the port.
func portFree(p api.PortMapping) error {
	addr := ":" + strconv.Itoa(p.HostPort)
	if p.Protocol == "udp" {
		c, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return l.Close()
}

// attachNetwork gives a workload's run its network: a namespace on the
// bridge for a container, an address and a tap's place for a VM.
func (a *Agent) attachNetwork(ctx context.Context, w *api.Workload) (*driver.Network, *api.NetworkStatus, error) {
	mode := api.NetworkNone
	if w.Network != nil && w.Network.Mode != "" {
		mode = w.Network.Mode
	}
	st := &api.NetworkStatus{Mode: mode}
	switch mode {
	case api.NetworkNone:
		return &driver.Network{Mode: driver.NetworkNone}, st, nil
	case api.NetworkHost:
		return &driver.Network{Mode: driver.NetworkHost}, st, nil
	}
	if a.opts.Network == nil {
		return nil, nil, fmt.Errorf("workload %s wants the bridge network, and this node has none: %w", w.ID, errdefs.ErrFailedPrecondition)
	}
	kind := network.KindNetns
	if w.Isolation == api.IsolationVM {
		kind = network.KindTap
	}
	att, err := a.opts.Network.Attach(ctx, w.ID, kind, w.Spec.Ports)
	if err != nil {
		return nil, nil, err
	}
	st.Address, st.Gateway, st.Ports = att.Address.Addr().String(), att.Gateway.String(), w.Spec.Ports
	return &driver.Network{
		Mode:       driver.NetworkBridge,
		Netns:      att.Netns,
		Bridge:     att.Bridge,
		MAC:        att.MAC,
		Address:    att.Address.String(),
		Gateway:    att.Gateway.String(),
		DNS:        att.DNS,
		ResolvConf: att.ResolvConf(),
	}, st, nil
}

// detachNetwork releases what attachNetwork made; it is idempotent.
func (a *Agent) detachNetwork(ctx context.Context, id string) error {
	if a.opts.Network == nil {
		return nil
	}
	return a.opts.Network.Detach(ctx, id)
}

// reconcileNetwork releases attachments no running workload owns: left by
// a crash between a run's end and its detach, or by a delete. A release
// that fails is retried every pass, but reported (logged, evented, in the
// report) only when it first fails or fails for another reason.
func (a *Agent) reconcileNetwork(ctx context.Context, rep *ReconcileReport) {
	if a.opts.Network == nil {
		return
	}
	ids, err := a.opts.Network.List()
	if err != nil {
		rep.Errors = append(rep.Errors, "network: "+err.Error())
		return
	}
	for _, id := range ids {
		// Asked again under the attachment's lock: a start attaching it
		// meanwhile has made the workload starting.
		inUse := func() bool {
			a.mu.Lock()
			defer a.mu.Unlock()
			r, ok := a.recs[id]
			return ok && !r.Deleting && (r.Workload.State == api.StateStarting || r.Workload.State == api.StateRunning || r.Workload.State == api.StateStopping)
		}
		if inUse() {
			continue
		}
		detached, err := a.opts.Network.DetachUnused(ctx, id, inUse)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				continue
			}
			if errors.Is(err, network.ErrRepeatedFailure) {
				a.log.Debug("reconcile: network release still failing", "workload_id", id, "err", err)
				continue
			}
			a.log.Warn("reconcile: release a network attachment no running workload owns", "workload_id", id, "err", err)
			rep.Errors = append(rep.Errors, fmt.Sprintf("network: release %s: %v", id, err))
			a.events.publish(api.Event{Type: api.EventWorkloadReconciled, WorkloadID: id,
				Message: fmt.Sprintf("could not release the network attachment of %s, which no running workload owns: %v", id, err),
				Attrs:   map[string]string{"action": "network_release_failed"}})
			continue
		}
		if !detached {
			continue
		}
		rep.Orphans = append(rep.Orphans, "network:"+id)
		a.events.publish(api.Event{Type: api.EventWorkloadReconciled, WorkloadID: id,
			Message: "released the network attachment of " + id + ", which no running workload owned",
			Attrs:   map[string]string{"action": "network_released"}})
	}
}
