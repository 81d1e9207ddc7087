package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// record is what the agent persists per workload: the API view plus what
// only the agent needs (the driver's handle, pending operations).
type record struct {
	Version  int          `json:"version"`
	Workload api.Workload `json:"workload"`
	// Handle is the driver's state from Start; nil before the task exists.
	Handle *driver.Handle `json:"handle,omitempty"`
	// StopRequested survives restarts: a workload asked to stop is never
	// started or restarted again.
	StopRequested bool `json:"stop_requested,omitempty"`
	// StopAt is when the stop was asked and StopGrace its grace period:
	// the stop's deadline, which an agent restart resumes with what is
	// left of it.
	StopAt    *time.Time    `json:"stop_at,omitempty"`
	StopGrace time.Duration `json:"stop_grace,omitempty"`
	// Deleting marks a delete in progress, finished by the agent (after a
	// crash too).
	Deleting bool `json:"deleting,omitempty"`
	// DeleteAttempts counts the failed attempts of a delete and
	// DeleteError is why the last one failed.
	DeleteAttempts int    `json:"delete_attempts,omitempty"`
	DeleteError    string `json:"delete_error,omitempty"`
	// NextStart is when a backed-off restart is due.
	NextStart *time.Time `json:"next_start,omitempty"`
}

const recordVersion = 1

func (r *record) clone() *record {
	c := *r
	c.Workload = cloneWorkload(r.Workload)
	return &c
}

func cloneWorkload(w api.Workload) api.Workload {
	data, _ := json.Marshal(w)
	var c api.Workload
	_ = json.Unmarshal(data, &c)
	return c
}

var (
	bucketWorkloads = []byte("workloads")
	bucketMeta      = []byte("meta")
	keyIndex        = []byte("index")
	keyNodeID       = []byte("node_id")
)

// store persists workload records in bbolt. Every write is committed (and
// fsynced by bbolt) before the API acknowledges the request it serves.
type store struct {
	db *bolt.DB
}

func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "state.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open %s: another berth agent holds it (is one already running with this data dir?)", path)
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketWorkloads, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init %s: %w", path, err)
	}
	return &store{db: db}, nil
}

func (s *store) close() error { return s.db.Close() }

// loadAll returns every record and the last index.
func (s *store) loadAll() ([]*record, uint64, error) {
	var out []*record
	var index uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyIndex); v != nil {
			if err := json.Unmarshal(v, &index); err != nil {
				return fmt.Errorf("decode index: %w", err)
			}
		}
		return tx.Bucket(bucketWorkloads).ForEach(func(k, v []byte) error {
			var r record
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode workload %s: %w", k, err)
			}
			out = append(out, &r)
			return nil
		})
	})
	return out, index, err
}

// put writes r with the given index in one transaction.
func (s *store) put(r *record, index uint64) error {
	r.Version = recordVersion
	data, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode workload %s: %w", r.Workload.ID, err)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketWorkloads).Put([]byte(r.Workload.ID), data); err != nil {
			return err
		}
		return putIndex(tx, index)
	})
}

func (s *store) delete(id string, index uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketWorkloads).Delete([]byte(id)); err != nil {
			return err
		}
		return putIndex(tx, index)
	})
}

func putIndex(tx *bolt.Tx, index uint64) error {
	v, _ := json.Marshal(index)
	return tx.Bucket(bucketMeta).Put(keyIndex, v)
}

// meta reads a metadata value, creating it with mk on first use.
func (s *store) meta(key []byte, mk func() string) (string, error) {
	var val string
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if v := b.Get(key); v != nil {
			val = string(v)
			return nil
		}
		val = mk()
		return b.Put(key, []byte(val))
	})
	return val, err
}

// setIndex persists the state index alone.
func (s *store) setIndex(index uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error { return putIndex(tx, index) })
}
