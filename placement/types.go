package placement

// Isolation is how strongly a workload is kept apart from the node: the
// submitter's request on a Workload, and the outcome on a Decision.
type Isolation string

const (
	// IsolationAuto accepts whatever the policy requires. The empty string
	// means the same.
	IsolationAuto Isolation = "auto"
	// IsolationContainer runs the workload as an OCI container.
	IsolationContainer Isolation = "container"
	// IsolationVM runs the workload in its own virtual machine.
	IsolationVM Isolation = "vm"
)

// Outcome is what a rule, or the policy default, does with a workload.
// Outcomes are ordered: deny is stronger than vm, vm stronger than container,
// and when several rules match the strongest one wins.
type Outcome string

const (
	OutcomeContainer Outcome = "container"
	OutcomeVM        Outcome = "vm"
	OutcomeDeny      Outcome = "deny"
)

// rank orders outcomes so that composing rules is a max; 0 is "no outcome".
func (o Outcome) rank() int {
	switch o {
	case OutcomeContainer:
		return 1
	case OutcomeVM:
		return 2
	case OutcomeDeny:
		return 3
	}
	return 0
}

// Verdict says whether a workload may run on this node.
type Verdict string

const (
	// VerdictAllow: the workload may run with Decision.Isolation.
	VerdictAllow Verdict = "allow"
	// VerdictDeny: a deny rule (or a deny default) matched.
	VerdictDeny Verdict = "deny"
	// VerdictRefused: the request cannot be honoured without weakening the
	// policy (container requested where vm is required), or is not a valid
	// request at all.
	VerdictRefused Verdict = "refused"
	// VerdictUnschedulable: the node has no working driver for the isolation
	// the workload requires. berth never falls back to a weaker one.
	VerdictUnschedulable Verdict = "unschedulable"
)

// Workload is what placement needs to know about a submitted workload. The
// agent converts its own spec into this, after filling in defaults.
type Workload struct {
	Name string `json:"name,omitempty"`
	// Image is the normalized reference, e.g. docker.io/library/busybox:latest.
	Image  string            `json:"image"`
	Labels map[string]string `json:"labels,omitempty"`
	// Privileged asks for a privileged workload.
	Privileged bool `json:"privileged,omitempty"`
	// Isolation is the submitter's request: auto (or empty), container or vm.
	Isolation Isolation `json:"isolation,omitempty"`
	Resources Resources `json:"resources"`
	// Network is the requested network mode: bridge (or empty), none or
	// host.
	Network string `json:"network,omitempty"`
	// Ports counts the ports the workload publishes.
	Ports int `json:"ports,omitempty"`
	// HostPaths are the host directories the workload mounts.
	HostPaths []string `json:"host_paths,omitempty"`
}

// Tenant is the workload's tenant: its "tenant" label.
func (w *Workload) Tenant() string { return w.Labels["tenant"] }

// Resources are the workload's resource requests.
type Resources struct {
	// CPU in cores.
	CPU      float64 `json:"cpu,omitempty"`
	MemoryMB int64   `json:"memory_mb,omitempty"`
	Pids     int64   `json:"pids,omitempty"`
}

// NodeFacts is what placement needs to know about the node: which drivers
// work (and why not) and the node's own labels.
type NodeFacts struct {
	ContainerAvailable bool   `json:"container_available"`
	ContainerReason    string `json:"container_reason,omitempty"`
	VMAvailable        bool   `json:"vm_available"`
	VMReason           string `json:"vm_reason,omitempty"`
	// Accel is the VM acceleration in use: kvm, tcg or empty.
	Accel  string            `json:"accel,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// available reports whether the node can run iso and, if not, why.
func (n *NodeFacts) available(iso Isolation) (bool, string) {
	if iso == IsolationVM {
		if n.VMAvailable {
			return true, ""
		}
		if n.VMReason == "" {
			return false, "no working VM driver"
		}
		return false, n.VMReason
	}
	if n.ContainerAvailable {
		return true, ""
	}
	if n.ContainerReason == "" {
		return false, "no working container driver"
	}
	return false, n.ContainerReason
}

// Decision is the result of Decide: the verdict, the isolation, and the trace
// an operator reads to understand it.
type Decision struct {
	Verdict Verdict `json:"verdict"`
	// Isolation is container or vm: what the workload gets when allowed,
	// and what it would require otherwise (for a deny, what the rest of the
	// policy and the request would have required).
	Isolation Isolation `json:"isolation"`
	// DecidingRule names the rule that settled the verdict, or "default"
	// when the policy default did, or "request" when the submitter's
	// request did (a vm request raising container, or an invalid request).
	DecidingRule string `json:"deciding_rule"`
	// Matched lists every rule that matched, in policy order.
	Matched       []Match `json:"matched,omitempty"`
	PolicyVersion string  `json:"policy_version"`
	// Explanation is one line for humans.
	Explanation string `json:"explanation"`
	// Network is the network mode the workload gets when allowed: the
	// request, or none when a matching rule forces it.
	Network string `json:"network,omitempty"`
}

// Allowed reports whether the workload may run.
func (d *Decision) Allowed() bool { return d.Verdict == VerdictAllow }

// Match is one rule that matched a workload and why.
type Match struct {
	Rule    string  `json:"rule"`
	Outcome Outcome `json:"outcome"`
	// Reason lists the conditions that held, e.g. "label trust=untrusted,
	// privileged".
	Reason string `json:"reason"`
}

// Names of the deciding "rule" when no policy rule decided.
const (
	DecidedByDefault = "default"
	DecidedByRequest = "request"
)

// Network modes a rule can name.
const (
	// NetworkNone in a rule forces matched workloads onto loopback only.
	NetworkNone = "none"
	// NetworkHost in a rule lets matched container workloads use the
	// host's network namespace; without such a rule host is refused.
	NetworkHost = "host"
	// NetworkBridge is the default mode.
	NetworkBridge = "bridge"
)
