// Package guest is the contract between berth's VM driver on the host and
// berth-init, the small static program that runs as PID 1 inside every
// workload VM. The host imports this package to write the guest's input and
// read its result; berth-init (package guest/pid1) implements the other
// side. Both halves live here so encoding and decoding cannot drift apart.
//
// # Boot
//
// The host boots a transient domain by direct kernel boot: the node's
// kernel, an initramfs built by vmdriver/initramfs (containing /init =
// berth-init, the kernel modules it needs and /berth/modules, their load
// order) and the command line "console=ttyS0" (plus "panic=-1" so a guest
// kernel panic ends the domain instead of hanging it). /dev/console (ttyS0)
// carries only kernel messages and berth-init's own diagnostics, never the
// workload's output. The machine needs ACPI (q35 or pc) for the power
// button. berth-init is built static (CGO_ENABLED=0; -ldflags=-s -w keeps
// the initramfs small).
//
// # Devices
//
// Disks are virtio-blk devices found by their serial number, never by
// their order on the bus:
//
//   - serial "berth-root" (RootDiskSerial): an ext4 filesystem holding the
//     workload's root filesystem (the unpacked OCI image), normally a qcow2
//     copy-on-write overlay over a per-image base built by vmdriver/rootdisk.
//     berth-init mounts it read-write.
//   - serial "berth-config" (ConfigDiskSerial): raw bytes, the JSON encoding
//     of a Config followed by NUL padding to a multiple of 512 bytes, as
//     written by EncodeConfig. At most MaxConfigSize bytes are read.
//
// In libvirt terms: <disk device='disk'> with <target bus='virtio'/> and
// <serial>berth-root</serial> (qcow2 driver) or <serial>berth-config</serial>
// (raw driver, <readonly/>); <channel type='file'> with <target
// type='virtio' name='org.berth.stdout'/> and so on.
//
// Channels are virtio-serial ports (a virtio-serial controller with
// virtserialport devices), found through
// /sys/class/virtio-ports/vport*/name:
//
//   - "org.berth.stdout" (StdoutPort) and "org.berth.stderr" (StderrPort):
//     the workload's output, byte for byte. Output of every process of the
//     workload is drained before the exit is reported.
//   - "org.berth.status" (StatusPort): newline-delimited JSON Status
//     records: {"event":"started","pid":N} once the command has been
//     executed, then exactly one terminal record, either
//     {"event":"exited","exit_code":N} ({"event":"exited","exit_code":128+S,
//     "signal":S} when the workload was killed by signal S, as shells and
//     runc report it) or {"event":"error","message":"...","exit_code":N}
//     when berth-init could not run the command (ExitCodeNotFound 127,
//     ExitCodeCannotExec 126, ExitCodeInitFailure 125 for anything else:
//     bad config, missing device, mount failure). The host treats the last
//     record as the result (ReadLastStatus); a domain that ends without a
//     terminal record crashed.
//   - "org.berth.exec" (ExecPort), only when Config.ExecChannel is set:
//     the exec channel, read and written by berth-init. Exec sessions,
//     attach sessions and signals for the workload travel over it as
//     frames (exec.go, ExecServer and ExecClient; docs/vm-exec.md
//     describes the protocol).
//
// # Lifecycle
//
// berth-init runs the command as a session and process group leader,
// chrooted into the root disk (with /proc, /sys, a minimal /dev with pts,
// shm and mqueue, and a tmpfs /run mounted as runc would), with the config's
// environment (PATH defaults to DefaultPath, HOME to the user's home from
// the image's /etc/passwd), working directory (created when missing, as runc
// does), numeric user and hostname, the loopback interface up and, when
// Config.Network is set, eth0 (virtio-net) up with its address, the default
// route through the gateway and the name servers in the workload's
// /etc/resolv.conf; stdin is /dev/null unless Config.Stdin or Config.TTY
// say otherwise (a pipe berth-init holds, or a terminal it allocates, whose
// output goes to StdoutPort; attach sessions on the exec channel reach
// them, see Console and docs/vm-exec.md). When the main
// process exits, every process left in the guest is killed (as when a
// container's PID namespace ends), the output is drained, the terminal
// status record is written, filesystems are synced and the guest powers
// itself off (ACPI). The domain must therefore be defined to end on power-off
// and on reboot (QEMU -no-reboot; libvirt on_poweroff and on_reboot
// "destroy"): if berth-init itself dies the kernel panics, "panic=-1"
// reboots, and the reboot must end the domain too.
//
// Graceful stop is the ACPI power button (libvirt
// virDomainShutdownFlags(VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN), QMP
// system_powerdown): berth-init sends SIGTERM to the workload's process
// group on each press, so a workload that handles SIGTERM exits with its own
// code. A press that arrives after berth-init has found its devices but
// before the command runs is delivered as soon as it starts; an earlier one
// is lost. The host forces the domain off after its grace period; nothing
// in the guest is needed for that.
//
// # Probe mode
//
// With "berth.probe" (ProbeParam) on the kernel command line, berth-init
// does nothing but prove the guest reached user space: right after mounting
// /dev, /proc and /sys it writes "berth-init: probe: user space reached
// N.NNs after boot" (ProbeMarker) to the console, waits for the UART to
// send it, and powers off. No disks, ports or modules are needed or looked
// for, so the host can boot the bare kernel and initramfs. vmdriver boots
// such a guest under KVM to decide whether KVM really works on the node.
//
// # Diagnostics
//
// berth-init writes its errors and a line "berth-init: started pid N Xs
// after boot" to the console, so the host's console log shows how long the
// guest took to reach the workload.
package guest
