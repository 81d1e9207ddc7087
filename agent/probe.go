package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/berthd/berth/api"
)

// healthLogKept is how many probe results a workload shows.
const healthLogKept = 5

// maxProbeOutput bounds what a probe's output keeps.
const maxProbeOutput = 1 << 10

// probe runs a running workload's health check until ctx ends (its run
// ended, or the agent stops): starting until the first success, healthy,
// or unhealthy after Retries failures in a row (failures during the start
// period count only once it has passed). A change of health is an event
// and moves the state index; with restart.on_unhealthy an unhealthy
// workload is stopped and its restart policy decides what follows.
func (a *Agent) probe(ctx context.Context, id string, run int) {
	r := a.record(id)
	if r == nil || r.Workload.Spec.Health == nil {
		return
	}
	h := r.Workload.Spec.Health
	started := time.Now()
	a.setHealth(id, run, &api.HealthStatus{Status: api.HealthStarting})
	t := time.NewTicker(time.Duration(h.Interval))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cur := a.record(id)
		if cur == nil || cur.Workload.State != api.StateRunning || cur.Workload.RestartCount != run {
			return
		}
		res := a.probeOnce(ctx, &cur.Workload, h)
		if ctx.Err() != nil {
			return
		}
		st := a.healthOf(id)
		if st == nil {
			return
		}
		st.Log = append(st.Log, res)
		if len(st.Log) > healthLogKept {
			st.Log = st.Log[len(st.Log)-healthLogKept:]
		}
		prev := st.Status
		switch {
		case res.OK:
			st.Status, st.FailingStreak = api.HealthHealthy, 0
		case st.Status == api.HealthStarting && time.Since(started) < time.Duration(h.StartPeriod):
			// Still starting: the failure does not count.
		default:
			if st.FailingStreak++; st.FailingStreak >= h.Retries {
				st.Status = api.HealthUnhealthy
			}
		}
		a.setHealth(id, run, st)
		if st.Status == prev {
			continue
		}
		a.bumpIndex()
		a.log.Info("workload health changed", "workload_id", id, "health", st.Status, "was", prev)
		a.events.publish(api.Event{Type: api.EventWorkloadHealth, WorkloadID: id, Message: fmt.Sprintf("workload %s is %s", id, st.Status),
			Attrs: map[string]string{"status": st.Status, "previous": prev, "output": res.Output}})
		if st.Status == api.HealthUnhealthy && cur.Workload.Spec.Restart.OnUnhealthy {
			a.stopUnhealthy(ctx, &cur.Workload)
			return
		}
	}
}

// stopUnhealthy stops the task of an unhealthy workload (not the
// workload: no stop is recorded), so its end goes through the restart
// policy and its backoff as any other end does.
func (a *Agent) stopUnhealthy(ctx context.Context, w *api.Workload) {
	d, err := a.driverFor(w.Isolation)
	if err != nil {
		return
	}
	a.log.Warn("stopping an unhealthy workload; its restart policy decides what follows", "workload_id", w.ID, "restart", w.Spec.Restart.Policy)
	if err := d.Stop(ctx, w.ID, a.opts.StopTimeout); err != nil {
		a.log.Warn("stop an unhealthy workload", "workload_id", w.ID, "err", err)
	}
}

// probeOnce runs one probe within the check's timeout.
func (a *Agent) probeOnce(ctx context.Context, w *api.Workload, h *api.HealthCheck) api.HealthResult {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(h.Timeout))
	defer cancel()
	res := api.HealthResult{Start: time.Now().UTC()}
	var err error
	switch {
	case len(h.Exec) > 0:
		res.Output, err = a.probeExec(ctx, w.ID, h.Exec)
	case h.HTTP != nil:
		res.Output, err = probeHTTP(ctx, probeHost(w), h.HTTP)
	case h.TCP != nil:
		err = probeTCP(ctx, probeHost(w), h.TCP.Port)
	}
	res.End = time.Now().UTC()
	res.OK = err == nil
	if err != nil {
		res.Output = err.Error()
	}
	if len(res.Output) > maxProbeOutput {
		res.Output = res.Output[:maxProbeOutput]
	}
	return res
}

// probeHost is where http and tcp checks reach the workload: its address
// on the bridge, or the node's loopback for one on the host network.
func probeHost(w *api.Workload) string {
	if w.Network != nil && w.Network.Address != "" {
		return w.Network.Address
	}
	return "127.0.0.1"
}

func (a *Agent) probeExec(ctx context.Context, id string, cmd []string) (string, error) {
	sess, err := a.Exec(ctx, id, api.ExecRequest{Command: cmd})
	if err != nil {
		return "", err
	}
	defer sess.Close()
	var out bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = io.Copy(&limitWriter{w: &out, n: maxProbeOutput}, sess.Stdout())
	}()
	if e := sess.Stderr(); e != nil {
		go func() { _, _ = io.Copy(io.Discard, e) }()
	}
	res, err := sess.Wait(ctx)
	if err != nil {
		return "", fmt.Errorf("health check: %w", err)
	}
	select {
	case <-done:
	case <-time.After(100 * time.Millisecond):
	}
	if res.ExitCode != 0 {
		return out.String(), fmt.Errorf("health check exited %d: %s", res.ExitCode, bytes.TrimSpace(out.Bytes()))
	}
	return out.String(), nil
}

func probeHTTP(ctx context.Context, host string, c *api.HTTPCheck) (string, error) {
	url := "http://" + net.JoinHostPort(host, strconv.Itoa(c.Port)) + c.Path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	client := http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return "", fmt.Errorf("GET %s: %s", c.Path, resp.Status)
	}
	return resp.Status, nil
}

func probeTCP(ctx context.Context, host string, port int) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return err
	}
	return conn.Close()
}

// limitWriter keeps the first n bytes and drops the rest.
type limitWriter struct {
	w io.Writer
	n int
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.n > 0 {
		k := min(len(p), l.n)
		_, _ = l.w.Write(p[:k])
		l.n -= k
	}
	return len(p), nil
}

// setHealth records a run's health (in memory: after an agent restart a
// workload starts over as starting).
func (a *Agent) setHealth(id string, run int, st *api.HealthStatus) {
	a.mu.Lock()
	defer a.mu.Unlock()
	cp := *st
	cp.Log = append([]api.HealthResult(nil), st.Log...)
	a.healths[id] = &runHealth{run: run, st: &cp}
}

func (a *Agent) healthOf(id string) *api.HealthStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	h := a.healths[id]
	if h == nil {
		return nil
	}
	cp := *h.st
	cp.Log = append([]api.HealthResult(nil), h.st.Log...)
	return &cp
}

// runHealth is one run's health.
type runHealth struct {
	run int
	st  *api.HealthStatus
}

// withHealth adds the health of the workload's current run, while it runs.
func (a *Agent) withHealth(w *api.Workload) {
	if w.State != api.StateRunning {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if h := a.healths[w.ID]; h != nil && h.run == w.RestartCount {
		cp := *h.st
		cp.Log = append([]api.HealthResult(nil), h.st.Log...)
		w.Health = &cp
	}
}
