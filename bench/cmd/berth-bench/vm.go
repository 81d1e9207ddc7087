package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

const libvirtURI = "qemu:///system"

// vmSpec is a bench VM workload: one vCPU, 128 MiB for the workload
// (plus the driver's guest overhead), no network: the baselines boot the
// same guest (berth's config disk) without a NIC, so boot to first output
// is compared like for like.
func vmSpec(command ...string) api.WorkloadSpec {
	return api.WorkloadSpec{
		Image:     benchImage,
		Command:   command,
		Network:   api.NetworkNone,
		Isolation: api.IsolationVM,
		Resources: api.Resources{CPU: 1, MemoryMB: 128},
		Labels:    map[string]string{"berth-bench": "1"},
	}
}

// vmCapture is what the harness takes from one of berth's VMs to boot the
// same guest without berth: its domain XML, its config disk, and the base
// image under its root overlay.
type vmCapture struct {
	xml    string
	dom    *libvirtxml.Domain
	config string // copy of the task's config.img
	base   string // the image's ext4 base (raw)
}

func virsh(ctx context.Context, args ...string) ([]byte, error) {
	out, err := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", libvirtURI}, args...)...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return out, nil
}

// captureVM polls for the domain of workload id and copies what the
// baselines need while it runs.
func captureVM(ctx context.Context, dataDir, id, into string) (*vmCapture, error) {
	name := "berth-" + id
	taskDir := filepath.Join(dataDir, "vms", "tasks", id)
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		out, err := virsh(ctx, "dumpxml", "--inactive", name)
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		c := &vmCapture{xml: string(out), dom: &libvirtxml.Domain{}}
		if err := c.dom.Unmarshal(c.xml); err != nil {
			return nil, fmt.Errorf("parse domain XML: %w", err)
		}
		cfg, err := os.ReadFile(filepath.Join(taskDir, "config.img"))
		if err != nil {
			return nil, fmt.Errorf("copy config disk: %w", err)
		}
		c.config = filepath.Join(into, "config.img")
		if err := os.WriteFile(c.config, cfg, 0o644); err != nil {
			return nil, err
		}
		info, err := exec.CommandContext(ctx, "qemu-img", "info", "-U", "--output=json", filepath.Join(taskDir, "root.qcow2")).Output()
		if err != nil {
			return nil, fmt.Errorf("qemu-img info of berth's overlay: %w", err)
		}
		var ii struct {
			Backing     string `json:"backing-filename"`
			FullBacking string `json:"full-backing-filename"`
		}
		if err := json.Unmarshal(info, &ii); err != nil {
			return nil, err
		}
		c.base = ii.FullBacking
		if c.base == "" {
			c.base = ii.Backing
		}
		if c.base == "" {
			return nil, errors.New("berth's root overlay has no backing file")
		}
		return c, nil
	}
	return nil, fmt.Errorf("domain %s never appeared", name)
}

// vmCommand prints one line and stays up, so the VM can also be measured
// running; berth's VMs and the baselines boot the same config disk.
var vmCommand = []string{"sh", "-c", "echo hi; exec sleep 600"}

// berthVM submits vmCommand in a VM and times submit → the first line of
// its output as the API's log follower returns it. capture, if set, is
// called with the workload's id while it boots; whileUp, if set, after the
// first line and before the VM is deleted.
func berthVM(ctx context.Context, a *agentProc, capture, whileUp func(id string)) (time.Duration, error) {
	t0 := time.Now()
	w, err := a.c.Submit(ctx, vmSpec(vmCommand...))
	if err != nil {
		return 0, err
	}
	defer a.c.Delete(context.WithoutCancel(ctx), w.ID, true)
	var wg sync.WaitGroup
	if capture != nil {
		wg.Add(1)
		go func() { defer wg.Done(); capture(w.ID) }()
	}
	defer wg.Wait()
	lctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var got time.Duration
	errFirst := errors.New("first line")
	err = a.c.Logs(lctx, w.ID, api.LogOptions{Follow: true, Tail: -1, Stream: "stdout"}, func(l api.LogLine) error {
		got = time.Since(t0)
		if l.Line != "hi" {
			return fmt.Errorf("first line %q, want hi", l.Line)
		}
		return errFirst
	})
	if !errors.Is(err, errFirst) {
		if err == nil {
			fw, _, _ := a.c.Get(ctx, w.ID, nil)
			if fw != nil {
				return 0, fmt.Errorf("VM workload %s ended %s without output: %s", w.ID, fw.State, fw.Error)
			}
			err = errors.New("no output")
		}
		return 0, err
	}
	if whileUp != nil {
		whileUp(w.ID)
	}
	return got, nil
}

// machineCgroup makes a cpu cgroup for the hand-started QEMU next to
// libvirt's (under /machine, where libvirt puts every QEMU it starts), so
// under CPU contention it competes for the same share as libvirt's guests
// instead of as a root-level task. Empty when there is no such hierarchy.
func machineCgroup(runID string) string {
	parent := "/sys/fs/cgroup/cpu/machine"
	if _, err := os.Stat(parent); err != nil {
		return ""
	}
	dir := filepath.Join(parent, "berthbench-"+runID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return ""
	}
	return dir
}

// qemuDirect boots the captured guest with qemu-system-x86_64 by hand:
// the same kernel, initramfs, command line, machine, CPU model, memory,
// disk caching and virtio-serial ports (as plain files), timed from exec
// to the first stdout byte.
func qemuDirect(ctx context.Context, c *vmCapture, dir, cgroup string) (time.Duration, error) {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	p := func(n string) string { return filepath.Join(dir, n) }
	opt := func(s string) string { return strings.ReplaceAll(s, ",", ",,") }
	if err := rootdisk.Overlay(ctx, c.base, p("root.qcow2")); err != nil {
		return 0, err
	}
	d := c.dom
	memKiB := uint(0)
	if d.Memory != nil {
		memKiB = d.Memory.Value
		switch strings.ToLower(d.Memory.Unit) {
		case "", "kib", "k":
		case "mib", "m":
			memKiB *= 1024
		case "gib", "g":
			memKiB *= 1 << 20
		}
	}
	vcpus := uint(1)
	if d.VCPU != nil && d.VCPU.Value > 0 {
		vcpus = d.VCPU.Value
	}
	accel, cpu := "tcg", "qemu64"
	if d.Type == "kvm" {
		accel, cpu = "kvm", "host"
	}
	args := []string{
		"-machine", "q35", "-accel", accel, "-cpu", cpu, "-smp", fmt.Sprint(vcpus), "-m", fmt.Sprintf("%dk", memKiB),
		"-nodefaults", "-nographic", "-no-reboot",
		"-kernel", d.OS.Kernel, "-initrd", d.OS.Initrd, "-append", d.OS.Cmdline,
		"-chardev", "file,id=console,path=" + opt(p("console.log")), "-serial", "chardev:console",
		"-device", "virtio-serial-pci,id=vser0",
		"-drive", "if=none,id=root,format=qcow2,cache=none,aio=native,discard=unmap,file=" + opt(p("root.qcow2")),
		"-device", "virtio-blk-pci,drive=root,serial=" + guest.RootDiskSerial,
		"-drive", "if=none,id=config,format=raw,readonly=on,file=" + opt(c.config),
		"-device", "virtio-blk-pci,drive=config,serial=" + guest.ConfigDiskSerial,
	}
	for i, port := range []string{guest.StdoutPort, guest.StderrPort, guest.StatusPort} {
		id := fmt.Sprintf("port%d", i)
		args = append(args,
			"-chardev", fmt.Sprintf("file,id=%s,path=%s", id, opt(p(port))),
			"-device", fmt.Sprintf("virtserialport,bus=vser0.0,chardev=%s,name=%s", id, port))
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	if cgroup != "" {
		_ = os.WriteFile(filepath.Join(cgroup, "cgroup.procs"), []byte(fmt.Sprint(cmd.Process.Pid)), 0)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() { _ = cmd.Process.Kill(); <-exited }()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if fi, err := os.Stat(p(guest.StdoutPort)); err == nil && fi.Size() > 0 {
			return time.Since(t0), nil
		}
		select {
		case <-exited:
			return 0, fmt.Errorf("qemu exited without output: %s; console: %s", stderr.String(), tailFile(p("console.log"), 500))
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("qemu: no output after 3m; console: %s", tailFile(p("console.log"), 500))
		}
	}
}

// virshCreate boots the captured domain XML, renamed and pointed at fresh
// disks and sockets of its own, with `virsh create`, timed from exec to
// the first byte on the stdout port.
func virshCreate(ctx context.Context, c *vmCapture, dir, name string) (time.Duration, error) {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	p := func(n string) string { return filepath.Join(dir, n) }
	if err := rootdisk.Overlay(ctx, c.base, p("root.qcow2")); err != nil {
		return 0, err
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(c.xml); err != nil {
		return 0, err
	}
	d.Name, d.UUID, d.Metadata, d.ID = name, "", nil, nil
	socks := map[string]string{}
	for i := range d.Devices.Disks {
		disk := &d.Devices.Disks[i]
		if disk.Source == nil || disk.Source.File == nil {
			continue
		}
		switch disk.Serial {
		case guest.RootDiskSerial:
			disk.Source.File.File = p("root.qcow2")
			disk.BackingStore = nil
		case guest.ConfigDiskSerial:
			disk.Source.File.File = c.config
		}
	}
	for i := range d.Devices.Channels {
		ch := &d.Devices.Channels[i]
		if ch.Source != nil && ch.Source.UNIX != nil && ch.Target != nil && ch.Target.VirtIO != nil {
			path := p(ch.Target.VirtIO.Name + ".sock")
			ch.Source.UNIX.Path = path
			socks[ch.Target.VirtIO.Name] = path
		}
	}
	for i := range d.Devices.Serials {
		if s := d.Devices.Serials[i].Source; s != nil && s.File != nil {
			s.File.Path = p("console.log")
		}
	}
	for i := range d.Devices.Consoles {
		if s := d.Devices.Consoles[i].Source; s != nil && s.File != nil {
			s.File.Path = p("console.log")
		}
	}
	if socks[guest.StdoutPort] == "" {
		return 0, errors.New("captured domain has no stdout channel")
	}
	x, err := d.Marshal()
	if err != nil {
		return 0, err
	}
	if err := os.WriteFile(p("domain.xml"), []byte(x), 0o644); err != nil {
		return 0, err
	}
	defer func() { _, _ = virsh(context.Background(), "destroy", name) }()

	first := make(chan error, 1)
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	t0 := time.Now()
	if _, err := virsh(ctx, "create", p("domain.xml")); err != nil {
		return 0, err
	}
	// Connect to every port, as berth's monitor does: a port nobody
	// listens on holds the guest's writes.
	for port, path := range socks {
		go func() {
			var conn net.Conn
			var err error
			for lctx.Err() == nil {
				if conn, err = net.Dial("unix", path); err == nil {
					break
				}
				time.Sleep(2 * time.Millisecond)
			}
			if conn == nil {
				return
			}
			defer conn.Close()
			go func() { <-lctx.Done(); conn.Close() }()
			buf := make([]byte, 4096)
			for {
				n, err := conn.Read(buf)
				if n > 0 && port == guest.StdoutPort {
					select {
					case first <- nil:
					default:
					}
				}
				if err != nil {
					if port == guest.StdoutPort && !errors.Is(err, io.EOF) && lctx.Err() == nil {
						select {
						case first <- err:
						default:
						}
					}
					return
				}
			}
		}()
	}
	select {
	case err := <-first:
		if err != nil {
			return 0, err
		}
		return time.Since(t0), nil
	case <-time.After(3 * time.Minute):
		return 0, fmt.Errorf("virsh create: no output after 3m; console: %s", tailFile(p("console.log"), 500))
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// vmStart is measurement 3: berth's VM start to first output against a
// hand-started QEMU and `virsh create` of berth's own domain XML, n of
// each, interleaved. A first, unmeasured berth VM warms the caches
// (initramfs, base image) and lends the baselines its domain XML.
//
// With footprint set, the warm-up VM is also measured for the footprint
// (quick runs boot no extra VMs for it).
func vmStart(ctx context.Context, a *agentProc, n int, budget time.Duration, work, runID string, footprint bool, rep *Report) error {
	phaseStart := time.Now()
	if err := os.MkdirAll(work, 0o711); err != nil {
		return err
	}
	var (
		cap    *vmCapture
		capErr error
		fpErr  error
	)
	before, _ := readMem(a.pid())
	var whileUp func(string)
	if footprint {
		whileUp = func(id string) { fpErr = measureVMs(a, []string{id}, before, rep) }
	}
	if _, err := berthVM(ctx, a, func(id string) { cap, capErr = captureVM(ctx, a.dataDir, id, work) }, whileUp); err != nil {
		return fmt.Errorf("warm-up VM: %w", err)
	}
	if capErr != nil {
		return fmt.Errorf("capture berth's domain: %w", capErr)
	}
	if fpErr != nil {
		rep.errorf("VM footprint: %v", fpErr)
	}
	rep.VMAccel = map[string]string{"qemu": "tcg", "kvm": "kvm"}[cap.dom.Type]
	var bt, qt, vt []float64
	cg := machineCgroup(runID)
	defer removeCgroups(strings.TrimPrefix(cg, "/sys/fs/cgroup/cpu"))
	for i := 0; i < n; i++ {
		if i > 0 && time.Since(phaseStart) > budget {
			rep.errorf("VM start: stopped after %d of %d rounds: the %s budget was spent (machine under load)", i, n, budget)
			break
		}
		d, err := berthVM(ctx, a, nil, nil)
		if err != nil {
			return fmt.Errorf("berth VM #%d: %w", i, err)
		}
		bt = append(bt, ms(d))
		d, err = qemuDirect(ctx, cap, filepath.Join(work, fmt.Sprintf("qemu%d", i)), cg)
		if err != nil {
			return fmt.Errorf("qemu direct boot #%d: %w", i, err)
		}
		qt = append(qt, ms(d))
		d, err = virshCreate(ctx, cap, filepath.Join(work, fmt.Sprintf("virsh%d", i)), fmt.Sprintf("berthbench-%s-%d", runID, i))
		if err != nil {
			return fmt.Errorf("virsh create #%d: %w", i, err)
		}
		vt = append(vt, ms(d))
	}
	sec := fmt.Sprintf("VM start (echo hi, %s, submit → first output)", strings.ToUpper(rep.VMAccel))
	q, v, b := summarize(qt), summarize(vt), summarize(bt)
	rep.add(Result{Section: sec, Name: "baseline: qemu-system-x86_64 direct boot (exec → first stdout byte)", Unit: "ms", Summary: &q})
	rep.add(Result{Section: sec, Name: "baseline: virsh create of berth's domain XML (exec → first stdout byte)", Unit: "ms", Summary: &v,
		Baseline: "qemu direct", Ratio: ratio(v.Median, q.Median)})
	rep.add(Result{Section: sec, Name: "berth submit → first stdout line (API log follow)", Unit: "ms", Summary: &b,
		Baseline: "qemu direct", Ratio: ratio(b.Median, q.Median),
		Note: fmt.Sprintf("×%.2f of virsh create; %+.0f ms over qemu direct", ratio(b.Median, v.Median), b.Median-q.Median)})
	r := ratio(b.Median, q.Median)
	rep.target(Target{
		Name: "VM submit→first output within 1.2× raw qemu direct boot (median)", Goal: "≤ 1.20×",
		Measured: fmt.Sprintf("%.2f× (berth %.0f ms, qemu %.0f ms, %s)", r, b.Median, q.Median, strings.ToUpper(rep.VMAccel)),
		Met:      r <= 1.2, By: fmt.Sprintf("%+.2f×", r-1.2),
	})
	rep.raw["vm_start"] = map[string]any{"berth_ms": bt, "qemu_direct_ms": qt, "virsh_create_ms": vt}
	return nil
}

// vmFootprint is measurement 6 for VMs: k VMs booted and running, their
// monitors' and QEMUs' memory and the agent's RSS delta.
func vmFootprint(ctx context.Context, a *agentProc, k int, rep *Report) error {
	before, err := readMem(a.pid())
	if err != nil {
		return err
	}
	ids := make([]string, k)
	defer deleteAll(ctx, a, ids, k)
	for i := range ids {
		w, err := a.c.Submit(ctx, vmSpec(vmCommand...))
		if err != nil {
			return err
		}
		ids[i] = w.ID
	}
	errUp := errors.New("up")
	for _, id := range ids {
		lctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		err := a.c.Logs(lctx, id, api.LogOptions{Follow: true, Tail: -1, Stream: "stdout"}, func(api.LogLine) error { return errUp })
		cancel()
		if !errors.Is(err, errUp) {
			return fmt.Errorf("VM %s never printed: %v", id, err)
		}
	}
	return measureVMs(a, ids, before, rep)
}

// measureVMs reads the memory of running, booted VMs' monitors and QEMUs
// and the agent's growth since before.
func measureVMs(a *agentProc, ids []string, before procMem, rep *Report) error {
	k := len(ids)
	time.Sleep(2 * time.Second)
	busy, err := readMem(a.pid())
	if err != nil {
		return err
	}
	var monRSS, monPSS, qemuRSS, qemuPSS []float64
	for _, id := range ids {
		dir := filepath.Join(a.dataDir, "vms", "tasks", id)
		if pid := jsonPid(filepath.Join(dir, "monitor.pid"), "pid"); pid > 0 {
			if m, err := readMem(pid); err == nil {
				monRSS, monPSS = append(monRSS, float64(m.RSS)), append(monPSS, float64(m.PSS))
			}
		}
		if pid := jsonPid(filepath.Join(dir, "task.json"), "qemu"); pid > 0 {
			if m, err := readMem(pid); err == nil {
				qemuRSS, qemuPSS = append(qemuRSS, float64(m.RSS)), append(qemuPSS, float64(m.PSS))
			}
		}
	}
	sec := "Footprint"
	delta := float64(busy.RSS-before.RSS) / float64(k)
	mr, mp, qr := summarize(monRSS), summarize(monPSS), summarize(qemuRSS)
	rep.add(Result{Section: sec, Name: fmt.Sprintf("agent memory per running VM ((RSS with %d VMs − before) / %d)", k, k), Unit: "KiB", Value: delta,
		Note: "few VMs: within the Go heap's noise"})
	rep.add(Result{Section: sec, Name: "VM monitor process RSS", Unit: "KiB", Summary: &mr})
	rep.add(Result{Section: sec, Name: "VM monitor process PSS", Unit: "KiB", Summary: &mp})
	rep.add(Result{Section: sec, Name: "QEMU process RSS per VM (guest RAM touched + QEMU)", Unit: "MiB", Summary: scaleSummary(qr, 1.0/1024),
		Note: "not berth's overhead: the VM itself"})
	rep.add(Result{Section: sec, Name: "per-VM overhead (monitor PSS + agent delta)", Unit: "KiB", Value: mp.Median + delta})
	return nil
}

func scaleSummary(s Summary, f float64) *Summary {
	return &Summary{N: s.N, Median: s.Median * f, P95: s.P95 * f, Min: s.Min * f, Max: s.Max * f, Mean: s.Mean * f}
}

// jsonPid reads {"key": {"pid": N}} or {"pid": N} from a JSON file.
func jsonPid(path, key string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		return 0
	}
	raw := m[key]
	if key != "pid" {
		var inner map[string]json.RawMessage
		if json.Unmarshal(raw, &inner) != nil {
			return 0
		}
		raw = inner["pid"]
	}
	var pid int
	_ = json.Unmarshal(raw, &pid)
	return pid
}
