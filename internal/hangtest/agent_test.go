package hangtest

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/vmdriver"
)

// answerBound bounds the agent's node status and container submits while
// libvirtd is frozen: it only proves "does not hang"; what they took is
// logged.
const answerBound = 5 * time.Second

// vmDriver is a VM driver on a libvirtd of the test's own, healthy when
// that libvirtd answers: forced TCG (no probe guest), a berth-init
// stand-in, the host's kernel.
func vmDriver(t *testing.T, uri, dir string) *vmdriver.Driver {
	t.Helper()
	initPath := filepath.Join(dir, "berth-init")
	if err := os.WriteFile(initPath, []byte("stand-in\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := vmdriver.New(vmdriver.Options{
		Root:         filepath.Join(dir, "root"),
		URI:          uri,
		Accel:        vmdriver.AccelTCG,
		DomainPrefix: "berth-hangtest-",
		InitPath:     initPath,
		MonitorCmd:   []string{"/bin/false"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), answerBound)
		defer cancel()
		_ = d.Close(ctx)
	})
	return d
}

func timed(f func()) time.Duration {
	start := time.Now()
	f()
	return time.Since(start)
}

// The agent with a container driver and a VM driver on a private libvirtd
// that freezes: container submits, node status and events keep answering
// within answerBound throughout; the VM driver turns unhealthy with the
// reason within seconds and healthy when libvirtd resumes; killed, it is
// unhealthy with the reason.
func TestHungLibvirtdLeavesTheAgentAnswering(t *testing.T) {
	p := StartLibvirtd(t)
	vm := vmDriver(t, p.URI, p.Dir())
	// libvirtd's first QEMU capabilities probe is slow.
	for start := time.Now(); ; time.Sleep(200 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		fp := vm.Fingerprint(ctx)
		cancel()
		if fp.Healthy {
			break
		}
		if time.Since(start) > 90*time.Second {
			t.Fatalf("VM driver not healthy within 90s: %s", fp.Reason)
		}
	}

	dir := t.TempDir()
	imgs, err := image.New(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	const ref = "berth.test/busybox:latest"
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(ociimage.WriteOCIArchive(pw, img, ref)) }()
	if _, err := imgs.Import(context.Background(), pr, ""); err != nil {
		t.Fatal(err)
	}
	ctr := fake.New("container", fake.NewNode())
	a, err := agent.New(context.Background(), agent.Options{
		Capacity:       &api.NodeResources{CPU: 1024, MemoryMB: 1 << 20},
		DataDir:        filepath.Join(dir, "state"),
		Drivers:        []driver.Driver{ctr, vm},
		Images:         imgs,
		Defaults:       agent.Defaults{CPU: 0.1, MemoryMB: 64, Pids: 64},
		StopTimeout:    2 * time.Second,
		HealthInterval: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	defer func() {
		for _, id := range ids {
			_ = a.Delete(context.Background(), id, true)
		}
		a.Close()
	}()

	events := make(chan api.Event, 64)
	evctx, evcancel := context.WithCancel(context.Background())
	defer evcancel()
	go a.Events(evctx, 1, api.EventFilter{Types: []string{"driver."}}, nil, func(ev api.Event) error {
		events <- ev
		return nil
	})

	var maxNode, maxSubmit time.Duration
	// node checks node status answers in time and returns the VM driver's.
	node := func() api.DriverStatus {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), answerBound)
		defer cancel()
		var n *api.Node
		took := timed(func() { n = a.Node(ctx) })
		maxNode = max(maxNode, took)
		if took > answerBound {
			t.Errorf("node status took %s (bound %s)", took, answerBound)
		}
		if c := n.Drivers["container"]; !c.Healthy {
			t.Errorf("container driver %+v, want healthy throughout", c)
		}
		return n.Drivers["vm"]
	}
	submit := func() {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), answerBound)
		defer cancel()
		spec := api.WorkloadSpec{Image: ref, Command: []string{"sleep", "60"}, Isolation: api.IsolationContainer}
		var (
			w   *api.Workload
			err error
		)
		took := timed(func() { w, _, err = a.Submit(ctx, spec) })
		maxSubmit = max(maxSubmit, took)
		if err != nil || took > answerBound {
			t.Errorf("container submit took %s (bound %s): %v", took, answerBound, err)
			return
		}
		ids = append(ids, w.ID)
	}
	// until polls node status (and submits now and then) until ok.
	until := func(what string, within time.Duration, ok func(api.DriverStatus) bool) (api.DriverStatus, time.Duration) {
		t.Helper()
		start := time.Now()
		for i := 0; ; i++ {
			st := node()
			if ok(st) {
				return st, time.Since(start)
			}
			if i%10 == 0 {
				submit()
			}
			if time.Since(start) > within {
				t.Fatalf("%s: not within %s; vm driver %+v", what, within, st)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	healthy := func(st api.DriverStatus) bool { return st.Healthy }
	unhealthy := func(st api.DriverStatus) bool { return !st.Healthy }
	nextEvent := func(typ string) api.Event {
		t.Helper()
		timeout := time.After(answerBound)
		for {
			select {
			case ev := <-events:
				if ev.Type == typ && ev.Attrs["driver"] == "vm" {
					return ev
				}
			case <-timeout:
				t.Fatalf("no %s event for the vm driver", typ)
				return api.Event{}
			}
		}
	}

	until("vm driver healthy at start", 30*time.Second, healthy)
	submit()

	p.Freeze()
	st, took := until("vm driver unhealthy after the freeze", 20*time.Second, unhealthy)
	t.Logf("frozen: vm driver unhealthy after %s: %s", took, st.Reason)
	if !strings.Contains(st.Reason, "libvirtd") {
		t.Errorf("reason %q does not say libvirtd is the trouble", st.Reason)
	}
	if ev := nextEvent(api.EventDriverUnhealthy); !strings.Contains(ev.Message, "libvirtd") {
		t.Errorf("unhealthy event %+v", ev)
	}
	// Stay frozen a while: everything keeps answering.
	for start := time.Now(); time.Since(start) < 8*time.Second; {
		if st := node(); st.Healthy {
			t.Errorf("vm driver healthy while libvirtd is frozen: %+v", st)
		}
		submit()
		time.Sleep(250 * time.Millisecond)
	}
	w, err := a.Get(context.Background(), ids[len(ids)-1])
	if err != nil || w.Isolation != api.IsolationContainer {
		t.Errorf("last container workload %+v, %v", w, err)
	}

	p.Thaw()
	_, took = until("vm driver healthy after the thaw", 40*time.Second, healthy)
	t.Logf("thawed: vm driver healthy after %s", took)
	nextEvent(api.EventDriverHealthy)

	p.Kill()
	st, took = until("vm driver unhealthy with libvirtd dead", 20*time.Second, unhealthy)
	t.Logf("dead: vm driver unhealthy after %s: %s", took, st.Reason)
	if !strings.Contains(st.Reason, "libvirt") {
		t.Errorf("reason %q does not name libvirt", st.Reason)
	}
	t.Logf("slowest node status %s, slowest container submit %s (%d submitted)", maxNode, maxSubmit, len(ids))
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), answerBound)
		if _, err := a.Stop(ctx, id, time.Second); err != nil {
			t.Errorf("stop %s: %v", id, err)
		}
		cancel()
	}
}
