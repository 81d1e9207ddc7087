package main

import (
	"bufio"
	"context"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
)

// cleaner removes everything a run created: the agent's workloads (through
// the API), the agent, then whatever is left of containers, monitors,
// domains, mounts and cgroups under the run's scratch directory, and the
// directory itself. It only ever touches things under that directory or
// named after the run.
type cleaner struct {
	dir   string
	runID string
	agent *agentProc
	runc  *rawRunc
	cni   *rawCNI
}

func (c *cleaner) run() {
	log.Printf("cleaning up %s", c.dir)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if a := c.agent; a != nil {
		lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
		ws, _, err := a.c.List(lctx, api.ListFilter{}, nil)
		lcancel()
		if err == nil && len(ws) > 0 {
			ids := make([]string, len(ws))
			for i, w := range ws {
				ids[i] = w.ID
			}
			deleteAll(ctx, a, ids, 16)
		}
		a.stop()
	}
	if c.cni != nil {
		c.cni.cleanup()
	}
	agentDir := filepath.Join(c.dir, "agent")

	// Domains: berth's (task dir under our data dir) and the baselines'.
	if out, err := exec.CommandContext(ctx, "virsh", "-q", "-c", libvirtURI, "list", "--name").Output(); err == nil {
		for _, name := range strings.Fields(string(out)) {
			mine := strings.HasPrefix(name, "berthbench-"+c.runID+"-")
			if id, ok := strings.CutPrefix(name, "berth-"); ok {
				if _, err := os.Stat(filepath.Join(agentDir, "vms", "tasks", id)); err == nil {
					mine = true
				}
			}
			if mine {
				_ = exec.CommandContext(ctx, "virsh", "-c", libvirtURI, "destroy", name).Run()
			}
		}
	}

	// Containers left in berth's runc root, and their monitors.
	stateDir := filepath.Join(runDir(c.dir), "agent")
	runcRoot := filepath.Join(stateDir, "containers", "runc")
	if out, err := exec.CommandContext(ctx, "runc", "--root", runcRoot, "list", "-q").Output(); err == nil {
		for _, id := range strings.Fields(string(out)) {
			_ = exec.CommandContext(ctx, "runc", "--root", runcRoot, "delete", "--force", id).Run()
		}
	}
	for kind, dir := range map[string]string{"containers": stateDir, "vms": agentDir} {
		tasks, _ := filepath.Glob(filepath.Join(dir, kind, "tasks", "*"))
		for _, t := range tasks {
			if pid := jsonPid(filepath.Join(t, "monitor.pid"), "pid"); pid > 0 && cmdlineHas(pid, c.dir) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			if kind == "containers" {
				removeCgroups("/berth/" + filepath.Base(t))
			}
		}
	}
	if c.runc != nil {
		c.runc.cleanup()
	}
	unmountUnder(c.dir)
	if err := os.RemoveAll(c.dir); err != nil {
		log.Printf("cleanup: %v", err)
	}
}

func cmdlineHas(pid int, s string) bool {
	b, err := os.ReadFile("/proc/" + itoa(pid) + "/cmdline")
	return err == nil && strings.Contains(string(b), s)
}

func itoa(i int) string { return strconv.Itoa(i) }

// unmountUnder detaches every mount below dir, deepest first.
func unmountUnder(dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var targets []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 4 && strings.HasPrefix(fs[4], dir+"/") {
			targets = append(targets, fs[4])
		}
	}
	f.Close()
	sort.Sort(sort.Reverse(sort.StringSlice(targets)))
	for _, t := range targets {
		_ = unix.Unmount(t, unix.MNT_DETACH)
	}
}
