// Package vmdriver runs berth tasks inside libvirt virtual machines: the
// task's OCI image boots as a transient libvirt domain by direct kernel
// boot into berth-init, which runs the command and reports how it ended
// (the host<->guest contract is package guest). A task may instead boot a
// whole-disk qcow2 image by its own bootloader (see Whole-disk images).
//
// # Task directory
//
// Each task gets a directory under the driver's root:
//
//	tasks/<id>/task.json          domain name, uuid, QEMU pid+start time, log dir, accel
//	tasks/<id>/root.qcow2         copy-on-write overlay over the image's ext4 base (or the whole-disk image)
//	tasks/<id>/console.sock       a whole-disk task's serial console (QEMU listens)
//	tasks/<id>/config.img         guest.EncodeConfig: args, env, workdir, user, hostname
//	tasks/<id>/{stdout,stderr,status}.sock  the virtio-serial ports (QEMU listens)
//	tasks/<id>/exec.sock          the exec channel's port (QEMU listens; the driver connects on demand, see exec.go)
//	tasks/<id>/status.log         the guest's status records, as the monitor received them
//	tasks/<id>/console.log        the serial console (kernel and berth-init diagnostics)
//	tasks/<id>/monitor.json, monitor.pid, monitor.log, monitor-done.json
//	tasks/<id>/killed             marker: berth forced the VM off (exit 137)
//	cache/                        initramfs archives and ext4 base images, by content
//	probe/console.log             the KVM probe guest's console, while it runs
//
// and the task's output goes to TaskConfig.LogDir/stdout.log and
// stderr.log, as with ctrdriver. Destroy removes the domain and the task
// directory; the log dir is the agent's.
//
// The domain is transient (CreateXML), named DomainPrefix+id, and carries
// berth metadata (task id and driver root): a domain is the driver's only
// when both name and metadata match, so other domains on the same libvirtd
// are never listed, stopped or destroyed. It is a q35 machine with ACPI
// (the power button is SIGTERM), on_poweroff/on_reboot/on_crash destroy,
// domain type qemu (TCG, CPU model qemu64) or kvm (host-model; never
// host-passthrough), vCPUs = ceil(cpu), RAM = memory + GuestMemoryOverhead,
// two virtio-blk disks found by serial, a virtio-net NIC on the node bridge
// for a bridge network (libvirt makes and removes the tap), no USB, no balloon.
//
// # Whole-disk images
//
// A task whose driver.Image.DiskPath names a qcow2 whole-disk image (a
// full OS with its own bootloader) boots that instead: root.qcow2 is a
// copy-on-write overlay over the image (qemu-img create -f qcow2 -b IMAGE
// -F qcow2; the shared image is never written), the domain boots it by
// BIOS (SeaBIOS, boot order 1), with no kernel, initramfs, config disk or
// virtio-serial ports, and its first serial port (the guest's ttyS0) is
// the unix socket console.sock, which the task's monitor appends to
// LogDir/stdout.log (stderr.log stays empty). The domain is created
// paused and resumed once the monitor is connected: unlike a
// virtio-serial port, a serial port without a client drops what the guest
// writes, and the bootloader's first lines would be lost. Nothing in the
// guest reports a result, so the exit code is 0 when the guest ends by
// itself (power-off; a reset ends the domain too) and 137 (SIGKILL) when
// berth forced it off. Stop presses the ACPI power button (a full OS with
// acpid shuts down and exits 0) and forces the VM off after the timeout;
// Destroy, Recover, Stats and List are the same as for other tasks. The
// image must be reachable by QEMU's unprivileged user, as the driver root.
//
// # Output and exit codes while the agent is dead
//
// The guest's ports are unix sockets that libvirt creates and hands to
// QEMU; a per-task monitor process (the VM counterpart of ctrdriver's, run
// as `berth vm-monitor DIR`, in its own session) connects to them and
// appends to stdout.log, stderr.log and status.log. libvirt's own file
// channels were rejected: with the default stdio_handler they are written
// by virtlogd, which renames a file away at 2 MiB, and a log the agent
// tails must be one complete growing file. A port without a connected
// monitor is closed for the guest, so its writes wait instead of being
// lost; a monitor that dies while the VM runs is replaced (by supervise,
// or by Recover after an agent restart).
//
// The monitor ends when QEMU does, after draining the sockets, and leaves
// monitor-done.json: from then on status.log is final. The exit code is
// the last status record (guest.ReadLastStatus); without a terminal record
// it is 137 if berth forced the VM off (the killed marker is written before
// the domain is destroyed), else -1 with an error quoting the end of
// console.log. So the agent may be SIGKILLed at any time: the VM and its
// monitor carry on, and Recover re-attaches from task.json and monitor.pid
// (watching the monitor's pidfd, or the QEMU process when no monitor is
// left), never from memory.
//
// # Exec and signals
//
// Exec and Signal go through the exec channel, a fourth virtio-serial port
// (guest.ExecPort, exec.sock) that berth-init serves (exec.go; the
// protocol is package guest's, docs/vm-exec.md describes it). The driver,
// not the monitor, connects to it, on the first exec or signal of a VM,
// and keeps that one connection for the VM's life: sessions are
// multiplexed over it. An agent that dies drops it, and berth-init kills
// the sessions it carried; the restarted agent connects again. A VM
// started by a berth without the port is ErrConflict, a whole-disk VM
// ErrNotImplemented.
//
// # libvirt
//
// One connection, opened lazily; a call that fails because libvirtd went
// away (it restarted) reconnects and is retried once. When libvirt is
// unreachable, Fingerprint reports unhealthy with libvirt's own reason
// (naming the socket) and Start fails with errdefs.ErrUnavailable.
//
// Acceleration (Options.Accel): "tcg" and "kvm" are taken as given (a
// forced kvm is checked: /dev/kvm and libvirt's kvm domain type must be
// there). "auto" first makes the cheap checks (open /dev/kvm, the
// KVM_GET_API_VERSION ioctl, libvirt's kvm domain capabilities) and uses
// TCG when they fail. When they pass, only a guest can tell: on
// nested-virtualization hosts (berth's build machines) /dev/kvm answers
// but QEMU aborts on a host-model CPU ("failed to set MSR") or the guest
// hangs right after its kernel starts. So the driver boots a probe guest
// once, in the background, on the first Fingerprint or Start: the same
// kernel and initramfs as the tasks, under the same KVM domain definition,
// with berth-init in probe mode (guest.ProbeParam: it prints
// guest.ProbeMarker on the console and powers off; no disks, no ports). KVM
// is used only if the marker appears within Options.ProbeTimeout (default
// 20 s); otherwise TCG, with the probe's failure as the reason. The probe
// domain is transient, named DomainPrefix+"_probe-"+hash(root) (no task id
// can start with "_"), carries berth metadata with <probe>true</probe> and
// no task id (List never reports it), writes its console to probe/ under
// the root, and is destroyed and its directory removed whatever happens:
// on success, timeout, failure, Close, or at the next probe after an agent
// died mid-probe. While it runs, Fingerprint reports accel "probing" and
// stays healthy; Start waits for the verdict. The verdict is kept for the
// driver's life. A probe that cannot run at all (no kernel, libvirt
// unreachable) decides nothing: Fingerprint is unhealthy with the error
// and the probe is retried 30 s later. Fingerprint reports the choice in
// Details["accel"], why in Details["accel_reason"], and when a probe
// decided, its duration in Details["accel_probe_duration"].
//
// QEMU runs as libvirt's unprivileged user: the driver root and its
// parents must be o+x (the driver makes its own directories 0711, and
// Fingerprint names a parent that is not).
//
// # Measured
//
// On a 2-core AMD EPYC VM (nproc 2, /proc/cpuinfo "AMD EPYC"), Debian 12,
// libvirt 9.0.0, QEMU 7.2, kernel 6.1.0-56-amd64, TCG, caches warm:
//
//	BenchmarkVMStartToFirstOutput-2   5   10617950255 ns/op   (Start of `echo hi` to its first stdout byte)
//	BenchmarkQEMUDirectBoot-2         5   11684327894 ns/op   (plain qemu-system-x86_64, same kernel, initramfs, disks)
//
// accel auto on the same machine (KVM present but unusable nested): the
// probe's domain fails to start under KVM with a host-model CPU within
// ~1.8 s ("failed to set MSR 0x10a"), so auto decides TCG about 2 s after
// the first Fingerprint; with a CPU model QEMU accepts (qemu64), the KVM
// guest hangs without a console byte and the probe gives up at its bound.
// Under TCG the probe guest reaches user space ~8 s after its domain
// starts (~3.2 s of guest kernel time). The test's whole-disk image
// (SYSLINUX from an MBR disk loading the node's 8 MiB kernel and a busybox
// initramfs through the BIOS) boots, prints and powers off in ~17 s under
// TCG. On a busy shared machine (load average 15-27) all of these took
// 3-6 times as long.
//
// The guest kernel reports berth-init starting the workload ~4.9 s after
// its own boot; the rest is QEMU start, firmware and loading the kernel and
// initramfs under emulation. libvirt and berth add no measurable time on
// top of a hand-started QEMU (the difference is within run-to-run noise).
package vmdriver
