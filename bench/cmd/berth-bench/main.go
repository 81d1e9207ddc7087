// Command berth-bench measures berth against the raw runtimes it drives,
// side by side on the same machine in the same run: container start
// against runc, VM start against a hand-started QEMU and `virsh create`,
// placement and node-status throughput against the HTTP server's floor,
// and the agent's memory footprint. It starts its own agent on a scratch
// data directory and a free loopback port, and removes everything it
// created when it ends, fails or is interrupted.
//
//	go run ./bench/cmd/berth-bench -berth bin/berth -out bench/results   # make bench
//
// BENCH_QUICK=1 (or -quick) runs fewer iterations and VMs (under 2
// minutes); BENCH_ACCEL=kvm runs the VMs under KVM where a probe showed it
// works (the default is TCG: nested KVM guests hang on berth's build
// machines).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
)

// sizes are the iteration counts of a run.
type sizes struct {
	startN       int // sequential /bin/true starts
	throughputN  int
	throughputC  int
	runningN     int // containers running for the footprint
	decideTime   string
	decideCount  int
	httpDur      time.Duration
	httpConc     int
	pollers      int
	pollerRounds int
	vmN          int           // VM boots of each kind
	vmBudget     time.Duration // no new VM round starts after this (shared machines get slow)
	vmFootprintK int           // extra VMs running for the footprint (0: the warm-up VM alone)
	volumeN      int           // rounds of the volume measurements
	execN        int           // exec round trips of each kind
}

var full = sizes{
	startN: 50, throughputN: 200, throughputC: 16, runningN: 100,
	decideTime: "1s", decideCount: 5, httpDur: 5 * time.Second, httpConc: 32,
	pollers: 10000, pollerRounds: 3, vmN: 5, vmBudget: 4 * time.Minute, vmFootprintK: 3,
	volumeN: 3, execN: 30,
}

var quick = sizes{
	startN: 10, throughputN: 50, throughputC: 16, runningN: 30,
	decideTime: "200ms", decideCount: 1, httpDur: 2 * time.Second, httpConc: 32,
	pollers: 1000, pollerRounds: 1, vmN: 1, vmBudget: time.Minute, vmFootprintK: 0,
	volumeN: 1, execN: 5,
}

func main() {
	berth := flag.String("berth", "bin/berth", "berth binary")
	out := flag.String("out", "bench/results", "directory for latest.md and latest.json")
	repo := flag.String("repo", ".", "berth's source tree (for go test -bench)")
	quickFlag := flag.Bool("quick", os.Getenv("BENCH_QUICK") == "1", "fewer iterations and VMs (also BENCH_QUICK=1)")
	accel := flag.String("accel", envOr("BENCH_ACCEL", "tcg"), "vm.accel of the bench agent: tcg, kvm or auto (also BENCH_ACCEL)")
	scratch := flag.String("scratch", "/var/tmp", "where the scratch data directory is made (must be o+x all the way: QEMU runs as libvirt-qemu)")
	vmOnly := flag.Bool("vm-only", os.Getenv("BENCH_VM_ONLY") == "1", "only the VM measurements (also BENCH_VM_ONLY=1); write them to another -out than the full run's")
	only := flag.String("only", os.Getenv("BENCH_ONLY"), "run only the phases whose name contains this (also BENCH_ONLY), e.g. volumes; write them to another -out than the full run's")
	skip := flag.String("skip", os.Getenv("BENCH_SKIP"), "comma-separated: skip the phases whose name contains any of these (also BENCH_SKIP), e.g. volumes,exec round trip")
	render := flag.String("render", "", "only rewrite latest.md (and latest.json) in -out from this latest.json, with the current notes on what limits each target")
	flag.Parse()
	if *render != "" {
		if err := rerender(*render, *out); err != nil {
			log.Fatal(err)
		}
		return
	}
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench: ")
	if os.Geteuid() != 0 {
		log.Fatal("needs root (runc, libvirt, /proc of the agent)")
	}
	os.Exit(run(*berth, *out, *repo, *scratch, *accel, *only, *skip, *quickFlag, *vmOnly))
}

// loadAvg is the host's 1-minute load average: how quiet the machine was.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Fields(string(b))[0]
}

// skipped says whether phase name contains one of skip's comma-separated
// parts.
func skipped(name, skip string) bool {
	for _, part := range strings.Split(skip, ",") {
		if part = strings.TrimSpace(part); part != "" && strings.Contains(name, part) {
			return true
		}
	}
	return false
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func run(berth, out, repo, scratch, accel, only, skip string, isQuick, vmOnly bool) int {
	started := time.Now()
	sz := full
	if isQuick {
		sz = quick
	}
	berth, _ = filepath.Abs(berth)
	rep := newReport()
	rep.Quick = isQuick
	rep.Load = loadAvg()
	rep.Host = hostInfo(berth)
	rep.AccelNote = accelNote(accel)

	// 10,000 parked pollers are 10,000 sockets here and in the agent:
	// the soft file limit goes up to the hard one, for both.
	var nofile unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile); err == nil && nofile.Cur < nofile.Max {
		nofile.Cur = nofile.Max
		_ = unix.Setrlimit(unix.RLIMIT_NOFILE, &nofile)
	}

	// Runc baseline containers are orphaned to the harness once `runc
	// create` returns; being a subreaper lets it reap them.
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()

	dir, err := os.MkdirTemp(scratch, "berth-bench-")
	if err != nil {
		log.Print(err)
		return 1
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		log.Print(err)
		return 1
	}
	runID := strings.TrimPrefix(filepath.Base(dir), "berth-bench-")
	cl := &cleaner{dir: dir, runID: runID}
	defer cl.run()

	log.Printf("scratch %s; starting agent (vm.accel %s)", dir, accel)
	if err := mountRunDir(dir); err != nil {
		log.Print(err)
		return 1
	}
	a, err := startAgent(ctx, berth, dir, filepath.Join(runDir(dir), "agent"), accel)
	if err != nil {
		log.Print(err)
		return 1
	}
	cl.agent = a
	if err := a.importImage(ctx); err != nil {
		log.Print(err)
		return 1
	}
	if n, _, err := a.c.Node(ctx, nil); err == nil {
		if d, ok := n.Drivers[string(api.IsolationVM)]; ok {
			if v := d.Details["accel"]; v != "" {
				rep.VMAccel = v
			}
			if !d.Healthy {
				rep.errorf("VM driver unhealthy: %s", d.Reason)
			}
			// The boot mode is decided in the background once the agent
			// sees the kernel; the VM phase reads it again once it is.
			rep.AccelNote += "; guest kernel boot (vm.boot " + orDash(d.Details["boot_config"]) + "): decided at the first VM"
		}
	}
	rr := &rawRunc{root: filepath.Join(runDir(dir), "runc-baseline"), dir: filepath.Join(dir, "bundles"), cgroup: "/berthbench-" + runID}
	cl.runc = rr
	rc, err := newRawCNI(filepath.Join(dir, "cni-baseline"), runID)
	if err != nil {
		log.Print(err)
		return 1
	}
	cl.cni = rc

	failed := false
	phase := func(name string, fn func() error) {
		if ctx.Err() != nil || vmOnly && !strings.Contains(name, "VM") || !strings.Contains(name, only) || skipped(name, skip) {
			return
		}
		t := time.Now()
		log.Printf("%s ...", name)
		if err := fn(); err != nil {
			failed = true
			log.Printf("%s: FAILED: %v", name, err)
			rep.errorf("%s: %v", name, err)
			return
		}
		log.Printf("%s done in %.1fs", name, time.Since(t).Seconds())
	}

	var idle procMem
	phase("idle agent RSS", func() error {
		var err error
		var waited time.Duration
		idle, waited, err = settledMem(ctx, a.pid())
		if err != nil {
			return err
		}
		rep.add(Result{Section: "Footprint", Name: "agent RSS idle (image imported, no workloads)", Unit: "MiB", Value: float64(idle.RSS) / 1024,
			Note: fmt.Sprintf("PSS %.1f MiB, file-backed %.1f MiB (the binary and its libraries), anonymous %.1f MiB; read once RSS held still for 5 s, %.0f s after the import",
				float64(idle.PSS)/1024, float64(idle.RSS-idle.Anon)/1024, float64(idle.Anon)/1024, waited.Seconds())})
		mib := float64(idle.RSS) / 1024
		rep.target(Target{Name: "agent idle RSS", Goal: "≤ 25 MiB", Measured: fmt.Sprintf("%.1f MiB", mib), Met: mib <= 25, By: fmt.Sprintf("%+.1f MiB", mib-25)})
		return nil
	})
	phase(fmt.Sprintf("footprint: %d running containers", sz.runningN), func() error {
		c, err := containerFootprint(ctx, a, sz.runningN, idle, filepath.Join(dir, "bundle-files"), rep)
		rr.cap = c
		return err
	})
	phase(fmt.Sprintf("container start: %d × (berth, runc run, runc create/start/delete)", sz.startN), func() error {
		if rr.cap == nil {
			return errors.New("no berth bundle captured to build the baseline from")
		}
		return containerStart(ctx, a, rr, rc, sz.startN, rep)
	})
	phase(fmt.Sprintf("throughput: %d workloads at concurrency %d", sz.throughputN, sz.throughputC), func() error {
		if rr.cap == nil {
			return errors.New("no berth bundle captured to build the baseline from")
		}
		return throughput(ctx, a, rr, rc, sz.throughputN, sz.throughputC, rep)
	})
	var execBase Summary
	phase(fmt.Sprintf("exec round trip: %d × (runc exec, berth exec, POST exec) into one container", sz.execN), func() error {
		var err error
		execBase, err = execBench(ctx, a, berth, sz.execN, rep)
		return err
	})
	phase("placement Decide (go test -bench)", func() error {
		return decideBench(ctx, repo, sz.decideTime, sz.decideCount, rep)
	})
	phase(fmt.Sprintf("HTTP load at concurrency %d", sz.httpConc), func() error {
		return httpLoad(ctx, a, sz.httpConc, sz.httpDur, rep)
	})
	phase(fmt.Sprintf("%d blocking node pollers", sz.pollers), func() error {
		return nodePollers(ctx, a, sz.pollers, sz.pollerRounds, rep)
	})
	phase(fmt.Sprintf("VM start: %d × (berth, qemu PVH, qemu bzImage, qemu bzImage + busybox, virsh create)", sz.vmN), func() error {
		err := vmStart(ctx, a, sz.vmN, sz.vmBudget, filepath.Join(dir, "vm-baseline"), runID, sz.vmFootprintK == 0, rep)
		if mode, why := vmBoot(ctx, a); mode == "pvh" || mode == "bzimage" {
			rep.AccelNote = strings.Replace(rep.AccelNote, "decided at the first VM", mode+" — "+why, 1)
		}
		return err
	})
	phase(fmt.Sprintf("exec round trip into a VM: %d × (berth exec, POST exec)", sz.execN), func() error {
		return execVMBench(ctx, a, berth, sz.execN, execBase, rep)
	})
	if sz.vmFootprintK > 0 {
		phase(fmt.Sprintf("footprint: %d running VMs", sz.vmFootprintK), func() error {
			return vmFootprint(ctx, a, sz.vmFootprintK, rep)
		})
	}
	phase(fmt.Sprintf("VM volumes: %d × (host, container, VM): write and read 256 MiB, create 10,000 files", sz.volumeN), func() error {
		return volumeBench(ctx, a, sz.volumeN, rep)
	})
	if ctx.Err() != nil {
		rep.errorf("interrupted: %v", ctx.Err())
		failed = true
	}

	rep.Duration = time.Since(started).Round(time.Second).String()
	rep.Load = rep.Load + " → " + loadAvg()
	if ctx.Err() == nil {
		if err := rep.write(out); err != nil {
			log.Print(err)
			return 1
		}
		log.Printf("wrote %s and %s in %s", filepath.Join(out, "latest.md"), filepath.Join(out, "latest.json"), rep.Duration)
	}
	if failed {
		return 1
	}
	return 0
}

func accelNote(accel string) string {
	switch accel {
	case "tcg":
		return "forced in the bench agent's config (vm.accel: tcg): on these machines /dev/kvm exists but nested KVM guests hang after the kernel starts; set BENCH_ACCEL=kvm where a probe shows KVM works"
	case "kvm":
		return "forced in the bench agent's config (vm.accel: kvm, BENCH_ACCEL)"
	default:
		return "vm.accel: " + accel + " (the agent's probe decides)"
	}
}

// methodology is appended to latest.md.
const methodology = `- **Container start**: a ` + "`/bin/true`" + ` workload (1 core, 32 MiB) submitted through the Go client, N sequential. *submit→running* is the agent's ` + "`started_at`" + ` (set when the driver's Start returned: overlay mounted, bundle written, monitor spawned, ` + "`runc create`+`start`" + ` done) minus the client's clock before the POST (same host, same wall clock). *submit→exit* is until the client's blocking GET sees ` + "`exited`" + `. Baselines, interleaved with berth's runs: ` + "`runc run`" + ` and ` + "`runc create`/`start`/wait/`delete`" + ` of a bundle holding **berth's own config.json** (captured from a running berth container: same hardened spec, seccomp profile, namespaces, masked paths, cgroup limits; berth starts its containers' processes through berth-entry, which installs the filter the agent compiled once, and the baselines are given the bundle as runc alone runs it: the process's own args and the profile for runc to compile and install) over the same unpacked image rootfs (read-only instead of berth's per-workload overlay), with their own runc root and cgroup parent. The bridge baseline adds, in the same round, a new network namespace and CNI ADD of berth's plugin chain (bridge with host-local IPAM, portmap, firewall) run by hand through libcni on a bridge and subnet of its own; its time is summed with that round's runc create+start. A plain ` + "`runc spec`" + ` bundle of the same rootfs, run with ` + "`runc run`" + `, shows what berth's hardening costs runc itself, and ` + "`runc run`" + ` of the baseline bundle started through berth-entry (the profile left out of runc's config) what it costs the way berth pays for it. The run mounts a tmpfs as a node's /run: the agents' ` + "`state_dir`" + ` (each task's bundle, monitor records and runc's state, as the Debian package puts them in /run/berth) and the raw runc baselines' ` + "`--root`" + ` (runc's own default is /run/runc) are both on it; berth's writable layers and records stay on the scratch disk.
- **Container throughput**: N workloads, a fixed number of client workers each submitting and waiting for the exit; completed per second; once with network none, once with the bridge network. Baselines: the same number of ` + "`runc run`" + ` at the same concurrency, and for the bridge network the same with a new namespace, CNI ADD before and CNI DEL after each, by hand. Peak agent RSS is VmHWM after clear_refs, cross-checked by sampling every 20 ms.
- **VM start**: the first (unmeasured) berth VM warms the kernel-extraction, initramfs and base-image caches, and lends the baselines its domain XML (` + "`virsh dumpxml --inactive`" + `), config disk and base image. Then, interleaved: berth submit → first stdout line through ` + "`GET /v1/workloads/{id}/logs?follow=true`" + ` (woken by inotify on the log directory); ` + "`qemu-system-x86_64`" + ` started by hand with berth's firmware (qboot where berth's domain names it), initramfs, command line, machine, CPU model, vCPUs, memory, devices (all on the root bus, as berth places them), disk cache mode and virtio-serial ports as plain files, exec → first stdout byte, booting the node's kernel twice: as the vmlinux the harness extracts from /boot/vmlinuz-* as berth does, through its PVH entry point (the **PVH baseline**), and as the bzImage; ` + "`virsh create`" + ` of berth's domain XML renamed, without berth's metadata, on a fresh overlay and sockets of its own, exec → first byte read from the stdout port's socket; and the **fixed baseline**, which does not move with berth: the node's bzImage as shipped with an initramfs of busybox-static and an /init script that prints a line and powers off, on q35/qemu64 with 224 MiB and only the serial console, exec → that line in the console file. The header's VM accelerator row says how berth booted the kernel (node status ` + "`boot`, `boot_reason`" + `).
- **Exec round trip**: one idle container; N rounds, each ` + "`runc exec ID true`" + ` against the agent's own runc state (the baseline: the container's process spec, no berth in the way), then ` + "`berth exec ID -- true`" + ` (the CLI binary: its start, the WebSocket session, the exit code) and ` + "`POST /v1/workloads/{id}/exec`" + ` with ` + "`true`" + ` through the Go client (the simple form). berth's path adds the API, the policy check and a ` + "`berth-monitor exec`" + ` shim that is the process's parent (runc exec --detach). The VM rows: one idle VM (the run's accelerator; the first, unmeasured exec waits for its boot), N rounds of the same ` + "`berth exec`" + ` and ` + "`POST exec`" + `, as ratios of the container's ` + "`runc exec`" + ` of the same run; the exec'd process is started by berth-init in the guest over the VM's exec channel (docs/vm-exec.md).
- **Placement**: ` + "`BenchmarkDecide`" + ` of package placement (default policy and the 50-rule policy: 40 match rules and 10 CEL rules), median of the repeated runs. HTTP: a Go closed-loop load generator in the harness (keep-alive connections, one per worker) on the same 2 cores as the agent, against ` + "`POST /v1/placements`" + `, ` + "`GET /v1/node`" + ` and, as the server's floor, ` + "`GET /healthz`" + `.
- **Node status blocking queries**: the pollers park on ` + "`GET /v1/node?index=N&wait=1m`" + ` (parked = the agent holds that many more established connections, plus 300 ms); the state change is a container submit; latency is from before the submit to each poller's return. Baseline: the same with a single poller. The harness raises its file limit to the hard limit for the 10,000 sockets (the agent, a Go program, does so for itself).
- **What is durable when** (issue 16 asks the results to say what was made non-durable and why that is safe). Every change to a workload is written to the state database and fsynced, by one writer that commits whatever is queued in a single transaction (group commit); a change is visible (GET, events, blocking queries) as soon as it is made, a few milliseconds before it is on disk. What is waited for: every API answer (submit, stop, delete) waits for its change on disk, so nothing acknowledged is lost; and the driver runs nothing of a workload before its ` + "`starting`" + ` is on disk (the driver prepares the task meanwhile and waits for it, ` + "`TaskConfig.Commit`" + `), so a ` + "`restart: never`" + ` workload never runs twice: a crash or power loss before that point finds it pending with nothing run (recovery releases what was prepared), one after finds it starting, and a start the node's reboot interrupted with nothing left of its task ends as the reboot's instead of running again (` + "`TestStartInterruptedByARebootIsNotRunAgain`" + `). A submitted workload's start does not wait for its submit's record: the driver prepares the task while that record and the ` + "`starting`" + ` one go to disk, and the wait above (and, with a network, one before the attach) keeps anything from running on what a crash could take back; a crash before then leaves a prepared task no record claims, which reconciliation removes (` + "`TestStartPreparesWhileTheRecordGoesToDisk`" + `). What is no longer waited for: the ` + "`running`" + ` record (a crash before it is written finds the task through the ` + "`starting`" + ` record and re-attaches it); a container's id-range record and a bridge attachment's final record are written without fsync (their intent, or the task's absence after a power loss, is what recovery needs: no container of the range runs after a power loss, and the attachment's intent record, which is synced before any side effect, is what the teardown reads). A container's writable layer is a volatile overlay (node status ` + "`overlay_volatile`" + `): the container's fsync and syncfs on it return at once, and its unmount writes nothing back. That is safe because the layer never outlives its run: a restart makes a new one and a node's reboot releases it, so what it held is gone after a crash of the node whether it was synced or not; what a workload must keep goes on a volume, synced as usual. A running container's runtime files (its bundle, its monitor's config, records, log and sockets, runc's state) are in ` + "`state_dir`" + `, a tmpfs on a node (here the run's own tmpfs): nothing in them means anything after a reboot (a task of an earlier boot is released, and a running workload whose task the reboot took with the tmpfs ends as the reboot's: ` + "`TestRebootTakesTheStateDir`, `TestRunningTaskTheRebootTook`" + `); the writable layers stay on disk and those a reboot left without a task are removed at start-up. Recovery from a crash is checked by ` + "`TestChaosSIGKILL`, `TestChaosExitCodes`, `TestHostReboot`" + `.
- **Footprint**: VmRSS (and PSS from smaps_rollup) of the agent and of each per-workload monitor. Agent memory per workload is (RSS with the workloads running − RSS idle) / count: the Go heap grows in steps, so this is coarse. Monitor PSS splits the berth binary's shared text among the monitors mapping it; RSS counts it whole in each.
`

// rerender reads a latest.json and writes it and latest.md again, with the
// current notes on each target: the same data, current notes.
func rerender(path, out string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	rep := newReport()
	if err := json.Unmarshal(b, rep); err != nil {
		return err
	}
	rep.raw = rep.Raw
	for i, t := range rep.Targets {
		if l, ok := targetLimits[t.Name]; ok {
			rep.Targets[i].Limits = l
		}
	}
	return rep.write(out)
}

// targetLimits says what limits each target where it is missed, from what
// the runs on berth's build machines showed (2 shared cores, TCG).
var targetLimits = map[string]string{
	"agent idle RSS": "of the 48 MiB, 38 MiB are file-backed: the agent's binary (34 MB: libvirt bindings, CNI, CEL, go-containerregistry, " +
		"client_golang, the CLI) and its C libraries, which this kernel maps whole as they are touched (the 4.5 MB monitor binary is likewise " +
		"resident almost entirely); the Go heap and stacks are 10 MiB. Reaching 25 MiB needs an agent binary of a third of today's size. " +
		"PSS (in the results) splits the page cache the monitors share. " +
		"Measured per mapping on the AMD host (an idle agent, 44.8-46.4 MiB): the binary 20.5 MiB (text 9.3 of its 11.2 MB, read-only data 10.7 of 12.5 MB; " +
		"the same from a copy on a tmpfs mounted huge=never, so it is not the page cache's large folios: start-up runs the init code of 235 packages and " +
		"the agent's own set-up, spread over the text, and the kernel maps 64 KiB around each fault); the C libraries 14 MiB, all of them libvirt's " +
		"(libcrypto 2.9, libvirt 2.6, libc 1.6, gnutls 1.1, libstdc++ 0.9, glib 0.75 MiB and some twenty smaller ones); anonymous 9.7 MiB, of which the Go heap " +
		"in use is 3 MiB (the 80 MB it held while extracting the kernel and building the initramfs at the first start are returned to the kernel). " +
		"Package init costs 19 ms and 1.4 MB of allocations in all, 13 ms of it libvirt's. What the agent holds privately is the 9.7 MiB; " +
		"the rest is page cache the kernel can reclaim and other processes share.",
	"agent memory per running workload (containers)":                                  "measured as the RSS delta of a Go process from idle, which grows in heap steps and moves by several KiB from run to run (59 and 64.4 KiB in the two full runs on the Intel host, 77 KiB in the round before's full run on the AMD host, 63 KiB in this one). This round took two goroutines and most of a start's stack off each running container: one goroutine per monitor reads its ended pipe, records the end and then reaps it (the reaper and the reader were two); the drivers say when a task has ended (Driver.Ended), so the agent's supervisor selects on that instead of a goroutine parked in Wait; and a start runs on a goroutine that ends with it, so the stack its deep calls grow is not kept by the supervisor that waits out the run. A running container now holds two goroutines in the agent (its supervisor and its monitor's follower; TestRunningWorkloadCostsTheAgentOneGoroutine and TestRunningContainerCostsOneGoroutine count them). Measured with 100 sleeping containers on this host (agent runtime metrics, RSS, moments apart): goroutines 4 -> 2 a container, goroutine stacks 18.5 -> 11 KiB, RSS from idle 69 and 69 KiB (the round before's agent) -> 53 and 59 KiB (two goroutines fewer) -> 51 and 53 KiB (the start's stack too); the live heap a container is some 11 KiB (its record and clones, its events, the monitor's process and pipes). The delta from idle still spreads one-off costs over the containers (the JSON encoders' type cache, more OS threads after the burst of starts); at the margin, from 50 to 100 running, each container adds 26 KiB in this run (56 KiB in the round before's). Rounds before: a blocked OS thread per workload removed (109 -> 78 KiB), the GC target at 50% (78 -> 64 KiB).",
	"container submit→running, network none, within 1.15× runc create+start (median)": "The last full runs are on another host than the earlier rounds' (AMD EPYC, 2 cores, where runc run of the same bundle takes 106.7 ms against 40.7 ms on the round before's Intel Xeon: process creation, page faults and mounts cost about twice as much here), so absolute milliseconds are not comparable between the two hosts; ratios are. What berth adds to runc's work, from kernel traces of single starts (ftrace: exec, fork, exit, file and mount system calls, with markers from the client, on the Intel host): the request and the submit's commit about 1.3 ms (its two fdatasyncs overlap the driver's preparation), the driver's preparation 2.3 ms (the prepared layer taken, the range record, the id-mapped overlay, the bundle and the monitor's config), the monitor before runc 2.5-3 ms, and after runc about 1 ms. Of the monitor's share, 1.1 ms was creating the four log and index files in the data directory (on this machine's ext4 without a journal a new inode costs 0.2-0.4 ms under a start benchmark's churn): this round a stream's log and its time index are created by its first output, so a /bin/true creates none. The runtime files are in state_dir on a tmpfs, as on a node's /run (the baseline's runc --root is on the same tmpfs). The prepared monitors and layers are refilled at niceness 19. User namespaces: the second agent with them off measures 0-4 ms less a start. Full runs: 1.20x -> 1.19x -> 1.17x -> 1.10x (Intel host) -> 0.91x -> 0.77x (AMD host; the last with berth-entry, which installs the seccomp filter the agent compiled once where runc compiled the profile on every start, about 15 ms of runc's work here).",
	"container submit→running, bridge network, within 1.15× runc create+start + CNI ADD by hand (median)": "the network-none path above, plus berth's " +
		"crash-safe attach records around CNI ADD (an intent before, the result after, each written and renamed into place).",
	"client sees exited (/bin/true, network none) within runc run + 10 ms (median)":                                          "runc run is one runc process that creates, starts, waits and deletes; berth's monitor runs runc run --detach, then sees the end through its pidfd, records it and tells the agent over its pipe, the agent publishes exited, and the client's GET ?until=ended answers. This round berth stopped paying runc's compilation of the seccomp allowlist on every start (libseccomp and runc's patching, about 15 ms of runc's work a start here, the plain bundle's row): the agent compiles the profile into BPF once and berth-entry, a freestanding program of 10 KiB that runc starts as the container's process, installs it and executes the workload (the row through berth-entry: 77.5 ms, as fast as the plain bundle's 77.6 ms, against runc's own 97.2 ms). The baseline keeps runc's own seccomp, as the issue asks. Full runs: +10.5 ms on the Intel host (a runc run of 40.7 ms), +15.5 and +19.0 ms on the AMD host (runc runs of 106.7 and 110.6 ms), -1.8 ms in this one (97.2 ms).",
	"throughput, network none: 200 × /bin/true at concurrency 16, within 0.9× runc run, none failed":                         "CPU on 2 cores (perf over a run on the Intel host: runc and its init 60% of all CPU, the agent 14%, the monitors 9%, the load generator 4%). This round runc no longer compiles the seccomp allowlist for each of berth's containers (berth-entry installs the filter the agent compiled once), while the baseline's runc still does for its own: about 15 ms of CPU a start less on berth's side. What berth still adds per workload: a monitor process, three HTTP requests (submit, wait, delete) with their JSON and state commits (group commit), the writable layer's filesystem on a loop device (made ahead, but its making and release take the same CPU on a saturated node), the id-mapped overlay, and berth-entry's exec. Full runs: 0.64x -> 0.69x -> 0.73x -> 0.76x on the Intel host; 0.70x, 0.84x and 0.97x on the AMD host, and 0.84x in this one, whose round changed nothing on the container path (its changes are the VM boot's): on this host the ratio moves by that much from run to run.",
	"throughput, network bridge: 200 × /bin/true at concurrency 16, within 0.9× runc run + CNI ADD/DEL by hand, none failed": "the network-none costs above, plus berth's attach and detach records around the same CNI plugin executions; the CNI plugins themselves (four executions each way) dominate both sides. Full runs: 0.87x -> 0.88x -> 0.95x -> 0.88x on the Intel host, 0.97x and 0.96x on the AMD host: within this machine's noise of the target.",
	"10000 parked pollers of GET /v1/node all answered after a change (median of 3 rounds)":                                  "one encoding of the node document serves every poller woken at an index, and the woken pollers read the index and the cached encoding without a lock; each answer (about 2.6 KB) goes out in one write with its length. What is left is the kernel's and Go's per-connection work, profiled this round (perf over the agent during the bursts alone, on the AMD host): the agent takes two thirds of the CPU and the load generator one fifth; of the agent's, about a third is its socket writes (31 µs of CPU each here), 10-30% is goroutine stacks growing back on wake (runtime.morestack and copystack: the GC shrank the parked goroutines' stacks while they waited) and, in rounds where a collection falls into the burst, a third is the GC (markroot shrinking those stacks, assists). The GC runs about once per round because each round's 10,000 new connections allocate some 75 MB. GOGC=100 or GODEBUG=gcshrinkstackoff=1 for the agent did not move the figure beyond the run-to-run spread (0.9-1.4 s for three rounds each on this host); going much further needs no goroutine, no net/http response and no write per poller. Full runs: 277, 384 and 585 ms on the Intel host, 716, 1274, 1149 and 428 ms (this run) on the AMD host. The figure is bimodal on this host: pollers-only runs of this round's agent and the round before's, alternated, gave medians of 541-1528 ms and 561-1402 ms (seven each; both sets' medians 793 and 1269 ms), about 0.5-0.8 s when no collection falls into the burst and 1.3-1.5 s when one does; this round's changes touch no code on the pollers' path. The Go client's pollers (the row after) also decode each answer.",
	"placement dry-runs over HTTP on 2 cores": "the HTTP stack, not Decide: even GET /healthz on the same server stays far below 20,000 req/s here, " +
		"with the load generator sharing the 2 cores; Decide is ~1.4 µs of a several-ms request. JSON decoding, validation and encoding of the decision make the rest.",
	"VM submit→first output within 1.1× raw QEMU PVH boot of the same guest (median)":                             "a fixed cost of 300-900 ms on a boot of 3-3.5 s in most runs, almost all of it libvirt's: between QEMU's start and its `cont`, libvirt 9.0 reads the vCPU's features one QMP round trip at a time (398 qom-get commands, one per CPU feature property, unconditional on x86: 150-230 ms in libvirtd's debug log on the Intel host; the same 400 commands sent straight to a paused QEMU take 140-164 ms), besides its cgroups, namespace and security labels. The virsh create row measures it: 1.04-1.16x of the PVH baseline on the Intel host, 0.99x-1.52x on the AMD host; libvirt's share and the baseline move by hundreds of milliseconds from run to run on this host. This round's boot changes (qboot instead of SeaBIOS, an lz4 initramfs, no crc32c-intel under TCG) shorten the guest's boot for berth and for the PVH baseline alike, which boots berth's firmware, initramfs and devices by hand, so they leave the ratio's fixed cost as it was and make it a larger share of a shorter boot. berth's own path (submit, commits, overlay and config disk, monitor spawn, the log follower woken by inotify) adds 0-200 ms to virsh create's in most runs (+403 ms in this one). Full runs: 1.31x, 1.21x, 1.15x on the Intel host; 1.26x, 1.30x, 1.03x and 1.19x (this run: berth 3.8 s, the PVH baseline 3.2 s) on the AMD host; a VM-start-only run of the same code right after this one: 1.05x (berth 3106 ms, PVH baseline 2958 ms, virsh create 2961 ms).",
	"VM submit→first output within 0.6× raw QEMU of the node's bzImage with a minimal busybox initramfs (median)": "the guest kernel's own boot to init (about 2 s under TCG: ACPI and PCI enumeration, alternatives patching) is the floor; on top of it berth-init loads its modules (virtio, ext4: about half a second under TCG), mounts the root disk and starts the workload, and berth adds libvirt's set-up (see the row above). This round took out of every boot what berth's guests never needed: SeaBIOS's POST (qboot hands over to the kernel: 2.66 -> 2.38 s for raw QEMU of berth's devices and a busybox init, 8 interleaved pairs), the inflating of a gzip initramfs on the guest's one vCPU (lz4 instead: 2.48 -> 2.16 s for an archive of berth's init and modules, 8 interleaved triples; uncompressed 2.17 s), and loading crc32c-intel on a CPU that refuses it (about 40 ms of guest time under TCG). Before them: met in the Intel host's runs (0.54x-0.58x); on the AMD host 0.79x, 0.76x, 0.69x (the fixed baseline booting in 5.6-5.8 s there). After: 0.57x in this run (berth 3.8 s; the fixed baseline 6.7 s, slower than in the earlier runs on this host: against their 5.6-5.8 s berth's 3.8 s would be 0.65-0.68x) and 0.48x in a VM-start-only run right after it (berth 3.1 s, fixed baseline 6.4 s). What is left is the kernel's own boot to init (1.6-2.0 s of guest time: ACPI, PCI, alternatives patching, the W+X page-table check of Debian's CONFIG_DEBUG_WX) and berth-init's modules (ext4 alone 130-290 ms: relocating and checking a 2 MB module under TCG).",
	"QEMU RSS of an idle busybox VM": "under TCG, of about 220 MiB: guest RAM the guest touched, some 105 MiB (the kernel image alone is 59 MiB, then slab, " +
		"the unpacked initramfs, module memory and the root disk's page cache); the kernel file QEMU maps to load it through PVH, 36 MiB of page cache " +
		"shared by every VM (PSS splits it); TCG's translation cache, capped at 32 MiB; QEMU's own binary, libraries and heap, some 45 MiB. " +
		"Free page reporting (virtio-balloon) returned nothing measurable: what an idle guest has touched it still uses. " +
		"In the guest of an idle busybox VM (measured this round): MemTotal 306 MiB of 352, MemFree 259 MiB; slab 19 MiB, shmem 7 MiB (the initramfs), page cache 9 MiB. " +
		"The guest's part cannot go below the kernel's own image, which is loaded whole and zeroed where the file has no data (its last segment, init data, bss and brk, is 25 MiB of the 59), and QEMU keeps the kernel file mapped after the boot; " +
		"128 MiB under TCG would need a kernel built for guests, not the node's distribution kernel. " +
		"Measured per mapping on the AMD host (an idle busybox VM, 222-226 MiB): what is there before the guest allocates anything adds up past the target: " +
		"QEMU's binary and libraries about 20 MiB, its heap and threads about 24 MiB, the translation cache 32 MiB, the kernel file mapped 35 MiB and the kernel image " +
		"in guest RAM 58 MiB (text and read-only data 26, data 6, and the last segment's 25.5, of which bss alone is 17 MiB, cleared by the kernel itself at entry), " +
		"about 169 MiB. Tried and measured, not kept: guest RAM in small pages (memfd) instead of THP, 103.5 against 106.5 MiB; virtio-balloon with free page " +
		"reporting and virtio_balloon loaded, no change (225.2 against 226.1 MiB): what the guest frees after its boot (initrd 2.8 MiB, init sections and gaps 8 MiB) " +
		"lies in blocks below the 2 MiB reporting order; a 16 MiB translation cache, 204 MiB with boots within the noise (3.4-4.0 s against 3.2-4.1 s), " +
		"an 8 MiB one, 195 MiB with boots 1.5-2.5 s slower: a smaller cache trades a TCG workload's speed for memory, and even 8 MiB leaves the target far off.",
}
