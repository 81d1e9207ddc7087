package daemon_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// An exec health check through each driver's exec path: the workload is
// healthy while /tmp/ok exists, unhealthy once it removes the file, and
// restarted for it (on_unhealthy, restart always), in a container and in
// a VM alike.
func TestHealthCheckFlipsAndRestartsContainerAndVM(t *testing.T) {
	requireLibvirt(t)
	c, _ := serve(t, withVMs(t, testConfig(t, vmDataDir(t), "127.0.0.1:0")))
	importBusybox(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var mu sync.Mutex
	health := map[string][]string{} // workload id -> statuses in order
	go func() {
		_ = c.Events(ctx, client.EventOptions{Types: []string{api.EventWorkloadHealth}}, func() {}, func(e api.Event) error {
			mu.Lock()
			health[e.WorkloadID] = append(health[e.WorkloadID], e.Attrs["status"]+" ("+e.Attrs["output"]+")")
			mu.Unlock()
			return nil
		})
	}()
	var wg sync.WaitGroup
	for _, iso := range []api.Isolation{api.IsolationContainer, api.IsolationVM} {
		wg.Go(func() {
			spec := sh(`touch /tmp/ok; sleep 6; rm /tmp/ok; sleep 1000`)
			spec.Isolation = iso
			// A start period: a VM's exec channel answers only once its
			// guest has booted; failures before the first success do not
			// count while it lasts.
			spec.Health = &api.HealthCheck{Exec: []string{"test", "-e", "/tmp/ok"}, Interval: api.Duration(time.Second), Timeout: api.Duration(5 * time.Second),
				Retries: 2, StartPeriod: api.Duration(time.Minute)}
			spec.Restart = api.RestartSpec{Policy: api.RestartAlways, OnUnhealthy: true}
			w, err := c.Submit(ctx, spec)
			if err != nil {
				t.Errorf("%s: submit: %v", iso, err)
				return
			}
			var index uint64
			for {
				got, idx, err := c.Get(ctx, w.ID, &client.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Second})
				if err != nil {
					t.Errorf("%s: waiting for a restart: %v", iso, err)
					return
				}
				if got.RestartCount >= 1 {
					break
				}
				if got.State.Terminal() {
					t.Errorf("%s: ended: %s %q", iso, got.State, got.Error)
					return
				}
				index = idx
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				mu.Lock()
				seen := append([]string(nil), health[w.ID]...)
				mu.Unlock()
				if len(seen) >= 2 && strings.HasPrefix(seen[0], api.HealthHealthy+" ") && strings.HasPrefix(seen[1], api.HealthUnhealthy+" ") {
					return
				}
				if time.Now().After(deadline) {
					t.Errorf("%s: health events %v, want healthy then unhealthy", iso, seen)
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
	wg.Wait()
}
