package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/configs"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/placement"
)

func newPolicyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check, explain and show isolation policies",
		Long: `Isolation policies decide whether a workload runs as a container, in a VM,
or not at all. "check" and "explain --policy" work offline on files; "show"
and "explain" without --policy ask the running agent.`,
	}
	cmd.AddCommand(newPolicyCheckCmd(g), newPolicyExplainCmd(g), newPolicyShowCmd(g))
	return cmd
}

// policyCheck is one file's result in `berth policy check -o json`.
type policyCheck struct {
	File    string            `json:"file"`
	Valid   bool              `json:"valid"`
	Version string            `json:"version,omitempty"`
	Default string            `json:"default,omitempty"`
	Rules   int               `json:"rules,omitempty"`
	Errors  []api.PolicyError `json:"errors,omitempty"`
}

func newPolicyCheckCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "check FILE...",
		Short: "Validate policy files offline; exit 1 and print every problem as file:line:column: message",
		Example: `  berth policy check /etc/berth/policy.yaml
  berth policy check configs/examples/*.yaml`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, files []string) error {
			out, errOut := cmd.OutOrStdout(), cmd.ErrOrStderr()
			var results []policyCheck
			failed := false
			for _, file := range files {
				r := checkPolicyFile(file)
				results = append(results, r)
				if !r.Valid {
					failed = true
				}
				if g.output == "json" {
					continue
				}
				if r.Valid {
					fmt.Fprintf(out, "%s: ok, version %s, default %s, %d rules\n", r.File, r.Version, r.Default, r.Rules)
					continue
				}
				for _, e := range r.Errors {
					fmt.Fprintln(errOut, placement.Error{File: e.File, Line: e.Line, Column: e.Column, Msg: e.Message}.Error())
				}
			}
			if g.output == "json" {
				if err := writeJSONTo(out, results); err != nil {
					return err
				}
			}
			if failed {
				return exitError{1}
			}
			return nil
		},
	}
}

func checkPolicyFile(file string) policyCheck {
	r := policyCheck{File: file}
	p, err := parsePolicyFile(file)
	if err != nil {
		var list placement.ErrorList
		if errors.As(err, &list) {
			for _, e := range list {
				r.Errors = append(r.Errors, api.PolicyError{File: e.File, Line: e.Line, Column: e.Column, Message: e.Msg})
			}
		} else {
			msg := err.Error()
			var pe *fs.PathError
			if errors.As(err, &pe) {
				msg = pe.Err.Error()
			}
			r.Errors = []api.PolicyError{{File: file, Message: msg}}
		}
		return r
	}
	r.Valid, r.Version, r.Default, r.Rules = true, p.Version(), string(p.Default()), len(p.Rules())
	return r
}

// parsePolicyFile parses a policy file; "-" is standard input and
// "builtin" the policy embedded in berth.
func parsePolicyFile(file string) (*placement.Policy, error) {
	var (
		data []byte
		err  error
	)
	switch file {
	case "-":
		data, err = io.ReadAll(io.LimitReader(os.Stdin, placement.MaxSize+1))
		file = "<stdin>"
	case agent.BuiltinPolicySource:
		data = configs.DefaultPolicy
	default:
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		data, err = io.ReadAll(io.LimitReader(f, placement.MaxSize+1))
		if err != nil {
			return nil, err
		}
	}
	if err != nil {
		return nil, err
	}
	return placement.Parse(file, data)
}

func newPolicyExplainCmd(g *globals) *cobra.Command {
	var (
		policyFile string
		specFile   string
		configFile string
		node       placement.NodeFacts
	)
	cmd := &cobra.Command{
		Use:   "explain -f WORKLOAD.json [--policy FILE]",
		Short: "Show what a policy decides for a workload spec, and why, without running it",
		Long: `Explain the placement of a workload spec (the JSON body of POST
/v1/workloads) without creating anything.

With --policy FILE (or --policy builtin) the decision is made offline, on a
node assumed to run both containers and VMs unless --vm=false or
--container=false say otherwise; workload defaults come from the agent
config (built-in, or --config). Without --policy the running agent decides
with its active policy and its real drivers (POST /v1/placements).

The output, with -o json as in the table, is the same decision the API
returns.`,
		Example: `  berth policy explain --policy /etc/berth/policy.yaml -f job.json
  berth policy explain --policy builtin --vm=false -f job.json
  echo '{"image":"busybox","labels":{"trust":"untrusted"}}' | berth policy explain -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if specFile == "" {
				return errors.New("give the workload spec with -f FILE (- for standard input)")
			}
			spec, err := readSpec(cmd.InOrStdin(), specFile)
			if err != nil {
				return err
			}
			var d *api.PlacementDecision
			if policyFile != "" {
				p, err := parsePolicyFile(policyFile)
				if err != nil {
					return err
				}
				cfg, err := config.Load(configFile, nil)
				if err != nil {
					return err
				}
				def := agent.Defaults{CPU: cfg.WorkloadDefaults.CPU, MemoryMB: cfg.WorkloadDefaults.MemoryMB, CPULimit: cfg.WorkloadDefaults.CPULimit, MemoryLimitMB: cfg.WorkloadDefaults.MemoryLimitMB, Pids: cfg.WorkloadDefaults.Pids, DiskMB: cfg.WorkloadDefaults.DiskMB}
				if !node.VMAvailable {
					node.VMReason = "no VM driver (--vm=false)"
				}
				if !node.ContainerAvailable {
					node.ContainerReason = "no container driver (--container=false)"
				}
				if d, err = agent.Explain(spec, p, node, def); err != nil {
					return err
				}
			} else {
				for _, name := range []string{"vm", "container", "accel", "config"} {
					if cmd.Flags().Changed(name) {
						return fmt.Errorf("--%s describes an offline node; it needs --policy", name)
					}
				}
				c, err := g.client()
				if err != nil {
					return err
				}
				if d, err = c.Place(cmd.Context(), spec); err != nil {
					return err
				}
			}
			if g.output == "json" {
				return writeJSONTo(cmd.OutOrStdout(), d)
			}
			return printDecision(cmd.OutOrStdout(), d)
		},
	}
	f := cmd.Flags()
	f.StringVar(&policyFile, "policy", "", `policy file to decide with offline ("builtin" for the embedded default); default: ask the agent`)
	f.StringVarP(&specFile, "file", "f", "", "workload spec (JSON, as for POST /v1/workloads); - for standard input")
	f.StringVar(&configFile, "config", "", "agent config whose workload_defaults fill the spec (offline only)")
	f.BoolVar(&node.VMAvailable, "vm", true, "the node can run VMs (offline only)")
	f.BoolVar(&node.ContainerAvailable, "container", true, "the node can run containers (offline only)")
	f.StringVar(&node.Accel, "accel", "", "the node's VM acceleration, kvm or tcg, as CEL rules see it (offline only)")
	return cmd
}

// readSpec decodes a workload spec as strictly as the API does: one JSON
// document, no unknown fields.
func readSpec(stdin io.Reader, file string) (api.WorkloadSpec, error) {
	var spec api.WorkloadSpec
	r := stdin
	if file == "-" {
		file = "<stdin>"
	} else {
		f, err := os.Open(file)
		if err != nil {
			return spec, err
		}
		defer f.Close()
		r = f
	}
	dec := json.NewDecoder(io.LimitReader(r, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		return spec, fmt.Errorf("workload spec %s: %w", file, err)
	}
	if err := dec.Decode(&struct{}{}); !errors.Is(err, io.EOF) {
		return spec, fmt.Errorf("workload spec %s: more than one JSON document", file)
	}
	return spec, nil
}

func printDecision(w io.Writer, d *api.PlacementDecision) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("Verdict", d.Verdict)
	row("Isolation", string(d.Isolation))
	row("Deciding rule", dash(d.DecidingRule))
	row("Policy", d.PolicyVersion)
	row("Explanation", d.Explanation)
	row("Node", nodeText(d.Node))
	if d.Exec != nil {
		row("Exec", d.Exec.Explanation)
	}
	if len(d.Matched) == 0 {
		row("Matched", "no rule")
	}
	for i, m := range d.Matched {
		k := ""
		if i == 0 {
			k = "Matched"
		}
		fmt.Fprintf(tw, "%s\t%s → %s: %s\n", k+":", m.Rule, m.Outcome, m.Reason)
	}
	return tw.Flush()
}

func nodeText(n api.NodeFacts) string {
	part := func(name string, ok bool, why string) string {
		if ok {
			return name + " yes"
		}
		if why == "" {
			return name + " no"
		}
		return name + " no (" + why + ")"
	}
	s := part("container", n.ContainerAvailable, n.ContainerReason) + ", " + part("vm", n.VMAvailable, n.VMReason)
	if n.Accel != "" {
		s += ", accel " + n.Accel
	}
	return s
}

func newPolicyShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "show",
		Short: "Show the agent's active policy, its rules and the last reload error",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := g.client()
			if err != nil {
				return err
			}
			st, err := c.Policy(cmd.Context())
			if err != nil {
				return err
			}
			if g.output == "json" {
				return writeJSONTo(cmd.OutOrStdout(), st)
			}
			return printPolicyStatus(cmd.OutOrStdout(), st)
		},
	}
}

func printPolicyStatus(w io.Writer, st *api.PolicyStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("Version", st.Version)
	source := st.Source
	if st.Watching {
		source += " (watched)"
	}
	row("Source", source)
	row("Loaded", st.LoadedAt.Format(time.RFC3339)+" ("+ago(st.LoadedAt)+" ago)")
	row("Default", st.Default)
	row("Reloads", fmt.Sprintf("%d applied, %d rejected", st.Reloads, st.ReloadFailures))
	if e := st.LastReloadError; e != nil {
		row("Last reload error", e.At.Format(time.RFC3339)+": the file on disk is NOT the active policy")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if e := st.LastReloadError; e != nil {
		for _, line := range strings.Split(e.Message, "\n") {
			fmt.Fprintln(w, "  "+line)
		}
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RULE\tLINE\tOUTCOME\tCONDITIONS")
	for _, r := range st.Rules {
		cond := r.Match
		if r.When != "" {
			if cond != "" {
				cond += "; "
			}
			cond += "when " + strings.Join(strings.Fields(r.When), " ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.Name, strconv.Itoa(r.Line), r.Outcome, cond)
	}
	return tw.Flush()
}

// placedLine says where a submitted workload was placed and why, for
// `berth run`.
func placedLine(w *api.Workload) string {
	p := w.Placement
	if p == nil {
		return fmt.Sprintf("placed on %s", w.Isolation)
	}
	by := "rule " + strconv.Quote(p.DecidingRule)
	switch p.DecidingRule {
	case placement.DecidedByDefault:
		by = "the policy default (no rule matched)"
	case placement.DecidedByRequest:
		by = "the isolation request"
	default:
		for _, m := range p.Matched {
			if m.Rule == p.DecidingRule && m.Reason != "" {
				by += " (" + m.Reason + ")"
				break
			}
		}
	}
	return fmt.Sprintf("placed on %s by %s, policy %s", p.Isolation, by, p.PolicyVersion)
}

func writeJSONTo(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
