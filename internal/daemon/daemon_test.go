package daemon_test

// End-to-end tests of the container path: a real agent (state, image store,
// ctrdriver on real runc) serving the HTTP API, driven through the Go client
// as the CLI drives it. They need root and runc; `make test` provides both.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/internal/daemon"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/openapitest"
	"github.com/berthd/berth/internal/testimage"
	"github.com/berthd/berth/supervisor/monitortest"
)

const (
	testImage = "berth.test/busybox:latest"
	// agentConfigEnv makes the test binary run an agent from the config file
	// it names, so a test can SIGKILL and restart a real agent process.
	agentConfigEnv = "BERTH_TEST_AGENT_CONFIG"
)

func TestMain(m *testing.M) {
	if file := os.Getenv(agentConfigEnv); file != "" {
		os.Exit(runAgent(file))
	}
	// Build the monitor once, before any agent process is started: they
	// inherit its path.
	if _, err := monitortest.Build(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	monitortest.Cleanup()
	if initDir != "" {
		os.RemoveAll(initDir)
	}
	os.Exit(code)
}

func runAgent(file string) int {
	cfg, err := config.Load(file, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if cfg.Node.MonitorPath == "" {
		// The berth-monitor built for this test run (its path comes
		// from the test process that started this agent).
		if cfg.Node.MonitorPath, err = monitortest.Build(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	d, err := daemon.New(ctx, cfg, daemon.Options{Version: "test"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := d.Serve(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func requireRunc(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("end-to-end container tests need root; run `make test` as root")
	}
	if _, err := exec.LookPath("runc"); err != nil {
		if _, err := os.Stat("/usr/sbin/runc"); err != nil {
			t.Skip("runc is not installed; `make test` installs it (apt-get install runc)")
		}
	}
}

func testConfig(t *testing.T, dataDir, listen string) *config.Config {
	t.Helper()
	cfg, err := config.Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = dataDir
	cfg.Listen = listen
	cfg.Node.MonitorPath = monitortest.Path(t)
	cfg.VM.Enabled = false
	// Tests that use the network make their own bridge and subnet, so
	// agents of concurrent tests never share an address pool.
	cfg.Network.Enabled = false
	cfg.WorkloadDefaults.StopTimeout = 2 * time.Second
	// 20 workloads at once on a 2-core machine: request little CPU.
	cfg.WorkloadDefaults.CPU = 0.05
	return cfg
}

// serve runs an agent with cfg in this process until the test ends (then
// deletes every workload it holds and stops it) and returns a client for it
// and its TCP address.
func serve(t *testing.T, cfg *config.Config) (*client.Client, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logger := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	d, err := daemon.New(ctx, cfg, daemon.Options{Version: "test", Logger: logger})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	c, err := client.New(d.Addr(), checked(t))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		deleteAll(t, c)
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	return c, d.Addr()
}

// startAgent runs an agent in this process with the busybox image and
// returns a client for it and its data dir.
func startAgent(t *testing.T) (*client.Client, string) {
	t.Helper()
	requireRunc(t)
	dataDir := t.TempDir()
	c, _ := serve(t, testConfig(t, dataDir, "127.0.0.1:0"))
	importBusybox(t, c)
	return c, dataDir
}

// checked makes a client's every request and answer be checked against
// the API's OpenAPI document (api/openapi.yaml) for the rest of the test.
func checked(t *testing.T) client.Option {
	return client.WithRoundTripper(func(rt http.RoundTripper) http.RoundTripper { return openapitest.Transport(t, rt) })
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func importBusybox(t *testing.T, c *client.Client) {
	t.Helper()
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, testImage); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ImportImage(context.Background(), &buf, ""); err != nil {
		t.Fatalf("import: %v", err)
	}
}

func deleteAll(t *testing.T, c *client.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	list, _, err := c.List(ctx, api.ListFilter{}, nil)
	if err != nil {
		t.Logf("cleanup list: %v", err)
		return
	}
	for _, w := range list {
		// A workload listed as deleting may be gone by now: its delete,
		// asked before, has finished.
		if err := c.Delete(ctx, w.ID, true); err != nil && !client.IsReason(err, api.ReasonNotFound) {
			t.Errorf("cleanup delete %s: %v", w.ID, err)
		}
	}
}

func sh(script string) api.WorkloadSpec {
	return api.WorkloadSpec{Image: testImage, Command: []string{"sh", "-c", script}}
}

// run submits spec, waits for its end and returns it with its output.
func run(t *testing.T, c *client.Client, spec api.WorkloadSpec) (w *api.Workload, stdout, stderr string) {
	t.Helper()
	// Generous: a VM boots under emulation, and CI machines are shared.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	sub, err := c.Submit(ctx, spec)
	if err != nil {
		t.Fatalf("submit: %v", err)
	}
	w, err = c.WaitExit(ctx, sub.ID)
	if err != nil {
		t.Fatalf("wait %s: %v", sub.ID, err)
	}
	stdout, stderr = logs(t, c, w.ID)
	return w, stdout, stderr
}

func logs(t *testing.T, c *client.Client, id string) (stdout, stderr string) {
	t.Helper()
	var out, errb strings.Builder
	err := c.Logs(context.Background(), id, api.LogOptions{Tail: -1}, func(l api.LogLine) error {
		if l.Stream == "stderr" {
			errb.WriteString(l.Line + "\n")
		} else {
			out.WriteString(l.Line + "\n")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("logs %s: %v", id, err)
	}
	return out.String(), errb.String()
}

func exitCode(w *api.Workload) int {
	if w.ExitCode == nil {
		return -1
	}
	return *w.ExitCode
}

func TestContainerWorkloads(t *testing.T) {
	c, dataDir := startAgent(t)

	t.Run("OutputAndExitCode", func(t *testing.T) {
		w, out, errs := run(t, c, sh("echo hello; echo oops >&2; exit 7"))
		if w.State != api.StateExited || exitCode(w) != 7 {
			t.Fatalf("workload ended %s with exit %d, want exited 7 (error %q)", w.State, exitCode(w), w.Error)
		}
		if out != "hello\n" || errs != "oops\n" {
			t.Errorf("stdout %q stderr %q, want %q and %q", out, errs, "hello\n", "oops\n")
		}
		if w.Isolation != api.IsolationContainer || w.Placement == nil {
			t.Errorf("placement %v %+v, want a container with its decision", w.Isolation, w.Placement)
		}
	})

	t.Run("EnvWorkdirCommand", func(t *testing.T) {
		spec := api.WorkloadSpec{
			Image:   testImage,
			Command: []string{"sh", "-c"},
			Args:    []string{`echo "$GREETING $0"; pwd`, "from-args"},
			Env:     map[string]string{"GREETING": "hi there"},
			Workdir: "/srv/work",
		}
		w, out, _ := run(t, c, spec)
		if exitCode(w) != 0 || out != "hi there from-args\n/srv/work\n" {
			t.Errorf("exit %d, stdout %q", exitCode(w), out)
		}
	})

	t.Run("MemoryLimitOOM", func(t *testing.T) {
		spec := sh("x=$(head -c 100000000 /dev/zero | tr '\\0' x); echo survived ${#x}")
		spec.Resources.MemoryMB = 32
		w, out, _ := run(t, c, spec)
		if exitCode(w) != 137 || !w.OOMKilled {
			t.Errorf("exit %d oom_killed %v, want 137 and true (stdout %q)", exitCode(w), w.OOMKilled, out)
		}
		if strings.Contains(out, "survived") {
			t.Errorf("the workload outgrew its limit: %q", out)
		}
	})

	t.Run("PidsLimit", func(t *testing.T) {
		// 30 sleepers under a limit of 10 processes: forks must fail.
		spec := sh("for i in $(seq 30); do sleep 30 & done; echo started=$(jobs -p | wc -l); kill $(jobs -p) 2>/dev/null; exit 0")
		spec.Resources.Pids = 10
		w, out, errs := run(t, c, spec)
		if !strings.Contains(errs, "can't fork") && !strings.Contains(errs, "Resource temporarily unavailable") {
			t.Errorf("want fork failures under a pids limit of 10; exit %d stdout %q stderr %q", exitCode(w), out, errs)
		}
	})

	t.Run("StopWithinTimeout", func(t *testing.T) {
		ctx := context.Background()
		sub, err := c.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"sleep", "1000"}})
		if err != nil {
			t.Fatal(err)
		}
		waitRunning(t, c, sub.ID)
		start := time.Now()
		w, err := c.Stop(ctx, sub.ID, 2*time.Second)
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		// sleep ignores nothing but is PID 1 in its container: SIGTERM has
		// no default action there, so the stop must escalate to SIGKILL.
		if w.State != api.StateExited || exitCode(w) != 137 {
			t.Errorf("stopped workload: %s exit %d, want exited 137", w.State, exitCode(w))
		}
		if took > 2*time.Second+8*time.Second {
			t.Errorf("stop took %v with a 2s timeout", took)
		}
	})

	t.Run("ConcurrentSubmits", func(t *testing.T) {
		const n = 20
		ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
		defer cancel()
		ids := make([]string, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				spec := sh(fmt.Sprintf("echo task-%d; exit %d", i, i%5))
				spec.Labels = map[string]string{"batch": "concurrent"}
				w, err := c.Submit(ctx, spec)
				if err == nil {
					ids[i] = w.ID
					_, err = c.WaitExit(ctx, w.ID)
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("workload %d: %v", i, err)
			}
		}
		list, _, err := c.List(ctx, api.ListFilter{Labels: map[string]string{"batch": "concurrent"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(list) != n {
			t.Fatalf("listed %d workloads, want %d", len(list), n)
		}
		for i, id := range ids {
			w, _, err := c.Get(ctx, id, nil)
			if err != nil {
				t.Fatal(err)
			}
			out, _ := logs(t, c, id)
			if exitCode(w) != i%5 || out != fmt.Sprintf("task-%d\n", i) {
				t.Errorf("workload %d: exit %d stdout %q", i, exitCode(w), out)
			}
		}
	})

	t.Run("DeleteLeavesNothing", func(t *testing.T) {
		ctx := context.Background()
		sub, err := c.Submit(ctx, sh("echo some output; sleep 1000"))
		if err != nil {
			t.Fatal(err)
		}
		waitRunning(t, c, sub.ID)
		id := sub.ID
		traces := func() []string {
			var found []string
			for _, p := range []string{
				filepath.Join(dataDir, "containers", "tasks", id),
				filepath.Join(dataDir, "containers", "runc", id),
				filepath.Join(dataDir, "logs", id),
				filepath.Join(dataDir, "containers", "layers", id),
				"/sys/fs/cgroup/memory/berth/" + id,
				"/sys/fs/cgroup/pids/berth/" + id,
				"/sys/fs/cgroup/cpu/berth/" + id,
			} {
				if _, err := os.Stat(p); err == nil {
					found = append(found, p)
				}
			}
			mounts, _ := os.ReadFile("/proc/self/mountinfo")
			for _, line := range strings.Split(string(mounts), "\n") {
				if strings.Contains(line, id) {
					found = append(found, "mount: "+line)
				}
			}
			return found
		}
		if len(traces()) < 4 {
			t.Fatalf("a running workload should have a task dir, runc state, logs, cgroups and a mount; found only %v", traces())
		}
		if err := c.Delete(ctx, id, true); err != nil {
			t.Fatal(err)
		}
		if left := traces(); len(left) > 0 {
			t.Errorf("delete left behind:\n%s", strings.Join(left, "\n"))
		}
		if _, _, err := c.Get(ctx, id, nil); !client.IsReason(err, api.ReasonNotFound) {
			t.Errorf("get after delete: %v, want not_found", err)
		}
	})

	t.Run("PullFromRegistry", func(t *testing.T) {
		host := testimage.StartRegistry(t)
		// A loopback registry over plain HTTP is reached only when the
		// configuration lists it (images.insecure_registries).
		cfg := testConfig(t, t.TempDir(), "127.0.0.1:0")
		cfg.ListenUnix = filepath.Join(t.TempDir(), "berth.sock") // the outer agent holds the default
		cfg.Images.InsecureRegistries = []string{host}
		c, _ := serve(t, cfg)
		img, err := ociimage.Busybox()
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if _, err := testimage.Push(ctx, host, "team/busybox:pulled", img); err != nil {
			t.Fatal(err)
		}
		ref := host + "/team/busybox:pulled"
		pulled, err := c.PullImage(ctx, ref)
		if err != nil {
			t.Fatalf("pull %s: %v", ref, err)
		}
		if !strings.HasPrefix(pulled.Digest, "sha256:") {
			t.Errorf("pulled image digest %q", pulled.Digest)
		}
		w, out, _ := run(t, c, api.WorkloadSpec{Image: ref, Command: []string{"echo", "pulled"}})
		if exitCode(w) != 0 || out != "pulled\n" {
			t.Errorf("workload from pulled image: exit %d stdout %q", exitCode(w), out)
		}
	})
}

func waitRunning(t *testing.T, c *client.Client, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var index uint64
	for {
		w, idx, err := c.Get(ctx, id, &client.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Second})
		if err != nil {
			t.Fatalf("waiting for %s to run: %v", id, err)
		}
		if w.State == api.StateRunning {
			return
		}
		if w.State.Terminal() {
			t.Fatalf("workload %s ended (%s, exit %d, %q) before running", id, w.State, exitCode(w), w.Error)
		}
		index = idx
	}
}

// agentProcess is an agent in its own process, which a test may SIGKILL.
type agentProcess struct {
	t      *testing.T
	config string
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	// cleanup is set once the process's leftovers are released at the
	// test's end.
	cleanup bool
}

// releaseLeftovers registers, at the first start, what the next agent on
// the data directory would do at the test's end: an agent killed last
// leaves its prepared writable layers mounted (ctrdriver's layer pool),
// which the next agent's start releases and a test's end must.
func (p *agentProcess) releaseLeftovers() {
	if p.cleanup {
		return
	}
	p.cleanup = true
	cfg, err := config.Load(p.config, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() {
		if p.cmd != nil && p.cmd.ProcessState == nil {
			p.kill()
		}
		mounts, _ := filepath.Glob(filepath.Join(cfg.DataDir, "containers", "layer-pool", "*"))
		for _, m := range mounts {
			if fi, err := os.Stat(m); err == nil && fi.IsDir() {
				if err := syscall.Unmount(m, 0); err != nil && !errors.Is(err, syscall.EINVAL) {
					p.t.Errorf("release a prepared layer of the killed agent: %v", err)
				}
			}
		}
	})
}

func (p *agentProcess) start(addr string) *client.Client {
	p.t.Helper()
	p.releaseLeftovers()
	exe, err := os.Executable()
	if err != nil {
		p.t.Fatal(err)
	}
	p.stderr = &bytes.Buffer{}
	p.cmd = exec.Command(exe, "-test.run=^$")
	p.cmd.Env = append(os.Environ(), agentConfigEnv+"="+p.config)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	c, err := client.New(addr, checked(p.t))
	if err != nil {
		p.t.Fatal(err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for c.Ready(context.Background()) != nil {
		if time.Now().After(deadline) {
			p.t.Fatalf("agent did not become ready:\n%s", p.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c
}

func (p *agentProcess) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestAgentSIGKILLKeepsWorkloads kills the agent process while a workload
// runs and starts a new one on the same data dir: the workload is still
// running, its log still grows, and its exit code is reported when it ends.
func TestAgentSIGKILLKeepsWorkloads(t *testing.T) {
	requireRunc(t)
	dataDir := t.TempDir()
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nvm:\n  enabled: false\nnetwork:\n  enabled: false\nworkload_defaults:\n  stop_timeout: 2s\n  cpu: 0.05\n", addr, dataDir)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &agentProcess{t: t, config: cfgFile}
	c := p.start(addr)
	t.Cleanup(func() {
		deleteAll(t, c)
		p.kill()
	})
	importBusybox(t, c)

	ctx := context.Background()
	// Ticks for about 6 s, then exits 3.
	sub, err := c.Submit(ctx, sh("i=0; while [ $i -lt 30 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done; exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, sub.ID)
	countTicks := func() int {
		out, _ := logs(t, c, sub.ID)
		return strings.Count(out, "tick")
	}
	time.Sleep(500 * time.Millisecond)

	p.kill()
	killedAt := time.Now()
	// While no agent runs, the workload keeps going: its monitor owns it.
	time.Sleep(time.Second)

	c = p.start(addr)
	w, _, err := c.Get(ctx, sub.ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(killedAt) < 5*time.Second && w.State != api.StateRunning {
		t.Fatalf("after the agent restart the workload is %s (exit %d, %q), want running", w.State, exitCode(w), w.Error)
	}
	first := countTicks()
	deadline := time.Now().Add(5 * time.Second)
	for countTicks() <= first {
		if time.Now().After(deadline) {
			t.Fatalf("log stopped growing at %d ticks after the agent restart", first)
		}
		time.Sleep(100 * time.Millisecond)
	}
	end, err := c.WaitExit(ctx, sub.ID)
	if err != nil {
		t.Fatal(err)
	}
	if end.State != api.StateExited || exitCode(end) != 3 {
		t.Errorf("workload ended %s with exit %d (%q), want exited 3", end.State, exitCode(end), end.Error)
	}
	if n := countTicks(); n != 30 {
		out, _ := logs(t, c, sub.ID)
		t.Errorf("log has %d ticks, want all 30:\n%s", n, out)
	}
	if t.Failed() {
		t.Logf("agent stderr:\n%s", p.stderr)
	}
}
