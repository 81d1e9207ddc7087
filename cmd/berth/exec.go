package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/berthd/berth/api"
)

func newExecCmd(g *globals) *cobra.Command {
	var (
		interactive, tty bool
		env              []string
		workdir, user    string
	)
	cmd := &cobra.Command{
		Use:   "exec [-i] [-t] [-e K=V] [-w DIR] [-u USER] WORKLOAD -- CMD [ARG...]",
		Short: "Run a command in a running workload, container or VM alike",
		Long: `Run a command in a running workload and exit with its exit code (128+N
when signal N killed it). With -i this terminal's input goes to the command;
with -t the command runs on a terminal of its own, this terminal is raw and
the command's follows its size. Without -t, SIGINT, SIGTERM and SIGHUP here
are sent to the command. If this command goes away, the agent kills the
command and what it started. Allowed to whoever may stop the workload; the
node's policy may forbid it (exec: deny).`,
		Example: `  berth exec web -- cat /etc/os-release
  berth exec -it web -- sh
  berth exec -e DEBUG=1 -w /srv -u nobody web -- ./check.sh
  echo 'select 1;' | berth exec -i db -- psql`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 && args[1] == "--" {
				args = args[1:] // the workload, then -- (flags end at the workload)
			}
			if len(args) < 2 {
				return errors.New("exec needs a workload and a command: berth exec WORKLOAD -- CMD [ARG...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			command := args[1:]
			if command[0] == "--" {
				command = command[1:]
			}
			req := api.ExecRequest{Command: command, Workdir: workdir, User: user, Stdin: interactive, TTY: tty}
			for _, kv := range env {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					v, ok = os.LookupEnv(k) // -e NAME passes this shell's value
				}
				if !ok {
					continue
				}
				if req.Env == nil {
					req.Env = map[string]string{}
				}
				req.Env[k] = v
			}
			code, err := runExec(cmd, g, args[0], req)
			if err != nil {
				return err
			}
			if code != 0 {
				return exitError{code}
			}
			return nil
		},
	}
	// Flags end at the workload: the command's own flags are its own.
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().BoolVarP(&interactive, "interactive", "i", false, "send this terminal's input to the command")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "run the command on a terminal")
	cmd.Flags().StringArrayVarP(&env, "env", "e", nil, "set KEY=VALUE for the command (KEY alone: this shell's value)")
	cmd.Flags().StringVarP(&workdir, "workdir", "w", "", "working directory in the workload")
	cmd.Flags().StringVarP(&user, "user", "u", "", "user (name or uid[:gid]) as the workload's image knows it")
	return cmd
}

// runExec runs one interactive session and returns the command's exit code.
func runExec(cmd *cobra.Command, g *globals, ref string, req api.ExecRequest) (int, error) {
	c, err := g.client()
	if err != nil {
		return 0, err
	}
	inFd, outFd := int(os.Stdin.Fd()), int(os.Stdout.Fd())
	if req.TTY && term.IsTerminal(outFd) {
		if w, h, err := term.GetSize(outFd); err == nil {
			req.Size = &api.TermSize{Rows: uint16(h), Cols: uint16(w)}
		}
	}
	sess, err := c.ExecStream(cmd.Context(), ref, req)
	if err != nil {
		return 0, err
	}
	defer sess.Close()
	if req.TTY && term.IsTerminal(inFd) {
		state, err := term.MakeRaw(inFd)
		if err != nil {
			return 0, fmt.Errorf("make this terminal raw: %w", err)
		}
		defer term.Restore(inFd, state)
	}
	defer forwardSignals(sess, req.TTY)()
	if req.Stdin {
		go func() {
			_, _ = io.Copy(sess, os.Stdin)
			_ = sess.CloseStdin()
		}()
	}
	exit, err := sess.Wait(os.Stdout, os.Stderr)
	if err != nil {
		return 0, err
	}
	return *exit.ExitCode, nil
}

func newKillCmd(g *globals) *cobra.Command {
	var sig string
	cmd := &cobra.Command{
		Use:   "kill [-s SIGNAL] WORKLOAD...",
		Short: "Send a signal to running workloads' main process (default KILL)",
		Long: `Send a signal to running workloads' main process: a name (HUP, SIGHUP)
or a number. In a VM, berth-init forwards it to the workload's process.
Unlike stop, nothing follows: a workload that ignores the signal keeps
running, and one that ends is restarted as its restart policy says.`,
		Example: `  berth kill -s HUP web             # make it reload its configuration
  berth kill web                    # SIGKILL
  berth kill -s 10 worker-1 worker-2`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, ref := range args {
				w, err := c.Signal(cmd.Context(), ref, sig)
				if err != nil {
					return err
				}
				fmt.Println(w.ID)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&sig, "signal", "s", "KILL", "signal name or number")
	return cmd
}
