package agent

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

func schedulableCond(n *api.Node) api.Condition {
	for _, c := range n.Conditions {
		if c.Type == api.ConditionSchedulable {
			return c
		}
	}
	return api.Condition{}
}

// A cordoned node refuses new submits with the reason, keeps running what
// it runs, answers a retry of what it already admitted, shows
// Schedulable=false with a moved index, and stays cordoned across an
// agent restart until it is uncordoned.
func TestCordonRefusesSubmitsAndSurvivesRestart(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	spec := sh("sleep 1000")
	spec.Name = "kept"
	w := e.submit(spec)
	e.waitFor(w.ID, running)
	before := e.agent.Node(ctx)
	if !before.Schedulable || !schedulableCond(before).Status {
		t.Fatalf("fresh node: schedulable %v, condition %+v", before.Schedulable, schedulableCond(before))
	}
	n, err := e.agent.Cordon(ctx, "kernel update")
	if err != nil {
		t.Fatal(err)
	}
	if n.Schedulable || n.Cordon == nil || n.Cordon.Reason != "kernel update" || n.Index <= before.Index {
		t.Fatalf("after cordon: schedulable %v, cordon %+v, index %d (was %d)", n.Schedulable, n.Cordon, n.Index, before.Index)
	}
	if c := schedulableCond(n); c.Status || c.Reason != "Cordoned" || !strings.Contains(c.Message, "kernel update") {
		t.Errorf("Schedulable condition: %+v", c)
	}
	refused := func(when string) {
		t.Helper()
		other := sh("true")
		other.Image = testImage
		_, _, err := e.agent.Submit(ctx, other)
		if !errors.Is(err, errdefs.ErrCordoned) || !strings.Contains(err.Error(), "kernel update") {
			t.Errorf("%s: submit: %v; want ErrCordoned naming the reason", when, err)
		}
		// A retry of what was admitted before is still answered.
		retry := spec
		retry.Image = testImage
		if got, created, err := e.agent.Submit(ctx, retry); err != nil || created || got.ID != w.ID {
			t.Errorf("%s: retry of an admitted workload: %v created=%v", when, err, created)
		}
	}
	refused("cordoned")
	if got, _ := e.agent.Get(ctx, w.ID); got.State != api.StateRunning {
		t.Errorf("a cordon stopped workload %s: %s", w.ID, got.State)
	}
	e.restart()
	n = e.agent.Node(ctx)
	if n.Schedulable || n.Cordon == nil || n.Cordon.Reason != "kernel update" {
		t.Fatalf("after an agent restart: schedulable %v, cordon %+v", n.Schedulable, n.Cordon)
	}
	refused("cordoned, after an agent restart")
	idx := n.Index
	if n, err = e.agent.Uncordon(ctx); err != nil || !n.Schedulable || n.Cordon != nil || n.Index <= idx {
		t.Fatalf("uncordon: %v, schedulable %v, cordon %+v, index %d (was %d)", err, n.Schedulable, n.Cordon, n.Index, idx)
	}
	e.submit(sh("true"))
	e.restart()
	if n := e.agent.Node(ctx); !n.Schedulable {
		t.Errorf("uncordoned node is cordoned again after a restart: %+v", n.Cordon)
	}
}

// A drain stops every workload (a restart policy does not bring one back)
// and refuses new ones; an agent killed after the drain was recorded but
// before every stop was asks them after its restart.
func TestDrainStopsEveryWorkload(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a := e.submit(sh("sleep 1000"))
	b := sh("sleep 1000")
	b.Restart.Policy = api.RestartAlways
	bw := e.submit(b)
	e.waitFor(a.ID, running)
	e.waitFor(bw.ID, running)
	events := e.agent.events.lastID()
	n, err := e.agent.Drain(ctx, "decommission", 0)
	if err != nil {
		t.Fatal(err)
	}
	if n.Schedulable || n.Cordon == nil || !n.Cordon.Draining {
		t.Fatalf("after drain: schedulable %v, cordon %+v", n.Schedulable, n.Cordon)
	}
	for _, id := range []string{a.ID, bw.ID} {
		if w := e.waitFor(id, terminal); w.State != api.StateExited {
			t.Errorf("drained workload %s: %s %q", id, w.State, w.Error)
		}
	}
	got, _, _ := e.agent.events.after(events, func(ev *api.Event) bool { return ev.Type == api.EventNodeDraining })
	if len(got) != 1 || got[0].Attrs["reason"] != "decommission" {
		t.Errorf("drain events: %+v", got)
	}
	// A cordon after a drain leaves it a drain.
	if n, _ := e.agent.Cordon(ctx, ""); n.Cordon == nil || !n.Cordon.Draining || n.Cordon.Reason != "decommission" {
		t.Errorf("cordon of a draining node: %+v", n.Cordon)
	}

	// The fault: the drain is persisted, the agent dies before it asks
	// the workloads to stop. The restarted agent asks them.
	if _, err := e.agent.Uncordon(ctx); err != nil {
		t.Fatal(err)
	}
	c := e.submit(sh("sleep 1000"))
	e.waitFor(c.ID, running)
	if err := e.agent.setCordon("half done", true); err != nil {
		t.Fatal(err)
	}
	e.restart()
	if w := e.waitFor(c.ID, terminal); w.State != api.StateExited {
		t.Errorf("workload of an interrupted drain: %s %q", w.State, w.Error)
	}
}
