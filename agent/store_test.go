package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/errdefs"
	bolt "go.etcd.io/bbolt"
)

// fill sets every field reachable from v to a non-zero value, so a test
// over it notices a field that a conversion or a clone forgets.
func fill(t *testing.T, v reflect.Value, path string) {
	switch v.Type() {
	case reflect.TypeFor[time.Time]():
		v.Set(reflect.ValueOf(time.Date(2025, 1, 2, 3, 4, 5, 6000, time.UTC)))
		return
	case reflect.TypeFor[time.Duration]():
		v.Set(reflect.ValueOf(1500 * time.Millisecond)) // the database keeps milliseconds
		return
	case reflect.TypeFor[json.RawMessage]():
		v.Set(reflect.ValueOf(json.RawMessage(`{"pid":1234}`)))
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			fill(t, v.Field(i), path+"."+v.Type().Field(i).Name)
		}
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(t, v.Elem(), path)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 1, 1))
		fill(t, v.Index(0), path+"[0]")
	case reflect.Map:
		v.Set(reflect.MakeMap(v.Type()))
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(t, k, path+".key")
		fill(t, e, path+".value")
		v.SetMapIndex(k, e)
	case reflect.String:
		v.SetString("s" + strings.ReplaceAll(path, ".", "-"))
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int64:
		v.SetInt(7)
	case reflect.Uint64:
		v.SetUint(7)
	case reflect.Float64:
		v.SetFloat(1.5)
	default:
		t.Fatalf("fill: %s has kind %s; teach fill about it", path, v.Kind())
	}
}

func filledRecord(t *testing.T) *record {
	var r record
	fill(t, reflect.ValueOf(&r).Elem(), "record")
	return &r
}

// Every field of a record survives the database: a field added to the
// record or to api.Workload fails here until the database schema has it.
func TestRecordRoundTripsThroughTheDatabase(t *testing.T) {
	r := filledRecord(t)
	// A record holds the names of its secrets, never a value (secrets.go).
	r.Workload.Spec.SecretEnv = redactedEnv(secretNames(r.Workload.Spec.SecretEnv))
	// A download's progress is in answers only (withPull), never stored.
	r.Workload.Pull = nil
	r.Workload.Health = nil // likewise a run's health
	data, err := json.Marshal(toDB(r))
	if err != nil {
		t.Fatal(err)
	}
	var d dbRecord
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	if got := fromDB(&d); !reflect.DeepEqual(got, r) {
		t.Errorf("after the database:\n%+v\nwant\n%+v", got, r)
	}
}

// shared reports the paths where a and b share memory (a pointer, a
// slice's array, a map).
func shared(a, b reflect.Value, path string) []string {
	var out []string
	switch a.Kind() {
	case reflect.Pointer:
		if a.IsNil() || b.IsNil() {
			return nil
		}
		if a.Pointer() == b.Pointer() {
			out = append(out, path)
		}
		return append(out, shared(a.Elem(), b.Elem(), path)...)
	case reflect.Slice:
		if a.Len() > 0 && b.Len() > 0 && a.Pointer() == b.Pointer() {
			out = append(out, path)
		}
		for i := range min(a.Len(), b.Len()) {
			out = append(out, shared(a.Index(i), b.Index(i), path+"[i]")...)
		}
	case reflect.Map:
		if !a.IsNil() && a.Pointer() == b.Pointer() {
			out = append(out, path)
		}
	case reflect.Struct:
		for i := range a.NumField() {
			out = append(out, shared(a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name)...)
		}
	}
	return out
}

// A clone equals its record and shares nothing with it: readers change
// what they are given without touching the agent's records.
func TestCloneSharesNothing(t *testing.T) {
	r := filledRecord(t)
	c := r.clone()
	if !reflect.DeepEqual(c, r) {
		t.Errorf("clone differs:\n%+v\nwant\n%+v", c, r)
	}
	if s := shared(reflect.ValueOf(r).Elem(), reflect.ValueOf(c).Elem(), "record"); len(s) > 0 {
		t.Errorf("clone shares memory with its record at %v", s)
	}
}

// v1Fixture copies the database that the schema 1 store wrote (before
// the database had a schema of its own) into a data dir.
func v1Fixture(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("testdata/state-v1.db")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "state.db"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The schema 1 database is converted when it is opened, and every
// workload in it is found with what it held.
func TestOpenSchema1Database(t *testing.T) {
	dir := v1Fixture(t)
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	recs, index, err := st.loadAll()
	if err != nil {
		t.Fatal(err)
	}
	if index != 42 {
		t.Errorf("index %d, want 42", index)
	}
	byID := map[string]*record{}
	for _, r := range recs {
		byID[r.Workload.ID] = r
	}
	if len(byID) != 8 {
		t.Fatalf("%d workloads, want 8", len(byID))
	}
	at := func(s string) time.Time { v, _ := time.Parse(time.RFC3339Nano, s); return v }
	want := []struct {
		id, name string
		state    api.State
		iso      api.Isolation
		check    func(r *record) bool
	}{
		{"00000000000000a1", "pending-one", api.StatePending, api.IsolationContainer, func(r *record) bool {
			s := r.Workload.Spec
			// Before limits, requests were limits.
			return reflect.DeepEqual(s.Resources, api.Resources{CPU: 0.5, MemoryMB: 64, Pids: 100, Limits: &api.ResourceLimits{CPU: 0.5, MemoryMB: 64}}) && s.Restart == api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 3} &&
				reflect.DeepEqual(s.Command, []string{"sh", "-c", "true"}) && reflect.DeepEqual(s.Args, []string{"a1"}) && s.Env["K"] == "V" &&
				s.Workdir == "/w" && s.Labels["tenant"] == "t1" && s.Network == "bridge" && s.Isolation == api.IsolationAuto &&
				len(s.Ports) == 1 && s.Ports[0] == api.PortMapping{HostPort: 8080, ContainerPort: 80, Protocol: "tcp"} &&
				r.Workload.CreatedAt.Equal(at("2025-01-02T03:04:05.123456789Z")) && r.Workload.ImageDigest == "sha256:d1" &&
				r.Workload.Placement != nil && r.Workload.Placement.DecidingRule == "default" && len(r.Workload.Placement.Matched) == 1 &&
				r.Workload.Placement.Matched[0].Rule == "r1" && r.Workload.ModifyIndex == 10
		}},
		{"00000000000000a2", "running-one", api.StateRunning, api.IsolationContainer, func(r *record) bool {
			n := r.Workload.Network
			return r.Handle != nil && r.Handle.Driver == "container" && r.Handle.Version == 1 && string(r.Handle.State) == `{"pid":1234}` &&
				n != nil && n.Address == "10.88.0.5" && n.Gateway == "10.88.0.1" && len(n.Ports) == 1 && r.Workload.StartedAt != nil
		}},
		{"00000000000000a3", "", api.StateExited, api.IsolationVM, func(r *record) bool {
			w := r.Workload
			return exitOf(&w) == 3 && w.LastExitCode != nil && *w.LastExitCode == 3 && w.RestartCount == 3 && w.OOMKilled &&
				w.Error != "" && w.FinishedAt != nil && w.FinishedAt.Equal(at("2025-01-02T03:05:06Z")) && r.Handle.Version == 2
		}},
		{"00000000000000a4", "failed-one", api.StateFailed, api.IsolationContainer, func(r *record) bool { return r.Workload.Error == "runc exploded" }},
		{"00000000000000a5", "stopping-one", api.StateStopping, api.IsolationContainer, func(r *record) bool { return r.StopRequested && !r.Deleting }},
		{"00000000000000a6", "deleting-one", api.StateExited, api.IsolationContainer, func(r *record) bool {
			return r.Deleting && r.Workload.Deleting && r.StopRequested && exitOf(&r.Workload) == 0
		}},
		{"00000000000000a7", "backoff-one", api.StatePending, api.IsolationContainer, func(r *record) bool {
			return r.NextStart != nil && r.NextStart.Equal(at("2025-01-02T03:06:00Z")) && r.Workload.RestartCount == 1
		}},
		{"00000000000000a8", "starting-one", api.StateStarting, api.IsolationVM, func(r *record) bool { return r.Handle == nil && !r.StopRequested }},
	}
	for _, w := range want {
		r := byID[w.id]
		if r == nil {
			t.Errorf("workload %s is missing", w.id)
			continue
		}
		if r.Workload.Name != w.name || r.Workload.State != w.state || r.Workload.Isolation != w.iso || !w.check(r) {
			t.Errorf("workload %s: %+v (handle %+v, stop %v, deleting %v, next start %v)", w.id, r.Workload, r.Handle, r.StopRequested, r.Deleting, r.NextStart)
		}
	}
	// Converted once: the database says the current schema, and reads
	// the same.
	var schema string
	_ = st.db.View(func(tx *bolt.Tx) error { schema = string(tx.Bucket(bucketMeta).Get(keySchema)); return nil })
	if schema != strconv.Itoa(schemaVersion) {
		t.Errorf("schema %q after opening, want %d", schema, schemaVersion)
	}
	st.close()
	st, err = openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	again, _, err := st.loadAll()
	st.close()
	if err != nil || len(again) != len(recs) {
		t.Fatalf("reopened: %d workloads, %v", len(again), err)
	}
	for _, r := range again {
		if !reflect.DeepEqual(r, byID[r.Workload.ID]) {
			t.Errorf("workload %s changed when reopened:\n%+v\nwant\n%+v", r.Workload.ID, r, byID[r.Workload.ID])
		}
	}
}

// An agent over the schema 1 database finds every workload (by id and by
// name, in the namespace of its tenant label) and keeps its node id.
func TestAgentOpensSchema1Database(t *testing.T) {
	e := newEnv(t)
	e.agent.Close()
	e.agent = nil
	e.dir = v1Fixture(t)
	e.change = func(o *Options) {
		o.Drivers = []driver.Driver{e.ctr, fake.New("vm", e.node)}
	}
	e.start()
	ctx := context.Background()
	for _, ref := range []string{"00000000000000a1", "t1/running-one", "00000000000000a3", "t1/failed-one", "t1/stopping-one", "t1/backoff-one", "t1/starting-one"} {
		if _, err := e.agent.Get(ctx, ref); err != nil {
			t.Errorf("GET %s: %v", ref, err)
		}
	}
	// The interrupted delete is carried out.
	if w, err := e.agent.Get(ctx, "t1/deleting-one"); err == nil && !w.Deleting {
		t.Errorf("deleting-one is not deleting: %+v", w)
	} else if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		t.Error(err)
	}
	e.waitGone("00000000000000a6")
	if n := e.agent.Node(ctx); n.ID != "node-fixture-1" {
		t.Errorf("node id %q, want the database's", n.ID)
	}
}

// A database of a newer schema is refused, not misread.
func TestNewerSchemaIsRefused(t *testing.T) {
	dir := t.TempDir()
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	newer := strconv.Itoa(schemaVersion + 1)
	_ = st.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keySchema, []byte(newer)) })
	st.close()
	if _, err := openStore(dir); err == nil || !strings.Contains(err.Error(), "schema "+newer) {
		t.Errorf("open a schema %s database: %v, want a refusal naming it", newer, err)
	}
}
