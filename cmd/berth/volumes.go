package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
)

func newVolumeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "Manage named volumes"}
	var (
		size   string
		labels []string
	)
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a named volume: a directory, or with --size a filesystem of its own",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec := api.VolumeSpec{Name: args[0]}
			var err error
			if size != "" {
				if spec.SizeBytes, err = parseSize(size); err != nil {
					return err
				}
			}
			if spec.Labels, err = keyValues("--label", labels); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			v, err := c.CreateVolume(cmd.Context(), spec)
			if err != nil {
				return err
			}
			return printVolumes(g, []api.Volume{*v})
		},
	}
	create.Flags().StringVar(&size, "size", "", "size (e.g. 512M, 10G): a filesystem of its own, full at that size; default a directory")
	create.Flags().StringArrayVarP(&labels, "label", "l", nil, "label KEY=VALUE (repeatable; tenant=T puts it in tenant T)")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List volumes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			vols, err := c.Volumes(cmd.Context())
			if err != nil {
				return err
			}
			return printVolumes(g, vols)
		},
	}
	inspect := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a volume, and the workloads that use it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			v, err := c.Volume(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printJSON(v)
		},
	}
	rm := &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove volumes and their data (refused while a workload uses one)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, ref := range args {
				if err := c.DeleteVolume(cmd.Context(), ref); err != nil {
					return err
				}
				fmt.Println(ref)
			}
			return nil
		},
	}
	cmd.AddCommand(create, ls, inspect, rm)
	return cmd
}

func printVolumes(g *globals, vols []api.Volume) error {
	if g.output == "json" {
		return printJSON(vols)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tTENANT\tSIZE\tUSED BY\tCREATED")
	for _, v := range vols {
		size := "-"
		if v.SizeBytes > 0 {
			size = humanBytes(v.SizeBytes)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.Name, dash(v.Tenant), size, dash(strings.Join(v.UsedBy, ",")), ago(v.CreatedAt))
	}
	return tw.Flush()
}

// parseSize reads a byte count with an optional binary suffix: 512M,
// 10G, 1.5G, 1048576.
func parseSize(s string) (int64, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	if t != "" {
		if i := strings.IndexByte("KMGT", t[len(t)-1]); i >= 0 {
			mult = int64(1) << (10 * (i + 1))
			t = t[:len(t)-1]
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f <= 0 || f*float64(mult) > 1<<60 {
		return 0, fmt.Errorf("size %q: want a positive number of bytes, with K, M, G or T (binary) if you like", s)
	}
	return int64(f * float64(mult)), nil
}

// parseVolumes reads -v SOURCE:/PATH[:ro|rw]: a SOURCE starting with /
// is a host directory, anything else a named volume.
func parseVolumes(specs []string) ([]api.VolumeMount, error) {
	var out []api.VolumeMount
	for _, s := range specs {
		parts := strings.Split(s, ":")
		if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
			return nil, fmt.Errorf("-v %q: want NAME:/PATH[:ro] or /HOST/DIR:/PATH[:ro]", s)
		}
		m := api.VolumeMount{Path: parts[1]}
		if strings.HasPrefix(parts[0], "/") {
			m.HostPath = parts[0]
		} else {
			m.Name = parts[0]
		}
		if len(parts) == 3 {
			switch parts[2] {
			case "ro":
				m.ReadOnly = true
			case "rw":
			default:
				return nil, fmt.Errorf("-v %q: the mode is ro or rw, not %q", s, parts[2])
			}
		}
		out = append(out, m)
	}
	return out, nil
}
