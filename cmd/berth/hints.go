package main

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
)

// hintedError is a command's error with the berth command line that helps
// next: the agent's problems speak HTTP (routes, fields), a CLI user needs
// the command to run.
type hintedError struct {
	err  error
	hint string
}

func (e *hintedError) Error() string { return e.err.Error() + "\n" + e.hint }
func (e *hintedError) Unwrap() error { return e.err }

// workloadCmds take workload references as arguments.
var workloadCmds = map[string]bool{
	"berth inspect": true, "berth logs": true, "berth stop": true, "berth rm": true, "berth stats": true,
	"berth exec": true, "berth kill": true,
}

// hintFor returns what to run after err ended command path with args, or
// "" when there is nothing better to say than the error. It switches on
// the problem's reason (stable), never on its detail (prose).
func hintFor(path string, args []string, addr string, err error) string {
	var p *api.Problem
	if !errors.As(err, &p) {
		if unreachable(err) {
			return fmt.Sprintf("no agent answers at %s: start it (systemctl start berth, or berth agent), or point --addr / BERTH_ADDR at one", addr)
		}
		return ""
	}
	arg := func(i int, placeholder string) string {
		if i < len(args) && args[i] != "" && args[i] != "-" {
			return args[i]
		}
		return placeholder
	}
	switch p.Reason {
	case api.ReasonImageNotFound:
		ref := "IMAGE"
		if path == "berth run" {
			ref = arg(0, ref)
		}
		return fmt.Sprintf("pull it: berth image pull %s (or import an archive: berth image import --ref %s FILE)", ref, ref)
	case api.ReasonNotFound:
		switch {
		case workloadCmds[path]:
			return "berth ps -a lists the workloads you can see on this node"
		case path == "berth image rm":
			return "berth image ls lists the node's images"
		case path == "berth volume inspect" || path == "berth volume rm":
			return "berth volume ls lists the node's volumes"
		}
	case api.ReasonAlreadyExists:
		if path == "berth run" {
			return "a workload of that name exists with another spec: berth inspect NAME shows it; berth rm NAME first to replace it"
		}
	case api.ReasonConflict:
		if path == "berth run" {
			return "the name is held by a workload being deleted: berth ps -a shows it; run again once it is gone"
		}
	case api.ReasonFailedPrecondition:
		if workloadCmds[path] {
			return fmt.Sprintf("berth inspect %s shows its state", arg(0, "WORKLOAD"))
		}
	case api.ReasonDenied:
		return "berth policy show prints the node's isolation policy; berth policy explain -f SPEC.json says why a spec is refused"
	case api.ReasonResourceExhausted:
		return "berth node status shows the node's capacity and what is allocated; berth ps lists what holds it"
	case api.ReasonNodeCordoned:
		return "berth node status says who cordoned the node and why; berth node uncordon admits workloads again"
	case api.ReasonUnavailable:
		return "berth node status shows the drivers' health and the node's conditions"
	case api.ReasonUnauthenticated:
		return "give a token with --token or BERTH_TOKEN (an admin makes one: berth token add --file TOKENS --role ROLE)"
	case api.ReasonPermissionDenied:
		return "your token's role may not do this; berth token add --help lists what each role may do"
	case api.ReasonRouteNotFound, api.ReasonMethodNotAllowed:
		return "the agent does not know this request: it is older than this berth (berth node status shows its version)"
	}
	return ""
}

// unreachable: nothing listens at the address, or the socket is missing.
func unreachable(err error) bool {
	var op *net.OpError
	return errors.Is(err, syscall.ECONNREFUSED) || errors.As(err, &op) && op.Op == "dial" && errors.Is(err, syscall.ENOENT)
}

// addHints wraps every command's RunE so its error carries the hint.
func addHints(c *cobra.Command, g *globals) {
	if run := c.RunE; run != nil {
		path := c.CommandPath()
		c.RunE = func(cmd *cobra.Command, args []string) error {
			err := run(cmd, args)
			if err == nil {
				return nil
			}
			var ee exitError
			if errors.As(err, &ee) {
				return err
			}
			if h := hintFor(path, args, g.addr, err); h != "" {
				return &hintedError{err: err, hint: h}
			}
			return err
		}
	}
	for _, sub := range c.Commands() {
		addHints(sub, g)
	}
}

// describeHinted is describe with the hint on its own line.
func describeHinted(err error) string {
	var h *hintedError
	if errors.As(err, &h) {
		return describe(h.err) + "\n" + indent("hint: "+h.hint)
	}
	return describe(err)
}

func indent(s string) string { return "  " + strings.ReplaceAll(s, "\n", "\n  ") }
