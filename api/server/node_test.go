package server_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

func (e *env) client() *client.Client {
	e.t.Helper()
	c, err := client.New(e.srv.URL)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

func (e *env) submitSleep(c *client.Client) *api.Workload {
	e.t.Helper()
	w, err := c.Submit(context.Background(), api.WorkloadSpec{Image: testImage, Command: []string{"sleep", "30"}})
	if err != nil {
		e.t.Fatal(err)
	}
	return w
}

func TestBlockingNodeQuery(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	ctx := context.Background()
	_, index, err := c.Node(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if index == 0 {
		t.Fatal("a node's index starts at 1: 0 tells clients not to block")
	}

	// Nothing changes: the query holds for its wait (plus at most 1/16
	// jitter), then answers with the same index.
	start := time.Now()
	_, idx, err := c.Node(ctx, &client.QueryOptions{WaitIndex: index, WaitTime: 300 * time.Millisecond})
	held := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if held < 300*time.Millisecond || idx != index {
		t.Errorf("an idle blocking query returned after %v with index %d (asked %d), want >= 300ms and the same index", held, idx, index)
	}

	// A change releases it at once.
	type answer struct {
		at  time.Time
		idx uint64
		err error
	}
	done := make(chan answer, 1)
	go func() {
		_, idx, err := c.Node(ctx, &client.QueryOptions{WaitIndex: index, WaitTime: 30 * time.Second})
		done <- answer{time.Now(), idx, err}
	}()
	time.Sleep(200 * time.Millisecond) // let it park
	select {
	case a := <-done:
		t.Fatalf("blocking query returned before any change: %+v", a)
	default:
	}
	changed := time.Now()
	e.submitSleep(c)
	a := <-done
	if a.err != nil {
		t.Fatal(a.err)
	}
	if lag := a.at.Sub(changed); lag > 100*time.Millisecond || a.idx <= index {
		t.Errorf("blocking query answered %v after the change with index %d (was %d); want within 100ms and a higher index", lag, a.idx, index)
	}
}

func TestBlockingWorkloadQuery(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	ctx := context.Background()
	w := e.submitSleep(c)
	var index uint64
	for {
		cur, idx, err := c.Get(ctx, w.ID, &client.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if cur.State == api.StateRunning {
			index = idx
			break
		}
		index = idx
	}
	done := make(chan time.Time, 1)
	go func() {
		cur, _, err := c.Get(ctx, w.ID, &client.QueryOptions{WaitIndex: index, WaitTime: 30 * time.Second})
		if err != nil || cur.State == api.StateRunning {
			t.Errorf("blocking get: %v %+v", err, cur)
		}
		done <- time.Now()
	}()
	time.Sleep(200 * time.Millisecond)
	changed := time.Now()
	if _, err := c.Stop(ctx, w.ID, time.Second); err != nil {
		t.Fatal(err)
	}
	if lag := (<-done).Sub(changed); lag > 2*time.Second {
		t.Errorf("blocking get answered %v after the stop began", lag)
	}
}

// ?until=ended holds a GET through every change on the way (a label of
// the workload's, the stop's own state changes) and answers once, when
// the run has ended; without an end it answers when the wait ends, with
// the workload as it is.
func TestWaitUntilEnded(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	ctx := context.Background()
	w := e.submitSleep(c)
	e.waitRunning(w.ID)

	cur, _, err := c.Get(ctx, w.ID, &client.QueryOptions{UntilEnded: true, WaitTime: 300 * time.Millisecond})
	if err != nil || cur.State != api.StateRunning {
		t.Fatalf("until=ended with nothing ending, after its wait: %v %+v; want the workload running", err, cur)
	}

	type answer struct {
		w   *api.Workload
		err error
	}
	done := make(chan answer, 1)
	go func() {
		cur, _, err := c.Get(ctx, w.ID, &client.QueryOptions{UntilEnded: true, WaitTime: 30 * time.Second})
		done <- answer{cur, err}
	}()
	time.Sleep(200 * time.Millisecond)
	if _, err := c.Stop(ctx, w.ID, 500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	select {
	case a := <-done:
		if a.err != nil || !a.w.State.Terminal() {
			t.Fatalf("until=ended answered %v %+v; want the workload ended", a.err, a.w)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("until=ended did not answer after the workload ended")
	}
}

func rssKiB(t *testing.T) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status to read RSS from")
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	t.Skip("no VmRSS in /proc/self/status")
	return 0
}

// TestThousandsOfPollers parks 2,000 blocking node queries on one agent,
// makes one change and checks that every poller returns with the new
// index. It logs the process's RSS growth per parked poller (client and
// server side of each connection together, so an upper bound for the
// agent alone); the README quotes it.
func TestThousandsOfPollers(t *testing.T) {
	if testing.Short() {
		t.Skip("2,000 connections: not in -short")
	}
	const pollers = 2000
	e := newEnv(t)
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = pollers
	hc := &http.Client{Transport: tr}
	defer tr.CloseIdleConnections()
	_, index, err := e.client().Node(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	url := e.srv.URL + "/v1/node?index=" + strconv.FormatUint(index, 10) + "&wait=60s"

	runtime.GC()
	before := rssKiB(t)
	goroutinesBefore := runtime.NumGoroutine()
	var wg sync.WaitGroup
	results := make(chan uint64, pollers)
	errs := make(chan error, pollers)
	for range pollers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := hc.Get(url)
			if err != nil {
				errs <- err
				return
			}
			resp.Body.Close()
			idx, _ := strconv.ParseUint(resp.Header.Get("X-Berth-Index"), 10, 64)
			results <- idx
		}()
	}
	// Every poller parked: a client goroutine plus the server's connection
	// and handler goroutines, and the transport's read and write loops.
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine()-goroutinesBefore < 4*pollers {
		if time.Now().After(deadline) {
			t.Fatalf("only %d goroutines more after 30s; pollers did not park", runtime.NumGoroutine()-goroutinesBefore)
		}
		select {
		case err := <-errs:
			t.Fatalf("poller: %v", err)
		default:
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(results) > 0 {
		t.Fatalf("%d pollers returned before any change", len(results))
	}
	parked := rssKiB(t)
	t.Logf("RSS %d KiB before, %d KiB with %d parked pollers: %.1f KiB per poller (client and server together)",
		before, parked, pollers, float64(parked-before)/pollers)

	changed := time.Now()
	e.submitSleep(e.client())
	wg.Wait()
	t.Logf("all %d pollers returned %v after the change", pollers, time.Since(changed))
	close(results)
	close(errs)
	for err := range errs {
		t.Fatalf("poller: %v", err)
	}
	n := 0
	for idx := range results {
		if idx <= index {
			t.Fatalf("a poller returned index %d, not past %d", idx, index)
		}
		n++
	}
	if n != pollers {
		t.Errorf("%d of %d pollers returned", n, pollers)
	}
}

func TestEventStreamReconnectsWithLastEventID(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Read events until the first workload has exited, then drop the
	// connection (the callback's error ends the stream).
	w1, err := c.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"sh", "-c", "exit 4"}})
	if err != nil {
		t.Fatal(err)
	}
	var seen []api.Event
	enough := errors.New("disconnect")
	err = c.Events(ctx, client.EventOptions{Since: 1, Types: []string{"workload."}}, nil, func(ev api.Event) error {
		seen = append(seen, ev)
		if ev.Type == api.EventWorkloadExited && ev.WorkloadID == w1.ID {
			return enough
		}
		return nil
	})
	if !errors.Is(err, enough) {
		t.Fatalf("first stream: %v after %d events", err, len(seen))
	}
	last := seen[len(seen)-1].ID

	// Meanwhile: a second workload runs and ends, the first is deleted.
	w2, err := c.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"true"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitExit(ctx, w2.ID); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, w1.ID, false); err != nil {
		t.Fatal(err)
	}

	var resumed []api.Event
	err = c.Events(ctx, client.EventOptions{Since: last, Types: []string{"workload."}}, nil, func(ev api.Event) error {
		resumed = append(resumed, ev)
		if ev.Type == api.EventWorkloadDeleted {
			return enough
		}
		return nil
	})
	if !errors.Is(err, enough) {
		t.Fatalf("resumed stream: %v after %+v", err, resumed)
	}
	want := []string{api.EventWorkloadCreated, api.EventWorkloadPlaced, api.EventWorkloadStarted, api.EventWorkloadExited, api.EventWorkloadDeleted}
	if len(resumed) != len(want) {
		t.Fatalf("resumed with %d events, want %d: %+v", len(resumed), len(want), resumed)
	}
	for i, ev := range resumed {
		if ev.ID <= last || ev.Type != want[i] {
			t.Errorf("resumed event %d: id %d type %s; want after %d and %s", i, ev.ID, ev.Type, last, want[i])
		}
	}

	// The raw protocol: ids and event names on the wire.
	req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+"/v1/events?workload="+w2.ID, nil)
	req.Header.Set("Last-Event-ID", strconv.FormatUint(last, 10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	buf := make([]byte, 4096)
	n, _ := resp.Body.Read(buf)
	if !strings.Contains(string(buf[:n]), "\nevent: workload.created\ndata: {") || !strings.HasPrefix(string(buf[:n]), "id: ") {
		t.Errorf("wire format: %q", buf[:n])
	}
}

// The node document is encoded once per index and served again for up to
// a second (a change wakes every parked poller at once): requests at one
// index get the same bytes, a change gives a new document, and a second
// later even an unchanged node's uptime moves again.
func TestNodeDocumentSharedAtOneIndex(t *testing.T) {
	e := newEnv(t)
	get := func() (string, string) {
		resp := e.do("GET", "/v1/node", "", nil)
		defer resp.Body.Close()
		var b strings.Builder
		if _, err := io.Copy(&b, resp.Body); err != nil {
			t.Fatal(err)
		}
		return b.String(), resp.Header.Get("X-Berth-Index")
	}
	first, idx := get()
	again, idx2 := get()
	if again != first || idx2 != idx {
		t.Errorf("two reads at index %s got different documents:\n%s\n%s", idx, first, again)
	}
	e.submitSleep(e.client())
	changed, idx3 := get()
	if idx3 == idx || changed == first || !strings.Contains(changed, `"running"`) && !strings.Contains(changed, `"pending"`) && !strings.Contains(changed, `"starting"`) {
		t.Errorf("after a change: index %s (was %s), document:\n%s", idx3, idx, changed)
	}
	time.Sleep(1100 * time.Millisecond)
	if later, idx4 := get(); idx4 == idx3 && later == changed {
		t.Errorf("a second later the same bytes are served at index %s: the uptime never moves", idx4)
	}
}
