//go:build linux

package pid1

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/internal/ptyio"
)

// execReconnectDelay is how often berth-init looks again at an exec port
// with no host on the other side: such a port reads end of file at once.
const execReconnectDelay = 100 * time.Millisecond

// serveExec serves the exec channel for as long as the guest runs. It is
// started once the workload's root is berth-init's own, so every exec'd
// process sees the filesystem the workload sees.
func (in *initProc) serveExec(cfg *guest.Config) {
	defer in.recoverGoroutine("exec channel")
	srv := guest.NewExecServer(&execBackend{in: in, cfg: cfg}, in.logf)
	var last string
	for {
		err := srv.Serve(in.execPort, in.execPort)
		if !errors.Is(err, io.EOF) {
			if msg := err.Error(); msg != last {
				in.logf("exec channel: %v", err)
				last = msg
			}
			time.Sleep(time.Second)
			continue
		}
		time.Sleep(execReconnectDelay)
	}
}

// execBackend starts exec'd processes the way runWorkload starts the
// workload: in its root, with its environment (plus the session's), as its
// user unless the session names another, in a session of their own.
type execBackend struct {
	in  *initProc
	cfg *guest.Config
}

func invalid(format string, args ...any) error {
	return &guest.ExecError{Kind: guest.ExecInvalid, Message: fmt.Sprintf(format, args...)}
}

func (b *execBackend) SignalMain(sig int) error {
	b.in.mu.Lock()
	pid := b.in.pgid
	b.in.mu.Unlock()
	if pid == 0 {
		return &guest.ExecError{Kind: guest.ExecConflict, Message: "the workload's main process is not running"}
	}
	if err := unix.Kill(pid, unix.Signal(sig)); err != nil {
		if errors.Is(err, unix.EINVAL) {
			return invalid("signal %d: %v", sig, err)
		}
		return &guest.ExecError{Kind: guest.ExecConflict, Message: fmt.Sprintf("signal the workload: %v", err)}
	}
	return nil
}

// Attach connects a session to the workload's main process (its console,
// set up before the exec channel is served).
func (b *execBackend) Attach(req *guest.AttachRequest) (guest.ExecProcess, error) {
	return b.in.main.Attach(req)
}

func (b *execBackend) Start(req *guest.ExecRequest) (guest.ExecProcess, error) {
	userSpec := req.User
	if userSpec == "" {
		userSpec = b.cfg.User
	}
	user, err := resolveUser(userSpec, "/etc/passwd", "/etc/group")
	if err != nil {
		return nil, invalid("%v", err)
	}
	env := workloadEnv(append(append([]string(nil), b.cfg.Env...), req.Env...), user.home)
	dir := req.Workdir
	switch {
	case dir == "":
		// The workload's own, which runWorkload created.
		if dir = b.cfg.Workdir; dir == "" {
			dir = "/"
		}
	case !filepath.IsAbs(dir):
		return nil, invalid("workdir %q is not an absolute path", dir)
	default:
		fi, err := os.Stat(dir)
		if err != nil {
			return nil, invalid("workdir %s: %v", dir, err)
		}
		if !fi.IsDir() {
			return nil, invalid("workdir %s is not a directory", dir)
		}
	}
	path, err := lookPath(req.Args[0], getenv(env, "PATH"), dir)
	if err != nil {
		return nil, invalid("%v", err)
	}
	p := &execProc{}
	var files []*os.File
	var childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	attr := &syscall.SysProcAttr{
		// A session of its own: Close kills it whole, and a terminal
		// becomes its controlling one.
		Setsid:     true,
		Credential: &syscall.Credential{Uid: user.uid, Gid: user.gid, Groups: user.groups},
	}
	if req.TTY {
		master, slave, err := openPTY(user.uid, user.gid)
		if err != nil {
			return nil, &guest.ExecError{Kind: guest.ExecInternal, Message: err.Error()}
		}
		p.master = master
		childEnds = append(childEnds, slave)
		if err := p.Resize(req.Rows, req.Cols); err != nil {
			master.Close()
			return nil, &guest.ExecError{Kind: guest.ExecInternal, Message: err.Error()}
		}
		files = []*os.File{slave, slave, slave}
		attr.Setctty, attr.Ctty = true, 0
		p.stdout = master
		if req.Stdin {
			p.stdin = ttyInput{master}
		}
	} else {
		stdin, err := os.Open("/dev/null")
		if err != nil {
			return nil, &guest.ExecError{Kind: guest.ExecInternal, Message: err.Error()}
		}
		childEnds = append(childEnds, stdin)
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, &guest.ExecError{Kind: guest.ExecInternal, Message: err.Error()}
			}
			childEnds = append(childEnds, r)
			stdin, p.stdin = r, w
		}
		outR, outW, err := os.Pipe()
		if err != nil {
			p.Release()
			return nil, &guest.ExecError{Kind: guest.ExecInternal, Message: err.Error()}
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			outR.Close()
			outW.Close()
			p.Release()
			return nil, &guest.ExecError{Kind: guest.ExecInternal, Message: err.Error()}
		}
		childEnds = append(childEnds, outW, errW)
		p.stdout, p.stderr = outR, errR
		files = []*os.File{stdin, outW, errW}
	}
	pid, exited, err := b.in.reaper.start(func() (int, error) {
		proc, err := os.StartProcess(path, req.Args, &os.ProcAttr{Dir: dir, Env: env, Files: files, Sys: attr})
		if err != nil {
			return 0, err
		}
		defer proc.Release()
		return proc.Pid, nil
	})
	if err != nil {
		p.Release()
		return nil, invalid("%v", commandErrorFor(req.Args[0], err))
	}
	p.pid, p.exited = pid, exited
	return p, nil
}

// openPTY allocates a terminal in the workload's devpts (mounted by
// enterRoot, with /dev/ptmx pointing into it) whose slave belongs to the
// session's user, as runc's console does.
func openPTY(uid, gid uint32) (master, slave *os.File, err error) {
	master, err = os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	fail := func(err error) (*os.File, *os.File, error) {
		master.Close()
		return nil, nil, err
	}
	rc, err := master.SyscallConn()
	if err != nil {
		return fail(err)
	}
	var n int
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		if ioErr = unix.IoctlSetPointerInt(int(fd), unix.TIOCSPTLCK, 0); ioErr != nil {
			return
		}
		n, ioErr = unix.IoctlGetInt(int(fd), unix.TIOCGPTN)
	}); err != nil {
		return fail(err)
	}
	if ioErr != nil {
		return fail(fmt.Errorf("unlock terminal: %w", ioErr))
	}
	name := "/dev/pts/" + strconv.Itoa(n)
	if err := os.Chown(name, int(uid), int(gid)); err != nil {
		return fail(fmt.Errorf("chown %s: %w", name, err))
	}
	slave, err = os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("open %s: %w", name, err))
	}
	return master, slave, nil
}

// execProc is one exec'd process in the guest.
type execProc struct {
	pid    int
	exited <-chan syscall.WaitStatus
	master *os.File // the terminal, with TTY
	stdin  io.WriteCloser
	stdout *os.File
	stderr *os.File
}

func (p *execProc) Stdin() io.WriteCloser {
	if p.stdin == nil {
		return nil
	}
	return p.stdin
}

func (p *execProc) Stdout() io.Reader { return p.stdout }

func (p *execProc) Stderr() io.Reader {
	if p.stderr == nil {
		return nil
	}
	return p.stderr
}

func (p *execProc) Wait() (int, int) { return exitStatus(<-p.exited) }

func (p *execProc) Signal(sig int) error { return unix.Kill(p.pid, unix.Signal(sig)) }

func (p *execProc) Resize(rows, cols uint16) error {
	if p.master == nil || rows == 0 || cols == 0 {
		return nil
	}
	return ptyio.Resize(p.master, rows, cols)
}

// Kill ends the process's session: its process group, and any group a
// shell with job control made inside it.
func (p *execProc) Kill() {
	if p.pid == 0 {
		return
	}
	_ = unix.Kill(-p.pid, unix.SIGKILL)
	for _, pid := range proc.SessionMembers(p.pid) {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
}

func (p *execProc) Release() {
	for _, f := range []*os.File{p.master, p.stderr} {
		if f != nil {
			f.Close()
		}
	}
	if p.stdout != nil {
		p.stdout.Close()
	}
	if w, ok := p.stdin.(*os.File); ok {
		w.Close()
	}
}

// ttyInput writes to a terminal; closing it types the end-of-file
// character, as closing a pipe would end the input.
type ttyInput struct{ master *os.File }

func (t ttyInput) Write(p []byte) (int, error) { return t.master.Write(p) }
func (t ttyInput) Close() error {
	_, err := t.master.Write([]byte{4}) // VEOF, ^D
	return err
}

// openExecPort opens the exec channel's port, waiting for it (its name
// can arrive after the other ports') when the scan at boot missed it.
func (in *initProc) openExecPort(devs devices) error {
	deadline := time.Now().Add(deviceTimeout)
	for {
		if p, ok := devs.ports[guest.ExecPort]; ok {
			f, err := os.OpenFile(p, os.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open exec port %s: %w", p, err)
			}
			in.execPort = f
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("devices missing after waiting: virtio-serial port %s (is the domain defined with it?)", guest.ExecPort)
		}
		time.Sleep(10 * time.Millisecond)
		var err error
		if devs, _, err = scanDevices("/sys", "/dev"); err != nil {
			return err
		}
	}
}
