// Package e2e runs berth's Nomad task driver on a real Nomad cluster on
// loopback: one server and two clients, each client with its own berth
// agent whose policy sends everything to VMs on one node and to
// containers on the other.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	nomad "github.com/hashicorp/nomad/api"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

const (
	vmNode  = "berth-vm"
	ctrNode = "berth-ctr"
)

// TestNomadCluster is one test on purpose: starting the cluster (and
// booting VMs under TCG) is the expensive part, so every check shares it.
func TestNomadCluster(t *testing.T) {
	env := requireEnv(t)
	cl := startCluster(t, env)

	t.Run("fingerprint", func(t *testing.T) { testFingerprint(t, cl) })
	t.Run("batch job runs one allocation per isolation", func(t *testing.T) { testBatchJob(t, cl) })
	t.Run("a template reaches the task in both isolations", func(t *testing.T) { testAllocDirs(t, cl) })
	t.Run("client restart re-attaches and job stop stops workloads", func(t *testing.T) { testRecoverAndStop(t, cl) })
	t.Run("a job's health block is berth's check and its changes are task events", func(t *testing.T) { testHealth(t, cl) })
	t.Run("unreachable agent makes the driver unhealthy", func(t *testing.T) { testUnhealthy(t, cl) })
}

func testFingerprint(t *testing.T, cl *cluster) {
	for _, n := range cl.nodes {
		info := cl.nodeInfo(t, n)
		d := info.Drivers["berth"]
		if d == nil || !d.Healthy {
			t.Fatalf("%s: berth driver not healthy: %+v", n.name, d)
		}
		bn, _, err := n.berth.agent.Node(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		wantVM := fmt.Sprint(bn.Drivers["vm"].Healthy)
		if got := info.Attributes["driver.berth.vm"]; got != wantVM {
			t.Errorf("%s: driver.berth.vm = %q, berth says vm healthy = %s", n.name, got, wantVM)
		}
		if got := info.Attributes["driver.berth.policy_version"]; got != bn.Policy.Version {
			t.Errorf("%s: driver.berth.policy_version = %q, berth says %q", n.name, got, bn.Policy.Version)
		}
		if wantVM == "true" && info.Attributes["driver.berth.accel"] != "tcg" {
			t.Errorf("%s: driver.berth.accel = %q, want tcg", n.name, info.Attributes["driver.berth.accel"])
		}
	}
}

const batchJob = `
job "berth-hello" {
  type        = "batch"
  datacenters = ["*"]
  group "g" {
    count = 2
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    task "hello" {
      driver = "berth"
      config {
        image   = "berth.test/busybox:latest"
        command = "sh"
        args    = ["-c", "echo hello from berth alloc $NOMAD_ALLOC_INDEX; echo a line on stderr >&2"]
        network = "none"
      }
      resources {
        cpu    = 100
        memory = 96
      }
    }
  }
}
`

func testBatchJob(t *testing.T, cl *cluster) {
	// berth deletes a task's workload when Nomad destroys the task, right
	// after a batch task ends; its placement is read from the events.
	placed := map[string]*placements{}
	for _, n := range cl.nodes {
		placed[n.name] = watchPlacements(t, n.berth.agent)
	}
	cl.runJob(t, batchJob)
	allocs := cl.waitAllocs(t, "berth-hello", 2, func(a *nomad.AllocationListStub) bool { return a.ClientStatus == "complete" }, 5*time.Minute)

	seen := map[string]bool{}
	for _, a := range allocs {
		if seen[a.NodeName] {
			t.Errorf("two allocations on %s despite distinct_hosts", a.NodeName)
		}
		seen[a.NodeName] = true
		stdout := cl.nomadCLI(t, "alloc", "logs", a.ID, "hello")
		stderr := cl.nomadCLI(t, "alloc", "logs", "-stderr", a.ID, "hello")
		if !strings.Contains(stdout, "hello from berth alloc") || !strings.Contains(stderr, "a line on stderr") {
			t.Errorf("%s on %s: nomad alloc logs: stdout %q, stderr %q", a.ID, a.NodeName, stdout, stderr)
		}
		want := api.IsolationContainer
		if a.NodeName == vmNode {
			want = api.IsolationVM
		}
		if got := placed[a.NodeName].isolationOf(t, a.ID); got != want {
			t.Errorf("allocation %s on %s ran as %q according to berth, want %q", a.ID, a.NodeName, got, want)
		}
	}
	if !seen[vmNode] || !seen[ctrNode] {
		t.Errorf("allocations on %v, want one on each of %s and %s", seen, vmNode, ctrNode)
	}
	for _, n := range cl.nodes {
		n.requireNoWorkloads(t, "berth-hello")
	}
}

const templateJob = `
job "berth-template" {
  type        = "batch"
  datacenters = ["*"]
  group "g" {
    count = 2
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    task "read" {
      driver = "berth"
      template {
        data        = "answer {{ env \"NOMAD_ALLOC_INDEX\" }}-21"
        destination = "local/answer.txt"
      }
      config {
        image   = "berth.test/busybox:latest"
        command = "sh"
        args    = ["-c", "echo template says $(cat $NOMAD_TASK_DIR/answer.txt); test -d /alloc/logs && test -d /secrets && echo alloc dirs mounted"]
        network = "none"
      }
      resources {
        cpu    = 100
        memory = 96
      }
    }
  }
}
`

// testAllocDirs: Nomad renders a template into the task's local/ dir; the
// task reads it at $NOMAD_TASK_DIR (/local) as a container and as a VM,
// and finds alloc/ and secrets/ mounted too.
func testAllocDirs(t *testing.T, cl *cluster) {
	cl.runJob(t, templateJob)
	allocs := cl.waitAllocs(t, "berth-template", 2, func(a *nomad.AllocationListStub) bool { return a.ClientStatus == "complete" }, 5*time.Minute)
	seen := map[string]bool{}
	for _, a := range allocs {
		seen[a.NodeName] = true
		stdout := cl.nomadCLI(t, "alloc", "logs", a.ID, "read")
		if !strings.Contains(stdout, "template says answer ") || !strings.Contains(stdout, "-21") || !strings.Contains(stdout, "alloc dirs mounted") {
			t.Errorf("%s on %s: nomad alloc logs %q, want the template's content and the alloc dirs", a.ID, a.NodeName, stdout)
		}
	}
	if !seen[vmNode] || !seen[ctrNode] {
		t.Errorf("allocations on %v, want one on each of %s and %s", seen, vmNode, ctrNode)
	}
	for _, n := range cl.nodes {
		n.requireNoWorkloads(t, "berth-template")
	}
}

const sleepJob = `
job "berth-sleep" {
  type        = "service"
  datacenters = ["*"]
  group "g" {
    count = 2
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }
    task "tick" {
      driver       = "berth"
      kill_timeout = "3s"
      config {
        image   = "berth.test/busybox:latest"
        command = "sh"
        args    = ["-c", "trap 'echo got-usr1' USR1; i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]
        network = "none"
      }
      resources {
        cpu    = 100
        memory = 96
      }
    }
  }
}
`

func testRecoverAndStop(t *testing.T, cl *cluster) {
	// A failure below leaves the job running: purge it, so that the next
	// checks and the cleanup start from no workloads.
	t.Cleanup(func() {
		if t.Failed() {
			cl.api.Jobs().Deregister("berth-sleep", true, nil)
			for _, n := range cl.nodes {
				waitForE(2*time.Minute, func() bool {
					list, _, err := n.berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.job": "berth-sleep"}}, nil)
					return err == nil && len(list) == 0
				})
			}
		}
	})
	cl.runJob(t, sleepJob)
	allocs := cl.waitAllocs(t, "berth-sleep", 2, func(a *nomad.AllocationListStub) bool {
		return a.ClientStatus == "running"
	}, 5*time.Minute)
	workloads := map[string]api.Workload{}
	for _, a := range allocs {
		n := cl.node(a.NodeName)
		w := n.waitRunningWorkload(t, a.ID)
		workloads[a.ID] = w
		waitFor(t, 3*time.Minute, "tick lines in nomad alloc logs of "+a.NodeName, func() bool {
			return strings.Contains(cl.allocLogs(a.ID, "tick"), "tick 1")
		})
	}

	// nomad alloc exec and nomad alloc signal reach the workload, in a VM
	// and in a container alike.
	for _, a := range allocs {
		out, code, err := cl.nomadExitCode("alloc", "exec", "-i=false", "-t=false", "-task", "tick", a.ID, "sh", "-c", "echo exec-$((1+2)) in $(cat /proc/1/comm); exit 3")
		if err != nil || code != 3 || !strings.Contains(out, "exec-3 in") {
			t.Errorf("nomad alloc exec on %s: exit %d, %q, %v; want exit 3 and the command's output", a.NodeName, code, out, err)
		}
		cl.nomadCLI(t, "alloc", "signal", "-s", "SIGUSR1", "-task", "tick", a.ID)
		waitFor(t, 2*time.Minute, "the trap's output after nomad alloc signal on "+a.NodeName, func() bool {
			return strings.Contains(cl.allocLogs(a.ID, "tick"), "got-usr1")
		})
	}

	// Restart the container node's Nomad client: the task keeps running
	// in berth and the new client re-attaches to it.
	var ctrAlloc *nomad.AllocationListStub
	for _, a := range allocs {
		if a.NodeName == ctrNode {
			ctrAlloc = a
		}
	}
	if ctrAlloc == nil {
		t.Fatal("no allocation on the container node")
	}
	n := cl.node(ctrNode)
	before := tickCount(cl.nomadCLI(t, "alloc", "logs", ctrAlloc.ID, "tick"))
	n.nomad.stop(t)
	n.nomad.start(t)
	cl.waitNodeReady(t, n)
	waitFor(t, 3*time.Minute, "new output after the client restart", func() bool {
		return tickCount(cl.allocLogs(ctrAlloc.ID, "tick")) > before+2
	})
	alloc, _, err := cl.api.Allocations().Info(ctrAlloc.ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	ts := alloc.TaskStates["tick"]
	if alloc.ClientStatus != "running" || ts == nil || ts.Restarts != 0 {
		t.Fatalf("after the client restart the allocation is %s with task state %+v; want running, no restarts", alloc.ClientStatus, ts)
	}
	list, _, err := n.berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.job": "berth-sleep"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].ID != workloads[ctrAlloc.ID].ID || list[0].State != api.StateRunning {
		t.Fatalf("after the client restart berth has %+v; want only the original workload %s, running", list, workloads[ctrAlloc.ID].ID)
	}

	// Stopping the job stops (and removes) the workloads on both nodes.
	if _, _, err := cl.api.Jobs().Deregister("berth-sleep", false, nil); err != nil {
		t.Fatal(err)
	}
	cl.waitAllocs(t, "berth-sleep", 2, func(a *nomad.AllocationListStub) bool {
		return a.ClientStatus == "complete"
	}, 3*time.Minute)
	for _, n := range cl.nodes {
		waitFor(t, 2*time.Minute, "no berth-sleep workloads on "+n.name, func() bool {
			list, _, err := n.berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.job": "berth-sleep"}}, nil)
			return err == nil && len(list) == 0
		})
	}
}

func tickCount(logs string) int { return strings.Count(logs, "tick ") }

func testUnhealthy(t *testing.T, cl *cluster) {
	n := cl.node(ctrNode)
	n.berth.stop(t)
	waitFor(t, 2*time.Minute, "the berth driver unhealthy on "+n.name, func() bool {
		d := cl.nodeInfo(t, n).Drivers["berth"]
		return d != nil && !d.Healthy && strings.Contains(d.HealthDescription, "unreachable")
	})
	n.berth.start(t)
	waitFor(t, 2*time.Minute, "the berth driver healthy again on "+n.name, func() bool {
		d := cl.nodeInfo(t, n).Drivers["berth"]
		return d != nil && d.Healthy
	})
}

// placements records berth's placement events of workloads made for
// Nomad: the created event names the workload (after its allocation), the
// placed event says its isolation.
type placements struct {
	names     chan [2]string // workload id, name
	isolation chan [2]string // workload id, isolation
}

func watchPlacements(t *testing.T, c *client.Client) *placements {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	p := &placements{names: make(chan [2]string, 64), isolation: make(chan [2]string, 64)}
	// Since 1: every event the agent still holds, so that none of the
	// job's can come before the subscription.
	go c.Events(ctx, client.EventOptions{Since: 1, Types: []string{api.EventWorkloadCreated, api.EventWorkloadPlaced}}, nil, func(e api.Event) error {
		switch e.Type {
		case api.EventWorkloadCreated:
			p.names <- [2]string{e.WorkloadID, e.Attrs["name"]}
		case api.EventWorkloadPlaced:
			p.isolation <- [2]string{e.WorkloadID, e.Attrs["isolation"]}
		}
		return nil
	})
	return p
}

func (p *placements) isolationOf(t *testing.T, allocID string) api.Isolation {
	names, isos := map[string]string{}, map[string]string{}
	timeout := time.After(time.Minute)
	for {
		for id, name := range names {
			if strings.Contains(name, allocID) && isos[id] != "" {
				return api.Isolation(isos[id])
			}
		}
		select {
		case e := <-p.names:
			names[e[0]] = e[1]
		case e := <-p.isolation:
			isos[e[0]] = e[1]
		case <-timeout:
			t.Errorf("no berth placement event for allocation %s (events: names %v, isolations %v)", allocID, names, isos)
			return ""
		}
	}
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	if !waitForE(d, ok) {
		t.Fatalf("timed out after %s waiting for %s", d, what)
	}
}

// waitForE polls ok until it holds (true) or d has passed (false).
func waitForE(d time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(500 * time.Millisecond)
	}
	return true
}

func (cl *cluster) runJob(t *testing.T, hcl string) {
	t.Helper()
	f := filepath.Join(cl.root, fmt.Sprintf("job-%d.nomad.hcl", time.Now().UnixNano()))
	if err := os.WriteFile(f, []byte(hcl), 0o644); err != nil {
		t.Fatal(err)
	}
	cl.nomadCLI(t, "job", "run", "-detach", f)
}

func (cl *cluster) nomadCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, err := cl.nomadCLITry(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// nomadCLITry runs the nomad CLI against the server, for at most two
// minutes. Reading logs fails while the allocation's client is not
// connected, so polls use this one.
func (cl *cluster) nomadCLITry(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cl.env.nomadBin, args...)
	cmd.Env = append(cleanEnv(), "NOMAD_ADDR=http://"+cl.serverHTTP)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nomad %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// nomadExitCode runs the nomad CLI and returns its stdout and exit code
// (an error only when it could not run).
func (cl *cluster) nomadExitCode(args ...string) (string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cl.env.nomadBin, args...)
	cmd.Env = append(cleanEnv(), "NOMAD_ADDR=http://"+cl.serverHTTP)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return stdout.String(), ee.ExitCode(), nil
	}
	if err != nil {
		return "", -1, fmt.Errorf("nomad %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), 0, nil
}

// allocLogs is the task's stdout in nomad alloc logs, "" while it cannot
// be read.
func (cl *cluster) allocLogs(allocID, task string) string {
	out, _ := cl.nomadCLITry("alloc", "logs", allocID, task)
	return out
}

func (cl *cluster) waitAllocs(t *testing.T, job string, count int, ok func(*nomad.AllocationListStub) bool, d time.Duration) []*nomad.AllocationListStub {
	t.Helper()
	var last []*nomad.AllocationListStub
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		allocs, _, err := cl.api.Jobs().Allocations(job, false, nil)
		if err == nil {
			last = allocs
			done := 0
			for _, a := range allocs {
				if a.ClientStatus == "failed" || a.ClientStatus == "lost" {
					al, _, _ := cl.api.Allocations().Info(a.ID, nil)
					t.Fatalf("allocation %s on %s is %s: %s", a.ID, a.NodeName, a.ClientStatus, describeTasks(al))
				}
				if ok(a) {
					done++
				}
			}
			if done == count && len(allocs) == count {
				return allocs
			}
		}
		time.Sleep(time.Second)
	}
	var b strings.Builder
	for _, a := range last {
		al, _, _ := cl.api.Allocations().Info(a.ID, nil)
		fmt.Fprintf(&b, "\n  %s on %s: %s %s", a.ID, a.NodeName, a.ClientStatus, describeTasks(al))
	}
	t.Fatalf("job %s: allocations not there after %s:%s", job, d, b.String())
	return nil
}

func describeTasks(a *nomad.Allocation) string {
	if a == nil {
		return ""
	}
	var b strings.Builder
	for name, ts := range a.TaskStates {
		fmt.Fprintf(&b, "[task %s %s:", name, ts.State)
		for _, e := range ts.Events {
			fmt.Fprintf(&b, " %s %q %q;", e.Type, e.DisplayMessage, e.DriverError)
		}
		b.WriteString("]")
	}
	return b.String()
}
