package vmdriver

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/hangtest"
)

// The bounds below only prove "does not hang": a call against a hung
// libvirtd returns within them, however loaded the machine. What the
// calls really took is logged.
const (
	// hangCallBound bounds a call with a 2s ctx against a hung libvirtd.
	hangCallBound = 5 * time.Second
	// hangNoDeadlineBound bounds a call without a deadline: it fails
	// fast once a stuck call or connection is seen, or at dialWait.
	hangNoDeadlineBound = dialWait + 5*time.Second
)

// hangDriver is a VM driver on a libvirtd of the test's own. Its
// fingerprint is healthy when that libvirtd answers: forced TCG (no
// probe guest), a berth-init stand-in, the host's kernel.
func hangDriver(t *testing.T, uri, dir string) *Driver {
	t.Helper()
	initPath := filepath.Join(dir, "berth-init")
	if err := os.WriteFile(initPath, []byte("stand-in\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := New(Options{
		Root:         filepath.Join(dir, "root"),
		URI:          uri,
		Accel:        AccelTCG,
		DomainPrefix: "berth-hangtest-",
		InitPath:     initPath,
		MonitorCmd:   []string{"/bin/false"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), hangCallBound)
		defer cancel()
		_ = d.Close(ctx)
	})
	return d
}

// timed runs f and returns how long it took.
func timed(f func()) time.Duration {
	start := time.Now()
	f()
	return time.Since(start)
}

// waitDriverHealthy fingerprints d until it is healthy.
func waitDriverHealthy(t *testing.T, d *Driver, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	var fp driver.Fingerprint
	for time.Since(start) < within {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		fp = d.Fingerprint(ctx)
		cancel()
		if fp.Healthy {
			return time.Since(start)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("VM driver not healthy within %s: %s", within, fp.Reason)
	return 0
}

// A socket that accepts connections and never answers (a wedged
// libvirtd, seen from the client): opening the connection hangs in
// libvirt. Every call still returns within its ctx, later ones fail fast,
// and nothing queues behind the stuck open.
func TestLibvirtdNeverAnswers(t *testing.T) {
	dir, err := os.MkdirTemp("", "berth-mute-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "libvirt-sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // held, never read, never answered
			mu.Unlock()
		}
	}()
	// Last: the client's stuck open sees EOF and returns.
	defer func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()

	d := hangDriver(t, "qemu+unix:///system?socket="+sock, dir)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	var fp driver.Fingerprint
	took := timed(func() { fp = d.Fingerprint(ctx) })
	cancel()
	t.Logf("Fingerprint (2s ctx) on a mute socket: %s: %s", took, fp.Reason)
	if took > hangCallBound || fp.Healthy || !strings.Contains(fp.Reason, "did not answer") {
		t.Errorf("Fingerprint took %s (bound %s) = healthy %v, %q; want unhealthy saying libvirtd did not answer", took, hangCallBound, fp.Healthy, fp.Reason)
	}

	// No deadline: bounded by dialWait, and once the open is older than
	// that, at once. Concurrent calls do not queue.
	var wg sync.WaitGroup
	errs := make([]error, 8)
	durs := make([]time.Duration, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			durs[i] = timed(func() { _, errs[i] = d.List(context.Background()) })
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if durs[i] > hangNoDeadlineBound || !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("List without a deadline took %s (bound %s): %v; want ErrUnavailable", durs[i], hangNoDeadlineBound, err)
		}
	}
	t.Logf("8 concurrent Lists without a deadline: %v; first error: %v", durs, errs[0])
	var lerr error
	took = timed(func() { _, lerr = d.List(context.Background()) })
	t.Logf("List once the open is known stuck: %s: %v", took, lerr)
	if took > time.Second || !errors.Is(lerr, errdefs.ErrUnavailable) {
		t.Errorf("List once the open is known stuck took %s: %v; want an ErrUnavailable at once", took, lerr)
	}
	cctx, ccancel := context.WithTimeout(context.Background(), hangCallBound)
	defer ccancel()
	if took := timed(func() { _ = d.Close(cctx) }); took > hangCallBound {
		t.Errorf("Close took %s", took)
	}
}

// A private libvirtd frozen with SIGSTOP: VM driver calls end with their
// ctx or fail fast, and the driver is healthy again on the same connection
// once libvirtd resumes; killed, the connection is dropped and the driver
// unhealthy at once with the reason.
func TestHungLibvirtdBoundsCalls(t *testing.T) {
	p := hangtest.StartLibvirtd(t)
	d := hangDriver(t, p.URI, p.Dir())
	t.Logf("healthy after %s", waitDriverHealthy(t, d, 90*time.Second))
	d.hv.mu.Lock()
	frozen := d.hv.cur
	d.hv.mu.Unlock()
	if frozen == nil {
		t.Fatal("no connection after a healthy fingerprint")
	}

	p.Freeze()
	frozenAt := time.Now()
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		var fp driver.Fingerprint
		took := timed(func() { fp = d.Fingerprint(ctx) })
		cancel()
		t.Logf("frozen: Fingerprint #%d (2s ctx): %s: %s", i+1, took, fp.Reason)
		if took > hangCallBound || fp.Healthy || !strings.Contains(fp.Reason, "libvirtd") {
			t.Errorf("Fingerprint #%d took %s (bound %s), healthy %v, %q; want unhealthy naming libvirtd", i+1, took, hangCallBound, fp.Healthy, fp.Reason)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 8)
	durs := make([]time.Duration, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			durs[i] = timed(func() {
				if i%2 == 0 {
					_, errs[i] = d.List(context.Background())
				} else {
					errs[i] = d.destroyDomain(context.Background(), "nonexistent")
				}
			})
		}()
	}
	wg.Wait()
	t.Logf("frozen: 8 concurrent calls without a deadline: %v; first error: %v", durs, errs[0])
	for i, err := range errs {
		if durs[i] > hangNoDeadlineBound || !errors.Is(err, errdefs.ErrUnavailable) {
			t.Errorf("call %d without a deadline took %s (bound %s): %v; want ErrUnavailable", i, durs[i], hangNoDeadlineBound, err)
		}
	}

	// Frozen for longer: still failing fast, with no call piling up on
	// the connection beyond the stuck call and the ping.
	time.Sleep(5 * time.Second)
	var lerr error
	took := timed(func() { _, lerr = d.List(context.Background()) })
	d.hv.mu.Lock()
	stuck := len(frozen.calls)
	d.hv.mu.Unlock()
	t.Logf("frozen %s: List without a deadline: %s: %v; %d calls stuck on the connection",
		time.Since(frozenAt).Round(time.Millisecond), took, lerr, stuck)
	if took > time.Second || !errors.Is(lerr, errdefs.ErrUnavailable) || stuck > 2 {
		t.Errorf("List took %s: %v, with %d calls stuck; want ErrUnavailable at once and at most 2 calls stuck", took, lerr, stuck)
	}

	p.Thaw()
	t.Logf("healthy %s after the thaw", waitDriverHealthy(t, d, 30*time.Second))
	// The stuck calls got their answers; the connection is used again.
	d.hv.mu.Lock()
	cur, dead, stuck := d.hv.cur, frozen.dead, len(frozen.calls)
	d.hv.mu.Unlock()
	if cur != frozen || dead || stuck != 0 {
		t.Errorf("after the thaw: same connection %v, dropped %v, %d calls stuck; want the same connection, idle", cur == frozen, dead, stuck)
	}

	// Dead: nothing listens on the socket any more.
	p.Kill()
	// libvirt's event loop sees the socket close; the close callback drops
	// the connection.
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		d.hv.mu.Lock()
		dead := frozen.dead
		d.hv.mu.Unlock()
		if dead {
			t.Logf("dead: connection dropped %s after the kill", time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Since(start) > hangCallBound {
			t.Errorf("connection not dropped %s after libvirtd died", hangCallBound)
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var fp driver.Fingerprint
	took = timed(func() { fp = d.Fingerprint(ctx) })
	t.Logf("dead: Fingerprint: %s: %s", took, fp.Reason)
	if took > time.Second || fp.Healthy || !strings.Contains(fp.Reason, "connect to libvirt") {
		t.Errorf("Fingerprint with libvirtd dead took %s = healthy %v, %q; want unhealthy at once, saying it cannot connect", took, fp.Healthy, fp.Reason)
	}
}
