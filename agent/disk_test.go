package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// pressured is an image store whose free space the test sets.
type pressured struct {
	Images
	mu   sync.Mutex
	full bool
}

func (p *pressured) set(full bool) {
	p.mu.Lock()
	p.full = full
	p.mu.Unlock()
}

func (p *pressured) DiskPressure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.full {
		return fmt.Errorf("%w: the data directory has 10 MiB free, below the floor of 1 GiB (storage.min_free_bytes)", errdefs.ErrResourceExhausted)
	}
	return nil
}

// Below the free-space floor a submit is refused with the reason and
// changes nothing, and node status shows DiskPressure (moving the index);
// once space is back, both recover.
func TestDiskPressure(t *testing.T) {
	e := newEnv(t)
	store := &pressured{Images: e.imgs}
	e.change = func(o *Options) {
		o.Images = store
		o.DiskInterval = 20 * time.Millisecond
	}
	e.restart()
	ctx := context.Background()
	condition := func() api.Condition {
		for _, c := range e.agent.Node(ctx).Conditions {
			if c.Type == api.ConditionDiskPressure {
				return c
			}
		}
		t.Fatal("node status has no DiskPressure condition")
		return api.Condition{}
	}
	if c := condition(); c.Status {
		t.Fatalf("DiskPressure = %+v with room on disk", c)
	}
	before, _ := e.agent.Index()
	store.set(true)
	deadline := time.Now().Add(5 * time.Second)
	for {
		idx, _ := e.agent.Index()
		if condition().Status && idx > before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("DiskPressure = %+v, index %d (was %d): want true and a new index", condition(), idx, before)
		}
		time.Sleep(10 * time.Millisecond)
	}
	n := len(e.agent.List(ctx, api.ListFilter{}))
	spec := sh("true")
	spec.Image = testImage
	if _, _, err := e.agent.Submit(ctx, spec); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("submit under disk pressure: %v, want ErrResourceExhausted", err)
	}
	if got := len(e.agent.List(ctx, api.ListFilter{})); got != n {
		t.Errorf("a refused submit changed the workload list: %d, was %d", got, n)
	}
	store.set(false)
	for condition().Status {
		if time.Now().After(deadline.Add(5 * time.Second)) {
			t.Fatal("DiskPressure did not turn false again")
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.submit(sh("true"))
}

// A spec without a disk budget gets the node's default, which is what its
// driver enforces; one that names a budget keeps it.
func TestDiskBudgetDefaultAndOwn(t *testing.T) {
	e := newEnv(t)
	e.change = func(o *Options) { o.Defaults.DiskMB = 1024 }
	e.restart()
	w := e.submit(api.WorkloadSpec{Command: []string{"true"}})
	if got := w.Spec.Resources.DiskMB; got != 1024 {
		t.Errorf("default disk budget = %d MiB, want the node's 1024", got)
	}
	w = e.submit(api.WorkloadSpec{Command: []string{"true"}, Resources: api.Resources{DiskMB: 64}})
	if got := w.Spec.Resources.DiskMB; got != 64 {
		t.Errorf("own disk budget = %d MiB, want 64", got)
	}
	if got := taskResources(w.Spec.Resources).DiskBytes; got != 64<<20 {
		t.Errorf("the driver is given %d bytes, want 64 MiB", got)
	}
}
