package main

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/berthd/berth/api"
)

// volumeScript measures, in the directory $D, a sequential write of 256
// MiB (fsync'd), its read back, and creating 10,000 empty files (synced),
// with busybox's own tools wherever it runs (the host, a container, a
// VM), timed by the kernel's uptime: it prints the four instants. Reads
// come from the host's page cache for every variant (the guest's own
// cache is smaller than the file), so they measure the path to it.
const volumeScript = `set -e
cd "$D"
up() { cut -d' ' -f1 /proc/uptime; }
a=$(up); dd if=/dev/zero of=big bs=1M count=256 conv=fsync 2>/dev/null; b=$(up)
[ "$(wc -c < big)" -eq 268435456 ]
dd if=big of=/dev/null bs=1M 2>/dev/null; c=$(up)
mkdir many; cd many; seq 1 10000 | xargs touch; sync; d=$(up)
cd ..; rm -rf many big
echo "$a $b $c $d"`

// volumeOps are what volumeScript times.
var volumeOps = []string{"sequential write 256 MiB", "sequential read 256 MiB", "create 10,000 files"}

// parseVolumeTimes turns volumeScript's output into the three durations
// in seconds.
func parseVolumeTimes(out string) ([]float64, error) {
	f := strings.Fields(strings.TrimSpace(out))
	if len(f) < 4 {
		return nil, fmt.Errorf("volume script printed %q", out)
	}
	f = f[len(f)-4:]
	var t [4]float64
	for i, s := range f {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return nil, fmt.Errorf("volume script printed %q", out)
		}
		t[i] = v
	}
	return []float64{t[1] - t[0], t[2] - t[1], t[3] - t[2]}, nil
}

// volumeBench runs volumeScript n times on a named volume's directory on
// the host itself (the baseline), through a container's bind mount, and
// through a VM's virtio-fs (or whatever transport the node reports) and
// a VM's 9p (a second agent's), and reports each as a ratio of the host's
// time.
func volumeBench(ctx context.Context, a *agentProc, n int, rep *Report) error {
	if _, err := a.c.CreateVolume(ctx, api.VolumeSpec{Name: "bench"}); err != nil {
		return err
	}
	defer func() { _ = a.c.DeleteVolume(context.WithoutCancel(ctx), "bench") }()
	// 9p needs an agent of its own (vm.volume_transport is the node's).
	nine, err := startAgentWith(ctx, a, "agent-9p", map[string]string{
		"BERTH_VM_VOLUME_TRANSPORT": "9p", "BERTH_NETWORK_ENABLED": "false",
	})
	if err != nil {
		return fmt.Errorf("agent with 9p volumes: %w", err)
	}
	defer stopAgent(nine)
	if _, err := nine.c.CreateVolume(ctx, api.VolumeSpec{Name: "bench"}); err != nil {
		return err
	}
	defer func() { _ = nine.c.DeleteVolume(context.WithoutCancel(ctx), "bench") }()
	dirs, _ := filepath.Glob(filepath.Join(a.dataDir, "volumes", "*", "data"))
	if len(dirs) != 1 {
		return fmt.Errorf("volume directories: %v", dirs)
	}
	transport := "vm"
	if nd, _, err := a.c.Node(ctx, nil); err == nil {
		if d, ok := nd.Drivers[string(api.IsolationVM)]; ok && d.Details["volumes"] != "" {
			transport = d.Details["volumes"]
		}
	}
	variants := []struct {
		name string
		run  func() (string, error)
	}{
		{"host", func() (string, error) {
			cmd := exec.CommandContext(ctx, "/bin/busybox", "sh", "-c", volumeScript)
			cmd.Env = []string{"D=" + dirs[0], "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
			out, err := cmd.CombinedOutput()
			return string(out), err
		}},
		{"container bind mount", func() (string, error) { return volumeWorkload(ctx, a, api.IsolationContainer) }},
		{"VM " + transport, func() (string, error) { return volumeWorkload(ctx, a, api.IsolationVM) }},
		{"VM 9p", func() (string, error) { return volumeWorkload(ctx, nine, api.IsolationVM) }},
	}
	times := make([][][]float64, len(variants)) // variant, op, sample
	for i := range variants {
		times[i] = make([][]float64, len(volumeOps))
	}
	for round := 0; round < n; round++ {
		for i, v := range variants {
			out, err := v.run()
			if err != nil {
				return fmt.Errorf("%s: %w: %s", v.name, err, out)
			}
			ts, err := parseVolumeTimes(out)
			if err != nil {
				return fmt.Errorf("%s: %w", v.name, err)
			}
			for op, t := range ts {
				times[i][op] = append(times[i][op], t*1000)
			}
		}
	}
	for op, opName := range volumeOps {
		host := summarize(times[0][op])
		for i, v := range variants {
			s := summarize(times[i][op])
			res := Result{Section: "Volumes", Name: opName + ": " + v.name, Unit: "ms", Summary: &s}
			if i > 0 {
				res.Baseline = opName + ": host"
				res.Ratio = ratio(s.Median, host.Median)
				res.Note = fmt.Sprintf("%.2f× the host's time", res.Ratio)
			}
			rep.add(res)
		}
	}
	return nil
}

// volumeWorkload runs volumeScript in a workload of the given isolation
// with the bench volume at /v, and returns its output.
func volumeWorkload(ctx context.Context, a *agentProc, iso api.Isolation) (string, error) {
	spec := api.WorkloadSpec{
		Image: benchImage, Command: []string{"sh", "-c", volumeScript},
		Env:       map[string]string{"D": "/v"},
		Network:   api.NetworkNone,
		Isolation: iso,
		Resources: api.Resources{CPU: 1, MemoryMB: 256},
		Labels:    map[string]string{"berth-bench": "1"},
		Volumes:   []api.VolumeMount{{Name: "bench", Path: "/v"}},
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	w, err := a.c.Submit(rctx, spec)
	if err != nil {
		return "", err
	}
	defer func() { _ = a.c.Delete(context.WithoutCancel(ctx), w.ID, true) }()
	fin, err := a.c.WaitExit(rctx, w.ID)
	if err != nil {
		return "", err
	}
	var out, errOut strings.Builder
	err = a.c.Logs(rctx, w.ID, api.LogOptions{Tail: -1}, func(l api.LogLine) error {
		if l.Stream == "stderr" {
			errOut.WriteString(l.Line + "\n")
		} else {
			out.WriteString(l.Line + "\n")
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if fin.ExitCode == nil || *fin.ExitCode != 0 {
		return out.String() + errOut.String(), fmt.Errorf("%s workload ended %s (%q)", iso, fin.State, fin.Error)
	}
	return out.String(), nil
}
