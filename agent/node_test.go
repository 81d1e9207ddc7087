package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/errdefs"
)

// newEnvWith builds the test agent with changed options.
func newEnvWith(t *testing.T, change func(*Options)) *env {
	t.Helper()
	e := newEnv(t)
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	e.ctr = fake.New("container", e.node)
	opts := Options{
		Capacity:       testCapacity,
		DataDir:        e.dir,
		Drivers:        []driver.Driver{e.ctr},
		Images:         e.imgs,
		Defaults:       Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		StopTimeout:    2 * time.Second,
		RestartBackoff: 20 * time.Millisecond,
	}
	change(&opts)
	a, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	e.agent = a
	return e
}

func TestAdmissionNeverOvercommits(t *testing.T) {
	e := newEnvWith(t, func(o *Options) {
		o.Capacity = &api.NodeResources{CPU: 10, MemoryMB: 64 << 10}
	})
	const n = 50
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		admitted []string
		refused  []error
	)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			spec := sh("sleep 30")
			spec.Image = testImage
			spec.Resources.CPU = 1
			w, _, err := e.agent.Submit(context.Background(), spec)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				refused = append(refused, err)
				return
			}
			admitted = append(admitted, w.ID)
		}()
	}
	wg.Wait()
	if len(admitted) != 10 || len(refused) != 40 {
		t.Fatalf("admitted %d, refused %d; want exactly 10 and 40", len(admitted), len(refused))
	}
	for _, err := range refused {
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "cpu") || !strings.Contains(err.Error(), "10 of 10") {
			t.Errorf("refusal %q should be resource_exhausted naming cpu and the numbers", err)
			break
		}
	}
	node := e.agent.Node(context.Background())
	if node.Allocated.CPU != 10 || node.Allocated.Workloads != 10 {
		t.Errorf("allocated %+v, want 10 cores in 10 workloads", node.Allocated)
	}
	// Room comes back when a workload ends.
	if _, err := e.agent.Stop(context.Background(), admitted[0], time.Second); err != nil {
		t.Fatal(err)
	}
	spec := sh("true")
	spec.Image, spec.Resources.CPU = testImage, 1
	if _, _, err := e.agent.Submit(context.Background(), spec); err != nil {
		t.Errorf("submit after a stop freed a core: %v", err)
	}
}

func TestAdmissionCountsMemoryAndVMOverhead(t *testing.T) {
	e := newEnvWith(t, func(o *Options) {
		o.Capacity = &api.NodeResources{CPU: 64, MemoryMB: 1024}
		o.Reserved = Reserved{MemoryMB: 256}
		o.VMOverheadMB = 64
	})
	spec := sh("sleep 30")
	spec.Image = testImage
	spec.Resources.MemoryMB = 700
	if _, _, err := e.agent.Submit(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	spec.Resources.MemoryMB = 100
	_, _, err := e.agent.Submit(context.Background(), spec)
	if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "memory") || !strings.Contains(err.Error(), "700 of 768 MiB") {
		t.Errorf("second submit: %v; want memory refused with 700 of 768 MiB in use", err)
	}
	if got := e.agent.Node(context.Background()).Allocatable.MemoryMB; got != 768 {
		t.Errorf("allocatable memory %d, want 1024-256", got)
	}
}

func TestNodeDocument(t *testing.T) {
	e := newEnv(t)
	n1 := e.agent.Node(context.Background())
	if n1.ID == "" || len(n1.ID) != 32 || n1.Hostname == "" || n1.Capacity.CPU <= 0 {
		t.Fatalf("node %+v", n1)
	}
	if d := n1.Drivers["container"]; !d.Healthy {
		t.Errorf("container driver %+v, want healthy", d)
	}
	if len(n1.Conditions) == 0 || n1.Conditions[0].Type != api.ConditionReady || !n1.Conditions[0].Status {
		t.Errorf("conditions %+v, want Ready first and true", n1.Conditions)
	}
	w := e.submit(sh("sleep 30"))
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	n2 := e.agent.Node(context.Background())
	if n2.Index <= n1.Index || n2.Workloads.ByState[api.StateRunning] != 1 || n2.Workloads.ByIsolation[api.IsolationContainer] != 1 {
		t.Errorf("after a submit: index %d -> %d, workloads %+v", n1.Index, n2.Index, n2.Workloads)
	}
	// The node id survives a restart; the index never goes backwards.
	e.restart()
	n3 := e.agent.Node(context.Background())
	if n3.ID != n1.ID || n3.Index < n2.Index {
		t.Errorf("after restart: id %s index %d; before id %s index %d", n3.ID, n3.Index, n1.ID, n2.Index)
	}
}

func TestDriverHealthChangeIsAnEventAndMovesTheIndex(t *testing.T) {
	e := newEnvWith(t, func(o *Options) { o.HealthInterval = 10 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The first fingerprint is the driver's initial state; take it.
	if n := e.agent.Node(ctx); !n.Drivers["container"].Healthy {
		t.Fatalf("driver %+v", n.Drivers["container"])
	}
	before, _ := e.agent.Index()
	got := make(chan api.Event, 4)
	go e.agent.Events(ctx, 1, api.EventFilter{Types: []string{"driver."}}, nil, func(ev api.Event) error {
		got <- ev
		return nil
	})
	e.ctr.SetFingerprint(driver.Fingerprint{Healthy: false, Reason: "runc vanished"})
	select {
	case ev := <-got:
		if ev.Type != api.EventDriverUnhealthy || !strings.Contains(ev.Message, "runc vanished") {
			t.Errorf("event %+v", ev)
		}
	case <-ctx.Done():
		t.Fatal("no driver.unhealthy event")
	}
	if after, _ := e.agent.Index(); after <= before {
		t.Errorf("index %d -> %d after a health change", before, after)
	}
	n := e.agent.Node(context.Background())
	if n.Conditions[0].Status || n.Drivers["container"].Reason != "runc vanished" {
		t.Errorf("node after the driver failed: %+v %+v", n.Conditions[0], n.Drivers["container"])
	}
}

func TestEventsResumeAfterLastEventID(t *testing.T) {
	e := newEnv(t)
	collect := func(since uint64, want int) []api.Event {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var evs []api.Event
		stop := errors.New("enough")
		err := e.agent.Events(ctx, since, api.EventFilter{Types: []string{"workload."}}, nil, func(ev api.Event) error {
			evs = append(evs, ev)
			if len(evs) == want {
				return stop
			}
			return nil
		})
		if !errors.Is(err, stop) {
			t.Fatalf("got %d of %d events: %+v", len(evs), want, evs)
		}
		return evs
	}
	w1 := e.submit(sh("exit 0"))
	e.waitFor(w1.ID, terminal)
	first := collect(1, 4) // created, placed, started, exited
	wantTypes := []string{api.EventWorkloadCreated, api.EventWorkloadPlaced, api.EventWorkloadStarted, api.EventWorkloadExited}
	for i, ev := range first {
		if ev.Type != wantTypes[i] || ev.WorkloadID != w1.ID {
			t.Fatalf("event %d = %s for %s, want %s for %s", i, ev.Type, ev.WorkloadID, wantTypes[i], w1.ID)
		}
	}
	// While "disconnected", more happens; resuming after the last seen id
	// delivers exactly what was missed, in order.
	w2 := e.submit(sh("exit 5"))
	e.waitFor(w2.ID, terminal)
	if err := e.agent.Delete(context.Background(), w1.ID, false); err != nil {
		t.Fatal(err)
	}
	missed := collect(first[len(first)-1].ID, 5)
	wantTypes = append(wantTypes, api.EventWorkloadDeleted)
	for i, ev := range missed {
		if ev.ID <= first[len(first)-1].ID || (i > 0 && ev.ID <= missed[i-1].ID) {
			t.Errorf("event ids out of order: %+v", missed)
		}
		if ev.Type != wantTypes[i] {
			t.Errorf("missed event %d = %s, want %s", i, ev.Type, wantTypes[i])
		}
	}
	if missed[3].Attrs["exit_code"] != "5" || missed[4].WorkloadID != w1.ID {
		t.Errorf("missed events %+v", missed)
	}
}

func TestEventRingReportsLoss(t *testing.T) {
	l := newEventLog(time.Unix(0, 0))
	for range eventRing + 10 {
		l.publish(api.Event{Type: "workload.created"})
	}
	all := func(*api.Event) bool { return true }
	evs, lost, _ := l.after(5, all)
	if !lost || len(evs) != eventRing {
		t.Errorf("after an overflow: lost %v, %d events; want lost and %d", lost, len(evs), eventRing)
	}
	if _, lost, _ := l.after(evs[0].ID-1, all); lost {
		t.Error("resuming right before the oldest kept event is not a loss")
	}
}

func TestRestartPolicies(t *testing.T) {
	cases := []struct {
		name     string
		script   string
		restart  api.RestartSpec
		restarts int
		exit     int
	}{
		{"never restarts", "exit 1", api.RestartSpec{Policy: api.RestartNever}, 0, 1},
		{"on-failure leaves success alone", "exit 0", api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 3}, 0, 0},
		{"on-failure retries up to max", "exit 2", api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 3}, 3, 2},
		{"always restarts success too", "exit 0", api.RestartSpec{Policy: api.RestartAlways, MaxRetries: 2}, 2, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			spec := sh(tc.script)
			spec.Restart = tc.restart
			w := e.submit(spec)
			w = e.waitFor(w.ID, func(w *api.Workload) bool { return terminal(w) && w.RestartCount == tc.restarts })
			// Settled: no further restart comes.
			time.Sleep(200 * time.Millisecond)
			w, _ = e.agent.Get(context.Background(), w.ID)
			if w.RestartCount != tc.restarts || w.ExitCode == nil || *w.ExitCode != tc.exit || !terminal(w) {
				t.Errorf("workload %+v: want %d restarts and exit %d", w, tc.restarts, tc.exit)
			}
		})
	}
}

func TestRestartBackoffGrows(t *testing.T) {
	e := newEnvWith(t, func(o *Options) { o.RestartBackoff = 100 * time.Millisecond })
	spec := sh("exit 1")
	spec.Restart = api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 4}
	w := e.submit(spec)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var starts []time.Time
	e.agent.Events(ctx, 1, api.EventFilter{WorkloadID: w.ID, Types: []string{api.EventWorkloadStarted}}, nil, func(ev api.Event) error {
		starts = append(starts, ev.Time)
		if len(starts) == 5 {
			return errors.New("done")
		}
		return nil
	})
	if len(starts) != 5 {
		t.Fatalf("%d starts", len(starts))
	}
	// Each delay is at least base*2^n (plus up to 10% jitter, plus the
	// time a start takes on a loaded machine, which only adds): the lower
	// bounds alone prove the growth, and cannot flake.
	for i := 1; i < len(starts); i++ {
		gap := starts[i].Sub(starts[i-1])
		floor := 100 * time.Millisecond << (i - 1)
		if gap < floor {
			t.Errorf("restart %d came %v after the previous start; the backoff is at least %v", i, gap, floor)
		}
	}
}

func TestPolicyReloadIsAnEventAndShowsInNodeStatus(t *testing.T) {
	file := filepath.Join(t.TempDir(), "policy.yaml")
	write := func(body string) {
		t.Helper()
		if err := os.WriteFile(file, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\n")
	e := newEnvWith(t, func(o *Options) { o.PolicyFile = file })
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	evs := make(chan api.Event, 8)
	go e.agent.Events(ctx, 1, api.EventFilter{Types: []string{"policy."}}, nil, func(ev api.Event) error {
		evs <- ev
		return nil
	})
	next := func() api.Event {
		t.Helper()
		select {
		case ev := <-evs:
			return ev
		case <-ctx.Done():
			t.Fatal("no policy event")
			return api.Event{}
		}
	}
	before := e.agent.Node(ctx)

	write("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: vm\n")
	if ev := next(); ev.Type != api.EventPolicyReloaded || ev.Attrs["previous_version"] != before.Policy.Version {
		t.Errorf("after a valid change: %+v", ev)
	}
	mid := e.agent.Node(ctx)
	if mid.Index <= before.Index || mid.Policy.Version == before.Policy.Version {
		t.Errorf("node after reload: index %d -> %d, version %s -> %s", before.Index, mid.Index, before.Policy.Version, mid.Policy.Version)
	}

	write("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: maybe\n")
	if ev := next(); ev.Type != api.EventPolicyRejected || !strings.Contains(ev.Message, "policy.yaml:3") {
		t.Errorf("after an invalid change: %+v", ev)
	}
	after := e.agent.Node(ctx)
	var valid *api.Condition
	for i := range after.Conditions {
		if after.Conditions[i].Type == api.ConditionPolicyValid {
			valid = &after.Conditions[i]
		}
	}
	if after.Index <= mid.Index || after.Policy.LastReloadError == nil || after.Policy.Version != mid.Policy.Version || valid == nil || valid.Status {
		t.Errorf("node after a rejected reload: index %d, policy %+v, condition %+v", after.Index, after.Policy, valid)
	}
}

func TestReconcileRemovesOrphansAndMarksVanished(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	<-e.agent.recovered // the start-up reconciliation is over
	// A task no workload owns, as a crash between a driver's start and the
	// store could leave.
	orphan := &driver.TaskConfig{ID: "orphan-task", Args: []string{"sleep", "30"}, LogDir: t.TempDir()}
	if _, err := e.ctr.Start(ctx, orphan); err != nil {
		t.Fatal(err)
	}
	w := e.submit(sh("sleep 30"))
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })

	rep := e.agent.Reconcile(ctx)
	if len(rep.Orphans) != 1 || rep.Orphans[0] != "orphan-task" || len(rep.Vanished) != 0 {
		t.Fatalf("report %+v, want the orphan removed and nothing else", rep)
	}
	if _, err := e.ctr.Inspect(ctx, "orphan-task"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("orphan still there: %v", err)
	}
	if cur, _ := e.agent.Get(ctx, w.ID); cur.State != api.StateRunning {
		t.Errorf("the owned workload is %s after reconciliation", cur.State)
	}
	evs, _, _ := e.agent.events.after(1, func(ev *api.Event) bool { return ev.Type == api.EventWorkloadReconciled })
	if len(evs) != 1 || evs[0].WorkloadID != "orphan-task" || evs[0].Attrs["action"] != "orphan_removed" {
		t.Errorf("reconciliation events %+v", evs)
	}
}

// hungDriver is a fake whose Fingerprint, while hung, blocks and ignores
// its ctx, as a libvirt call on a frozen libvirtd does.
type hungDriver struct {
	*fake.Driver
	mu   sync.Mutex
	gate chan struct{} // non-nil while hung; closed to resume
}

func (d *hungDriver) hang() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gate == nil {
		d.gate = make(chan struct{})
	}
}

func (d *hungDriver) resume() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.gate != nil {
		close(d.gate)
		d.gate = nil
	}
}

func (d *hungDriver) Fingerprint(ctx context.Context) driver.Fingerprint {
	d.mu.Lock()
	gate := d.gate
	d.mu.Unlock()
	if gate != nil {
		<-gate
	}
	return d.Driver.Fingerprint(ctx)
}

// answerBound bounds requests while a driver hangs: it proves "does not
// hang", nothing about speed.
const answerBound = 3 * time.Second

// A hung VM driver makes only itself unhealthy, with the reason, within
// seconds; node status and container submits keep answering; when it
// answers again it is healthy again. Health changes are events.
func TestHungDriverMakesOnlyItselfUnhealthy(t *testing.T) {
	vm := &hungDriver{Driver: fake.New("vm", fake.NewNode())}
	e := newEnvWith(t, func(o *Options) {
		o.Drivers = append(o.Drivers, vm)
		o.HealthInterval = 20 * time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs := make(chan api.Event, 16)
	go e.agent.Events(ctx, 1, api.EventFilter{Types: []string{"driver."}}, nil, func(ev api.Event) error {
		evs <- ev
		return nil
	})
	node := func() *api.Node {
		t.Helper()
		start := time.Now()
		n := e.agent.Node(ctx)
		if took := time.Since(start); took > answerBound {
			t.Errorf("node status took %s", took)
		}
		if !n.Drivers["container"].Healthy || !n.Conditions[0].Status {
			t.Errorf("container driver %+v, ready %+v; want both fine throughout", n.Drivers["container"], n.Conditions[0])
		}
		return n
	}
	submit := func() {
		t.Helper()
		start := time.Now()
		spec := sh("sleep 30")
		spec.Image, spec.Isolation = testImage, api.IsolationContainer
		if _, _, err := e.agent.Submit(ctx, spec); err != nil {
			t.Errorf("container submit: %v", err)
		}
		if took := time.Since(start); took > answerBound {
			t.Errorf("container submit took %s", took)
		}
	}
	waitVM := func(ok func(api.DriverStatus) bool) api.DriverStatus {
		t.Helper()
		for {
			if st := node().Drivers["vm"]; ok(st) {
				return st
			}
			select {
			case <-ctx.Done():
				t.Fatalf("vm driver %+v", node().Drivers["vm"])
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	nextEvent := func(typ string) api.Event {
		t.Helper()
		for {
			select {
			case ev := <-evs:
				if ev.Type == typ && ev.Attrs["driver"] == "vm" {
					return ev
				}
			case <-ctx.Done():
				t.Fatalf("no %s event for the vm driver", typ)
			}
		}
	}

	waitVM(func(st api.DriverStatus) bool { return st.Healthy })
	before, _ := e.agent.Index()
	vm.hang()
	hungAt := time.Now()
	for range 3 {
		submit()
	}
	st := waitVM(func(st api.DriverStatus) bool { return !st.Healthy })
	t.Logf("vm driver unhealthy %s after it hung: %s", time.Since(hungAt).Round(time.Millisecond), st.Reason)
	if want := "fingerprint did not answer within 5s (libvirtd hung?)"; st.Reason != want || st.Version != "fake" {
		t.Errorf("vm driver %+v; want reason %q and the last known version", st, want)
	}
	if ev := nextEvent(api.EventDriverUnhealthy); !strings.Contains(ev.Message, "did not answer") {
		t.Errorf("event %+v", ev)
	}
	if after, _ := e.agent.Index(); after <= before {
		t.Errorf("index %d -> %d after the vm driver hung", before, after)
	}
	n := node()
	for _, c := range n.Conditions {
		if c.Type == api.ConditionVMCapable && (c.Status || !strings.Contains(c.Message, "did not answer")) {
			t.Errorf("condition %+v while the vm driver hangs", c)
		}
	}
	submit()
	spec := sh("true")
	spec.Image, spec.Isolation = testImage, api.IsolationVM
	if _, _, err := e.agent.Submit(ctx, spec); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("vm submit while the vm driver hangs: %v; want unavailable, saying why", err)
	}

	vm.resume()
	waitVM(func(st api.DriverStatus) bool { return st.Healthy })
	nextEvent(api.EventDriverHealthy)
}

// Before a driver's first fingerprint answers, it is "not checked yet":
// requests wait for it only briefly while the agent starts.
func TestDriverNotCheckedYet(t *testing.T) {
	vm := &hungDriver{Driver: fake.New("vm", fake.NewNode())}
	vm.hang()
	defer vm.resume()
	e := newEnvWith(t, func(o *Options) { o.Drivers = append(o.Drivers, vm) })
	start := time.Now()
	n := e.agent.Node(context.Background())
	took := time.Since(start)
	if st := n.Drivers["vm"]; st.Healthy || st.Reason != "not checked yet" {
		t.Errorf("vm driver %+v before its first fingerprint; want not checked yet", st)
	}
	if !n.Drivers["container"].Healthy || took > firstWait+answerBound {
		t.Errorf("node status after %s: container %+v", took, n.Drivers["container"])
	}
	start = time.Now()
	spec := sh("true")
	spec.Image = testImage
	if _, _, err := e.agent.Submit(context.Background(), spec); err != nil || time.Since(start) > answerBound {
		t.Errorf("container submit after %s: %v", time.Since(start), err)
	}
}
