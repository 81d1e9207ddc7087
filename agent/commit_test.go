package agent

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/berthd/berth/api"
)

func testRecord(id string, state api.State) *record {
	return &record{Workload: api.Workload{ID: id, State: state, Spec: api.WorkloadSpec{Image: "busybox"}}}
}

// Changes queued while a transaction is on its way to disk go to disk
// together, in one transaction, and every waiter learns when its change
// is there; what durable promised is in the database after a reopen.
func TestCommitterGroupsConcurrentWrites(t *testing.T) {
	dir := t.TempDir()
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err := newCommitter(st.db)
	if err != nil {
		t.Fatal(err)
	}
	const n = 32
	// The first transaction is held until every writer has queued: the
	// rest must then share one.
	release := make(chan struct{})
	queued := make(chan struct{}, n)
	first := true
	c.beforeWrite = func() {
		if first {
			first = false
			<-release
		}
	}
	var mu sync.Mutex // writeMu's part: the queue is in index order
	next := uint64(0)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mu.Lock()
			next++
			idx := next
			err := c.putRecord(testRecord(fmt.Sprintf("w%02d", i), api.StateRunning), idx)
			mu.Unlock()
			queued <- struct{}{}
			if err == nil {
				err = c.durable(idx)
			}
			errs <- err
		}()
	}
	for range n {
		<-queued
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	txs, writes := c.counts()
	if writes != n || txs > 2 {
		t.Errorf("%d changes went to disk in %d transactions; want %d in at most 2", writes, txs, n)
	}
	if err := c.close(); err != nil {
		t.Fatal(err)
	}
	if err := st.close(); err != nil {
		t.Fatal(err)
	}
	st, err = openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	recs, index, err := st.loadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != n || index != n {
		t.Errorf("after a reopen: %d records at index %d, want %d at %d", len(recs), index, n, n)
	}
}

// Two versions of one record in one transaction: the later one is what
// the disk keeps; a delete queued after a put removes it.
func TestCommitterKeepsOrder(t *testing.T) {
	st, err := openStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	c, err := newCommitter(st.db)
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	c.beforeWrite = func() { <-release }
	for i, w := range []struct {
		id    string
		state api.State
	}{{"a", api.StateStarting}, {"a", api.StateRunning}, {"b", api.StateRunning}, {"a", api.StateExited}} {
		if err := c.putRecord(testRecord(w.id, w.state), uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.enqueue(storeWrite{id: "b", del: true, index: 5}); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := c.durable(5); err != nil {
		t.Fatal(err)
	}
	if err := c.close(); err != nil {
		t.Fatal(err)
	}
	recs, index, err := st.loadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1 || recs[0].Workload.ID != "a" || recs[0].Workload.State != api.StateExited || index != 5 {
		t.Errorf("disk holds %d records (%+v) at index %d; want a exited at 5", len(recs), recs, index)
	}
}

// A failed write is sticky: its waiters and every later one get the
// error, nothing more is queued, and the agent says it is not ready.
func TestCommitterFailureIsSticky(t *testing.T) {
	e := newEnv(t)
	w := e.submit(api.WorkloadSpec{Command: []string{"true"}})
	// The database goes away under the agent, as a dead disk would.
	if err := e.agent.store.db.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.agent.Submit(t.Context(), api.WorkloadSpec{Image: w.Spec.Image, Command: []string{"true"}}); err == nil || !strings.Contains(err.Error(), "state database") {
		t.Fatalf("a submit with the database gone: %v, want the state database's error", err)
	}
	if err := e.agent.Ready(t.Context()); err == nil {
		t.Error("the agent says it is ready with writes failing")
	}
	if err := e.agent.commits.enqueue(storeWrite{index: 1 << 40}); err == nil {
		t.Error("a change was queued after a failed write")
	}
}

// After a failed transaction nothing queued behind it is written: the
// disk keeps a prefix of the history.
func TestCommitterWritesNothingAfterAFailure(t *testing.T) {
	st, err := openStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	c, err := newCommitter(st.db)
	if err != nil {
		t.Fatal(err)
	}
	inFlight, release := make(chan struct{}), make(chan struct{})
	first := true
	c.beforeWrite = func() {
		if first {
			first = false
			close(inFlight)
			<-release
		}
	}
	// bbolt refuses an empty key: the first transaction fails.
	if err := c.enqueue(storeWrite{put: []byte("{}"), id: "", index: 1}); err != nil {
		t.Fatal(err)
	}
	<-inFlight
	if err := c.putRecord(testRecord("later", api.StateRunning), 2); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := c.durable(2); err == nil {
		t.Fatal("durable after a failed write said the change is on disk")
	}
	c.close()
	recs, index, err := st.loadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 0 || index != 0 {
		t.Errorf("after a failed write the disk holds %d records at index %d; want nothing after the failure", len(recs), index)
	}
}
