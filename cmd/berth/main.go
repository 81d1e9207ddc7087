// Command berth is berth's single binary: `berth agent` runs the per-node
// daemon; the other commands are its command-line client.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

// exitError carries an exit code out of a command without printing it:
// `berth run --wait` exits with the workload's code.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	var ee exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		os.Exit(ee.code)
	default:
		fmt.Fprintln(os.Stderr, "berth:", describeHinted(err))
		os.Exit(1)
	}
}

// describe renders an agent problem as one readable line.
func describe(err error) string {
	var p *api.Problem
	if !errors.As(err, &p) {
		return err.Error()
	}
	s := p.Title
	if p.Detail != "" {
		s += ": " + p.Detail
	}
	for _, f := range p.Fields {
		s += fmt.Sprintf("\n  %s: %s", f.Field, f.Detail)
	}
	if p.Reason != "" {
		s += fmt.Sprintf(" (%s)", p.Reason)
	}
	return s
}

type globals struct {
	addr   string
	output string
	// token, tlsCA, tlsCert and tlsKey are the credentials and trust for
	// an agent with auth or TLS on (token.go).
	token, tlsCA, tlsCert, tlsKey string
}

func (g *globals) client() (*client.Client, error) {
	opts, err := g.clientOptions()
	if err != nil {
		return nil, err
	}
	return client.New(g.addr, opts...)
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:           "berth",
		Short:         "berth runs workloads as containers or virtual machines, as the node's isolation policy decides",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	addr := os.Getenv("BERTH_ADDR")
	if addr == "" {
		addr = client.DefaultAddr
	}
	root.PersistentFlags().StringVar(&g.addr, "addr", addr, "agent address: HOST:PORT, http://HOST:PORT or unix:///PATH (env BERTH_ADDR)")
	root.PersistentFlags().StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	g.addSecurityFlags(root)
	root.AddCommand(
		newAgentCmd(),
		newRunCmd(g), newPsCmd(g), newInspectCmd(g), newLogsCmd(g), newStopCmd(g), newRmCmd(g), newStatsCmd(g),
		newExecCmd(g), newAttachCmd(g), newKillCmd(g),
		newImageCmd(g), newVolumeCmd(g), newNodeCmd(g), newEventsCmd(g),
		newPolicyCmd(g),
		newTokenCmd(),
	)
	addExamples(root)
	addHints(root, g)
	return root
}
