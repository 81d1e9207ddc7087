package main

import (
	"bytes"
	"compress/gzip"
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
	"github.com/berthd/berth/vmdriver/initramfs"
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
	d, _, err := berthVMSplit(ctx, a, capture, whileUp)
	return d, err
}

// vmSplit is where the time of one berth VM start went: the submit's
// answer, and the first byte the task's monitor wrote to its stdout log
// (what the API's log follower then reads), both from before the submit.
type vmSplit struct {
	submitted, logged time.Duration
}

// berthVMSplit is berthVM that also says where the time went.
func berthVMSplit(ctx context.Context, a *agentProc, capture, whileUp func(id string)) (time.Duration, vmSplit, error) {
	var split vmSplit
	t0 := time.Now()
	w, err := a.c.Submit(ctx, vmSpec(vmCommand...))
	if err != nil {
		return 0, split, err
	}
	split.submitted = time.Since(t0)
	defer a.c.Delete(context.WithoutCancel(ctx), w.ID, true)
	var wg sync.WaitGroup
	if capture != nil {
		wg.Add(1)
		go func() { defer wg.Done(); capture(w.ID) }()
	}
	defer wg.Wait()
	logCtx, stopLog := context.WithCancel(ctx)
	defer stopLog()
	logged := make(chan time.Duration, 1)
	go func() {
		stdout := filepath.Join(a.dataDir, "logs", w.ID, "stdout.log")
		for logCtx.Err() == nil {
			if fi, err := os.Stat(stdout); err == nil && fi.Size() > 0 {
				logged <- time.Since(t0)
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
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
				return 0, split, fmt.Errorf("VM workload %s ended %s without output: %s", w.ID, fw.State, fw.Error)
			}
			err = errors.New("no output")
		}
		return 0, split, err
	}
	select {
	case split.logged = <-logged:
	case <-time.After(time.Second):
	}
	if whileUp != nil {
		whileUp(w.ID)
	}
	return got, split, nil
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
// kernel (berth's own when empty) with the same firmware (qboot where
// berth's domain names it), initramfs, command line,
// machine, CPU model, memory, devices (every one on the root bus, as
// berth places them), disk caching and virtio-serial ports (as plain
// files), timed from exec to the first stdout byte.
func qemuDirect(ctx context.Context, c *vmCapture, kernel, dir, cgroup string) (time.Duration, error) {
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
	} else if f := d.Features; f != nil && f.TCG != nil && f.TCG.TBCache != nil && strings.EqualFold(f.TCG.TBCache.Unit, "MiB") {
		accel += fmt.Sprintf(",tb-size=%d", f.TCG.TBCache.Size) // berth's translation cache
	}
	if kernel == "" {
		kernel = d.OS.Kernel
	}
	machine := "q35"
	if f := d.Features; f != nil {
		if f.SMM != nil && f.SMM.State == "off" {
			machine += ",smm=off"
		}
		if f.VMPort != nil && f.VMPort.State == "off" {
			machine += ",vmport=off"
		}
	}
	// QEMU puts devices without an address on the root bus, as berth's
	// domain does.
	args := []string{
		"-machine", machine, "-accel", accel, "-cpu", cpu, "-smp", fmt.Sprint(vcpus), "-m", fmt.Sprintf("%dk", memKiB),
		"-nodefaults", "-nographic", "-no-reboot",
		"-kernel", kernel, "-initrd", d.OS.Initrd, "-append", d.OS.Cmdline,
	}
	if l := d.OS.Loader; l != nil && l.Type == "rom" && l.Path != "" {
		args = append(args, "-bios", l.Path) // berth's firmware (qboot); else QEMU's SeaBIOS, as berth's
	}
	args = append(args,
		"-chardev", "file,id=console,path="+opt(p("console.log")), "-serial", "chardev:console",
		"-device", "virtio-serial-pci,id=vser0",
		"-drive", "if=none,id=root,format=qcow2,cache=none,aio=native,discard=unmap,file="+opt(p("root.qcow2")),
		"-device", "virtio-blk-pci,drive=root,serial="+guest.RootDiskSerial,
		"-drive", "if=none,id=config,format=raw,readonly=on,file="+opt(c.config),
		"-device", "virtio-blk-pci,drive=config,serial="+guest.ConfigDiskSerial,
	)
	// Every virtio-serial port of berth's domain (output, status, exec,
	// whatever berth-init waits for), each as a plain file.
	var ports []string
	if d.Devices != nil {
		for _, ch := range d.Devices.Channels {
			if ch.Target != nil && ch.Target.VirtIO != nil && ch.Target.VirtIO.Name != "" {
				ports = append(ports, ch.Target.VirtIO.Name)
			}
		}
	}
	if len(ports) == 0 {
		ports = []string{guest.StdoutPort, guest.StderrPort, guest.StatusPort}
	}
	for i, port := range ports {
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

// fixedBaseline is the row that does not move with berth: the node's
// kernel as shipped (its bzImage, through the firmware) with the smallest
// init, a busybox script that prints a line and powers off, on the
// machine, CPU model and memory of the bench's VM today and no devices
// but the serial console.
const (
	fixedCmdline = "console=ttyS0 panic=-1 quiet"
	fixedMemory  = "224M" // vmSpec's 128 MiB and the driver's 96 MiB guest overhead, as of issue 17
	fixedMarker  = "berth-bench: init reached"
)

// busyboxInitramfs writes a newc initramfs holding the host's static
// busybox and an /init script that prints fixedMarker and powers off.
func busyboxInitramfs(path string) error {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("read /bin/busybox (install busybox-static): %w", err)
	}
	var buf bytes.Buffer
	ino := 0
	entry := func(name string, mode uint32, data []byte) {
		ino++
		fmt.Fprintf(&buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		buf.WriteString(name + "\x00")
		for buf.Len()%4 != 0 {
			buf.WriteByte(0)
		}
		buf.Write(data)
		for buf.Len()%4 != 0 {
			buf.WriteByte(0)
		}
	}
	entry("bin", 0o40755, nil)
	entry("dev", 0o40755, nil)
	entry("bin/busybox", 0o100755, bb)
	entry("init", 0o100755, []byte("#!/bin/busybox sh\n/bin/busybox echo '"+fixedMarker+"'\n/bin/busybox poweroff -f\n"))
	entry("TRAILER!!!", 0, nil)
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	zw := gzip.NewWriter(f)
	if _, err := zw.Write(buf.Bytes()); err != nil {
		f.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// qemuFixed boots kernel with the busybox initramfs, timed from exec to
// the marker line on the serial console.
func qemuFixed(ctx context.Context, kernel, initrd, dir, cgroup string) (time.Duration, error) {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	console := filepath.Join(dir, "console.log")
	args := []string{
		"-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-m", fixedMemory,
		"-nodefaults", "-nographic", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", fixedCmdline,
		"-chardev", "file,id=console,path=" + strings.ReplaceAll(console, ",", ",,"), "-serial", "chardev:console",
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
		if b, err := os.ReadFile(console); err == nil && bytes.Contains(b, []byte(fixedMarker)) {
			return time.Since(t0), nil
		}
		select {
		case <-exited:
			if b, err := os.ReadFile(console); err == nil && bytes.Contains(b, []byte(fixedMarker)) {
				return time.Since(t0), nil
			}
			return 0, fmt.Errorf("qemu exited without the marker: %s; console: %s", stderr.String(), tailFile(console, 500))
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("qemu: no marker after 3m; console: %s", tailFile(console, 500))
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

// vmStart is measurement 3: berth's VM start to first output against
// raw QEMU boots of the same guest and `virsh create` of berth's own domain
// XML, n of each, interleaved. A first, unmeasured berth VM warms the
// caches (kernel extraction, initramfs, base image) and lends the
// baselines its domain XML. The raw QEMU baselines boot berth's initramfs
// and devices with the node's kernel twice, extracted (vmlinux through its
// PVH entry point, the bench extracting it as berth does) and as shipped
// (the bzImage through the firmware), and, as a fixed reference, the
// bzImage with the smallest busybox init.
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

	node, err := initramfs.FindKernel("/boot", "/lib/modules")
	if err != nil {
		return fmt.Errorf("the node's kernel: %w", err)
	}
	vmlinux, err := initramfs.ExtractVmlinux(ctx, node.Path, filepath.Join(work, "kernel"))
	if err != nil {
		return fmt.Errorf("extract the node's kernel for the PVH baseline: %w", err)
	}
	bbInitrd := filepath.Join(work, "busybox.cpio.gz")
	if err := busyboxInitramfs(bbInitrd); err != nil {
		return err
	}
	// Node status says how until the agent's next fingerprint after the
	// kernel was first prepared; the domain says it at once.
	berthBoot, _ := vmBoot(ctx, a)
	if berthBoot != "pvh" && berthBoot != "bzimage" {
		berthBoot = "pvh"
		if cap.dom.OS != nil && cap.dom.OS.Kernel == node.Path {
			berthBoot = "bzimage"
		}
	}

	var bt, pt, zt, ft, vt, st, lt []float64
	cg := machineCgroup(runID)
	defer removeCgroups(strings.TrimPrefix(cg, "/sys/fs/cgroup/cpu"))
	for i := 0; i < n; i++ {
		if i > 0 && time.Since(phaseStart) > budget {
			rep.errorf("VM start: stopped after %d of %d rounds: the %s budget was spent (machine under load)", i, n, budget)
			break
		}
		d, split, err := berthVMSplit(ctx, a, nil, nil)
		if err != nil {
			return fmt.Errorf("berth VM #%d: %w", i, err)
		}
		bt, st = append(bt, ms(d)), append(st, ms(split.submitted))
		if split.logged > 0 {
			lt = append(lt, ms(split.logged))
		}
		d, err = qemuDirect(ctx, cap, vmlinux.Path, filepath.Join(work, fmt.Sprintf("pvh%d", i)), cg)
		if err != nil {
			return fmt.Errorf("qemu PVH boot #%d: %w", i, err)
		}
		pt = append(pt, ms(d))
		d, err = qemuDirect(ctx, cap, node.Path, filepath.Join(work, fmt.Sprintf("bz%d", i)), cg)
		if err != nil {
			return fmt.Errorf("qemu bzImage boot #%d: %w", i, err)
		}
		zt = append(zt, ms(d))
		d, err = qemuFixed(ctx, node.Path, bbInitrd, filepath.Join(work, fmt.Sprintf("fixed%d", i)), cg)
		if err != nil {
			return fmt.Errorf("qemu busybox boot #%d: %w", i, err)
		}
		ft = append(ft, ms(d))
		d, err = virshCreate(ctx, cap, filepath.Join(work, fmt.Sprintf("virsh%d", i)), fmt.Sprintf("berthbench-%s-%d", runID, i))
		if err != nil {
			return fmt.Errorf("virsh create #%d: %w", i, err)
		}
		vt = append(vt, ms(d))
	}
	accel := strings.ToUpper(rep.VMAccel)
	sec := fmt.Sprintf("VM start (echo hi, %s, berth boots %s, submit → first output)", accel, berthBoot)
	p, z, f, v, b := summarize(pt), summarize(zt), summarize(ft), summarize(vt), summarize(bt)
	rep.add(Result{Section: sec, Name: "fixed baseline: qemu-system-x86_64, the node's bzImage as shipped, minimal busybox initramfs (exec → first console line)", Unit: "ms", Summary: &f,
		Note: fmt.Sprintf("%s, %s, no devices but the serial console; %q", fixedMemory, "q35 qemu64", fixedCmdline)})
	rep.add(Result{Section: sec, Name: "baseline: qemu-system-x86_64, the node's bzImage, berth's initramfs, command line and devices (exec → first stdout byte)", Unit: "ms", Summary: &z,
		Baseline: "fixed baseline", Ratio: ratio(z.Median, f.Median), Note: "the bzImage through berth's firmware, decompressed by the guest"})
	rep.add(Result{Section: sec, Name: "PVH baseline: qemu-system-x86_64, the extracted vmlinux through its PVH entry point, berth's initramfs, command line and devices (exec → first stdout byte)", Unit: "ms", Summary: &p,
		Baseline: "fixed baseline", Ratio: ratio(p.Median, f.Median), Note: fmt.Sprintf("×%.2f of the bzImage boot with the same initramfs", ratio(p.Median, z.Median))})
	rep.add(Result{Section: sec, Name: "baseline: virsh create of berth's domain XML (exec → first stdout byte)", Unit: "ms", Summary: &v,
		Baseline: "PVH baseline", Ratio: ratio(v.Median, p.Median)})
	rep.add(Result{Section: sec, Name: "berth submit → first stdout line (API log follow)", Unit: "ms", Summary: &b,
		Baseline: "PVH baseline", Ratio: ratio(b.Median, p.Median),
		Note: fmt.Sprintf("boot %s; ×%.2f of the fixed baseline; ×%.2f of virsh create; %+.0f ms over the PVH baseline", berthBoot, ratio(b.Median, f.Median), ratio(b.Median, v.Median), b.Median-p.Median)})
	sm, lm := summarize(st), summarize(lt)
	rep.add(Result{Section: sec, Name: "berth: submit → its answer (part of the row above)", Unit: "ms", Summary: &sm})
	rep.add(Result{Section: sec, Name: "berth: submit → first byte in the task's stdout log, written by its monitor (part of the row above)", Unit: "ms", Summary: &lm,
		Baseline: "PVH baseline", Ratio: ratio(lm.Median, p.Median), Note: fmt.Sprintf("the API's log follower delivered the line %+.0f ms later (median)", b.Median-lm.Median)})
	r := ratio(b.Median, p.Median)
	rep.target(Target{
		Name: "VM submit→first output within 1.1× raw QEMU PVH boot of the same guest (median)", Goal: "≤ 1.10×",
		Measured: fmt.Sprintf("%.2f× (berth %.0f ms, qemu PVH %.0f ms, %s, berth boots %s)", r, b.Median, p.Median, accel, berthBoot),
		Met:      r <= 1.1, By: fmt.Sprintf("%+.2f×", r-1.1),
	})
	rf := ratio(b.Median, f.Median)
	rep.target(Target{
		Name: "VM submit→first output within 0.6× raw QEMU of the node's bzImage with a minimal busybox initramfs (median)", Goal: "≤ 0.60×",
		Measured: fmt.Sprintf("%.2f× (berth %.0f ms, qemu bzImage+busybox %.0f ms, %s)", rf, b.Median, f.Median, accel),
		Met:      rf <= 0.6, By: fmt.Sprintf("%+.2f×", rf-0.6),
	})
	rep.raw["vm_start"] = map[string]any{"berth_ms": bt, "qemu_pvh_ms": pt, "qemu_bzimage_ms": zt, "qemu_bzimage_busybox_ms": ft,
		"virsh_create_ms": vt, "berth_submit_ms": st, "berth_logged_ms": lt, "berth_boot": berthBoot, "vmlinux_compression": vmlinux.Compression}
	return nil
}

// vmBoot is how the agent's VM driver boots the guest kernel, and why,
// from node status.
func vmBoot(ctx context.Context, a *agentProc) (mode, reason string) {
	n, _, err := a.c.Node(ctx, nil)
	if err != nil {
		return "", ""
	}
	d, ok := n.Drivers[string(api.IsolationVM)]
	if !ok {
		return "", ""
	}
	reason = d.Details["boot_reason"]
	if fw := d.Details["firmware"]; fw != "" {
		reason += "; firmware " + fw + " (" + d.Details["firmware_reason"] + ")"
	}
	return d.Details["boot"], reason
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
	qp := summarize(qemuPSS)
	rep.add(Result{Section: sec, Name: "QEMU process RSS per VM (guest RAM touched + QEMU)", Unit: "MiB", Summary: scaleSummary(qr, 1.0/1024),
		Note: "not berth's overhead: the VM itself"})
	rep.add(Result{Section: sec, Name: "QEMU process PSS per VM", Unit: "MiB", Summary: scaleSummary(qp, 1.0/1024),
		Note: "the kernel file QEMU maps (PVH) is page cache shared by every VM; PSS splits it among them"})
	rep.add(Result{Section: sec, Name: "per-VM overhead (monitor PSS + agent delta)", Unit: "KiB", Value: mp.Median + delta})
	if len(qemuRSS) > 0 {
		mib := qr.Median / 1024
		rep.target(Target{Name: "QEMU RSS of an idle busybox VM", Goal: "≤ 128 MiB",
			Measured: fmt.Sprintf("%.1f MiB (median of %d)", mib, qr.N), Met: mib <= 128, By: fmt.Sprintf("%+.1f MiB", mib-128)})
	}
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
