package ctrdriver

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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/internal/ptyio"
	"github.com/berthd/berth/supervisor/monitor"
)

var (
	_ driver.Execer   = (*Driver)(nil)
	_ driver.Signaler = (*Driver)(nil)
)

// execKillTimeout bounds how long Close of a session kills and waits.
const execKillTimeout = 10 * time.Second

// runningTask returns task id when it runs.
func (d *Driver) runningTask(id string) (*task, error) {
	t, err := d.sup.Get(id)
	if err != nil {
		return nil, err
	}
	if t.Exited() {
		return nil, fmt.Errorf("container task %s has exited: %w", id, errdefs.ErrConflict)
	}
	return t, nil
}

// Signal implements driver.Signaler through `runc kill`, to the
// container's init.
func (d *Driver) Signal(ctx context.Context, id string, sig syscall.Signal) error {
	t, err := d.runningTask(id)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, runcTimeout)
	defer cancel()
	if err := d.runc.kill(rctx, id, strconv.Itoa(int(sig))); err != nil {
		if t.Exited() || strings.Contains(err.Error(), "not running") || strings.Contains(err.Error(), "does not exist") {
			return fmt.Errorf("container task %s does not run: %w", id, errdefs.ErrConflict)
		}
		return err
	}
	return nil
}

// Exec implements driver.Execer. The process is the container's own
// process (config.json) with the exec's command, environment, workdir,
// user and terminal: the same capabilities, rlimits, no_new_privileges and
// AppArmor profile; runc puts it in the container's namespaces (its user
// namespace included), cgroup (its pids limit counts it) and seccomp
// filter. Its parent is a `berth-monitor exec` shim, which runs
// `runc exec --detach` and reports its pid and exit status; a terminal's
// master comes through runc's console socket.
func (d *Driver) Exec(ctx context.Context, id string, cfg *driver.ExecConfig) (_ driver.ExecSession, err error) {
	if err := driver.CheckID(id); err != nil {
		return nil, err
	}
	if err := driver.CheckExecConfig(cfg); err != nil {
		return nil, err
	}
	if _, err := d.runningTask(id); err != nil {
		return nil, err
	}
	dir := d.taskDir(id)
	spec, p, err := d.execProcess(dir, cfg)
	if err != nil {
		return nil, err
	}
	// process.json holds the workload's whole environment, secrets
	// included: it stays in the task's directory in the data dir (0700),
	// never in a shared temporary directory; an agent that dies leaves it
	// there for Recover (or the task's removal) to sweep.
	tmp, err := newExecDir(dir)
	if err != nil {
		return nil, err
	}
	s := &execSession{d: d, id: id, tmp: tmp, pidfd: -1, done: make(chan struct{})}
	var consoles <-chan monitor.ConsoleResult
	defer func() {
		if err != nil {
			if consoles != nil && s.pty == nil {
				// The terminal may still arrive (until the listener's
				// deadline): close it then, not leak it.
				go func() {
					if c := <-consoles; c.Master != nil {
						c.Master.Close()
					}
				}()
			}
			s.abort()
		}
	}()
	procPath := filepath.Join(tmp, "process.json")
	if err := fileutil.ReplaceJSON(procPath, p); err != nil {
		return nil, err
	}
	args := monitor.ExecArgs{
		Runc: d.runc.path, RuncRoot: d.runc.root, RuncLog: filepath.Join(tmp, "runc.log"),
		Process: procPath, PidFile: filepath.Join(tmp, "pid"), ID: id, Entry: EntryOf(spec),
	}
	if netns := netnsToJoinFirst(spec); netns != "" {
		if args.RuncRoot, err = d.execRuncRoot(id, tmp); err != nil {
			return nil, err
		}
		args.Netns = netns
	}
	if cfg.TTY {
		// The socket holds no secret; a short temporary directory keeps
		// its path within a unix socket's 108 bytes whatever the data dir.
		if s.sockDir, err = os.MkdirTemp("", "berth-console-"); err != nil {
			return nil, fmt.Errorf("console socket directory: %w", err)
		}
		args.ConsoleSocket = filepath.Join(s.sockDir, "console.sock")
		if consoles, err = monitor.ListenConsole(args.ConsoleSocket, d.opts.StartTimeout); err != nil {
			return nil, err
		}
	}
	if err := s.startShim(cfg, args); err != nil {
		return nil, err
	}
	startCtx, cancel := context.WithTimeout(ctx, d.opts.StartTimeout)
	defer cancel()
	var first monitor.ExecReport
	select {
	case r, ok := <-s.reports:
		if !ok {
			return nil, fmt.Errorf("exec into %s: the exec shim ended without a report", id)
		}
		first = r
	case <-startCtx.Done():
		return nil, fmt.Errorf("exec into %s: runc exec did not start the process: %w", id, startCtx.Err())
	}
	if first.Error != "" {
		return nil, d.execError(id, first.Error)
	}
	if cfg.TTY {
		select {
		case c := <-consoles:
			if c.Err != nil {
				return nil, fmt.Errorf("exec into %s: receive the terminal: %w", id, c.Err)
			}
			s.pty = c.Master
		case <-startCtx.Done():
			return nil, fmt.Errorf("exec into %s: runc never handed over the terminal: %w", id, startCtx.Err())
		}
		s.stdout = ptyio.Reader{F: s.pty}
		if cfg.Stdin {
			s.stdin = &ptyio.Stdin{F: s.pty}
		}
		if err := s.Resize(cfg.Size); err != nil {
			return nil, err
		}
	}
	s.track(first.Pid)
	return s, nil
}

// execDirName is the directory of a task's exec sessions, in its task
// directory.
const execDirName = "exec"

// newExecDir makes a session's directory (0700) under the task's.
func newExecDir(taskDir string) (string, error) {
	parent := filepath.Join(taskDir, execDirName)
	if err := os.MkdirAll(parent, 0o700); err != nil {
		return "", fmt.Errorf("exec session directory: %w", err)
	}
	dir, err := os.MkdirTemp(parent, "s-")
	if err != nil {
		return "", fmt.Errorf("exec session directory: %w", err)
	}
	return dir, nil
}

// sweepExecDirs removes what exec sessions of an agent that died left in
// a task's directory: their sessions died with it (the shim kills its
// session when its lifeline closes), their files hold the workload's
// environment.
func (d *Driver) sweepExecDirs(taskDir string) {
	if err := os.RemoveAll(filepath.Join(taskDir, execDirName)); err != nil {
		d.log.Warn("remove leftover exec session files", "dir", taskDir, "err", err)
	}
}

// execProcess builds the exec's process from the container's own spec,
// which it returns too.
func (d *Driver) execProcess(dir string, cfg *driver.ExecConfig) (*specs.Spec, *specs.Process, error) {
	var spec specs.Spec
	if err := fileutil.ReadJSON(filepath.Join(dir, "bundle", "config.json"), &spec); err != nil {
		return nil, nil, fmt.Errorf("read the container's spec: %w", err)
	}
	if spec.Process == nil {
		return nil, nil, fmt.Errorf("the container's spec has no process")
	}
	p := *spec.Process
	p.Args = cfg.Args
	if EntryOf(&spec) != nil {
		// The container's own profile is not in its runc config: the
		// exec starts through berth-entry too.
		p.Args = monitor.EntryArgs(cfg.Args)
	}
	p.Env = driver.MergeEnv(p.Env, cfg.Env)
	if cfg.Workdir != "" {
		p.Cwd = cfg.Workdir
	}
	if cfg.User != "" {
		uid, gid, err := driver.ParseExecUser(cfg.User)
		if err != nil {
			return nil, nil, err
		}
		p.User = specs.User{UID: uid, GID: gid}
	}
	ids, err := readIDMap(dir)
	if err != nil {
		return nil, nil, err
	}
	if ids != nil && (p.User.UID >= ids.Size || p.User.GID >= ids.Size) {
		return nil, nil, fmt.Errorf("exec user %d:%d is outside the container's user namespace (ids 0-%d): %w", p.User.UID, p.User.GID, ids.Size-1, errdefs.ErrInvalidArgument)
	}
	p.Terminal = cfg.TTY
	p.ConsoleSize = nil
	if cfg.TTY {
		// runc 1.1 ignores it for exec (the size is set once the master
		// arrives); later runcs size the terminal before the process runs.
		p.ConsoleSize = &specs.Box{Height: uint(cfg.Size.Rows), Width: uint(cfg.Size.Cols)}
	}
	return &spec, &p, nil
}

// netnsToJoinFirst is the network namespace an exec must join before the
// container's user namespace: one the host made (bridge: the agent's),
// owned by the host's user namespace, which a process already in the
// container's user namespace may not join. runc 1.1 joins the user
// namespace first, so for such a container the shim joins the network
// namespace itself and runc is told the container has none to join.
func netnsToJoinFirst(spec *specs.Spec) string {
	if spec.Linux == nil {
		return ""
	}
	var userns bool
	var netns string
	for _, ns := range spec.Linux.Namespaces {
		switch ns.Type {
		case specs.UserNamespace:
			userns = true
		case specs.NetworkNamespace:
			netns = ns.Path
		}
	}
	if !userns {
		return ""
	}
	return netns
}

// execRuncRoot makes a runc state root under dir holding task id's state
// without its network namespace, so `runc exec` from there does not join
// it (the shim has): runc reads the state only, for an exec.
func (d *Driver) execRuncRoot(id, dir string) (string, error) {
	var state map[string]json.RawMessage
	if err := fileutil.ReadJSON(filepath.Join(d.runc.root, id, "state.json"), &state); err != nil {
		return "", fmt.Errorf("read runc's state of %s: %w", id, err)
	}
	var config map[string]json.RawMessage
	if err := json.Unmarshal(state["config"], &config); err != nil {
		return "", fmt.Errorf("runc's state of %s: %w", id, err)
	}
	var namespaces []map[string]any
	if err := json.Unmarshal(config["namespaces"], &namespaces); err != nil {
		return "", fmt.Errorf("runc's state of %s: namespaces: %w", id, err)
	}
	kept := namespaces[:0]
	for _, ns := range namespaces {
		if ns["type"] != "NEWNET" {
			kept = append(kept, ns)
		}
	}
	var err error
	if config["namespaces"], err = json.Marshal(kept); err != nil {
		return "", err
	}
	if state["config"], err = json.Marshal(config); err != nil {
		return "", err
	}
	root := filepath.Join(dir, "runc")
	if err := os.MkdirAll(filepath.Join(root, id), 0o700); err != nil {
		return "", err
	}
	if err := fileutil.ReplaceJSON(filepath.Join(root, id, "state.json"), state); err != nil {
		return "", err
	}
	return root, nil
}

// execError classifies runc's reason for not starting the process.
func (d *Driver) execError(id, msg string) error {
	if t, err := d.sup.Get(id); err == nil && t.Exited() {
		return fmt.Errorf("container task %s has exited: %w", id, errdefs.ErrConflict)
	}
	for _, s := range []string{"no such file or directory", "executable file not found", "permission denied", "not a directory", "chdir"} {
		if strings.Contains(msg, s) {
			return fmt.Errorf("exec into %s: %s: %w", id, msg, errdefs.ErrInvalidArgument)
		}
	}
	for _, s := range []string{"not running", "stopped container", "paused"} {
		if strings.Contains(msg, s) {
			return fmt.Errorf("exec into %s: %s: %w", id, msg, errdefs.ErrConflict)
		}
	}
	return fmt.Errorf("exec into %s: %s", id, msg)
}

// execSession is one process run by runc exec under a shim.
type execSession struct {
	d       *Driver
	id      string
	tmp     string // the session's files, in the task's directory
	sockDir string // the console socket's directory (a terminal only)

	shim    *exec.Cmd
	reports chan monitor.ExecReport
	files   []*os.File // our ends of the stdio pipes
	pty     *os.File
	stdin   io.WriteCloser
	stdout  io.Reader
	stderr  io.Reader

	pid   int
	pidfd int

	done chan struct{}
	exit *driver.ExitResult

	closeOnce sync.Once
	closeErr  error
}

// startShim starts `berth-monitor exec` with the process's stdio.
func (s *execSession) startShim(cfg *driver.ExecConfig, args monitor.ExecArgs) error {
	var childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	childEnds = append(childEnds, null)
	stdio := [3]*os.File{null, null, null}
	if !cfg.TTY {
		if cfg.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return err
			}
			childEnds, s.files = append(childEnds, r), append(s.files, w)
			stdio[0], s.stdin = r, w
		}
		for i := 1; i <= 2; i++ {
			r, w, err := os.Pipe()
			if err != nil {
				return err
			}
			childEnds, s.files = append(childEnds, w), append(s.files, r)
			stdio[i] = w
			if i == 1 {
				s.stdout = r
			} else {
				s.stderr = r
			}
		}
	}
	repR, repW, err := os.Pipe()
	if err != nil {
		return err
	}
	// The lifeline: the shim kills the session when its write end closes
	// (release, or this process's death).
	lifeR, lifeW, err := os.Pipe()
	if err != nil {
		repR.Close()
		repW.Close()
		return err
	}
	childEnds = append(childEnds, repW, lifeR)
	s.files = append(s.files, repR, lifeW)
	cmd := exec.Command(s.d.sup.MonitorPath(), append([]string{"exec"}, args.List()...)...)
	cmd.Env = s.d.opts.MonitorEnv
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdio[0], stdio[1], stdio[2]
	cmd.ExtraFiles = []*os.File{repW, lifeR} // monitor.ExecReportFD, ExecLifelineFD
	// Its own session, so it and the process are killed as one.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the exec shim %s: %w", cmd.Path, err)
	}
	s.shim = cmd
	s.reports = make(chan monitor.ExecReport, 2)
	go func() {
		defer close(s.reports)
		sc := bufio.NewScanner(repR)
		for sc.Scan() {
			var r monitor.ExecReport
			if json.Unmarshal(sc.Bytes(), &r) == nil {
				s.reports <- r
			}
		}
	}()
	return nil
}

// track follows the running process to its end.
func (s *execSession) track(pid int) {
	s.pid = pid
	ident, err := proc.Identify(pid)
	var gone <-chan struct{}
	if err == nil && inCgroup(pid, s.id) {
		if fd, err := unix.PidfdOpen(pid, 0); err == nil {
			// The pidfd pins the process we identified, not a successor.
			if again, err := proc.Identify(pid); err == nil && again == ident {
				s.pidfd = fd
			} else {
				unix.Close(fd)
			}
		}
		gone, _ = proc.Watch(ident)
	}
	go func() {
		var res *driver.ExitResult
		for r := range s.reports {
			if r.Exited {
				res = &driver.ExitResult{ExitCode: r.ExitCode, Signal: r.Signal, FinishedAt: time.Now().UTC()}
			}
		}
		_ = s.shim.Wait()
		if res == nil {
			// The shim was killed: the process's end is still ours to
			// see, not its status.
			if gone != nil {
				<-gone
			}
			res = &driver.ExitResult{ExitCode: -1, Err: "the exec shim died before the process ended; its exit status is lost", FinishedAt: time.Now().UTC()}
		}
		s.exit = res
		close(s.done)
	}()
}

// inCgroup reports whether pid is in task id's cgroup.
func inCgroup(pid int, id string) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	return err == nil && strings.Contains(string(data), cgroupPath(id))
}

// cgroupProcs lists the processes in task id's cgroup (none when it is
// gone: the container, and every process in it, ended).
func cgroupProcs(id string) ([]int, error) {
	path := "/sys/fs/cgroup/pids" + cgroupPath(id) + "/cgroup.procs"
	if cgroups.Mode() == cgroups.Unified {
		path = "/sys/fs/cgroup" + cgroupPath(id) + "/cgroup.procs"
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

func (s *execSession) Stdin() io.WriteCloser {
	if s.stdin == nil {
		return nil
	}
	return s.stdin
}

func (s *execSession) Stdout() io.Reader { return s.stdout }

func (s *execSession) Stderr() io.Reader {
	if s.stderr == nil {
		return nil
	}
	return s.stderr
}

func (s *execSession) Resize(size driver.TermSize) error {
	if s.pty == nil {
		return nil
	}
	return ptyio.Resize(s.pty, size.Rows, size.Cols)
}

func (s *execSession) Signal(sig syscall.Signal) error {
	select {
	case <-s.done:
		return fmt.Errorf("exec'd process has ended: %w", errdefs.ErrConflict)
	default:
	}
	if s.pidfd < 0 {
		return fmt.Errorf("exec'd process has ended: %w", errdefs.ErrConflict)
	}
	if err := unix.PidfdSendSignal(s.pidfd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("exec'd process has ended: %w", errdefs.ErrConflict)
		}
		return fmt.Errorf("signal the exec'd process: %w", err)
	}
	return nil
}

func (s *execSession) Wait(ctx context.Context) (*driver.ExitResult, error) {
	select {
	case <-s.done:
		return s.exit, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close kills the process, what it started in its session or process
// group inside the container, and the shim, then releases the session.
func (s *execSession) Close() error {
	s.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), execKillTimeout)
		defer cancel()
		s.closeErr = s.kill(ctx)
		select {
		case <-s.done:
		case <-ctx.Done():
			// A shim that does not report: end it and what it runs.
			_ = unix.Kill(-s.shim.Process.Pid, unix.SIGKILL)
			<-s.done
		}
		s.release()
	})
	return s.closeErr
}

func (s *execSession) kill(ctx context.Context) error {
	select {
	case <-s.done:
		// Ended; what it left running in its session still goes.
	default:
		if s.pidfd >= 0 {
			_ = unix.PidfdSendSignal(s.pidfd, unix.SIGKILL, nil, 0)
		}
	}
	shim, pid := s.shim.Process.Pid, s.pid
	return proc.KillAll(ctx, func() ([]int, error) { return cgroupProcs(s.id) }, func(p proc.Info) bool {
		return p.Session == shim || p.Session == pid || p.Pgrp == pid
	})
}

// abort ends a session whose start failed.
func (s *execSession) abort() {
	if s.shim != nil {
		_ = unix.Kill(-s.shim.Process.Pid, unix.SIGKILL)
		for range s.reports {
		}
		_ = s.shim.Wait()
		if s.pid > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), execKillTimeout)
			_ = s.kill(ctx)
			cancel()
		}
	}
	s.release()
}

func (s *execSession) release() {
	for _, f := range s.files {
		f.Close()
	}
	if s.pty != nil {
		s.pty.Close()
	}
	if s.pidfd >= 0 {
		unix.Close(s.pidfd)
		s.pidfd = -1
	}
	os.RemoveAll(s.tmp)
	if s.sockDir != "" {
		os.RemoveAll(s.sockDir)
	}
}
