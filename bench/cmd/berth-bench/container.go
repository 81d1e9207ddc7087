package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/ctrdriver"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/supervisor/monitor"
)

// containerSpec is a bench container workload: 1 core (so CFS throttling
// never slows runc init), 32 MiB.
func containerSpec(command ...string) api.WorkloadSpec {
	return api.WorkloadSpec{
		Image:     benchImage,
		Command:   command,
		Isolation: api.IsolationContainer,
		Resources: api.Resources{CPU: 1, MemoryMB: 32},
		Labels:    map[string]string{"berth-bench": "1"},
	}
}

// idleCommand runs until SIGTERM, which it honours at once (a bare sleep
// as PID 1 ignores it and would make every stop wait for the grace period).
var idleCommand = []string{"sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"}

// captured is what the harness learns from a berth container to build
// the baseline bundle: berth's own runtime spec and the image's unpacked
// root filesystem. userns says berth ran it in a user namespace, which
// the baseline does without (berth's id-mapped root filesystem is its own).
type captured struct {
	spec   *specs.Spec
	rootfs string
	userns bool
	// entry is how berth started the container's process (berth-entry
	// with the filter it compiled once), nil when runc installed the
	// profile; spec has the profile for runc either way.
	entry *monitor.Entry
}

// captureBundle reads the runtime spec berth wrote for workload id and the
// lower directory of its overlay root (the image's unpacked rootfs; with
// user namespaces, the image's tree in the store: the id-mapped lower is
// gone once the overlay is mounted). Files berth bind-mounts from the
// task's directory (resolv.conf, hosts) are copied into keep, since the
// task's directory goes with the workload.
func captureBundle(dataDir, stateDir, id, imageDigest, keep string) (*captured, error) {
	taskDir := filepath.Join(stateDir, "containers", "tasks", id)
	bundle := filepath.Join(taskDir, "bundle")
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read berth's bundle: %w", err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, err
	}
	// The baselines are runc alone: it compiles and installs the
	// profile, as it would for berth's bundle without berth-entry.
	entry := ctrdriver.EntryOf(&s)
	ctrdriver.WithoutEntry(&s)
	root := s.Root.Path
	if !filepath.IsAbs(root) {
		root = filepath.Join(bundle, root)
	}
	lower, err := overlayLower(root)
	if err != nil {
		return nil, err
	}
	userns := withoutUserNS(&s)
	if _, err := os.Stat(lower); err != nil && userns {
		_, hex, _ := strings.Cut(imageDigest, ":")
		lower = filepath.Join(dataDir, "images", "rootfs", hex)
		if _, err := os.Stat(lower); err != nil {
			return nil, fmt.Errorf("find the image's tree of %s: %w", imageDigest, err)
		}
	}
	if err := os.MkdirAll(keep, 0o700); err != nil {
		return nil, err
	}
	for i, m := range s.Mounts {
		if !strings.HasPrefix(m.Source, taskDir+"/") {
			continue
		}
		b, err := os.ReadFile(m.Source)
		if err != nil {
			return nil, fmt.Errorf("copy %s of berth's bundle: %w", m.Source, err)
		}
		dst := filepath.Join(keep, fmt.Sprintf("%d-%s", i, filepath.Base(m.Source)))
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			return nil, err
		}
		s.Mounts[i].Source = dst
	}
	return &captured{spec: &s, rootfs: lower, entry: entry}, nil
}

// withoutUserNS turns a spec of a container in a user namespace into the
// same container without one, for the baselines, and reports whether it
// was in one: no user namespace nor id mappings, and its own sysfs
// instead of the one berth mounted for it (a network namespace of the
// host's user namespace).
func withoutUserNS(s *specs.Spec) bool {
	if s.Linux == nil {
		return false
	}
	var nss []specs.LinuxNamespace
	userns := false
	for _, ns := range s.Linux.Namespaces {
		if ns.Type == specs.UserNamespace {
			userns = true
			continue
		}
		nss = append(nss, ns)
	}
	if !userns {
		return false
	}
	s.Linux.Namespaces, s.Linux.UIDMappings, s.Linux.GIDMappings = nss, nil, nil
	for i, m := range s.Mounts {
		if m.Destination == "/sys" {
			s.Mounts[i] = specs.Mount{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}}
		}
	}
	return true
}

// overlayLower finds the lowerdir of the overlay mounted at target.
func overlayLower(target string) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[4] != target {
			continue
		}
		for _, o := range strings.Split(fields[len(fields)-1], ",") {
			if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
				return strings.Split(v, ":")[0], nil
			}
		}
	}
	return "", fmt.Errorf("no overlay mounted at %s", target)
}

// rawRunc runs baseline containers straight through runc, with their own
// runc state root and cgroup parent.
type rawRunc struct {
	root    string // runc --root
	dir     string // bundles
	cgroup  string // cgroup parent, e.g. /berthbench-<run>
	cap     *captured
	plain   *specs.Spec // `runc spec`'s default, made once
	counter atomic.Int64
}

// bundle writes a bundle for one container: berth's spec with the given
// args, the image's rootfs read-only (the same files berth's overlay shows),
// its own cgroup.
func (r *rawRunc) bundle(args []string) (id, dir string, err error) {
	n := r.counter.Add(1)
	id = fmt.Sprintf("bb%d", n)
	dir = filepath.Join(r.dir, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", err
	}
	s := *r.cap.spec
	p := *s.Process
	p.Args = args
	s.Process = &p
	s.Root = &specs.Root{Path: r.cap.rootfs, Readonly: true}
	s.Hostname = id
	l := *s.Linux
	l.CgroupsPath = r.cgroup + "/" + id
	// berth joins the container to a network namespace it set up through
	// CNI; the baseline gets a fresh, empty one (runc's default), so the
	// network set-up is counted in berth's overhead.
	l.Namespaces = nil
	for _, ns := range s.Linux.Namespaces {
		ns.Path = ""
		l.Namespaces = append(l.Namespaces, ns)
	}
	s.Linux = &l
	s.Hooks = nil
	b, err := json.Marshal(&s)
	if err != nil {
		return "", "", err
	}
	return id, dir, os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600)
}

func (r *rawRunc) cmd(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "runc", append([]string{"--root", r.root}, args...)...)
	// A container started by runc holds runc's stdio; never wait on it
	// for ever once runc itself is gone.
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// run times `runc run` of /bin/true: create, start, wait, delete in one.
func (r *rawRunc) run(ctx context.Context) (time.Duration, error) {
	id, dir, err := r.bundle([]string{"/bin/true"})
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	cmd := r.cmd(ctx, "run", "--bundle", dir, id)
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("runc run: %v: %s", err, out)
	}
	return d, nil
}

// runEntry times `runc run` of /bin/true in the same bundle as run's, but
// started as berth starts it: through berth-entry, which installs the
// filter berth compiled once instead of runc compiling the profile.
func (r *rawRunc) runEntry(ctx context.Context) (time.Duration, error) {
	e := r.cap.entry
	if e == nil {
		return 0, errors.New("berth started its container without berth-entry")
	}
	id, dir, err := r.bundle(monitor.EntryArgs([]string{"/bin/true"}))
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	var s specs.Spec
	if err := fileutil.ReadJSON(filepath.Join(dir, "config.json"), &s); err != nil {
		return 0, err
	}
	s.Linux.Seccomp = nil
	if err := fileutil.ReplaceJSON(filepath.Join(dir, "config.json"), &s); err != nil {
		return 0, err
	}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, p := range []string{e.Program, e.Filter} {
		f, err := os.Open(p)
		if err != nil {
			return 0, err
		}
		files = append(files, f)
	}
	report, w, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer report.Close()
	files = append(files, w)
	cmd := r.cmd(ctx, "run", "--preserve-fds", fmt.Sprint(monitor.EntryFDs), "--bundle", dir, id)
	cmd.ExtraFiles = files
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("runc run (through berth-entry): %v: %s", err, out)
	}
	w.Close()
	if msg, _ := io.ReadAll(report); len(msg) > 0 {
		return 0, fmt.Errorf("berth-entry: %s", msg)
	}
	return d, nil
}

// runPlain times `runc run` of /bin/true in a plain `runc spec` bundle of
// the same root filesystem: runc's defaults, without berth's hardening.
func (r *rawRunc) runPlain(ctx context.Context) (time.Duration, error) {
	if r.plain == nil {
		dir, err := os.MkdirTemp(r.dir, "plain-spec-")
		if err != nil {
			return 0, err
		}
		defer os.RemoveAll(dir)
		if out, err := exec.CommandContext(ctx, "runc", "spec", "--bundle", dir).CombinedOutput(); err != nil {
			return 0, fmt.Errorf("runc spec: %v: %s", err, out)
		}
		var s specs.Spec
		b, err := os.ReadFile(filepath.Join(dir, "config.json"))
		if err != nil {
			return 0, err
		}
		if err := json.Unmarshal(b, &s); err != nil {
			return 0, err
		}
		s.Process.Terminal = false
		r.plain = &s
	}
	n := r.counter.Add(1)
	id := fmt.Sprintf("bp%d", n)
	dir := filepath.Join(r.dir, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	s := *r.plain
	p := *s.Process
	p.Args = []string{"/bin/true"}
	s.Process = &p
	s.Root = &specs.Root{Path: r.cap.rootfs, Readonly: true}
	l := *s.Linux
	l.CgroupsPath = r.cgroup + "/" + id
	s.Linux = &l
	b, err := json.Marshal(&s)
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		return 0, err
	}
	cmd := r.cmd(ctx, "run", "--bundle", dir, id)
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(t0)
	if err != nil {
		return 0, fmt.Errorf("runc run (plain bundle): %v: %s", err, out)
	}
	return d, nil
}

// createStartDelete times `runc create` + `runc start` (to running) and
// then until the container has exited and `runc delete` returned.
func (r *rawRunc) createStartDelete(ctx context.Context) (running, total time.Duration, err error) {
	id, dir, err := r.bundle([]string{"/bin/true"})
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(dir)
	pidFile := filepath.Join(dir, "pid")
	// The container inherits create's stdio: /dev/null, not a pipe the
	// harness would wait on until the container ends. Errors go to --log.
	logPath := filepath.Join(dir, "runc.log")
	create := r.cmd(ctx, "--log", logPath, "create", "--bundle", dir, "--pid-file", pidFile, id)
	t0 := time.Now()
	if err := create.Run(); err != nil {
		return 0, 0, fmt.Errorf("runc create: %v: %s", err, tailFile(logPath, 1000))
	}
	var pid int
	if b, err := os.ReadFile(pidFile); err == nil {
		fmt.Sscan(string(b), &pid)
	}
	pidfd := -1
	if pid > 0 {
		pidfd, _ = unix.PidfdOpen(pid, 0)
	}
	if out, err := r.cmd(ctx, "start", id).CombinedOutput(); err != nil {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
		_ = r.cmd(context.Background(), "delete", "--force", id).Run()
		return 0, 0, fmt.Errorf("runc start: %v: %s", err, out)
	}
	running = time.Since(t0)
	if pidfd >= 0 {
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			_, perr := unix.Poll(fds, 10000)
			if !errors.Is(perr, unix.EINTR) {
				break
			}
		}
		unix.Close(pidfd)
		// The harness is a child subreaper: the orphaned container
		// process is ours to reap.
		var ws unix.WaitStatus
		_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
	if out, err := r.cmd(ctx, "delete", id).CombinedOutput(); err != nil {
		return 0, 0, fmt.Errorf("runc delete: %v: %s", err, out)
	}
	return running, time.Since(t0), nil
}

// cleanup removes whatever baseline containers are left, and their cgroups.
func (r *rawRunc) cleanup() {
	out, _ := exec.Command("runc", "--root", r.root, "list", "-q").Output()
	for _, id := range strings.Fields(string(out)) {
		_ = exec.Command("runc", "--root", r.root, "delete", "--force", id).Run()
	}
	removeCgroups(r.cgroup)
	os.RemoveAll(r.root)
	os.RemoveAll(r.dir)
}

// removeCgroups removes the cgroup parent from every v1 hierarchy (and
// the unified one), children first.
func removeCgroups(parent string) {
	if parent == "" || parent == "/" {
		return
	}
	mounts, _ := filepath.Glob("/sys/fs/cgroup/*")
	mounts = append(mounts, "/sys/fs/cgroup")
	for _, m := range mounts {
		dir := filepath.Join(m, parent)
		subs, _ := filepath.Glob(filepath.Join(dir, "*"))
		for _, s := range subs {
			if fi, err := os.Stat(s); err == nil && fi.IsDir() {
				_ = unix.Rmdir(s)
			}
		}
		_ = unix.Rmdir(dir)
	}
}

// berthTrue submits /bin/true and times submit→running (from the agent's
// started_at) and submit→exit (as the client sees it), then deletes it.
func berthTrue(ctx context.Context, a *agentProc, network string) (running, exit time.Duration, err error) {
	spec := containerSpec("/bin/true")
	spec.Network = network
	t0 := time.Now()
	w, err := a.c.Submit(ctx, spec)
	if err != nil {
		return 0, 0, err
	}
	fin, err := a.c.WaitExit(ctx, w.ID)
	exit = time.Since(t0)
	if err != nil {
		return 0, 0, err
	}
	defer a.c.Delete(context.WithoutCancel(ctx), w.ID, true)
	if fin.State != api.StateExited || fin.ExitCode == nil || *fin.ExitCode != 0 || fin.StartedAt == nil {
		return 0, 0, fmt.Errorf("workload %s ended %s (exit %v): %s", w.ID, fin.State, fin.ExitCode, fin.Error)
	}
	// Wall clock on both sides: the agent runs on this machine.
	return fin.StartedAt.Sub(t0.Round(0)), exit, nil
}

// usernsState is what node status says of the agent's user namespaces:
// "on", or "off: why".
func usernsState(ctx context.Context, a *agentProc) string {
	n, _, err := a.c.Node(ctx, nil)
	if err != nil {
		return "unknown: " + err.Error()
	}
	d := n.Drivers[string(api.IsolationContainer)].Details
	if d["userns"] == "on" {
		return "on"
	}
	return "off: " + d["userns_reason"]
}

// startUsernsOffAgent starts a second agent like a but with user
// namespaces off, for the user namespace row; it runs network-none
// containers only (no node network, no VMs, a unix socket of its own).
// startAgent configures an agent from the bench's file and the
// environment, so the differences are BERTH_* variables set around it.
func startUsernsOffAgent(ctx context.Context, a *agentProc) (*agentProc, error) {
	return startAgentWith(ctx, a, "agent-userns-off", map[string]string{
		"BERTH_CONTAINER_USERNS_MODE": "off", "BERTH_NETWORK_ENABLED": "false", "BERTH_VM_ENABLED": "false",
	})
}

// startAgentWith starts a second agent like a, in a directory of its own
// (name) next to a's, with its configuration changed by env (BERTH_*),
// and the bench image imported.
func startAgentWith(ctx context.Context, a *agentProc, name string, env map[string]string) (*agentProc, error) {
	dir := filepath.Join(filepath.Dir(a.dataDir), name)
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return nil, err
	}
	env["BERTH_LISTEN_UNIX"] = filepath.Join(dir, "berth.sock")
	for k, v := range env {
		old, had := os.LookupEnv(k)
		os.Setenv(k, v)
		if had {
			defer os.Setenv(k, old)
		} else {
			defer os.Unsetenv(k)
		}
	}
	b, err := startAgent(ctx, a.cmd.Path, dir, filepath.Join(runDir(filepath.Dir(a.dataDir)), name), "tcg")
	if err != nil {
		return nil, err
	}
	if err := b.importImage(ctx); err != nil {
		b.stop()
		return nil, err
	}
	return b, nil
}

// stopAgent deletes what is left of an agent's workloads and stops it.
func stopAgent(a *agentProc) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if ws, _, err := a.c.List(ctx, api.ListFilter{}, nil); err == nil {
		ids := make([]string, len(ws))
		for i, w := range ws {
			ids[i] = w.ID
		}
		deleteAll(ctx, a, ids, 16)
	}
	a.stop()
}

// containerStart is measurement 1: N sequential /bin/true workloads
// through the API, interleaved with the runc baselines so drift and noise
// hit all three alike. A second agent with user namespaces off runs the
// network-none workload too, for what user namespaces cost.
func containerStart(ctx context.Context, a *agentProc, rr *rawRunc, rc *rawCNI, n int, rep *Report) error {
	var bRun, bExit, nRun, nExit, oRun, rRun, pRun, eRun, cRun, cTotal, cniAdd, bridgeBase []float64
	userns := usernsState(ctx, a)
	off, err := startUsernsOffAgent(ctx, a)
	if err != nil {
		return fmt.Errorf("agent with user namespaces off: %w", err)
	}
	defer stopAgent(off)
	// One unmeasured round of each warms page cache and runc.
	if _, _, err := berthTrue(ctx, a, ""); err != nil {
		return err
	}
	if _, _, err := berthTrue(ctx, off, "none"); err != nil {
		return fmt.Errorf("berth /bin/true, user namespaces off: %w", err)
	}
	if _, err := rr.run(ctx); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		run, exit, err := berthTrue(ctx, a, "")
		if err != nil {
			return fmt.Errorf("berth /bin/true #%d: %w", i, err)
		}
		bRun, bExit = append(bRun, ms(run)), append(bExit, ms(exit))
		// The same without the node network (no CNI set-up and teardown),
		// to show what the network costs.
		run, exit, err = berthTrue(ctx, a, "none")
		if err != nil {
			return fmt.Errorf("berth /bin/true network none #%d: %w", i, err)
		}
		nRun, nExit = append(nRun, ms(run)), append(nExit, ms(exit))
		run, _, err = berthTrue(ctx, off, "none")
		if err != nil {
			return fmt.Errorf("berth /bin/true network none, user namespaces off #%d: %w", i, err)
		}
		oRun = append(oRun, ms(run))
		d, err := rr.run(ctx)
		if err != nil {
			return err
		}
		rRun = append(rRun, ms(d))
		cr, ct, err := rr.createStartDelete(ctx)
		if err != nil {
			return err
		}
		cRun, cTotal = append(cRun, ms(cr)), append(cTotal, ms(ct))
		// The bridge baseline: the same plugin chain by hand, next to
		// runc create + start of this round.
		att, add, err := rc.add(ctx)
		if err != nil {
			return err
		}
		if _, err := rc.del(ctx, att); err != nil {
			return err
		}
		cniAdd = append(cniAdd, ms(add))
		bridgeBase = append(bridgeBase, ms(cr)+ms(add))
		d, err = rr.runPlain(ctx)
		if err != nil {
			return err
		}
		pRun = append(pRun, ms(d))
		if rr.cap.entry != nil {
			if d, err = rr.runEntry(ctx); err != nil {
				return err
			}
			eRun = append(eRun, ms(d))
		}
	}
	sec := "Container start (/bin/true, sequential)"
	runcRun := summarize(rRun)
	csRun := summarize(cRun)
	csTotal := summarize(cTotal)
	br := summarize(bRun)
	be := summarize(bExit)
	rep.add(Result{Section: sec, Name: "baseline: runc run (create+start+wait+delete)", Unit: "ms", Summary: &runcRun})
	rep.add(Result{Section: sec, Name: "baseline: runc create+start (to running)", Unit: "ms", Summary: &csRun})
	rep.add(Result{Section: sec, Name: "baseline: runc create+start+wait+delete", Unit: "ms", Summary: &csTotal})
	rep.add(Result{Section: sec, Name: "berth submit→running", Unit: "ms", Summary: &br,
		Baseline: "runc run", Ratio: ratio(br.Median, runcRun.Median),
		Note: fmt.Sprintf("overhead %+.1f ms over runc run, %+.1f ms (×%.2f) over runc create+start",
			br.Median-runcRun.Median, br.Median-csRun.Median, ratio(br.Median, csRun.Median))})
	bn := summarize(nRun)
	rep.add(Result{Section: sec, Name: "berth submit→running, network none (no CNI)", Unit: "ms", Summary: &bn,
		Baseline: "runc run", Ratio: ratio(bn.Median, runcRun.Median),
		Note: fmt.Sprintf("overhead %+.1f ms over runc run; the bridge network costs %+.1f ms; user namespaces %s", bn.Median-runcRun.Median, br.Median-bn.Median, userns)})
	bo := summarize(oRun)
	cost := fmt.Sprintf("user namespaces (on in the row above) cost %+.1f ms a start", bn.Median-bo.Median)
	if userns != "on" {
		cost = "user namespaces are " + userns + " on the bench agent too: nothing to compare"
	}
	rep.add(Result{Section: sec, Name: "berth submit→running, network none, user namespaces off", Unit: "ms", Summary: &bo,
		Baseline: "berth submit→running, network none (no CNI)", Ratio: ratio(bo.Median, bn.Median),
		Note: cost + " (a second agent with container.userns.mode off, interleaved)"})
	rep.add(Result{Section: sec, Name: "berth submit→exit (client sees exited)", Unit: "ms", Summary: &be,
		Baseline: "runc run", Ratio: ratio(be.Median, runcRun.Median),
		Note: fmt.Sprintf("overhead %+.1f ms over runc run, %+.1f ms over runc create+start+wait+delete",
			be.Median-runcRun.Median, be.Median-csTotal.Median)})
	ne := summarize(nExit)
	rep.add(Result{Section: sec, Name: "berth submit→exit, network none (client sees exited)", Unit: "ms", Summary: &ne,
		Baseline: "runc run", Ratio: ratio(ne.Median, runcRun.Median),
		Note: fmt.Sprintf("overhead %+.1f ms over runc run", ne.Median-runcRun.Median)})
	ca, bb := summarize(cniAdd), summarize(bridgeBase)
	rep.add(Result{Section: sec, Name: "baseline: CNI ADD by hand (new netns; bridge, portmap, firewall)", Unit: "ms", Summary: &ca,
		Note: "the plugin chain of berth's node network, run through libcni on a bridge of its own"})
	rep.add(Result{Section: sec, Name: "baseline: runc create+start + CNI ADD by hand", Unit: "ms", Summary: &bb,
		Note: "the two measured in the same round, summed per round"})
	pr := summarize(pRun)
	rep.add(Result{Section: sec, Name: "baseline: runc run of a plain `runc spec` bundle (no seccomp allowlist)", Unit: "ms", Summary: &pr,
		Baseline: "runc run", Ratio: ratio(pr.Median, runcRun.Median),
		Note: fmt.Sprintf("berth's hardened bundle (353-name seccomp allowlist runc compiles on every start, capabilities, masked paths) costs runc %+.1f ms a run", runcRun.Median-pr.Median)})
	if len(eRun) > 0 {
		er := summarize(eRun)
		rep.add(Result{Section: sec, Name: "baseline: runc run of berth's bundle through berth-entry (the filter compiled once)", Unit: "ms", Summary: &er,
			Baseline: "runc run", Ratio: ratio(er.Median, runcRun.Median),
			Note: fmt.Sprintf("how berth pays for its seccomp allowlist: berth-entry installs the filter the agent compiled once and executes /bin/true (one more exec), instead of runc compiling the profile on every start: %+.1f ms a run against runc's own (the plain bundle above: %+.1f ms)", er.Median-runcRun.Median, pr.Median-runcRun.Median)})
	}

	// The targets, as issue 16 writes them.
	rn := ratio(bn.Median, csRun.Median)
	rep.target(Target{Name: "container submit→running, network none, within 1.15× runc create+start (median)", Goal: "≤ 1.15×",
		Measured: fmt.Sprintf("×%.2f (berth %.1f ms, runc create+start %.1f ms)", rn, bn.Median, csRun.Median),
		Met:      rn <= 1.15, By: fmt.Sprintf("%+.2f×", rn-1.15)})
	rb := ratio(br.Median, bb.Median)
	rep.target(Target{Name: "container submit→running, bridge network, within 1.15× runc create+start + CNI ADD by hand (median)", Goal: "≤ 1.15×",
		Measured: fmt.Sprintf("×%.2f (berth %.1f ms, runc create+start + CNI ADD %.1f ms)", rb, br.Median, bb.Median),
		Met:      rb <= 1.15, By: fmt.Sprintf("%+.2f×", rb-1.15)})
	over := ne.Median - runcRun.Median
	rep.target(Target{Name: "client sees exited (/bin/true, network none) within runc run + 10 ms (median)", Goal: "≤ +10 ms",
		Measured: fmt.Sprintf("%+.1f ms (berth %.1f ms, runc run %.1f ms)", over, ne.Median, runcRun.Median),
		Met:      over <= 10, By: fmt.Sprintf("%+.1f ms", over-10)})
	rep.raw["container_start"] = map[string]any{
		"berth_submit_to_running_ms": bRun, "berth_submit_to_exit_ms": bExit, "berth_network_none_submit_to_running_ms": nRun,
		"berth_network_none_submit_to_exit_ms":               nExit,
		"berth_network_none_userns_off_submit_to_running_ms": oRun,
		"runc_run_ms": rRun, "runc_create_start_ms": cRun, "runc_create_start_wait_delete_ms": cTotal,
		"cni_add_ms": cniAdd, "runc_create_start_plus_cni_add_ms": bridgeBase, "runc_run_plain_bundle_ms": pRun,
	}
	return nil
}

// throughput is measurement 2: total workloads of /bin/true submitted by
// conc workers, each submitting and waiting for the exit, with network
// none and then with the bridge network; the baselines are the same
// number of `runc run`s at the same concurrency, without and then with
// CNI ADD and DEL of the same plugin chain by hand around each.
func throughput(ctx context.Context, a *agentProc, rr *rawRunc, rc *rawCNI, total, conc int, rep *Report) error {
	sec := fmt.Sprintf("Container throughput (%d × /bin/true, concurrency %d)", total, conc)
	for _, network := range []string{"none", "bridge"} {
		_ = resetPeak(a.pid())
		before, _ := readMem(a.pid())
		stopSample := samplePeak(a.pid())
		var mu sync.Mutex
		var ids []string
		var first error
		bwall, failed := concurrently(ctx, total, conc, func() error {
			spec := containerSpec("/bin/true")
			spec.Network = network
			wl, err := a.c.Submit(ctx, spec)
			if err != nil {
				return err
			}
			mu.Lock()
			ids = append(ids, wl.ID)
			mu.Unlock()
			fin, err := a.c.WaitExit(ctx, wl.ID)
			if err == nil && (fin.ExitCode == nil || *fin.ExitCode != 0) {
				err = fmt.Errorf("workload %s ended %s: %s", fin.ID, fin.State, fin.Error)
			}
			return err
		}, &first)
		after, _ := readMem(a.pid())
		peak := max(after.HWM, stopSample())
		deleteAll(ctx, a, ids, conc)
		if first != nil && failed > int64(total/10) {
			return fmt.Errorf("network %s: %d of %d workloads failed; first: %w", network, failed, total, first)
		}

		base, baseName := "runc run", "runc run"
		var rerr error
		rwall, rfailed := concurrently(ctx, total, conc, func() error {
			if network == "none" {
				_, err := rr.run(ctx)
				return err
			}
			att, _, err := rc.add(ctx)
			if err != nil {
				return err
			}
			_, err = rr.run(ctx)
			if _, derr := rc.del(ctx, att); err == nil {
				err = derr
			}
			return err
		}, &rerr)
		if network == "bridge" {
			base, baseName = "runc run + CNI ADD/DEL by hand", "runc run with CNI ADD and DEL by hand around it"
		}
		if rfailed > 0 {
			return fmt.Errorf("baseline %s: %w", baseName, rerr)
		}
		ok := total - int(failed)
		berthRate := float64(ok) / bwall.Seconds()
		runcRate := float64(total) / rwall.Seconds()
		rep.add(Result{Section: sec, Name: "baseline: " + base + ", network " + network, Unit: "completed/s", Value: runcRate,
			Note: fmt.Sprintf("%d runs in %.1f s", total, rwall.Seconds())})
		rep.add(Result{Section: sec, Name: "berth submit + wait exit, network " + network, Unit: "completed/s", Value: berthRate,
			Baseline: base, Ratio: ratio(berthRate, runcRate),
			Note: fmt.Sprintf("%d ok, %d failed in %.1f s", ok, failed, bwall.Seconds())})
		rep.add(Result{Section: sec, Name: "agent peak RSS during the run, network " + network, Unit: "MiB", Value: float64(peak) / 1024,
			Note: fmt.Sprintf("RSS %.1f MiB before, %.1f MiB after", float64(before.RSS)/1024, float64(after.RSS)/1024)})
		r := ratio(berthRate, runcRate)
		rep.target(Target{Name: fmt.Sprintf("throughput, network %s: %d × /bin/true at concurrency %d, within 0.9× %s, none failed", network, total, conc, base),
			Goal:     "≥ 0.9×, 0 failed",
			Measured: fmt.Sprintf("×%.2f (berth %.2f/s, %s %.2f/s), %d failed", r, berthRate, base, runcRate, failed),
			Met:      r >= 0.9 && failed == 0, By: fmt.Sprintf("%+.2f×", r-0.9)})
		if first != nil {
			rep.errorf("throughput, network %s: %d workloads failed; first: %v", network, failed, first)
		}
	}
	return nil
}

// concurrently runs fn total times, conc at a time, and returns the wall
// time and how many failed; *first is the first error.
func concurrently(ctx context.Context, total, conc int, fn func() error, first *error) (time.Duration, int64) {
	var next, failed atomic.Int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	t0 := time.Now()
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for int(next.Add(1)) <= total && ctx.Err() == nil {
				if err := fn(); err != nil {
					failed.Add(1)
					mu.Lock()
					if *first == nil {
						*first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(t0), failed.Load()
}

// samplePeak samples pid's RSS every 20 ms, in case clear_refs (and so
// VmHWM) is not available; stop ends the sampling and returns the peak.
func samplePeak(pid int) (stop func() int64) {
	peak := new(atomic.Int64)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if m, err := readMem(pid); err == nil && m.RSS > peak.Load() {
				peak.Store(m.RSS)
			}
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(done)
		wg.Wait()
		return peak.Load()
	}
}

// deleteAll force-deletes workloads, conc at a time.
func deleteAll(ctx context.Context, a *agentProc, ids []string, conc int) {
	ch := make(chan string)
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range ch {
				dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 60*time.Second)
				_ = a.c.Delete(dctx, id, true)
				cancel()
			}
		}()
	}
	for _, id := range ids {
		if id != "" {
			ch <- id
		}
	}
	close(ch)
	wg.Wait()
}

// waitRunning waits until every workload is running (or fails).
func waitRunning(ctx context.Context, a *agentProc, ids []string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for _, id := range ids {
		var idx uint64
		for {
			w, i, err := a.c.Get(ctx, id, queryOpts(idx))
			if err != nil {
				return fmt.Errorf("workload %s: %w", id, err)
			}
			if w.State == api.StateRunning {
				break
			}
			if w.State.Terminal() {
				return fmt.Errorf("workload %s ended %s before running: %s", id, w.State, w.Error)
			}
			idx = i
		}
	}
	return nil
}

// monitorPids returns the pids of the container monitors in the agent's
// data dir, by task id.
func monitorPids(dir string, ids []string) map[string]int {
	out := map[string]int{}
	for _, id := range ids {
		b, err := os.ReadFile(filepath.Join(dir, id, "monitor.pid"))
		if err != nil {
			continue
		}
		var ident struct {
			Pid int `json:"pid"`
		}
		if json.Unmarshal(b, &ident) == nil && ident.Pid > 0 {
			out[id] = ident.Pid
		}
	}
	return out
}

// containerFootprint is measurement 6 for containers: agent RSS with n
// running containers against the idle agent, and each monitor's memory.
// It returns berth's own bundle of the first container, for the baselines.
func containerFootprint(ctx context.Context, a *agentProc, n int, idle procMem, keep string, rep *Report) (*captured, error) {
	ids := make([]string, n)
	defer func() { deleteAll(ctx, a, ids, 16) }()
	// Half first, read once settled, then the rest: the second half's
	// growth is what a running container costs at the margin, without
	// what the first starts page in or make once (the start path's code,
	// pools, buffers), which (busy - idle) / n spreads over n.
	half := n / 2
	var up time.Duration
	var mid procMem
	for _, part := range [][2]int{{0, half}, {half, n}} {
		t1 := time.Now()
		for i := part[0]; i < part[1]; i++ {
			w, err := a.c.Submit(ctx, containerSpec(idleCommand...))
			if err != nil {
				return nil, fmt.Errorf("submit running container #%d: %w", i, err)
			}
			ids[i] = w.ID
		}
		if err := waitRunning(ctx, a, ids[part[0]:part[1]], 5*time.Minute); err != nil {
			return nil, err
		}
		up += time.Since(t1)
		if part[0] == 0 {
			time.Sleep(2 * time.Second)
			var err error
			if mid, err = readMem(a.pid()); err != nil {
				return nil, err
			}
		}
	}
	first, _, err := a.c.Get(ctx, ids[0], nil)
	if err != nil {
		return nil, err
	}
	cap, err := captureBundle(a.dataDir, a.stateDir, ids[0], first.ImageDigest, keep)
	if err != nil {
		return nil, err
	}
	// Let the agent settle (health loop, GC) before reading it.
	time.Sleep(2 * time.Second)
	busy, err := readMem(a.pid())
	if err != nil {
		return nil, err
	}
	pids := monitorPids(filepath.Join(a.stateDir, "containers", "tasks"), ids)
	var rss, pss []float64
	for _, pid := range pids {
		if m, err := readMem(pid); err == nil {
			rss, pss = append(rss, float64(m.RSS)), append(pss, float64(m.PSS))
		}
	}
	sec := "Footprint"
	deltaKiB := float64(busy.RSS-idle.RSS) / float64(n)
	rest := n - half
	marginKiB := float64(busy.RSS-mid.RSS) / float64(rest)
	marginAnonKiB := float64(busy.Anon-mid.Anon) / float64(rest)
	fileKiB := float64((busy.RSS-busy.Anon)-(idle.RSS-idle.Anon)) / float64(n)
	monRSS, monPSS := summarize(rss), summarize(pss)
	rep.add(Result{Section: sec, Name: fmt.Sprintf("agent RSS with %d running containers", n), Unit: "MiB",
		Value: float64(busy.RSS) / 1024, Note: fmt.Sprintf("PSS %.1f MiB; %d submitted and running in %.1f s", float64(busy.PSS)/1024, n, up.Seconds())})
	rep.add(Result{Section: sec, Name: "agent memory per running container ((RSS busy − idle) / n)", Unit: "KiB", Value: deltaKiB,
		Note: fmt.Sprintf("of it %.0f KiB file-backed: code the starts paged in once, spread over the %d", fileKiB, n)})
	rep.add(Result{Section: sec, Name: fmt.Sprintf("agent memory per running container at the margin ((RSS with %d − with %d) / %d)", n, half, rest), Unit: "KiB", Value: marginKiB,
		Note: fmt.Sprintf("anonymous (heap and stacks) %.0f KiB; agent RSS %.1f MiB with %d running", marginAnonKiB, float64(mid.RSS)/1024, half)})
	rep.add(Result{Section: sec, Name: "container monitor process RSS", Unit: "KiB", Summary: &monRSS,
		Note: fmt.Sprintf("%d monitors; RSS counts the berth binary's shared text in full", len(rss))})
	rep.add(Result{Section: sec, Name: "container monitor process PSS", Unit: "KiB", Summary: &monPSS,
		Note: "shared pages split among the processes mapping them"})
	rep.add(Result{Section: sec, Name: "per-container overhead (monitor PSS + agent delta)", Unit: "KiB", Value: monPSS.Median + deltaKiB})
	rep.target(Target{
		Name: "agent memory per running workload (containers)", Goal: "≤ 64 KiB",
		Measured: fmt.Sprintf("%.0f KiB (agent RSS %.1f → %.1f MiB with %d containers; of it %.0f KiB file-backed, code paged in once; at the margin, from %d to %d running, %.0f KiB a container)",
			deltaKiB, float64(idle.RSS)/1024, float64(busy.RSS)/1024, n, fileKiB, half, n, marginKiB),
		Met: deltaKiB <= 64, By: fmt.Sprintf("%+.0f KiB", deltaKiB-64),
	})
	rep.target(Target{
		Name: "container monitor PSS (median)", Goal: "≤ 1 MiB",
		Measured: fmt.Sprintf("%.0f KiB (RSS %.0f KiB, of which the binary's shared text)", monPSS.Median, monRSS.Median),
		Met:      monPSS.Median <= 1024, By: fmt.Sprintf("%+.0f KiB", monPSS.Median-1024),
	})
	rep.raw["container_monitor_rss_kib"] = rss
	rep.raw["container_monitor_pss_kib"] = pss
	return cap, nil
}
