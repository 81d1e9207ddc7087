package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	nomad "github.com/hashicorp/nomad/api"

	"github.com/berthd/berth/api"
)

// healthJob's task is healthy while /tmp/ok exists: it creates it, then
// removes it a few seconds later. It runs as a container (the container
// node): the check is the same in a VM, and the VM path is berth's own
// tests' business.
const healthJob = `
job "berth-health" {
  type        = "service"
  datacenters = ["*"]
  group "g" {
    constraint {
      attribute = "${node.unique.name}"
      value     = "berth-ctr"
    }
    task "web" {
      driver       = "berth"
      kill_timeout = "2s"
      config {
        image   = "berth.test/busybox:latest"
        command = "sh"
        args    = ["-c", "touch /tmp/ok; sleep 6; rm /tmp/ok; sleep 1000"]
        network = "none"
        health {
          exec     = ["test", "-f", "/tmp/ok"]
          interval = "1s"
          timeout  = "2s"
          retries  = 1
        }
      }
      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
`

// testHealth: a job's health block reaches berth as the workload's health
// check with on_unhealthy off (Nomad's check_restart decides restarts),
// and the check's changes reach Nomad as task events, healthy then
// unhealthy, without berth restarting the task.
func testHealth(t *testing.T, cl *cluster) {
	t.Cleanup(func() {
		cl.api.Jobs().Deregister("berth-health", true, nil)
		n := cl.node(ctrNode)
		waitForE(2*time.Minute, func() bool {
			list, _, err := n.berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.job": "berth-health"}}, nil)
			return err == nil && len(list) == 0
		})
	})
	cl.runJob(t, healthJob)
	allocs := cl.waitAllocs(t, "berth-health", 1, func(a *nomad.AllocationListStub) bool { return a.ClientStatus == "running" }, 5*time.Minute)
	w := cl.node(ctrNode).waitRunningWorkload(t, allocs[0].ID)
	if h := w.Spec.Health; h == nil || strings.Join(h.Exec, " ") != "test -f /tmp/ok" || h.Retries != 1 || time.Duration(h.Interval) != time.Second {
		t.Errorf("the workload's health check is %+v, want the job's", h)
	}
	if w.Spec.Restart.OnUnhealthy {
		t.Error("the workload restarts itself when unhealthy: Nomad's check_restart must be the only restarter")
	}
	events := func() string {
		a, _, err := cl.api.Allocations().Info(allocs[0].ID, nil)
		if err != nil || a.TaskStates["web"] == nil {
			return ""
		}
		var b strings.Builder
		for _, e := range a.TaskStates["web"].Events {
			b.WriteString(e.DisplayMessage + "\n")
		}
		return b.String()
	}
	waitFor(t, 2*time.Minute, "healthy, then unhealthy, in the task's events", func() bool {
		ev := events()
		i := strings.Index(ev, "berth: health check: healthy")
		return i >= 0 && strings.Contains(ev[i:], "berth: health check: unhealthy")
	})
	a, _, err := cl.api.Allocations().Info(allocs[0].ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ts := a.TaskStates["web"]; a.ClientStatus != "running" || ts == nil || ts.Restarts != 0 {
		t.Errorf("an unhealthy task without check_restart: %s, %+v; want running, not restarted", a.ClientStatus, ts)
	}
	list, _, err := cl.node(ctrNode).berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.job": "berth-health"}}, nil)
	if err != nil || len(list) != 1 || list[0].ID != w.ID || list[0].RestartCount != 0 || list[0].Health == nil || list[0].Health.Status != api.HealthUnhealthy {
		t.Errorf("berth has %+v (%v); want the one workload, unhealthy, never restarted", list, err)
	}
}
