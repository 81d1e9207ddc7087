package agent

import (
	"encoding/json"
	"fmt"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// committer writes the agent's records to the state database in groups.
//
// Every change is published in memory under writeMu, in index order, and
// queued here in the same order; one goroutine writes whatever is queued
// in a single transaction (one pair of fsyncs for all of it), then wakes
// those that wait. A change that must be on disk before something
// follows from it (an API answer, a side effect on the node) waits for its
// index with durable after writeMu is released, so concurrent writers
// share fsyncs instead of queueing behind each other's.
//
// What is published but not yet on disk is lost only with the agent
// process, and only what nobody was told: every acknowledgement waits.
// Recovery rebuilds the rest from the runtime (a task that runs or
// ended), as after any crash.
//
// A write that fails leaves memory ahead of the disk: the error is
// sticky, every later durable returns it and the agent reports itself
// not ready; a restart of the agent recovers from what is on disk.
type committer struct {
	db *bolt.DB

	mu      sync.Mutex
	queue   []storeWrite
	wake    chan struct{} // one token: the queue has work
	written uint64        // highest index on disk
	err     error         // sticky write error
	flushed *sync.Cond    // broadcast after every transaction
	closing bool
	stopped bool          // the writer has returned
	done    chan struct{} // closed when the writer has returned
	// txs and writes count transactions and the changes they carried.
	txs, writes uint64
	// beforeWrite, when set (by tests, under mu), runs before each
	// transaction.
	beforeWrite func()
}

// storeWrite is one queued change: a record to put, or an id to delete;
// index is the state index it carries (alone, for an index bump).
type storeWrite struct {
	put   []byte // encoded record
	id    string
	del   bool
	index uint64
}

// newCommitter starts the writer of db.
func newCommitter(db *bolt.DB) (*committer, error) {
	var written uint64
	if err := db.View(func(tx *bolt.Tx) (err error) {
		written, err = readIndex(tx)
		return err
	}); err != nil {
		return nil, err
	}
	c := &committer{db: db, written: written, wake: make(chan struct{}, 1), done: make(chan struct{})}
	c.flushed = sync.NewCond(&c.mu)
	go c.run()
	return c, nil
}

// enqueue queues w. Callers hold writeMu, so the queue is in index order.
func (c *committer) enqueue(w storeWrite) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	if c.closing {
		return fmt.Errorf("state database: closed")
	}
	c.queue = append(c.queue, w)
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

// putRecord queues r at index.
func (c *committer) putRecord(r *record, index uint64) error {
	data, err := json.Marshal(toDB(r))
	if err != nil {
		return fmt.Errorf("encode workload %s: %w", r.Workload.ID, err)
	}
	return c.enqueue(storeWrite{put: data, id: r.Workload.ID, index: index})
}

// durable blocks until every change up to index is on disk.
func (c *committer) durable(index uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.written < index && c.err == nil && !c.stopped {
		c.flushed.Wait()
	}
	if c.err != nil {
		return c.err
	}
	if c.written < index {
		return fmt.Errorf("state database: closed before index %d was written", index)
	}
	return nil
}

// counts returns how many transactions carried how many changes.
func (c *committer) counts() (txs, writes uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.txs, c.writes
}

// healthy is the sticky write error, nil while every write succeeded.
func (c *committer) healthy() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// close writes what is queued and stops the writer.
func (c *committer) close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *committer) run() {
	defer func() {
		c.mu.Lock()
		c.stopped = true
		c.flushed.Broadcast()
		c.mu.Unlock()
		close(c.done)
	}()
	for range c.wake {
		for {
			c.mu.Lock()
			batch := c.queue
			c.queue = nil
			closing := c.closing
			beforeWrite := c.beforeWrite
			c.mu.Unlock()
			if len(batch) == 0 {
				if closing {
					return
				}
				break
			}
			if beforeWrite != nil {
				beforeWrite()
			}
			c.mu.Lock()
			failed := c.err != nil
			c.mu.Unlock()
			var err error
			if !failed {
				// After a failure nothing more is written: the disk
				// keeps a prefix of the history, which recovery reads.
				err = c.write(batch)
			}
			c.mu.Lock()
			c.txs++
			c.writes += uint64(len(batch))
			if err != nil && c.err == nil {
				c.err = fmt.Errorf("state database: %w", err)
			}
			if err == nil && !failed {
				c.written = batch[len(batch)-1].index
			}
			c.flushed.Broadcast()
			c.mu.Unlock()
		}
	}
}

// write applies batch, in order, in one transaction.
func (c *committer) write(batch []storeWrite) error {
	return c.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketWorkloads)
		for _, w := range batch {
			var err error
			switch {
			case w.del:
				err = b.Delete([]byte(w.id))
			case w.put != nil:
				err = b.Put([]byte(w.id), w.put)
			}
			if err != nil {
				return err
			}
		}
		return putIndex(tx, batch[len(batch)-1].index)
	})
}
