//go:build linux

// Package pid1 is berth-init, the program that runs as PID 1 inside a
// workload VM: it loads the kernel modules, finds berth's disks and
// channels, mounts the workload's root filesystem, runs the command, reports
// how it ended on the status channel and powers the guest off. The
// contract with the host is documented in package guest.
//
// PID 1 is special: if it exits or panics the kernel panics, and no one
// else reaps orphans. So berth-init never returns, recovers from its own
// panics, reports every failure on the status channel (and the console),
// and always ends by powering the guest off.
package pid1

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/guest"
)

const (
	// newRoot is where the root disk is mounted before berth-init chroots
	// into it.
	newRoot = "/newroot"
	// deviceTimeout bounds the wait for disks and ports. Probing takes
	// milliseconds under KVM but can take seconds under TCG on a busy host.
	deviceTimeout = 30 * time.Second
	// buttonGrace is how long to wait for the optional power button once
	// the required devices are there.
	buttonGrace = time.Second
	// reapTimeout bounds the wait for the processes killed after the main
	// one exited; a process stuck in the kernel cannot hold the VM up.
	reapTimeout = 5 * time.Second
	// drainTimeout bounds the wait for the output pipes to reach EOF after
	// every process of the workload is gone.
	drainTimeout = 5 * time.Second
)

// Main runs berth-init. It never returns.
func Main() {
	in := &initProc{console: os.Stderr}
	// Catch every signal and drop it. Go's default for most signals is to
	// exit, and PID 1 exiting panics the kernel. Caught signals (unlike
	// ignored ones) are reset to their defaults in the workload at exec.
	signal.Notify(make(chan os.Signal, 1))
	in.reaper = newReaper()
	unix.Umask(0o022)

	var result guest.Status
	func() {
		defer func() {
			if r := recover(); r != nil {
				result = in.failure(fmt.Errorf("berth-init panicked: %v\n%s", r, debug.Stack()))
			}
		}()
		result = in.run()
	}()
	if in.probe {
		// Probe mode: nothing was set up, nothing to report or tear down.
		powerOff(in)
	}
	in.finish(result)
}

// initProc is berth-init's state between its steps.
type initProc struct {
	console io.Writer
	status  *os.File // nil until the status port is open
	stdout  *os.File
	stderr  *os.File
	// barrier is the config disk, opened O_DIRECT, read once before power
	// off; see hostBarrier.
	barrier     *os.File
	rootMounted bool
	chrooted    bool
	probe       bool     // probe mode (guest.ProbeParam): power off at once
	mounts      []string // mounted inside the workload's root, in order

	reaper *reaper
	// execPort is the exec channel's port, nil when the host has none.
	execPort *os.File
	// main is the main process's streams as attach sessions see them;
	// set before the exec channel is served.
	main *guest.Console

	mu          sync.Mutex
	pgid        int  // the workload's process group while its leader runs
	stopPending bool // the power button was pressed
}

func (in *initProc) logf(format string, args ...any) {
	fmt.Fprintf(in.console, "berth-init: "+format+"\n", args...)
}

func (in *initProc) failure(err error) guest.Status {
	return guest.Status{Event: guest.EventError, ExitCode: exitCodeOf(err), Message: err.Error()}
}

// run does everything up to the workload's end and returns the terminal
// status to report.
func (in *initProc) run() guest.Status {
	if _, err := mountAll(earlyMounts); err != nil {
		return in.failure(err)
	}
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0); err == nil {
		in.console = c
	}
	if cmdline, err := os.ReadFile("/proc/cmdline"); err == nil && guest.ProbeRequested(string(cmdline)) {
		in.probe = true
		in.probeReached()
		return guest.Status{}
	}
	if err := loadModules(guest.ModuleListPath, cpuModaliasPath, finitModule, func(msg string) { in.logf("%s", msg) }); err != nil {
		return in.failure(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), deviceTimeout)
	devs, werr := waitDevices(ctx, "/sys", "/dev", 10*time.Millisecond, buttonGrace)
	cancel()
	// Open the status port first, even when other devices are missing, so
	// the failure reaches the host and not only the console.
	if p, ok := devs.ports[guest.StatusPort]; ok {
		f, err := os.OpenFile(p, os.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return in.failure(fmt.Errorf("open status port %s: %w", p, err))
		}
		in.status = f
	}
	if werr != nil {
		return in.failure(werr)
	}
	var err error
	if in.stdout, err = os.OpenFile(devs.ports[guest.StdoutPort], os.O_WRONLY|unix.O_CLOEXEC, 0); err != nil {
		return in.failure(fmt.Errorf("open stdout port: %w", err))
	}
	if in.stderr, err = os.OpenFile(devs.ports[guest.StderrPort], os.O_WRONLY|unix.O_CLOEXEC, 0); err != nil {
		return in.failure(fmt.Errorf("open stderr port: %w", err))
	}

	cfg, err := readConfig(devs.disks[guest.ConfigDiskSerial])
	if err != nil {
		return in.failure(err)
	}
	if cfg.ExecChannel {
		// Before entering the root: the port's node is in the
		// initramfs's /dev, not the workload's.
		if err := in.openExecPort(devs); err != nil {
			return in.failure(err)
		}
	}
	if f, err := os.OpenFile(devs.disks[guest.ConfigDiskSerial], os.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0); err == nil {
		in.barrier = f
	}
	for _, b := range devs.buttons {
		f, err := os.OpenFile(b, os.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			in.logf("power button %s: %v; graceful stop disabled", b, err)
			continue
		}
		go func() {
			defer in.recoverGoroutine("power button")
			watchPowerButton(f, in.powerPressed)
		}()
	}
	if len(devs.buttons) == 0 {
		in.logf("no %q input device; graceful stop disabled", PowerButtonName)
	}

	if err := in.loadVolumeModules(cfg); err != nil {
		return in.failure(err)
	}
	if err := in.enterRoot(devs.disks[guest.RootDiskSerial]); err != nil {
		return in.failure(err)
	}
	hostname := cfg.Hostname
	if hostname == "" {
		hostname = "localhost"
	}
	if err := unix.Sethostname([]byte(hostname)); err != nil {
		return in.failure(fmt.Errorf("set hostname: %w", err))
	}
	if err := bringUpLoopback(); err != nil {
		return in.failure(err)
	}
	if cfg.Network != nil {
		// Inside the root now: resolv.conf goes into the workload's /etc.
		if err := configureNetwork(cfg.Network, "/", deviceTimeout); err != nil {
			return in.failure(err)
		}
	}
	if err := in.mountVolumes(cfg); err != nil {
		return in.failure(err)
	}
	return in.runWorkload(cfg)
}

// probeReached writes the probe marker to the console and waits until the
// UART has sent it: tty writes are buffered, and a power-off right after
// could lose the line the host is waiting for.
func (in *initProc) probeReached() {
	in.logf("%s %.2fs after boot", strings.TrimPrefix(guest.ProbeMarker, "berth-init: "), uptime().Seconds())
	if f, ok := in.console.(*os.File); ok {
		_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1) // tcdrain
	}
}

func readConfig(dev string) (*guest.Config, error) {
	f, err := os.Open(dev)
	if err != nil {
		return nil, fmt.Errorf("open config disk: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, guest.MaxConfigSize))
	if err != nil {
		return nil, fmt.Errorf("read config disk %s: %w", dev, err)
	}
	return guest.DecodeConfig(data)
}

// enterRoot mounts the root disk and makes it berth-init's own root.
// Chrooting init itself (rather than only the workload) makes every later
// path — mount points, PATH lookup, /etc/passwd, the working directory —
// resolve exactly as the workload will see it, symlinks included. Init
// stays PID 1; the devices it needs are already open.
func (in *initProc) enterRoot(disk string) error {
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", newRoot, err)
	}
	if err := unix.Mount(disk, newRoot, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mount root disk %s (ext4): %w", disk, err)
	}
	in.rootMounted = true
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("enter root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("enter root: %w", err)
	}
	in.chrooted = true
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("enter root: %w", err)
	}
	mounted, err := mountAll(workloadMounts)
	in.mounts = mounted
	return err
}

// runWorkload starts the command, reaps until it ends and returns its
// terminal status, with its output drained.
func (in *initProc) runWorkload(cfg *guest.Config) guest.Status {
	user, err := resolveUser(cfg.User, "/etc/passwd", "/etc/group")
	if err != nil {
		return in.failure(err)
	}
	env := workloadEnv(cfg.Env, user.home)
	if cfg.TTY && !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, "TERM=") }) {
		// As docker run -t and berth's containers: programs on the
		// terminal need to know how to drive it.
		env = append(env, "TERM=xterm")
	}
	dir := cfg.Workdir
	if dir == "" {
		dir = "/"
	}
	// runc creates a missing working directory; so does berth, so an image
	// runs the same in both. A chdir failure at exec would otherwise be
	// indistinguishable from a missing command.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return in.failure(fmt.Errorf("working directory %s: %w", dir, err))
	}
	path, err := lookPath(cfg.Args[0], getenv(env, "PATH"), dir)
	if err != nil {
		return in.failure(err)
	}

	mio, err := newMainIO(cfg, user)
	if err != nil {
		return in.failure(err)
	}
	in.main = mio.console
	// Attach sessions need the main process's console: the channel is
	// served from here on, before the process starts, so a client that
	// attaches at once (berth run -it) sees its output from the start.
	if in.execPort != nil {
		go in.serveExec(cfg)
	}
	attr := &syscall.SysProcAttr{
		// Its own session and so process group: SIGTERM on stop reaches
		// the whole workload and not berth-init, and no terminal of
		// berth-init's is inherited; with TTY its own terminal becomes
		// its controlling one.
		Setsid:     true,
		Setctty:    cfg.TTY,
		Credential: &syscall.Credential{Uid: user.uid, Gid: user.gid, Groups: user.groups},
	}
	pid, exited, err := in.reaper.start(func() (int, error) {
		proc, err := os.StartProcess(path, cfg.Args, &os.ProcAttr{Dir: dir, Env: env, Files: mio.child, Sys: attr})
		if err != nil {
			return 0, err
		}
		// The reaper collects it; the os.Process is not needed.
		defer proc.Release()
		return proc.Pid, nil
	})
	// Only the workload may hold its ends, or EOF never comes.
	mio.closeChildEnds()
	if err != nil {
		err = commandErrorFor(cfg.Args[0], err)
		in.main.End(exitCodeOf(err), 0)
		mio.closeAll()
		return in.failure(err)
	}

	var drained sync.WaitGroup
	for _, c := range mio.relays(in) {
		drained.Add(1)
		go func() {
			defer drained.Done()
			defer in.recoverGoroutine(c.name + " copy")
			in.copyOutput(c.dst, c.tee, c.src, c.name)
		}()
	}

	in.report(guest.Status{Event: guest.EventStarted, PID: pid})
	in.logf("started pid %d %.2fs after boot", pid, uptime().Seconds())
	in.mu.Lock()
	in.pgid = pid
	pending := in.stopPending
	in.mu.Unlock()
	if pending {
		_ = unix.Kill(-pid, unix.SIGTERM)
	}

	ws := <-exited
	in.mu.Lock()
	in.pgid = 0
	in.mu.Unlock()
	code, sig := exitStatus(ws)

	// The main process is gone: end the rest of the workload, as the
	// kernel does when a container's PID namespace loses its init. Then
	// the pipes reach EOF and the output is complete.
	in.reaper.killAll()
	if !waitTimeout(&drained, drainTimeout) {
		in.logf("output not drained after %s; reporting anyway", drainTimeout)
	}
	// Attached sessions get the rest of the output and its end before the
	// guest powers off.
	in.main.End(code, sig)
	mio.closeOurEnds()
	if !in.main.WaitDrained(drainTimeout) {
		in.logf("attach sessions not drained after %s; powering off anyway", drainTimeout)
	}
	return guest.Status{Event: guest.EventExited, ExitCode: code, Signal: sig}
}

// powerPressed sends SIGTERM to the workload's process group, or remembers
// the press for when the workload starts.
func (in *initProc) powerPressed() {
	in.mu.Lock()
	in.stopPending = true
	pgid := in.pgid
	in.mu.Unlock()
	if pgid != 0 {
		if err := unix.Kill(-pgid, unix.SIGTERM); err != nil && !errors.Is(err, unix.ESRCH) {
			in.logf("signal workload: %v", err)
		}
	}
}

// copyOutput copies the workload's output to its port, and to tee (the
// attach sessions, which never block). If the port fails, the pipe is
// still drained so the workload never blocks on a full pipe.
func (in *initProc) copyOutput(dst, tee io.Writer, src *os.File, name string) {
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			_, _ = tee.Write(buf[:n])
		}
		if n > 0 && dst != nil {
			if _, err := dst.Write(buf[:n]); err != nil {
				in.logf("%s port: %v; discarding the rest", name, err)
				dst = nil
			}
		}
		if rerr != nil {
			return
		}
	}
}

func (in *initProc) recoverGoroutine(what string) {
	if r := recover(); r != nil {
		in.logf("%s panicked: %v\n%s", what, r, debug.Stack())
	}
}

// report writes s to the status port, and errors to the console too.
func (in *initProc) report(s guest.Status) {
	line := s.AppendLine(nil)
	if s.Event == guest.EventError {
		in.logf("error (exit code %d): %s", s.ExitCode, s.Message)
	}
	if in.status == nil {
		in.logf("no status port; result lost: %s", line)
		return
	}
	if _, err := in.status.Write(line); err != nil {
		in.logf("write status: %v", err)
	}
}

// finish reports the result, tears down and powers off. It never returns.
func (in *initProc) finish(result guest.Status) {
	defer func() {
		// Nothing may stop the power-off; a panic here is logged and ignored.
		if r := recover(); r != nil {
			in.logf("teardown panicked: %v", r)
		}
		powerOff(in)
	}()
	in.report(result)
	in.reaper.killAll()
	if err := unmountAll(in.mounts); err != nil {
		in.logf("%v", err)
	}
	if in.chrooted {
		// The root disk is our own root now; it cannot be unmounted, but
		// read-only makes it clean on the host side.
		if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			in.logf("remount root read-only: %v", err)
		}
	} else if in.rootMounted {
		if err := unix.Unmount(newRoot, 0); err != nil {
			in.logf("unmount root: %v", err)
		}
	}
	unix.Sync()
	in.hostBarrier()
}

// hostBarrier makes sure the host has consumed everything written to the
// ports before the guest powers off. virtio-serial writes return once the
// data is queued, not once the host read it, and QEMU does not drain queues
// at power-off. A direct read from the config disk is a round trip through
// the same device-model event loop that services the ports' queues, which
// handles the queues' earlier notifications no later than the disk's.
func (in *initProc) hostBarrier() {
	if in.barrier == nil {
		return
	}
	// O_DIRECT needs an aligned buffer; an anonymous mapping is page-aligned.
	buf, err := unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return
	}
	defer unix.Munmap(buf)
	if _, err := unix.Pread(int(in.barrier.Fd()), buf[:guest.SectorSize], 0); err != nil {
		in.logf("host barrier: %v", err)
	}
}

func powerOff(in *initProc) {
	for range 3 {
		err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		in.logf("power off: %v", err)
		time.Sleep(time.Second)
	}
	// Exiting panics the kernel; with panic=-1 on the command line that
	// resets the machine, which the host runs with no-reboot/on_reboot=destroy.
	os.Exit(1)
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

// uptime is the time since the kernel booted, for the boot-time log line.
func uptime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}
