package vmdriver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
)

// execSocket is the exec channel's port (guest.ExecPort) in the task
// directory. QEMU listens on it; the driver connects when a session or a
// signal needs it and keeps the connection for the VM's life, shared by
// all of its sessions. QEMU serves one client at a time: a second driver
// on the same root waits until the first lets go.
const execSocket = "exec.sock"

// execHandshakeTimeout bounds the wait for berth-init's answer on a new
// connection: a guest still booting under TCG answers once it has found
// its devices and entered the workload's root.
const execHandshakeTimeout = 60 * time.Second

var (
	_ driver.Execer   = (*Driver)(nil)
	_ driver.Signaler = (*Driver)(nil)
)

// execChannel is the driver's connection to one VM's exec channel.
type execChannel struct {
	// sem is held while dialing (and while reading client): callers wait
	// for it within their own ctx.
	sem    chan struct{}
	client *guest.ExecClient
}

// execClient returns the VM's connection, dialing it when there is none
// or the last one died (an agent restart, a guest that reset it).
func (d *Driver) execClient(ctx context.Context, t *task) (*guest.ExecClient, error) {
	if t.Data.WholeDisk != "" {
		return nil, fmt.Errorf("vm task %s boots a whole-disk image, which runs no berth-init to exec into or signal: %w", t.ID, errdefs.ErrNotImplemented)
	}
	sock := filepath.Join(t.Dir, execSocket)
	if _, err := os.Stat(sock); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("vm task %s was started by an older berth whose VMs have no exec channel; restart the workload to exec into it or signal it: %w", t.ID, errdefs.ErrConflict)
	}
	d.execMu.Lock()
	ch := d.execChans[t.ID]
	if ch == nil {
		ch = &execChannel{sem: make(chan struct{}, 1)}
		d.execChans[t.ID] = ch
	}
	d.execMu.Unlock()

	select {
	case ch.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("vm task %s: wait for the exec channel: %w", t.ID, ctx.Err())
	}
	defer func() { <-ch.sem }()
	if ch.client != nil && ch.client.Err() == nil {
		return ch.client, nil
	}
	hctx, cancel := context.WithTimeout(ctx, execHandshakeTimeout)
	defer cancel()
	// Close does not wait for a dial.
	defer context.AfterFunc(d.ctx, cancel)()
	var dialer net.Dialer
	conn, err := dialer.DialContext(hctx, "unix", sock)
	if err != nil {
		if t.Exited() {
			return nil, notRunning(t)
		}
		return nil, fmt.Errorf("vm task %s: connect to the exec channel: %w", t.ID, errors.Join(err, errdefs.ErrUnavailable))
	}
	c, err := guest.DialExec(hctx, conn)
	if err != nil {
		if t.Exited() {
			return nil, notRunning(t)
		}
		return nil, fmt.Errorf("vm task %s: %w", t.ID, errors.Join(err, errdefs.ErrUnavailable))
	}
	ch.client = c
	// The connection ends with the VM (QEMU closes it) or the driver; a
	// channel of a VM that ended is forgotten.
	go func() {
		select {
		case <-t.Done():
		case <-d.ctx.Done():
		case <-c.Done():
		}
		c.Close()
		if t.Exited() {
			d.execMu.Lock()
			if d.execChans[t.ID] == ch {
				delete(d.execChans, t.ID)
			}
			d.execMu.Unlock()
		}
	}()
	return c, nil
}

func notRunning(t *task) error {
	return fmt.Errorf("vm task %s is not running: %w", t.ID, errdefs.ErrConflict)
}

// runningTask returns a task that runs, for exec and signals.
func (d *Driver) runningTask(id string) (*task, error) {
	t, err := d.sup.Get(id)
	if err != nil {
		return nil, err
	}
	if t.Exited() {
		return nil, notRunning(t)
	}
	return t, nil
}

// checkExec refuses, before anything reaches the guest, what berth-init
// would refuse anyway.
func checkExec(cfg *driver.ExecConfig) error {
	var problems []string
	if len(cfg.Args) == 0 || cfg.Args[0] == "" {
		problems = append(problems, "args: a command is required")
	}
	if cfg.Workdir != "" && !filepath.IsAbs(cfg.Workdir) {
		problems = append(problems, fmt.Sprintf("workdir %q: must be an absolute path", cfg.Workdir))
	}
	if cfg.User != "" {
		if _, _, _, err := guest.ParseUser(cfg.User); err != nil {
			problems = append(problems, fmt.Sprintf("user %q: %v", cfg.User, err))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("vm exec: %s: %w", strings.Join(problems, "; "), errdefs.ErrInvalidArgument)
	}
	return nil
}

// Exec implements driver.Execer: berth-init starts the process in the
// guest (see guest.ExecServer) and the session's streams travel over the
// VM's exec channel.
func (d *Driver) Exec(ctx context.Context, id string, cfg *driver.ExecConfig) (driver.ExecSession, error) {
	if err := driver.CheckID(id); err != nil {
		return nil, err
	}
	if err := checkExec(cfg); err != nil {
		return nil, err
	}
	t, err := d.runningTask(id)
	if err != nil {
		return nil, err
	}
	c, err := d.execClient(ctx, t)
	if err != nil {
		return nil, err
	}
	s, err := c.Exec(ctx, &guest.ExecRequest{
		Args: cfg.Args, Env: cfg.Env, Workdir: cfg.Workdir, User: cfg.User,
		Stdin: cfg.Stdin, TTY: cfg.TTY, Rows: cfg.Size.Rows, Cols: cfg.Size.Cols,
	})
	if err != nil {
		return nil, d.execError(t, err)
	}
	return &execSession{s: s, cfg: *cfg}, nil
}

// execError classifies a failed request: berth-init's refusals carry
// their class; a connection that died with the VM is a task that no
// longer runs.
func (d *Driver) execError(t *task, err error) error {
	var ee *guest.ExecError
	switch {
	case errors.As(err, &ee):
		return fmt.Errorf("vm task %s: %w", t.ID, err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case t.Exited():
		return notRunning(t)
	}
	return fmt.Errorf("vm task %s: %w", t.ID, errors.Join(err, errdefs.ErrUnavailable))
}

// Signal implements driver.Signaler: berth-init delivers sig to the
// workload's main process.
func (d *Driver) Signal(ctx context.Context, id string, sig syscall.Signal) error {
	t, err := d.runningTask(id)
	if err != nil {
		return err
	}
	if sig <= 0 || sig > 64 {
		return fmt.Errorf("signal %d: %w", sig, errdefs.ErrInvalidArgument)
	}
	c, err := d.execClient(ctx, t)
	if err != nil {
		return err
	}
	if err := c.SignalMain(ctx, int(sig)); err != nil {
		return d.execError(t, err)
	}
	return nil
}

// closeExec drops every exec connection (Close): berth-init kills the
// sessions they carried.
func (d *Driver) closeExec() {
	d.execMu.Lock()
	chans := d.execChans
	d.execChans = map[string]*execChannel{}
	d.execMu.Unlock()
	for _, ch := range chans {
		ch.sem <- struct{}{}
		if ch.client != nil {
			ch.client.Close()
		}
		<-ch.sem
	}
}

// execSession adapts a guest.ExecSession to the driver contract.
type execSession struct {
	s   *guest.ExecSession
	cfg driver.ExecConfig
}

func (e *execSession) Stdin() io.WriteCloser {
	if !e.cfg.Stdin {
		return nil
	}
	return e.s.Stdin()
}

func (e *execSession) Stdout() io.Reader { return e.s.Stdout() }

func (e *execSession) Stderr() io.Reader {
	if e.cfg.TTY {
		return nil
	}
	return e.s.Stderr()
}

func (e *execSession) Resize(sz driver.TermSize) error { return e.s.Resize(sz.Rows, sz.Cols) }

func (e *execSession) Signal(sig syscall.Signal) error { return e.s.Signal(int(sig)) }

func (e *execSession) Wait(ctx context.Context) (*driver.ExitResult, error) {
	code, sig, err := e.s.Wait(ctx)
	if err != nil {
		return nil, fmt.Errorf("vm exec session: %w", err)
	}
	return &driver.ExitResult{ExitCode: code, Signal: sig, FinishedAt: time.Now().UTC()}, nil
}

func (e *execSession) Close() error { return e.s.Close() }
