package placement

import "strconv"

// Values of a rule's exec key.
const (
	// ExecDeny forbids exec sessions into the workloads a rule matches.
	ExecDeny = "deny"
	// ExecAllow says nothing (exec is allowed unless a rule denies it);
	// it is accepted so a rule can say so explicitly.
	ExecAllow = "allow"
)

// ExecDecision says whether an exec session into a workload may start.
type ExecDecision struct {
	Allowed bool `json:"allowed"`
	// Rule names the first matching rule with exec: deny.
	Rule string `json:"rule,omitempty"`
	// Reason lists the conditions of Rule that held.
	Reason        string `json:"reason,omitempty"`
	PolicyVersion string `json:"policy_version"`
	Explanation   string `json:"explanation"`
}

// DecideExec decides, under policy p on a node with facts n, whether an
// exec session into w may start: allowed unless a matching rule says
// exec: deny. The agent asks it at exec time with the current policy and
// the workload's recorded spec, so a rule added after the workload
// started applies to it. Like Decide it is pure, and a `when` that fails
// to evaluate counts as true (a broken rule errs towards refusing).
func DecideExec(w Workload, p *Policy, n NodeFacts) ExecDecision {
	if p == nil || p.def == "" {
		return ExecDecision{Explanation: "exec denied: no isolation policy is loaded"}
	}
	var act *activation
	for i := range p.rules {
		r := &p.rules[i]
		if !r.execDeny {
			continue
		}
		reason, ok := r.match(&w, &n, &act)
		if !ok {
			continue
		}
		return ExecDecision{
			Rule: r.name, Reason: reason, PolicyVersion: p.version,
			Explanation: "exec denied: rule " + strconv.Quote(r.name) + " (" + reason + ") forbids exec into this workload; policy " + p.version,
		}
	}
	return ExecDecision{Allowed: true, PolicyVersion: p.version, Explanation: "exec allowed: no rule with exec: deny matched; policy " + p.version}
}
