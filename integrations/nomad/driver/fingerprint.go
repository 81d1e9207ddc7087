package driver

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// Fingerprint timing. Each round is a blocking query on the agent's node
// document: it returns as soon as anything changes, or after
// fingerprintWait with the same document. A round that does not answer
// within fingerprintWait+fingerprintSlack (a hung agent) or fails in any
// way (refused, reset, an error status) makes the driver unhealthy at
// once; an unhealthy driver asks again every fingerprintRetry.
const (
	fingerprintWait  = 10 * time.Second
	fingerprintSlack = 5 * time.Second
	fingerprintRetry = 2 * time.Second
)

// Fingerprint implements drivers.DriverPlugin: healthy while the agent
// answers and has a healthy driver, with node attributes for constraints.
// A fingerprint is sent after every round, changed or not (Nomad only acts
// on changes).
func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go d.fingerprint(ctx, ch)
	return ch, nil
}

func (d *Driver) fingerprint(ctx context.Context, ch chan<- *drivers.Fingerprint) {
	defer close(ch)
	var index uint64
	for {
		var fp *drivers.Fingerprint
		wait := time.Duration(0)
		if c := d.agent(); c == nil {
			fp = &drivers.Fingerprint{Health: drivers.HealthStateUndetected, HealthDescription: "the plugin is not configured"}
			wait = fingerprintRetry
		} else {
			var n *api.Node
			var err error
			n, index, err = probeNode(ctx, c, index, fingerprintWait, fingerprintSlack)
			if err != nil {
				if ctx.Err() != nil || d.ctx.Err() != nil {
					return
				}
				fp = unreachable(err)
				wait = fingerprintRetry
			} else {
				fp = NodeFingerprint(n)
			}
		}
		select {
		case ch <- fp:
		case <-ctx.Done():
			return
		case <-d.ctx.Done():
			return
		}
		if wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			}
		}
	}
}

// probeNode is one fingerprint round: a blocking query for the node
// document past index, bounded by wait+slack in all. It returns the index
// for the next round (0 after an error or when the agent's state was
// reset, so that the next round answers at once).
func probeNode(ctx context.Context, c *client.Client, index uint64, wait, slack time.Duration) (*api.Node, uint64, error) {
	qctx, cancel := context.WithTimeout(ctx, wait+slack)
	defer cancel()
	n, idx, err := c.Node(qctx, &client.QueryOptions{WaitIndex: index, WaitTime: wait})
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			err = fmt.Errorf("no answer within %s", wait+slack)
		}
		return nil, 0, err
	}
	if idx < index {
		idx = 0 // the node's state was reset (a new agent)
	}
	return n, idx, nil
}

// unreachable is the fingerprint of an agent that does not answer. Its
// description names the cause without the request URL (whose query
// changes), so that Nomad records one node event per cause.
func unreachable(err error) *drivers.Fingerprint {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return &drivers.Fingerprint{
		Health:            drivers.HealthStateUnhealthy,
		HealthDescription: fmt.Sprintf("berth agent unreachable: %v", err),
		Attributes:        map[string]*pstructs.Attribute{"driver.berth": pstructs.NewBoolAttribute(false)},
	}
}

// NodeFingerprint turns berth's node document into Nomad's fingerprint:
// driver.berth.vm and driver.berth.container say which isolations the
// node can run, so that jobs can constrain on them.
func NodeFingerprint(n *api.Node) *drivers.Fingerprint {
	attrs := map[string]*pstructs.Attribute{
		"driver.berth":                pstructs.NewBoolAttribute(true),
		"driver.berth.version":        pstructs.NewStringAttribute(n.Version),
		"driver.berth.node_id":        pstructs.NewStringAttribute(n.ID),
		"driver.berth.policy_version": pstructs.NewStringAttribute(n.Policy.Version),
	}
	ctr, vm := n.Drivers[string(api.IsolationContainer)], n.Drivers[string(api.IsolationVM)]
	attrs["driver.berth.container"] = pstructs.NewBoolAttribute(ctr.Healthy)
	attrs["driver.berth.vm"] = pstructs.NewBoolAttribute(vm.Healthy)
	if accel := vm.Details["accel"]; vm.Healthy && accel != "" {
		attrs["driver.berth.accel"] = pstructs.NewStringAttribute(accel)
	}
	fp := &drivers.Fingerprint{Attributes: attrs, Health: drivers.HealthStateHealthy, HealthDescription: drivers.DriverHealthy}
	// Cordon, not Schedulable: an agent older than cordons sends neither.
	attrs["driver.berth.schedulable"] = pstructs.NewBoolAttribute(n.Cordon == nil)
	if c := n.Cordon; c != nil {
		// Nomad places nothing on a driver that is not healthy: that is
		// what an operator's cordon of the berth node means to it.
		fp.Health = drivers.HealthStateUnhealthy
		fp.HealthDescription = "berth node cordoned"
		if c.Draining {
			fp.HealthDescription = "berth node draining"
		}
		if c.Reason != "" {
			fp.HealthDescription += ": " + c.Reason
		}
		return fp
	}
	if !ctr.Healthy && !vm.Healthy {
		fp.Health = drivers.HealthStateUnhealthy
		fp.HealthDescription = "berth has no healthy driver"
		if ctr.Reason != "" || vm.Reason != "" {
			fp.HealthDescription += fmt.Sprintf(" (container: %s; vm: %s)", ctr.Reason, vm.Reason)
		}
	}
	return fp
}
