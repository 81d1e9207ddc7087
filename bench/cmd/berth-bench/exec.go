package main

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/berthd/berth/api"
)

// execSection is the report section of the exec round trips.
const execSection = "Exec round trip"

// execRoundTrips measures n exec round trips of `true` into the running
// workload id, interleaved: `berth exec ID -- true` (the CLI: a process,
// a WebSocket session, the exit code) and the API's simple form through
// the Go client (POST .../exec). The same for a container or a VM: a VM
// row is execRoundTrips into a VM workload, then execRows.
func execRoundTrips(ctx context.Context, a *agentProc, berth, id string, n int) (cli, simple Summary, err error) {
	var cs, ss []float64
	for range n {
		c, s, err := execOnce(ctx, a, berth, id)
		if err != nil {
			return cli, simple, err
		}
		cs, ss = append(cs, c), append(ss, s)
	}
	return summarize(cs), summarize(ss), nil
}

// execOnce is one round trip of each kind, in ms.
func execOnce(ctx context.Context, a *agentProc, berth, id string) (cli, simple float64, err error) {
	t := time.Now()
	if out, err := exec.CommandContext(ctx, berth, "--addr", a.addr, "exec", id, "--", "true").CombinedOutput(); err != nil {
		return 0, 0, fmt.Errorf("berth exec %s -- true: %v: %s", id, err, out)
	}
	cli = ms(time.Since(t))
	t = time.Now()
	res, err := a.c.Exec(ctx, id, api.ExecRequest{Command: []string{"true"}})
	if err != nil {
		return 0, 0, fmt.Errorf("exec %s true: %w", id, err)
	}
	if res.ExitCode != 0 {
		return 0, 0, fmt.Errorf("exec %s true: exit %d: %s", id, res.ExitCode, res.Stderr)
	}
	return cli, ms(time.Since(t)), nil
}

// execRows adds the rows of one isolation's round trips, compared with
// baseline (a row name of the same run; empty for none).
func execRows(rep *Report, isolation string, cli, simple Summary, baseline string, base Summary) {
	r := Result{Section: execSection, Name: "berth exec ID -- true (CLI, WebSocket session), " + isolation, Unit: "ms", Summary: &cli}
	s := Result{Section: execSection, Name: "POST /v1/workloads/{id}/exec true (Go client, simple form), " + isolation, Unit: "ms", Summary: &simple}
	if baseline != "" {
		r.Baseline, r.Ratio = baseline, ratio(cli.Median, base.Median)
		s.Baseline, s.Ratio = baseline, ratio(simple.Median, base.Median)
	}
	rep.add(r)
	rep.add(s)
}

// execBench measures exec into a container against `runc exec` of the
// same container (the agent's own runc state), interleaved, in the same
// run.
func execBench(ctx context.Context, a *agentProc, berth string, n int, rep *Report) (Summary, error) {
	// Network none: runc 1.1 cannot exec into a container in a user
	// namespace that joined a network namespace the host made (bridge),
	// so the baseline could not run there; berth's shim can (ctrdriver).
	spec := containerSpec(idleCommand...)
	spec.Network = "none"
	w, err := a.c.Submit(ctx, spec)
	if err != nil {
		return Summary{}, err
	}
	defer a.c.Delete(context.WithoutCancel(ctx), w.ID, true)
	if err := waitRunning(ctx, a, []string{w.ID}, time.Minute); err != nil {
		return Summary{}, err
	}
	runcRoot := filepath.Join(a.stateDir, "containers", "runc")
	var rs, cs, ss []float64
	for range n {
		t := time.Now()
		if out, err := exec.CommandContext(ctx, "runc", "--root", runcRoot, "exec", w.ID, "true").CombinedOutput(); err != nil {
			return Summary{}, fmt.Errorf("runc exec %s true: %v: %s", w.ID, err, out)
		}
		rs = append(rs, ms(time.Since(t)))
		c, s, err := execOnce(ctx, a, berth, w.ID)
		if err != nil {
			return Summary{}, err
		}
		cs, ss = append(cs, c), append(ss, s)
	}
	cli, simple := summarize(cs), summarize(ss)
	base := summarize(rs)
	baseName := execBaselineName
	rep.add(Result{Section: execSection, Name: baseName, Unit: "ms", Summary: &base,
		Note: "runc run directly against the agent's runc state, the container's own process spec"})
	execRows(rep, "container", cli, simple, baseName, base)
	return base, nil
}

// execBaselineName is the row execBench measures `runc exec` under.
const execBaselineName = "baseline: runc exec ID true (same container)"

// execVMBench measures exec into a VM (booted under the run's
// accelerator) the same way, compared with the container's `runc exec`
// of the same run (base; zero when that phase did not run). The first,
// unmeasured exec waits for the guest to boot.
func execVMBench(ctx context.Context, a *agentProc, berth string, n int, base Summary, rep *Report) error {
	w, err := a.c.Submit(ctx, vmSpec(idleCommand...))
	if err != nil {
		return err
	}
	defer a.c.Delete(context.WithoutCancel(ctx), w.ID, true)
	if err := waitRunning(ctx, a, []string{w.ID}, 3*time.Minute); err != nil {
		return err
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		res, err := a.c.Exec(ctx, w.ID, api.ExecRequest{Command: []string{"true"}})
		if err == nil && res.ExitCode == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("exec into the VM never succeeded: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	cli, simple, err := execRoundTrips(ctx, a, berth, w.ID, n)
	if err != nil {
		return err
	}
	baseName := ""
	if base.N > 0 {
		baseName = execBaselineName
	}
	execRows(rep, "VM", cli, simple, baseName, base)
	return nil
}
