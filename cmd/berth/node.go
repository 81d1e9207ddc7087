package main

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

func newNodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "The node's status, as fleet controllers see it"}
	var wait time.Duration
	var index uint64
	status := &cobra.Command{
		Use:   "status",
		Short: "Show capacity, allocation, drivers, policy and conditions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			var opts *client.QueryOptions
			if index > 0 {
				opts = &client.QueryOptions{WaitIndex: index, WaitTime: wait}
			}
			n, _, err := c.Node(cmd.Context(), opts)
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(n)
			}
			printNode(n)
			return nil
		},
	}
	status.Flags().Uint64Var(&index, "index", 0, "block until the node's index passes this one")
	status.Flags().DurationVar(&wait, "wait", time.Minute, "longest block with --index")
	cmd.AddCommand(status)
	cmd.AddCommand(maintenanceCmds(g)...)
	return cmd
}

func printNode(n *api.Node) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "Node:\t%s (%s)\n", n.ID, n.Hostname)
	fmt.Fprintf(tw, "Version:\t%s, up %s\n", n.Version, (time.Duration(n.UptimeSeconds) * time.Second).String())
	fmt.Fprintf(tw, "Index:\t%d\n", n.Index)
	switch {
	case n.Cordon != nil && n.Cordon.Draining:
		fmt.Fprintf(tw, "Schedulable:\tno, draining since %s %s\n", n.Cordon.Since.Local().Format(time.DateTime), quoted(n.Cordon.Reason))
	case n.Cordon != nil:
		fmt.Fprintf(tw, "Schedulable:\tno, cordoned since %s %s\n", n.Cordon.Since.Local().Format(time.DateTime), quoted(n.Cordon.Reason))
	default:
		fmt.Fprintf(tw, "Schedulable:\tyes\n")
	}
	res := func(r api.NodeResources) string {
		s := fmt.Sprintf("cpu %g, memory %d MiB", r.CPU, r.MemoryMB)
		if r.Workloads > 0 {
			s += fmt.Sprintf(", %d workloads", r.Workloads)
		}
		return s
	}
	fmt.Fprintf(tw, "Capacity:\t%s\n", res(n.Capacity))
	fmt.Fprintf(tw, "Allocatable:\t%s\n", res(n.Allocatable))
	fmt.Fprintf(tw, "Allocated:\t%s\n", res(n.Allocated))
	var states []string
	for s, k := range n.Workloads.ByState {
		states = append(states, fmt.Sprintf("%s %d", s, k))
	}
	sort.Strings(states)
	fmt.Fprintf(tw, "Workloads:\t%d (%s)\n", n.Workloads.Total, strings.Join(states, ", "))
	fmt.Fprintf(tw, "Policy:\t%s from %s\n", n.Policy.Version, n.Policy.Source)
	if e := n.Policy.LastReloadError; e != nil {
		fmt.Fprintf(tw, "Policy reload error:\t%s\n", e.Message)
	}
	names := make([]string, 0, len(n.Drivers))
	for name := range n.Drivers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		d := n.Drivers[name]
		health := "healthy"
		if !d.Healthy {
			health = "UNHEALTHY: " + d.Reason
		}
		fmt.Fprintf(tw, "Driver %s:\t%s, %s", name, health, d.Version)
		var keys []string
		for k := range d.Details {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(tw, ", %s=%s", k, d.Details[k])
		}
		fmt.Fprintln(tw)
	}
	for _, c := range n.Conditions {
		fmt.Fprintf(tw, "Condition %s:\t%v (%s) %s\n", c.Type, c.Status, c.Reason, c.Message)
	}
	tw.Flush()
}

func newEventsCmd(g *globals) *cobra.Command {
	var opts client.EventOptions
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Stream the node's events (workloads, policy reloads, driver health)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			lost := func() { fmt.Fprintln(os.Stderr, "berth: some events were dropped before this point") }
			return c.Events(cmd.Context(), opts, lost, func(e api.Event) error {
				if g.output == "json" {
					return printJSONLine(e)
				}
				_, err := fmt.Printf("%s  %-20s %-16s %s\n", e.Time.Local().Format(time.TimeOnly), e.Type, dash(e.WorkloadID), e.Message)
				return err
			})
		},
	}
	cmd.Flags().Uint64Var(&opts.Since, "since", 0, "replay the events after this event id that the agent still holds")
	cmd.Flags().StringVar(&opts.WorkloadID, "workload", "", "only this workload's events")
	cmd.Flags().StringSliceVar(&opts.Types, "type", nil, `only these types; "workload." selects a family`)
	return cmd
}
