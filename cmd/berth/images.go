package main

import (
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
)

func newImageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Manage the node's images"}
	var ref string
	imp := &cobra.Command{
		Use:   "import FILE",
		Short: "Import an OCI-layout or docker-archive tarball (- for stdin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			in := os.Stdin
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				in = f
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			imgs, err := c.ImportImage(cmd.Context(), in, ref)
			if err != nil {
				return err
			}
			return printImages(g, imgs)
		},
	}
	imp.Flags().StringVar(&ref, "ref", "", "reference to give an archive that names none")
	pull := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image from its registry (loopback registries over plain HTTP)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			img, err := c.PullImage(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printImages(g, []api.Image{*img})
		},
	}
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List the node's images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			imgs, err := c.Images(cmd.Context())
			if err != nil {
				return err
			}
			return printImages(g, imgs)
		},
	}
	rm := &cobra.Command{
		Use:   "rm REF...",
		Short: "Remove images that no workload uses",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, ref := range args {
				if err := c.RemoveImage(cmd.Context(), ref); err != nil {
					return err
				}
				fmt.Println(ref)
			}
			return nil
		},
	}
	cmd.AddCommand(imp, pull, ls, rm)
	return cmd
}

func printImages(g *globals, imgs []api.Image) error {
	if g.output == "json" {
		return printJSON(imgs)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REF\tDIGEST\tSIZE\tCREATED")
	for _, img := range imgs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", img.Ref, shortDigest(img.Digest), humanBytes(img.Size), ago(img.CreatedAt))
	}
	return tw.Flush()
}

func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
