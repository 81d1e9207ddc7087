package driver

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// Fingerprint timing: a blocking query on the node document returns as
// soon as anything changes, so health follows the agent within a request;
// an unreachable agent is retried this often.
const (
	fingerprintWait  = 30 * time.Second
	fingerprintRetry = 5 * time.Second
)

// Fingerprint implements drivers.DriverPlugin: healthy while the agent
// answers and has a healthy driver, with node attributes for constraints.
func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go d.fingerprint(ctx, ch)
	return ch, nil
}

func (d *Driver) fingerprint(ctx context.Context, ch chan<- *drivers.Fingerprint) {
	defer close(ch)
	var index uint64
	for {
		c := d.agent()
		var fp *drivers.Fingerprint
		wait := time.Duration(0)
		if c == nil {
			fp = &drivers.Fingerprint{Health: drivers.HealthStateUndetected, HealthDescription: "the plugin is not configured"}
			wait = fingerprintRetry
		} else {
			qctx, cancel := context.WithTimeout(ctx, fingerprintWait+15*time.Second)
			n, idx, err := c.Node(qctx, &client.QueryOptions{WaitIndex: index, WaitTime: fingerprintWait})
			cancel()
			if err != nil {
				index = 0
				fp = &drivers.Fingerprint{
					Health:            drivers.HealthStateUnhealthy,
					HealthDescription: fmt.Sprintf("berth agent unreachable: %v", err),
					Attributes:        map[string]*pstructs.Attribute{"driver.berth": pstructs.NewBoolAttribute(false)},
				}
				wait = fingerprintRetry
			} else {
				if idx < index {
					idx = 0 // the node's state was reset
				}
				index = idx
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
	if !ctr.Healthy && !vm.Healthy {
		fp.Health = drivers.HealthStateUnhealthy
		fp.HealthDescription = "berth has no healthy driver"
		if ctr.Reason != "" || vm.Reason != "" {
			fp.HealthDescription += fmt.Sprintf(" (container: %s; vm: %s)", ctr.Reason, vm.Reason)
		}
	}
	return fp
}
