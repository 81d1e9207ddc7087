package main

import (
	"fmt"
	"io"
	"os"
	"strings"
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
	var username, tenant string
	var passwordStdin bool
	pull := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image from its registry (loopback registries over plain HTTP)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			req := api.PullRequest{Ref: args[0], Tenant: tenant}
			if username != "" || passwordStdin {
				auth, err := pullAuth(username, passwordStdin, cmd.InOrStdin())
				if err != nil {
					return err
				}
				req.Auth = auth
			}
			stop := pullProgress(cmd.Context(), c, "", args[0])
			img, err := c.PullImageWith(cmd.Context(), req)
			stop()
			if err != nil {
				return err
			}
			return printImages(g, []api.Image{*img})
		},
	}
	pull.Flags().StringVarP(&username, "username", "u", "", "the registry user for this pull alone (the agent's images.auth_file otherwise)")
	pull.Flags().BoolVar(&passwordStdin, "password-stdin", false, "read the registry password (or token) from stdin")
	pull.Flags().StringVar(&tenant, "tenant", "", "with -u: the tenant the image is private to (a submitter's only tenant by default; an operator's or admin's: the node's namespace)")
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
	var all bool
	prune := &cobra.Command{
		Use:   "prune",
		Short: "Remove images no workload uses (least recently used first, down to the agent's low watermark; --all: every one)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			removed, err := c.PruneImages(cmd.Context(), all)
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(api.PruneResult{Removed: removed})
			}
			for _, r := range removed {
				fmt.Printf("removed %s (%s, %d bytes)\n", r.Ref, r.Digest, r.Size)
			}
			if len(removed) == 0 {
				fmt.Println("nothing to remove")
			}
			return nil
		},
	}
	prune.Flags().BoolVar(&all, "all", false, "remove every image no workload uses")
	cmd.AddCommand(imp, pull, ls, rm, prune)
	return cmd
}

func printImages(g *globals, imgs []api.Image) error {
	if g.output == "json" {
		return printJSON(imgs)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REF\tDIGEST\tSIZE\tCREATED\tFOR")
	for _, img := range imgs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", img.Ref, shortDigest(img.Digest), humanBytes(img.Size), ago(img.CreatedAt), imageFor(img))
	}
	return tw.Flush()
}

// imageFor says who may run an image: every tenant (the node's image),
// or the tenants a private one belongs to.
func imageFor(img api.Image) string {
	switch {
	case !img.Private:
		return "all"
	case len(img.Tenants) == 0:
		return "node namespace"
	}
	return strings.Join(img.Tenants, ",")
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

// pullAuth is a pull's own registry credentials: the user from the flag,
// the password from stdin (never from the command line, which other users
// of the host may read).
func pullAuth(username string, passwordStdin bool, stdin io.Reader) (*api.RegistryAuth, error) {
	if username == "" || !passwordStdin {
		return nil, fmt.Errorf("give both --username and --password-stdin")
	}
	data, err := io.ReadAll(io.LimitReader(stdin, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("read the password from stdin: %w", err)
	}
	pw := strings.TrimRight(string(data), "\r\n")
	if pw == "" {
		return nil, fmt.Errorf("--password-stdin: stdin holds no password")
	}
	return &api.RegistryAuth{Username: username, Password: pw}, nil
}
