package api

import (
	"encoding/json"
	"fmt"
	"time"
)

// HealthCheck says how berth probes a running workload, as docker's
// HEALTHCHECK and the kubelet's probes do: one of Exec (a command in the
// workload; exit 0 is healthy), HTTP (a GET of the workload's address;
// 2xx and 3xx are healthy) or TCP (a connection to it).
type HealthCheck struct {
	Exec []string   `json:"exec,omitempty"`
	HTTP *HTTPCheck `json:"http,omitempty"`
	TCP  *TCPCheck  `json:"tcp,omitempty"`
	// Interval between probes (default 30s), Timeout of one (default 5s),
	// Retries failures in a row that make it unhealthy (default 3), and
	// StartPeriod during which failures do not count (default 0).
	Interval    Duration `json:"interval,omitempty"`
	Timeout     Duration `json:"timeout,omitempty"`
	Retries     int      `json:"retries,omitempty"`
	StartPeriod Duration `json:"start_period,omitempty"`
}

// HTTPCheck probes http://ADDRESS:Port/Path.
type HTTPCheck struct {
	Port int    `json:"port"`
	Path string `json:"path,omitempty"`
}

// TCPCheck probes ADDRESS:Port.
type TCPCheck struct {
	Port int `json:"port"`
}

// Health states of a workload with a health check.
const (
	HealthStarting  = "starting"
	HealthHealthy   = "healthy"
	HealthUnhealthy = "unhealthy"
)

// HealthStatus is a running workload's health (Workload.Health).
type HealthStatus struct {
	Status        string         `json:"status"`
	FailingStreak int            `json:"failing_streak"`
	Log           []HealthResult `json:"log,omitempty"`
}

// HealthResult is one probe: the last few are kept.
type HealthResult struct {
	Start  time.Time `json:"start"`
	End    time.Time `json:"end"`
	OK     bool      `json:"ok"`
	Output string    `json:"output,omitempty"`
}

// EventWorkloadHealth: a workload's health changed (attrs status).
const EventWorkloadHealth = "workload.health"

// Duration is a time.Duration that JSON spells as Go does ("10s",
// "1m30s").
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("a duration is a string such as \"10s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration such as \"10s\"", s)
	}
	*d = Duration(v)
	return nil
}
