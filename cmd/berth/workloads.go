package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/api"
)

func newRunCmd(g *globals) *cobra.Command {
	var (
		spec    api.WorkloadSpec
		iso     string
		labels  []string
		env     []string
		restart string
		wait    bool
		detach  bool
		ports   []string
		secrets []string
		secFile string
		vols    []string
		limits  api.ResourceLimits
	)
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [-- COMMAND [ARG...]]",
		Short: "Submit a workload; print its id, or with --wait its output and exit code",
		Long: `Submit a workload running IMAGE. Words after "--" replace the image's
entrypoint and command. The node's isolation policy decides whether it runs
as a container or in a VM; --isolation asks for at least that much.

With --wait, berth streams the workload's output and exits with its exit
code (125 when it could not be run at all).

With -i the workload's standard input stays open, with -t it runs on a
terminal of its own; either attaches this terminal to it (as berth attach
does, from its first output) and exits with its exit code, unless -d. Detach
with ctrl-p ctrl-q; the workload runs on.

--secret-env and --secret-env-file set environment variables whose values
the agent writes only into the workload: every answer shows them as
<redacted>, and berth never prints them. --secret-env KEY takes the value
of KEY from berth's own environment; KEY=VALUE on the command line works
too, but other users of this host may see a command line (ps).`,
		Example: `  berth run --wait busybox:latest -- sh -c 'echo hello; exit 7'
  berth run -it busybox:latest -- sh
  echo hello | berth run -i busybox:latest -- cat
  berth run --name web --memory 512 --label team=infra nginx:1
  DB_PASSWORD=... berth run --secret-env DB_PASSWORD app:1
  berth run --secret-env-file - app:1 < secrets.env`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec.Image = args[0]
			if dash := cmd.ArgsLenAtDash(); dash >= 0 {
				if dash != 1 {
					return fmt.Errorf("give exactly one IMAGE before \"--\"")
				}
				spec.Command = args[1:]
			} else if len(args) > 1 {
				spec.Command = args[1:]
			}
			spec.Isolation = api.Isolation(iso)
			if limits != (api.ResourceLimits{}) {
				spec.Resources.Limits = &limits
			}
			spec.Restart.Policy = api.RestartPolicy(restart)
			var err error
			if spec.Labels, err = keyValues("--label", labels); err != nil {
				return err
			}
			if spec.Env, err = keyValues("-e", env); err != nil {
				return err
			}
			if spec.SecretEnv, err = secretEnv(secrets, secFile, cmd.InOrStdin()); err != nil {
				return err
			}
			if spec.Ports, err = parsePorts(ports); err != nil {
				return err
			}
			if spec.Volumes, err = parseVolumes(vols); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			w, err := c.Submit(ctx, spec)
			if err != nil {
				return err
			}
			fmt.Fprintln(os.Stderr, placedLine(w))
			attaching := (spec.Stdin || spec.TTY) && !detach
			if (wait || attaching) && w.State == api.StatePending {
				// Its image may be downloading: a progress bar until it starts.
				stop := pullProgress(ctx, c, w.ID, "")
				_, werr := waitNotPending(ctx, c, w.ID)
				stop()
				if werr != nil {
					return werr
				}
			}
			if attaching {
				if w, err = waitStarted(ctx, c, w.ID); err != nil {
					return err
				}
				err := attachAndExit(ctx, c, w, api.AttachRequest{Stdin: spec.Stdin, Logs: true})
				var p *api.Problem
				if !errors.As(err, &p) || p.Status != http.StatusConflict {
					return err
				}
				// It ended before the attach: its output and exit code
				// are in its logs and record.
			} else if !wait {
				if g.output == "json" {
					return printJSON(w)
				}
				fmt.Println(w.ID)
				return nil
			}
			// Follow the output until the workload ends, then report how.
			err = c.Logs(ctx, w.ID, api.LogOptions{Tail: -1, Follow: true}, func(l api.LogLine) error {
				out := os.Stdout
				if l.Stream == "stderr" {
					out = os.Stderr
				}
				_, err := fmt.Fprintln(out, l.Line)
				return err
			})
			if err != nil {
				return err
			}
			end, err := c.WaitExit(ctx, w.ID)
			if err != nil {
				return err
			}
			if g.output == "json" {
				if err := printJSON(end); err != nil {
					return err
				}
			}
			switch {
			case end.State == api.StateFailed:
				fmt.Fprintf(os.Stderr, "berth: workload %s failed: %s\n", end.ID, end.Error)
				return exitError{125}
			case end.ExitCode != nil:
				if end.OOMKilled {
					fmt.Fprintf(os.Stderr, "berth: workload %s was killed: out of memory\n", end.ID)
				}
				if *end.ExitCode != 0 {
					return exitError{*end.ExitCode}
				}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&spec.Name, "name", "", "unique name (DNS label); resubmitting the same spec under it is a no-op")
	f.StringVar(&iso, "isolation", "", "auto, container or vm: the least isolation to accept")
	f.StringArrayVarP(&labels, "label", "l", nil, "label KEY=VALUE (repeatable)")
	f.StringArrayVarP(&env, "env", "e", nil, "environment variable KEY=VALUE (repeatable)")
	f.StringArrayVar(&secrets, "secret-env", nil, "secret environment variable KEY (its value from berth's environment) or KEY=VALUE (repeatable); never shown")
	f.StringVar(&secFile, "secret-env-file", "", "read secret environment variables from FILE (\"-\" for stdin): KEY=VALUE lines, '#' comments")
	f.StringVarP(&spec.Workdir, "workdir", "w", "", "working directory inside the image")
	f.Float64Var(&spec.Resources.CPU, "cpus", 0, "CPU cores requested, also the limit without --cpu-limit (default from the agent's config)")
	f.Int64Var(&spec.Resources.MemoryMB, "memory", 0, "memory in MiB requested, also the limit without --memory-limit (default from the agent's config)")
	f.Float64Var(&limits.CPU, "cpu-limit", 0, "CPU cores the workload may use at most (default: the request)")
	f.Int64Var(&limits.MemoryMB, "memory-limit", 0, "memory in MiB the workload may use at most; a VM's guest RAM (default: the request)")
	f.Int64Var(&spec.Resources.Pids, "pids", 0, "maximum number of processes")
	f.BoolVar(&spec.Privileged, "privileged", false, "ask for privileges: policy places such workloads in VMs or refuses them")
	f.StringVar(&restart, "restart", "", "restart policy: never, on-failure or always")
	f.IntVar(&spec.Restart.MaxRetries, "max-retries", 0, "restarts allowed by on-failure")
	f.BoolVar(&wait, "wait", false, "stream the output and exit with the workload's exit code")
	f.BoolVarP(&spec.Stdin, "interactive", "i", false, "keep the workload's standard input open, and attach this terminal's input to it")
	f.BoolVarP(&spec.TTY, "tty", "t", false, "run the workload on a terminal, and attach this terminal to it")
	f.BoolVarP(&detach, "detach", "d", false, "with -i or -t: do not attach; print the workload's id")
	f.StringVar((*string)(&spec.ImagePull), "pull", "", "when to pull the image: if-not-present (default), always or never")
	f.StringVar(&spec.Network, "network", "", "bridge (default), none, or host (containers, where policy allows)")
	f.StringArrayVarP(&ports, "publish", "p", nil, "publish a port: HOST_PORT:CONTAINER_PORT[/tcp|udp] (repeatable)")
	f.StringArrayVarP(&vols, "volume", "v", nil, "mount a volume: NAME:/PATH[:ro] or an allowed host directory /HOST/DIR:/PATH[:ro] (repeatable)")
	return cmd
}

// parsePorts reads HOST:CONTAINER[/PROTO] port mappings.
func parsePorts(specs []string) ([]api.PortMapping, error) {
	var out []api.PortMapping
	for _, p := range specs {
		m := api.PortMapping{Protocol: "tcp"}
		rest, proto, ok := strings.Cut(p, "/")
		if ok {
			m.Protocol = proto
		}
		host, ctr, ok := strings.Cut(rest, ":")
		var err1, err2 error
		m.HostPort, err1 = strconv.Atoi(host)
		m.ContainerPort, err2 = strconv.Atoi(ctr)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("-p %q: want HOST_PORT:CONTAINER_PORT[/tcp|udp]", p)
		}
		out = append(out, m)
	}
	return out, nil
}

// secretEnv gathers the secret environment of --secret-env and
// --secret-env-file. Its errors name a flag, a line or a variable, never
// a value.
func secretEnv(flags []string, file string, stdin io.Reader) (map[string]string, error) {
	out := map[string]string{}
	if file != "" {
		var data []byte
		var err error
		if file == "-" {
			data, err = io.ReadAll(io.LimitReader(stdin, maxSecretFile+1))
		} else {
			data, err = readLimited(file, maxSecretFile+1)
		}
		if err != nil {
			return nil, fmt.Errorf("--secret-env-file: %w", err)
		}
		if len(data) > maxSecretFile {
			return nil, fmt.Errorf("--secret-env-file: more than %d bytes", maxSecretFile)
		}
		for i, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSuffix(line, "\r")
			if t := strings.TrimSpace(line); t == "" || strings.HasPrefix(t, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, "=")
			if k = strings.TrimSpace(k); !ok || k == "" {
				return nil, fmt.Errorf("--secret-env-file line %d: want KEY=VALUE", i+1)
			}
			out[k] = v
		}
	}
	for _, kv := range flags {
		k, v, ok := strings.Cut(kv, "=")
		if k == "" {
			return nil, fmt.Errorf("--secret-env: a variable has no name; want KEY or KEY=VALUE")
		}
		if !ok {
			if v, ok = os.LookupEnv(k); !ok {
				return nil, fmt.Errorf("--secret-env %s: not set in berth's environment; export it, or give KEY=VALUE", k)
			}
		}
		out[k] = v
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// maxSecretFile bounds --secret-env-file (the agent takes 64 KiB).
const maxSecretFile = 1 << 20

func readLimited(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, n))
}

func keyValues(flag string, kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%s %q: want KEY=VALUE", flag, kv)
		}
		m[k] = v
	}
	return m, nil
}

func newPsCmd(g *globals) *cobra.Command {
	var (
		all    bool
		quiet  bool
		labels []string
		state  string
		iso    string
	)
	cmd := &cobra.Command{
		Use:   "ps",
		Short: "List workloads (running ones; --all for every one)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := api.ListFilter{State: api.State(state), Isolation: api.Isolation(iso)}
			var err error
			if f.Labels, err = keyValues("--label", labels); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			list, _, err := c.List(cmd.Context(), f, nil)
			if err != nil {
				return err
			}
			if !all && state == "" {
				live := list[:0]
				for _, w := range list {
					if !w.State.Terminal() {
						live = append(live, w)
					}
				}
				list = live
			}
			if quiet {
				for _, w := range list {
					fmt.Fprintln(cmd.OutOrStdout(), w.ID)
				}
				return nil
			}
			if g.output == "json" {
				return printJSON(list)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tIMAGE\tISOLATION\tSTATE\tEXIT\tADDRESS\tPORTS\tCREATED")
			for _, w := range list {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", w.ID, dash(nameRef(&w)), w.Spec.Image, w.Isolation, stateText(&w), exitText(&w),
					dash(address(&w)), dash(portsText(w.Spec.Ports)), ago(w.CreatedAt))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVarP(&all, "all", "a", false, "include workloads that have ended")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only the workload ids, one a line")
	cmd.Flags().StringArrayVarP(&labels, "label", "l", nil, "only workloads with label KEY=VALUE (KEY= for any value)")
	cmd.Flags().StringVar(&state, "state", "", "only workloads in this state")
	cmd.Flags().StringVar(&iso, "isolation", "", "only container or vm workloads")
	return cmd
}

// nameRef is how a named workload is addressed: TENANT/NAME, or NAME in
// the node's own namespace.
func nameRef(w *api.Workload) string {
	if w.Name == "" {
		return ""
	}
	return api.Ref(w.Tenant, w.Name)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// stateText is the workload's state, and "deleting" while a delete is in
// progress.
func stateText(w *api.Workload) string {
	if w.Deleting {
		return string(w.State) + " (deleting)"
	}
	return string(w.State)
}

func exitText(w *api.Workload) string {
	switch {
	case w.ExitCode != nil && w.OOMKilled:
		return strconv.Itoa(*w.ExitCode) + " (oom)"
	case w.ExitCode != nil:
		return strconv.Itoa(*w.ExitCode)
	case w.State == api.StateFailed:
		return "failed"
	}
	return "-"
}

func ago(t time.Time) string {
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return fmt.Sprintf("%dd ago", int(d.Hours()/24))
}

func newInspectCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect WORKLOAD",
		Short: "Show a workload's record: spec, state, placement, exit",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			w, _, err := c.Get(cmd.Context(), args[0], nil)
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(w)
			}
			printWorkload(w)
			return nil
		},
	}
}

func printWorkload(w *api.Workload) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("ID", w.ID)
	row("Name", dash(nameRef(w)))
	if w.Tenant != "" {
		row("Tenant", w.Tenant)
	}
	row("Image", w.Spec.Image+" ("+w.ImageDigest+")")
	cmdline := append(append([]string{}, w.Spec.Command...), w.Spec.Args...)
	row("Command", dash(strings.Join(cmdline, " ")))
	row("State", stateText(w))
	row("Isolation", string(w.Isolation))
	if p := w.Placement; p != nil {
		row("Placement", p.Explanation)
		row("Policy", p.PolicyVersion)
	}
	row("Resources", fmt.Sprintf("cpu=%g memory=%dMiB pids=%d", w.Spec.Resources.CPU, w.Spec.Resources.MemoryMB, w.Spec.Resources.Pids))
	if len(w.Spec.Labels) > 0 {
		keys := make([]string, 0, len(w.Spec.Labels))
		for k := range w.Spec.Labels {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for i, k := range keys {
			keys[i] = k + "=" + w.Spec.Labels[k]
		}
		row("Labels", strings.Join(keys, ", "))
	}
	if len(w.Spec.SecretEnv) > 0 {
		// The agent answers with names only; print nothing else anyway.
		names := make([]string, 0, len(w.Spec.SecretEnv))
		for k := range w.Spec.SecretEnv {
			names = append(names, k)
		}
		sort.Strings(names)
		row("Secret env", strings.Join(names, ", ")+" (values not shown)")
	}
	if n := w.Network; n != nil {
		net := n.Mode
		if n.Address != "" {
			net += ", address " + n.Address + ", gateway " + n.Gateway
		}
		row("Network", net)
	}
	if len(w.Spec.Ports) > 0 {
		row("Ports", portsText(w.Spec.Ports))
	}
	row("Exit", exitText(w))
	if w.Error != "" {
		row("Error", w.Error)
	}
	if w.RestartCount > 0 {
		row("Restarts", strconv.Itoa(w.RestartCount))
	}
	row("Created", w.CreatedAt.Format(time.RFC3339))
	if w.StartedAt != nil {
		row("Started", w.StartedAt.Format(time.RFC3339))
	}
	if w.FinishedAt != nil {
		row("Finished", w.FinishedAt.Format(time.RFC3339))
	}
	tw.Flush()
}

func newLogsCmd(g *globals) *cobra.Command {
	var (
		follow     bool
		tail       int
		stream     string
		since      string
		timestamps bool
	)
	cmd := &cobra.Command{
		Use:   "logs WORKLOAD",
		Short: "Print a workload's output (stdout to stdout, stderr to stderr)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			opts := api.LogOptions{Follow: follow, Tail: tail, Stream: stream, Timestamps: timestamps}
			if since != "" {
				if opts.Since, err = api.ParseSince(since, time.Now()); err != nil {
					return fmt.Errorf("--since: %w", err)
				}
			}
			return c.Logs(cmd.Context(), args[0], opts, func(l api.LogLine) error {
				if g.output == "json" {
					return printJSONLine(l)
				}
				out := os.Stdout
				if l.Stream == "stderr" {
					out = os.Stderr
				}
				if timestamps && l.Time != nil {
					_, err := fmt.Fprintln(out, l.Time.UTC().Format(api.LogTimeFormat), l.Line)
					return err
				}
				_, err := fmt.Fprintln(out, l.Line)
				return err
			})
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the workload ends")
	cmd.Flags().IntVarP(&tail, "tail", "n", -1, "only the last N lines (of each stream)")
	cmd.Flags().StringVar(&stream, "stream", "", "stdout or stderr only")
	cmd.Flags().StringVar(&since, "since", "", "only lines written since a time: a duration before now (10m, 1h30m) or an RFC 3339 time")
	cmd.Flags().BoolVarP(&timestamps, "timestamps", "t", false, "prefix each line with the time it was written (RFC 3339, nanoseconds)")
	return cmd
}

func newStopCmd(g *globals) *cobra.Command {
	var (
		timeout time.Duration
		noWait  bool
	)
	cmd := &cobra.Command{
		Use:   "stop WORKLOAD...",
		Short: "Stop workloads: SIGTERM, then SIGKILL after the timeout",
		Long: `Stop workloads: SIGTERM, then SIGKILL after the timeout. Once asked, the
stop is the agent's: it goes on if this command is interrupted.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, ref := range args {
				if noWait {
					w, err := c.RequestStop(cmd.Context(), ref, timeout)
					if err != nil {
						return err
					}
					fmt.Printf("%s %s\n", w.ID, w.State)
					continue
				}
				w, err := c.Stop(cmd.Context(), ref, timeout)
				if err != nil {
					return err
				}
				fmt.Printf("%s %s exit=%s\n", w.ID, w.State, exitText(w))
			}
			return nil
		},
	}
	cmd.Flags().DurationVarP(&timeout, "timeout", "t", 0, "grace period before SIGKILL (default from the agent's config)")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the stop is recorded, not once the workload has ended")
	return cmd
}

func newRmCmd(g *globals) *cobra.Command {
	var force, noWait bool
	cmd := &cobra.Command{
		Use:   "rm WORKLOAD...",
		Short: "Delete workloads and everything they left on the node",
		Long: `Delete workloads and everything they left on the node. Once asked, the
delete is the agent's: it goes on if this command is interrupted, and the
workload reads as deleting until it is gone.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			for _, ref := range args {
				if noWait {
					w, err := c.RequestDelete(cmd.Context(), ref, force)
					if err != nil {
						return err
					}
					fmt.Println(w.ID, "deleting")
					continue
				}
				if err := c.Delete(cmd.Context(), ref, force); err != nil {
					return err
				}
				fmt.Println(ref)
			}
			return nil
		},
	}
	cmd.Flags().BoolVarP(&force, "force", "f", false, "stop a running workload first (immediately)")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the delete is recorded, not once the workload is gone")
	return cmd
}

func newStatsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "stats WORKLOAD",
		Short: "Show a running workload's CPU, memory and process counts",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			st, err := c.Stats(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(st)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "CPU TIME\tMEMORY\tWORKING SET\tLIMIT\tPIDS\tPIDS LIMIT")
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\n", time.Duration(st.CPUUsageNanos).Round(time.Millisecond),
				humanBytes(int64(st.MemoryBytes)), humanBytes(int64(st.MemoryWorkingSetBytes)), humanBytes(int64(st.MemoryLimit)), st.Pids, st.PidsLimit)
			return tw.Flush()
		},
	}
}

func address(w *api.Workload) string {
	if w.Network == nil {
		return ""
	}
	if w.Network.Address == "" && w.Network.Mode != api.NetworkBridge {
		return w.Network.Mode
	}
	return w.Network.Address
}

func portsText(ps []api.PortMapping) string {
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = fmt.Sprintf("%d->%d/%s", p.HostPort, p.ContainerPort, p.Protocol)
	}
	return strings.Join(parts, ",")
}
