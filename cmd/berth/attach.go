package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// The detach keys, as docker's: ctrl-p then ctrl-q.
const (
	keyCtrlP = 0x10
	keyCtrlQ = 0x11
)

func newAttachCmd(g *globals) *cobra.Command {
	var noStdin, logs bool
	cmd := &cobra.Command{
		Use:   "attach [--no-stdin] [--logs] WORKLOAD",
		Short: "Attach this terminal to a running workload's own terminal or streams",
		Long: `Attach to a running workload's terminal (a workload run with -t) or its
output, and type into its standard input when it was run with -i. Detach
with ctrl-p ctrl-q: the workload runs on, and berth attach exits 0. When the
workload ends while attached, berth attach exits with its exit code.
Without a terminal, SIGINT, SIGTERM and SIGHUP here are sent to the
workload's main process. Several clients may attach at once. --logs begins
with the workload's newest output from before the attach (up to 64 KiB).
Allowed to whoever may stop the workload.`,
		Example: `  berth run -it --name shell busybox:latest -- sh     # ctrl-p ctrl-q detaches
  berth attach shell
  berth attach --no-stdin --logs web`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			w, _, err := c.Get(cmd.Context(), args[0], nil)
			if err != nil {
				return err
			}
			return attachAndExit(cmd.Context(), c, w, api.AttachRequest{Stdin: w.Spec.Stdin && !noStdin, Logs: logs})
		},
	}
	cmd.Flags().BoolVar(&noStdin, "no-stdin", false, "only watch: do not send this terminal's input")
	cmd.Flags().BoolVar(&logs, "logs", false, "begin with the workload's newest earlier output")
	return cmd
}

// attachAndExit attaches to w and turns the outcome into berth's exit: the
// workload's exit code, or 0 after a detach.
func attachAndExit(ctx context.Context, c *client.Client, w *api.Workload, req api.AttachRequest) error {
	code, detached, err := attach(ctx, c, w, req)
	if err != nil {
		return err
	}
	if detached {
		fmt.Fprintf(os.Stderr, "\r\nberth: detached from %s; the workload runs on (berth attach %s)\n", w.ID, refOf(w))
		return nil
	}
	if code != 0 {
		return exitError{code}
	}
	return nil
}

func refOf(w *api.Workload) string {
	if w.Name != "" {
		return w.Name
	}
	return w.ID
}

// errDetach ends the input copy at the detach keys.
var errDetach = errors.New("detach keys")

// attach runs one attach session on this terminal: raw when the workload
// has a terminal and this is one, resized with the window, signals sent
// on without a terminal. It returns the workload's exit code when it
// ended, or detached when the user typed the detach keys.
func attach(ctx context.Context, c *client.Client, w *api.Workload, req api.AttachRequest) (code int, detached bool, err error) {
	inFd, outFd := int(os.Stdin.Fd()), int(os.Stdout.Fd())
	tty := w.Spec.TTY
	if tty && term.IsTerminal(outFd) {
		if cols, rows, err := term.GetSize(outFd); err == nil {
			req.Size = &api.TermSize{Rows: uint16(rows), Cols: uint16(cols)}
		}
	}
	sess, err := c.Attach(ctx, w.ID, req)
	if err != nil {
		return 0, false, err
	}
	defer sess.Close()
	localTerm := term.IsTerminal(inFd)
	if tty && localTerm && req.Stdin {
		state, err := term.MakeRaw(inFd)
		if err != nil {
			return 0, false, fmt.Errorf("make this terminal raw: %w", err)
		}
		defer term.Restore(inFd, state)
	}
	stopSignals := forwardSignals(sess, tty)
	defer stopSignals()
	detach := make(chan struct{})
	if req.Stdin {
		go func() {
			var in io.Reader = os.Stdin
			if localTerm {
				in = &detachReader{r: bufio.NewReader(os.Stdin)}
			}
			_, err := io.Copy(sess, in)
			if errors.Is(err, errDetach) {
				close(detach)
				_ = sess.Close()
				return
			}
			_ = sess.CloseStdin()
		}()
	}
	exit, err := sess.Wait(os.Stdout, os.Stderr)
	select {
	case <-detach:
		return 0, true, nil
	default:
	}
	if err != nil {
		return 0, false, err
	}
	return *exit.ExitCode, false, nil
}

// forwardSignals sends the window's size to a session with a terminal,
// and SIGINT, SIGTERM and SIGHUP to one without (on a terminal, ctrl-c is
// a byte the remote terminal turns into its signal).
func forwardSignals(sess *client.ExecSession, tty bool) (stop func()) {
	sigs := make(chan os.Signal, 4)
	if tty {
		signal.Notify(sigs, syscall.SIGWINCH)
	} else {
		signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	}
	outFd := int(os.Stdout.Fd())
	go func() {
		for s := range sigs {
			if s == syscall.SIGWINCH {
				if cols, rows, err := term.GetSize(outFd); err == nil {
					_ = sess.Resize(uint16(rows), uint16(cols))
				}
				continue
			}
			_ = sess.Signal(strconv.Itoa(int(s.(syscall.Signal))))
		}
	}()
	return func() { signal.Stop(sigs); close(sigs) }
}

// detachReader passes input through until ctrl-p ctrl-q, which ends it
// with errDetach; a ctrl-p followed by anything else is passed on with
// what follows, as docker does.
type detachReader struct {
	r       *bufio.Reader
	pending bool // a ctrl-p was read and held back
}

func (d *detachReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if n > 0 && d.r.Buffered() == 0 {
			break // return what we have rather than block
		}
		b, err := d.r.ReadByte()
		if err != nil {
			if n == 0 && d.pending {
				d.pending = false
				p[0] = keyCtrlP
				return 1, nil
			}
			if n > 0 {
				return n, nil
			}
			return 0, err
		}
		if d.pending {
			d.pending = false
			if b == keyCtrlQ {
				return n, errDetach
			}
			p[n] = keyCtrlP
			n++
			_ = d.r.UnreadByte() // b is looked at afresh: it may be a ctrl-p
			continue
		}
		if b == keyCtrlP {
			d.pending = true
			continue
		}
		p[n] = b
		n++
	}
	return n, nil
}

// waitStarted follows the workload with blocking queries until it is past
// pending and starting: running (to attach to), or already ended.
func waitStarted(ctx context.Context, c *client.Client, id string) (*api.Workload, error) {
	var index uint64
	for {
		w, idx, err := c.Get(ctx, id, &client.QueryOptions{WaitIndex: index, WaitTime: time.Minute})
		if err != nil || (w.State != api.StatePending && w.State != api.StateStarting) {
			return w, err
		}
		index = idx
	}
}
