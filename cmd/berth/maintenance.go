package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// maintenanceCmds are berth node cordon, uncordon and drain.
func maintenanceCmds(g *globals) []*cobra.Command {
	var reason string
	var timeout time.Duration
	var wait bool
	show := func(n *api.Node) error {
		if g.output == "json" {
			return printJSON(n)
		}
		switch {
		case n.Schedulable:
			fmt.Println("node is schedulable")
		case n.Cordon != nil && n.Cordon.Draining:
			fmt.Printf("node is draining since %s %s\n", n.Cordon.Since.Local().Format(time.DateTime), quoted(n.Cordon.Reason))
		case n.Cordon != nil:
			fmt.Printf("node is cordoned since %s %s\n", n.Cordon.Since.Local().Format(time.DateTime), quoted(n.Cordon.Reason))
		}
		return nil
	}
	cordon := &cobra.Command{
		Use:   "cordon",
		Short: "Refuse new workloads on this node; running ones keep running",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			n, err := c.Cordon(cmd.Context(), reason)
			if err != nil {
				return err
			}
			return show(n)
		},
	}
	uncordon := &cobra.Command{
		Use:   "uncordon",
		Short: "Admit new workloads again after a cordon or a drain",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			n, err := c.Uncordon(cmd.Context())
			if err != nil {
				return err
			}
			return show(n)
		},
	}
	drain := &cobra.Command{
		Use:   "drain",
		Short: "Cordon the node and stop every workload with its grace period",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			n, err := c.Drain(cmd.Context(), reason, timeout)
			if err != nil {
				return err
			}
			if wait {
				if n, err = waitDrained(cmd, c, n); err != nil {
					return err
				}
			}
			return show(n)
		},
	}
	for _, cmd := range []*cobra.Command{cordon, drain} {
		cmd.Flags().StringVar(&reason, "reason", "", "why, shown to submitters the node refuses and in node status")
	}
	drain.Flags().DurationVar(&timeout, "timeout", 0, "each workload's stop grace period (default: the agent's)")
	drain.Flags().BoolVar(&wait, "wait", true, "return once no workload runs any more")
	return []*cobra.Command{cordon, uncordon, drain}
}

// waitDrained follows node status with blocking queries until no workload
// holds resources.
func waitDrained(cmd *cobra.Command, c *client.Client, n *api.Node) (*api.Node, error) {
	for n.Allocated.Workloads > 0 {
		next, _, err := c.Node(cmd.Context(), &client.QueryOptions{WaitIndex: n.Index, WaitTime: time.Minute})
		if err != nil {
			return nil, err
		}
		n = next
	}
	return n, nil
}

func quoted(s string) string {
	if s == "" {
		return ""
	}
	return fmt.Sprintf("(%s)", s)
}
