package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// The state database (bbolt, DataDir/state.db) holds one dbRecord per
// workload, in the schema version the meta key "schema" names. Its types
// are the database's own, converted explicitly from and to the agent's
// records: the API's wire types may change (a renamed or a new field)
// without a migration, and a change of these types is one, with a new
// schema version and its conversion in migrate.
//
// Schema versions:
//
//	1 (no "schema" key): {"version":1,"workload":<api.Workload>,
//	  "handle":..., "stop_requested":..., "deleting":..., ...}
//	2: a flat dbRecord; a requested stop and a delete in progress are
//	  objects of their own ("stop", "delete").
//	3: a record keeps its tenant ("tenant"), whose namespace holds its
//	  name (converted from the tenant label); the spec's "secret_env" is
//	  the names of its secret variables, whose values are never in the
//	  database (secrets.go keeps them beside it).
const schemaVersion = 3

var (
	bucketWorkloads = []byte("workloads")
	bucketMeta      = []byte("meta")
	keyIndex        = []byte("index")
	keyNodeID       = []byte("node_id")
	keySchema       = []byte("schema")
)

// dbRecord is a workload as the state database holds it (schema 3).
type dbRecord struct {
	ID           string       `json:"id"`
	Name         string       `json:"name,omitempty"`
	Tenant       string       `json:"tenant,omitempty"`
	Spec         dbSpec       `json:"spec"`
	State        string       `json:"state"`
	Isolation    string       `json:"isolation"`
	ExitCode     *int         `json:"exit_code,omitempty"`
	OOMKilled    bool         `json:"oom_killed,omitempty"`
	Error        string       `json:"error,omitempty"`
	Placement    *dbPlacement `json:"placement,omitempty"`
	ImageDigest  string       `json:"image_digest,omitempty"`
	RestartCount int          `json:"restart_count,omitempty"`
	LastExitCode *int         `json:"last_exit_code,omitempty"`
	CreatedAt    time.Time    `json:"created_at"`
	StartedAt    *time.Time   `json:"started_at,omitempty"`
	FinishedAt   *time.Time   `json:"finished_at,omitempty"`
	Network      *dbNetwork   `json:"network,omitempty"`
	ModifyIndex  uint64       `json:"modify_index"`
	// Handle is the driver's own persisted state, versioned by the driver.
	Handle *dbHandle `json:"handle,omitempty"`
	// StopRequested: a stop was asked (the workload never starts again);
	// Stop is its deadline, absent when there was nothing to enforce.
	StopRequested bool       `json:"stop_requested,omitempty"`
	Stop          *dbStop    `json:"stop,omitempty"`
	Delete        *dbDelete  `json:"delete,omitempty"`
	NextStart     *time.Time `json:"next_start,omitempty"`
	// StartBoot is the node's boot id when the run's start began.
	StartBoot string `json:"start_boot,omitempty"`
}

type dbSpec struct {
	Name    string            `json:"name,omitempty"`
	Image   string            `json:"image"`
	Command []string          `json:"command,omitempty"`
	Args    []string          `json:"args,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	// SecretEnv names the secret variables, sorted; no value.
	SecretEnv  []string          `json:"secret_env,omitempty"`
	Workdir    string            `json:"workdir,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
	Isolation  string            `json:"isolation,omitempty"`
	Privileged bool              `json:"privileged,omitempty"`
	Resources  dbResources       `json:"resources"`
	ImagePull  string            `json:"image_pull,omitempty"`
	Logs       *dbLogs           `json:"logs,omitempty"`
	Health     *dbHealth         `json:"health,omitempty"`
	Restart    dbRestart         `json:"restart"`
	Network    string            `json:"network,omitempty"`
	Ports      []dbPort          `json:"ports,omitempty"`
	Volumes    []dbVolumeMount   `json:"volumes,omitempty"`
	Stdin      bool              `json:"stdin,omitempty"`
	TTY        bool              `json:"tty,omitempty"`
}

type dbVolumeMount struct {
	Name     string `json:"name,omitempty"`
	HostPath string `json:"host_path,omitempty"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

type dbResources struct {
	CPU      float64 `json:"cpu,omitempty"`
	MemoryMB int64   `json:"memory_mb,omitempty"`
	Pids     int64   `json:"pids,omitempty"`
	// DiskMB is absent from records of berth before disk budgets: their
	// workloads keep running without one.
	DiskMB int64 `json:"disk_mb,omitempty"`
	// Limits are absent in records of agents before limits: their
	// requests were their limits.
	CPULimit      float64 `json:"cpu_limit,omitempty"`
	MemoryLimitMB int64   `json:"memory_limit_mb,omitempty"`
}

func resourcesToDB(r api.Resources) dbResources {
	l := limits(r)
	return dbResources{CPU: r.CPU, MemoryMB: r.MemoryMB, Pids: r.Pids, DiskMB: r.DiskMB, CPULimit: l.CPU, MemoryLimitMB: l.MemoryMB}
}

func resourcesFromDB(d dbResources) api.Resources {
	l := api.ResourceLimits{CPU: d.CPULimit, MemoryMB: d.MemoryLimitMB}
	if l.CPU == 0 {
		l.CPU = d.CPU
	}
	if l.MemoryMB == 0 {
		l.MemoryMB = d.MemoryMB
	}
	return api.Resources{CPU: d.CPU, MemoryMB: d.MemoryMB, Pids: d.Pids, DiskMB: d.DiskMB, Limits: &l}
}

type dbRestart struct {
	Policy      string `json:"policy,omitempty"`
	MaxRetries  int    `json:"max_retries,omitempty"`
	OnUnhealthy bool   `json:"on_unhealthy,omitempty"`
}

// dbHealth is a workload's health check; durations in nanoseconds.
type dbHealth struct {
	Exec          []string `json:"exec,omitempty"`
	HTTPPort      int      `json:"http_port,omitempty"`
	HTTPPath      string   `json:"http_path,omitempty"`
	TCPPort       int      `json:"tcp_port,omitempty"`
	IntervalNS    int64    `json:"interval_ns,omitempty"`
	TimeoutNS     int64    `json:"timeout_ns,omitempty"`
	Retries       int      `json:"retries,omitempty"`
	StartPeriodNS int64    `json:"start_period_ns,omitempty"`
}

func healthToDB(h *api.HealthCheck) *dbHealth {
	if h == nil {
		return nil
	}
	d := &dbHealth{Exec: h.Exec, IntervalNS: int64(h.Interval), TimeoutNS: int64(h.Timeout), Retries: h.Retries, StartPeriodNS: int64(h.StartPeriod)}
	if h.HTTP != nil {
		d.HTTPPort, d.HTTPPath = h.HTTP.Port, h.HTTP.Path
	}
	if h.TCP != nil {
		d.TCPPort = h.TCP.Port
	}
	return d
}

func healthFromDB(d *dbHealth) *api.HealthCheck {
	if d == nil {
		return nil
	}
	h := &api.HealthCheck{Exec: d.Exec, Interval: api.Duration(d.IntervalNS), Timeout: api.Duration(d.TimeoutNS), Retries: d.Retries, StartPeriod: api.Duration(d.StartPeriodNS)}
	if d.HTTPPort != 0 {
		h.HTTP = &api.HTTPCheck{Port: d.HTTPPort, Path: d.HTTPPath}
	}
	if d.TCPPort != 0 {
		h.TCP = &api.TCPCheck{Port: d.TCPPort}
	}
	return h
}

type dbPort struct {
	HostPort      int    `json:"host_port"`
	ContainerPort int    `json:"container_port"`
	Protocol      string `json:"protocol,omitempty"`
}

type dbPlacement struct {
	Isolation     string        `json:"isolation"`
	Denied        bool          `json:"denied,omitempty"`
	DecidingRule  string        `json:"deciding_rule,omitempty"`
	Matched       []dbRuleMatch `json:"matched,omitempty"`
	PolicyVersion string        `json:"policy_version"`
	Explanation   string        `json:"explanation"`
	Network       string        `json:"network,omitempty"`
}

type dbRuleMatch struct {
	Rule    string `json:"rule"`
	Outcome string `json:"outcome"`
	Reason  string `json:"reason"`
}

type dbNetwork struct {
	Mode    string   `json:"mode"`
	Address string   `json:"address,omitempty"`
	Gateway string   `json:"gateway,omitempty"`
	Ports   []dbPort `json:"ports,omitempty"`
}

type dbHandle struct {
	ID      string          `json:"id"`
	Driver  string          `json:"driver"`
	Version int             `json:"version"`
	State   json.RawMessage `json:"state,omitempty"`
}

type dbStop struct {
	At      *time.Time `json:"at,omitempty"`
	GraceMS int64      `json:"grace_ms"`
}

type dbDelete struct {
	Attempts int    `json:"attempts,omitempty"`
	Error    string `json:"error,omitempty"`
}

// toDB converts a record to what the database holds.
func toDB(r *record) dbRecord {
	w := &r.Workload
	d := dbRecord{
		ID: w.ID, Name: w.Name, Tenant: w.Tenant, Spec: specToDB(w.Spec),
		State: string(w.State), Isolation: string(w.Isolation),
		ExitCode: clonePtr(w.ExitCode), OOMKilled: w.OOMKilled, Error: w.Error,
		ImageDigest: w.ImageDigest, RestartCount: w.RestartCount, LastExitCode: clonePtr(w.LastExitCode),
		CreatedAt: w.CreatedAt, StartedAt: clonePtr(w.StartedAt), FinishedAt: clonePtr(w.FinishedAt),
		ModifyIndex: w.ModifyIndex, StopRequested: r.StopRequested, NextStart: clonePtr(r.NextStart),
		StartBoot: r.StartBoot,
	}
	if p := w.Placement; p != nil {
		d.Placement = &dbPlacement{Isolation: string(p.Isolation), Denied: p.Denied, DecidingRule: p.DecidingRule,
			PolicyVersion: p.PolicyVersion, Explanation: p.Explanation, Network: p.Network}
		for _, m := range p.Matched {
			d.Placement.Matched = append(d.Placement.Matched, dbRuleMatch(m))
		}
	}
	if n := w.Network; n != nil {
		d.Network = &dbNetwork{Mode: n.Mode, Address: n.Address, Gateway: n.Gateway, Ports: portsToDB(n.Ports)}
	}
	if h := r.Handle; h != nil {
		d.Handle = &dbHandle{ID: h.ID, Driver: h.Driver, Version: h.Version, State: h.State}
	}
	if r.StopAt != nil || r.StopGrace != 0 {
		d.Stop = &dbStop{At: clonePtr(r.StopAt), GraceMS: r.StopGrace.Milliseconds()}
	}
	if r.Deleting {
		d.Delete = &dbDelete{Attempts: r.DeleteAttempts, Error: r.DeleteError}
	}
	return d
}

func specToDB(s api.WorkloadSpec) dbSpec {
	return dbSpec{
		Name: s.Name, Image: s.Image, Command: s.Command, Args: s.Args, Env: s.Env, SecretEnv: secretNames(s.SecretEnv), Workdir: s.Workdir,
		Labels: s.Labels, Isolation: string(s.Isolation), Privileged: s.Privileged,
		Resources: resourcesToDB(s.Resources),
		ImagePull: string(s.ImagePull),
		Logs:      logsToDB(s.Logs),
		Restart:   dbRestart{Policy: string(s.Restart.Policy), MaxRetries: s.Restart.MaxRetries, OnUnhealthy: s.Restart.OnUnhealthy},
		Health:    healthToDB(s.Health),
		Network:   s.Network, Ports: portsToDB(s.Ports),
		Volumes: convertSlice(s.Volumes, func(m api.VolumeMount) dbVolumeMount { return dbVolumeMount(m) }),
		Stdin:   s.Stdin, TTY: s.TTY,
	}
}

// convertSlice converts each element, keeping nil nil.
func convertSlice[S, D any](in []S, f func(S) D) []D {
	if in == nil {
		return nil
	}
	out := make([]D, len(in))
	for i, v := range in {
		out[i] = f(v)
	}
	return out
}

// secretNames is what the database keeps of a secret environment: the
// names, sorted; never a value (a record's values are api.Redacted
// anyway).
func secretNames(env map[string]string) []string {
	if len(env) == 0 {
		return nil
	}
	names := slices.Sorted(maps.Keys(env))
	return names
}

// redactedEnv is the record's view of a secret environment: each name
// with the value api.Redacted.
func redactedEnv(names []string) map[string]string {
	if len(names) == 0 {
		return nil
	}
	m := make(map[string]string, len(names))
	for _, k := range names {
		m[k] = api.Redacted
	}
	return m
}

func portsToDB(ports []api.PortMapping) []dbPort {
	if ports == nil {
		return nil
	}
	out := make([]dbPort, len(ports))
	for i, p := range ports {
		out[i] = dbPort(p)
	}
	return out
}

func portsFromDB(ports []dbPort) []api.PortMapping {
	if ports == nil {
		return nil
	}
	out := make([]api.PortMapping, len(ports))
	for i, p := range ports {
		out[i] = api.PortMapping(p)
	}
	return out
}

// fromDB converts what the database holds to a record.
func fromDB(d *dbRecord) *record {
	s := &d.Spec
	r := &record{
		Workload: api.Workload{
			ID: d.ID, Name: d.Name, Tenant: d.Tenant,
			Spec: api.WorkloadSpec{
				Name: s.Name, Image: s.Image, Command: s.Command, Args: s.Args, Env: s.Env, SecretEnv: redactedEnv(s.SecretEnv), Workdir: s.Workdir,
				Labels: s.Labels, Isolation: api.Isolation(s.Isolation), Privileged: s.Privileged,
				Resources: resourcesFromDB(s.Resources), ImagePull: pullFromDB(s.ImagePull), Logs: logsFromDB(s.Logs),
				Restart: api.RestartSpec{Policy: api.RestartPolicy(s.Restart.Policy), MaxRetries: s.Restart.MaxRetries, OnUnhealthy: s.Restart.OnUnhealthy},
				Health:  healthFromDB(s.Health),
				Network: s.Network, Ports: portsFromDB(s.Ports),
				Volumes: convertSlice(s.Volumes, func(m dbVolumeMount) api.VolumeMount { return api.VolumeMount(m) }),
				Stdin:   s.Stdin, TTY: s.TTY,
			},
			State: api.State(d.State), Isolation: api.Isolation(d.Isolation),
			ExitCode: d.ExitCode, OOMKilled: d.OOMKilled, Error: d.Error,
			ImageDigest: d.ImageDigest, RestartCount: d.RestartCount, LastExitCode: d.LastExitCode,
			CreatedAt: d.CreatedAt, StartedAt: d.StartedAt, FinishedAt: d.FinishedAt,
			ModifyIndex: d.ModifyIndex, Deleting: d.Delete != nil,
		},
		StopRequested: d.StopRequested || d.Stop != nil,
		Deleting:      d.Delete != nil,
		NextStart:     d.NextStart,
		StartBoot:     d.StartBoot,
	}
	if p := d.Placement; p != nil {
		r.Workload.Placement = &api.Placement{Isolation: api.Isolation(p.Isolation), Denied: p.Denied, DecidingRule: p.DecidingRule,
			PolicyVersion: p.PolicyVersion, Explanation: p.Explanation, Network: p.Network}
		for _, m := range p.Matched {
			r.Workload.Placement.Matched = append(r.Workload.Placement.Matched, api.RuleMatch(m))
		}
	}
	if n := d.Network; n != nil {
		r.Workload.Network = &api.NetworkStatus{Mode: n.Mode, Address: n.Address, Gateway: n.Gateway, Ports: portsFromDB(n.Ports)}
	}
	if h := d.Handle; h != nil {
		r.Handle = &driver.Handle{ID: h.ID, Driver: h.Driver, Version: h.Version, State: h.State}
	}
	if st := d.Stop; st != nil {
		r.StopAt, r.StopGrace = st.At, time.Duration(st.GraceMS)*time.Millisecond
	}
	if del := d.Delete; del != nil {
		r.DeleteAttempts, r.DeleteError = del.Attempts, del.Error
	}
	return r
}

// v1Record is the record of schema 1: the workload in the API's JSON of
// the time (whose field names dbRecord's workload fields keep, so it
// decodes into one) and the agent's fields beside it.
type v1Record struct {
	Workload       dbRecord   `json:"workload"`
	Handle         *dbHandle  `json:"handle,omitempty"`
	StopRequested  bool       `json:"stop_requested,omitempty"`
	StopAt         *time.Time `json:"stop_at,omitempty"`
	StopGrace      int64      `json:"stop_grace,omitempty"` // nanoseconds
	Deleting       bool       `json:"deleting,omitempty"`
	DeleteAttempts int        `json:"delete_attempts,omitempty"`
	DeleteError    string     `json:"delete_error,omitempty"`
	NextStart      *time.Time `json:"next_start,omitempty"`
}

// fromV1 decodes a schema 1 record into one of schema 2 (which fromV2
// takes on).
func fromV1(data []byte) (*dbRecord, error) {
	var v1 v1Record
	if err := json.Unmarshal(data, &v1); err != nil {
		return nil, err
	}
	d := v1.Workload
	d.Handle, d.StopRequested, d.NextStart = v1.Handle, v1.StopRequested, v1.NextStart
	d.Stop, d.Delete = nil, nil
	if v1.StopAt != nil || v1.StopGrace != 0 {
		d.Stop = &dbStop{At: v1.StopAt, GraceMS: time.Duration(v1.StopGrace).Milliseconds()}
	}
	if v1.Deleting {
		d.Delete = &dbDelete{Attempts: v1.DeleteAttempts, Error: v1.DeleteError}
	}
	return &d, nil
}

// fromV2 decodes a schema 2 record into one of schema 3: its tenant is
// its tenant label (labels never change after a submit). Names were
// unique node-wide then, so they stay unique per tenant.
func fromV2(data []byte) (*dbRecord, error) {
	var d dbRecord
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, err
	}
	return tenantFromLabel(&d), nil
}

func tenantFromLabel(d *dbRecord) *dbRecord {
	d.Tenant = d.Spec.Labels[api.TenantLabel]
	return d
}

// store persists workload records in bbolt, and their secret
// environments beside it (secrets.go). Records are written in groups by
// the committer (commit.go); every write is on disk (fsynced) before the
// API acknowledges the request it serves.
type store struct {
	db *bolt.DB
	// secretsDir holds one root-only file per workload with secrets.
	secretsDir string
}

func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	secretsDir, err := makeSecretsDir(dir)
	if err != nil {
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
	if err := db.Update(migrate); err != nil {
		db.Close()
		return nil, fmt.Errorf("init %s: %w", path, err)
	}
	s := &store{db: db, secretsDir: secretsDir}
	if err := s.sweepSecrets(); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// migrate brings the database to schemaVersion in one transaction: a new
// database gets it, an older one is converted record by record (any record
// that does not convert aborts it all, and the agent does not start).
func migrate(tx *bolt.Tx) error {
	for _, b := range [][]byte{bucketWorkloads, bucketMeta} {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return err
		}
	}
	meta, wls := tx.Bucket(bucketMeta), tx.Bucket(bucketWorkloads)
	version := 1
	if v := meta.Get(keySchema); v != nil {
		n, err := strconv.Atoi(string(v))
		if err != nil {
			return fmt.Errorf("schema version %q: %w", v, err)
		}
		version = n
	} else if k, _ := wls.Cursor().First(); k == nil {
		version = schemaVersion // a new database
	}
	switch {
	case version > schemaVersion:
		return fmt.Errorf("the state database has schema %d, newer than this agent's %d: run the agent that wrote it (downgrades are not supported)", version, schemaVersion)
	case version < schemaVersion:
		convert := fromV2
		if version == 1 {
			convert = func(data []byte) (*dbRecord, error) {
				d, err := fromV1(data)
				if err != nil {
					return nil, err
				}
				return tenantFromLabel(d), nil
			}
		}
		converted := map[string][]byte{}
		err := wls.ForEach(func(k, v []byte) error {
			d, err := convert(v)
			if err != nil {
				return fmt.Errorf("convert workload %s from schema %d: %w", k, version, err)
			}
			data, err := json.Marshal(d)
			if err != nil {
				return err
			}
			converted[string(k)] = data
			return nil
		})
		if err != nil {
			return err
		}
		for k, v := range converted {
			if err := wls.Put([]byte(k), v); err != nil {
				return err
			}
		}
	}
	return meta.Put(keySchema, []byte(strconv.Itoa(schemaVersion)))
}

func (s *store) close() error { return s.db.Close() }

// loadAll returns every record and the last index.
func (s *store) loadAll() ([]*record, uint64, error) {
	var out []*record
	var index uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		if index, err = readIndex(tx); err != nil {
			return err
		}
		return tx.Bucket(bucketWorkloads).ForEach(func(k, v []byte) error {
			var d dbRecord
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode workload %s: %w", k, err)
			}
			out = append(out, fromDB(&d))
			return nil
		})
	})
	return out, index, err
}

// put writes r with the given index in one transaction.
func (s *store) put(r *record, index uint64) error {
	data, err := json.Marshal(toDB(r))
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

// readIndex reads the state index; 0 before the first change.
func readIndex(tx *bolt.Tx) (uint64, error) {
	var index uint64
	if v := tx.Bucket(bucketMeta).Get(keyIndex); v != nil {
		if err := json.Unmarshal(v, &index); err != nil {
			return 0, fmt.Errorf("decode index: %w", err)
		}
	}
	return index, nil
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

type dbLogs struct {
	MaxBytes int64 `json:"max_bytes,omitempty"`
	MaxFiles int   `json:"max_files,omitempty"`
}

func logsToDB(l *api.LogSpec) *dbLogs {
	if l == nil {
		return nil
	}
	return &dbLogs{MaxBytes: l.MaxBytes, MaxFiles: l.MaxFiles}
}

func logsFromDB(l *dbLogs) *api.LogSpec {
	if l == nil {
		return nil
	}
	return &api.LogSpec{MaxBytes: l.MaxBytes, MaxFiles: l.MaxFiles}
}
