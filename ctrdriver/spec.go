package ctrdriver

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/seccomp"
)

// defaultCapabilities is the set every container process gets. It is the
// container runtimes' usual default minus CAP_NET_RAW (raw sockets let a
// workload spoof traffic on the node network) and CAP_MKNOD (no device nodes
// inside a container; /dev is provided by the runtime).
var defaultCapabilities = []string{
	"CAP_CHOWN",
	"CAP_DAC_OVERRIDE",
	"CAP_FSETID",
	"CAP_FOWNER",
	"CAP_SETGID",
	"CAP_SETUID",
	"CAP_SETFCAP",
	"CAP_SETPCAP",
	"CAP_NET_BIND_SERVICE",
	"CAP_SYS_CHROOT",
	"CAP_KILL",
	"CAP_AUDIT_WRITE",
}

// maskedPaths hide kernel interfaces that leak host information or allow
// host-wide side effects; readonlyPaths stay visible but cannot be written.
var (
	maskedPaths = []string{
		"/proc/acpi",
		"/proc/asound",
		"/proc/kcore",
		"/proc/keys",
		"/proc/latency_stats",
		"/proc/timer_list",
		"/proc/timer_stats",
		"/proc/sched_debug",
		"/proc/scsi",
		"/sys/firmware",
		"/sys/devices/virtual/powercap",
	}
	readonlyPaths = []string{
		"/proc/bus",
		"/proc/fs",
		"/proc/irq",
		"/proc/sys",
		"/proc/sysrq-trigger",
	}
)

// cpuPeriod is the CFS period the cpu quota is expressed against.
const cpuPeriod uint64 = 100000

// cgroupParent groups every berth container under one cgroup per controller.
const cgroupParent = "/berth"

func cgroupPath(id string) string { return cgroupParent + "/" + id }

// buildSpec turns a runtime-neutral task into a hardened OCI runtime spec.
func buildSpec(cfg *driver.TaskConfig, uid, gid uint32, swapAccounting bool) *specs.Spec {
	hostname := cfg.Name
	if hostname == "" {
		hostname = cfg.ID
		if len(hostname) > 12 {
			hostname = hostname[:12]
		}
	}
	cwd := cfg.Workdir
	if cwd == "" {
		cwd = "/"
	}
	caps := append([]string(nil), defaultCapabilities...)

	s := &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			User: specs.User{UID: uid, GID: gid},
			Args: cfg.Args,
			Env:  cfg.Env,
			Cwd:  cwd,
			Capabilities: &specs.LinuxCapabilities{
				Bounding:  caps,
				Effective: caps,
				Permitted: caps,
			},
			Rlimits:         []specs.POSIXRlimit{nofileLimit()},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: "rootfs"},
		Hostname: hostname,
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: cgroupPath(cfg.ID),
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
				{Type: specs.NetworkNamespace},
				{Type: specs.CgroupNamespace},
			},
			Resources:     buildResources(cfg.Resources, swapAccounting),
			MaskedPaths:   maskedPaths,
			ReadonlyPaths: readonlyPaths,
			Seccomp:       seccomp.DefaultProfile(),
		},
	}
	if n := cfg.Network; n != nil {
		for i := range s.Linux.Namespaces {
			if s.Linux.Namespaces[i].Type != specs.NetworkNamespace {
				continue
			}
			switch n.Mode {
			case driver.NetworkBridge:
				// The namespace the agent made and attached to the bridge.
				s.Linux.Namespaces[i].Path = n.Netns
			case driver.NetworkHost:
				s.Linux.Namespaces = append(s.Linux.Namespaces[:i], s.Linux.Namespaces[i+1:]...)
			}
			break
		}
	}
	if cfg.TTY {
		// runc makes the terminal in the container and hands its master
		// to the monitor (supervisor/monitor); 24x80 until an attach
		// resizes it.
		s.Process.Terminal = true
		s.Process.ConsoleSize = &specs.Box{Height: 24, Width: 80}
		s.Process.Env = withTerm(s.Process.Env)
	}
	return s
}

// withTerm adds TERM=xterm to a terminal's environment unless the task
// sets TERM itself, as docker run -t does: without it, programs on the
// terminal do not know how to drive it.
func withTerm(env []string) []string {
	for _, kv := range env {
		if strings.HasPrefix(kv, "TERM=") {
			return env
		}
	}
	return append(append([]string(nil), env...), "TERM=xterm")
}

// userNSSpec runs the container in a user namespace of its own, its ids
// 0 to m.Size-1 being m's host ids, on rootfs (an overlay on the id-mapped
// image). sysfs, when set, is a sysfs mounted for the container's network
// namespace, which the container cannot mount itself: the namespace
// belongs to the host's user namespace (the agent made it).
func userNSSpec(s *specs.Spec, m idMap, rootfs, sysfs string) error {
	if u := s.Process.User; u.UID >= m.Size || u.GID >= m.Size {
		return fmt.Errorf("the image's user %d:%d is outside the container's user namespace (ids 0-%d): %w", u.UID, u.GID, m.Size-1, errdefs.ErrInvalidArgument)
	}
	s.Root.Path = rootfs
	s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.UserNamespace})
	s.Linux.UIDMappings = []specs.LinuxIDMapping{{ContainerID: 0, HostID: m.UID, Size: m.Size}}
	s.Linux.GIDMappings = []specs.LinuxIDMapping{{ContainerID: 0, HostID: m.GID, Size: m.Size}}
	if sysfs != "" {
		for i := range s.Mounts {
			if s.Mounts[i].Destination == "/sys" {
				s.Mounts[i] = specs.Mount{Destination: "/sys", Type: "bind", Source: sysfs, Options: []string{"bind", "ro", "nosuid", "nodev", "noexec"}}
			}
		}
	}
	return nil
}

// writeNetworkFiles gives a container with a network its /etc/resolv.conf
// and /etc/hosts, bind-mounted read-only from the task directory (the image
// keeps its own files underneath, untouched).
func writeNetworkFiles(dir string, cfg *driver.TaskConfig, s *specs.Spec) error {
	n := cfg.Network
	if n == nil || n.Mode == driver.NetworkNone {
		return nil
	}
	hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	resolv := n.ResolvConf
	if n.Mode == driver.NetworkHost {
		host, err := os.ReadFile("/etc/resolv.conf")
		if err != nil {
			return fmt.Errorf("read the host's resolv.conf: %w", err)
		}
		resolv = host
	} else if addr, _, ok := strings.Cut(n.Address, "/"); ok {
		hosts += addr + "\t" + s.Hostname + "\n"
	}
	files := map[string][]byte{"resolv.conf": resolv, "hosts": []byte(hosts)}
	for _, name := range []string{"resolv.conf", "hosts"} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, files[name], 0o644); err != nil {
			return err
		}
		s.Mounts = append(s.Mounts, specs.Mount{Destination: "/etc/" + name, Type: "bind", Source: path, Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
	}
	return nil
}

// nofileLimit gives workloads the usual 1024 open files, raisable up to
// 65536 or the agent's own hard limit when that is lower (a container may
// not exceed the limits of the process that starts it).
func nofileLimit() specs.POSIXRlimit {
	hard := uint64(65536)
	var host unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &host); err == nil && host.Max < hard {
		hard = host.Max
	}
	return specs.POSIXRlimit{Type: "RLIMIT_NOFILE", Soft: min(1024, hard), Hard: hard}
}

func buildResources(r driver.Resources, swapAccounting bool) *specs.LinuxResources {
	res := &specs.LinuxResources{
		// Deny every device; runc re-allows the standard set (null, zero,
		// full, random, urandom, tty, ptmx) on its own.
		Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
	}
	if r.MemoryBytes > 0 {
		limit := r.MemoryBytes
		res.Memory = &specs.LinuxMemory{Limit: &limit}
		if swapAccounting {
			// memory+swap equal to memory: the workload gets no swap, so the
			// limit means what it says.
			swap := limit
			res.Memory.Swap = &swap
		}
	}
	if r.CPU > 0 {
		period := cpuPeriod
		quota := int64(r.CPU * float64(cpuPeriod))
		if quota < 1000 {
			quota = 1000 // the kernel's minimum quota is 1 ms
		}
		res.CPU = &specs.LinuxCPU{Period: &period, Quota: &quota}
	}
	if r.CPURequest > 0 {
		// The request is the weight under contention, as the kubelet sets
		// cpu.shares: 1024 per core, at least the kernel's minimum of 2.
		if res.CPU == nil {
			res.CPU = &specs.LinuxCPU{}
		}
		shares := max(uint64(r.CPURequest*1024), 2)
		res.CPU.Shares = &shares
	}
	if r.Pids > 0 {
		pids := r.Pids
		res.Pids = &specs.LinuxPids{Limit: &pids}
	}
	return res
}

// hasSwapAccounting reports whether the memory controller can limit swap;
// asking runc for a swap limit on a kernel without it fails the start.
func hasSwapAccounting(memoryMount string) bool {
	_, err := os.Stat(memoryMount + "/memory.memsw.limit_in_bytes")
	return err == nil
}

func validateTask(cfg *driver.TaskConfig) error {
	if err := driver.CheckID(cfg.ID); err != nil {
		return err
	}
	switch {
	case len(cfg.Args) == 0:
		return fmt.Errorf("task %s has no command: neither the spec nor the image gives one", cfg.ID)
	case cfg.Image.RootfsDir == "":
		return fmt.Errorf("task %s has no root filesystem", cfg.ID)
	case cfg.LogDir == "":
		return fmt.Errorf("task %s has no log directory", cfg.ID)
	}
	return nil
}
