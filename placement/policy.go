package placement

import (
	"fmt"
	"strconv"
	"strings"

	"cel.dev/cel-go/cel"
)

// Policy is a parsed, validated isolation policy. It is immutable: one
// Policy may serve any number of concurrent Decide calls, and a reload
// swaps in a new one.
type Policy struct {
	source  string
	version string
	def     Outcome
	rules   []rule
	// network is set when some rule has a network knob.
	network bool
}

// rule returns the rule named name, or nil.
func (p *Policy) rule(name string) *rule {
	for i := range p.rules {
		if p.rules[i].name == name {
			return &p.rules[i]
		}
	}
	return nil
}

// Version identifies the policy's content: "sha256:" and the first 16 hex
// digits of the SHA-256 of the file. The same bytes give the same version
// on every node.
func (p *Policy) Version() string { return p.version }

// Source is the file name the policy was parsed from.
func (p *Policy) Source() string { return p.source }

// Default is the outcome for workloads no rule matches.
func (p *Policy) Default() Outcome { return p.def }

// Rules describes the rules, in policy order, for display. The slice is a
// copy; changing it changes nothing in the policy.
func (p *Policy) Rules() []RuleInfo {
	out := make([]RuleInfo, len(p.rules))
	for i := range p.rules {
		r := &p.rules[i]
		out[i] = RuleInfo{
			Name:        r.name,
			Description: r.description,
			Outcome:     r.outcome,
			Match:       r.summary(),
			When:        r.when,
			Line:        r.line,
		}
	}
	return out
}

// RuleInfo is the read-only description of a rule.
type RuleInfo struct {
	Name        string  `json:"name"`
	Description string  `json:"description,omitempty"`
	Outcome     Outcome `json:"outcome"`
	// Match summarizes the match conditions, e.g.
	// "labels trust=untrusted; privileged".
	Match string `json:"match,omitempty"`
	When  string `json:"when,omitempty"`
	// Line is where the rule starts in the policy file.
	Line int `json:"line"`
}

// rule is one compiled rule. Every condition that is set must hold.
type rule struct {
	name        string
	description string
	outcome     Outcome
	line        int

	labels      []label // all must be equal
	labelsExist []string
	images      []*glob
	tenants     []string
	privileged  *bool
	hostPaths   *bool
	cpuGt       *float64
	memoryMBGt  *int64
	pidsGt      *int64

	// network is "none" (force loopback only) or "host" (allow the host
	// network) or empty.
	network string
	// execDeny: no exec session into a matched workload.
	execDeny bool

	when     string
	whenText string      // when on one line, for reasons
	prg      cel.Program // nil when there is no `when`
}

type label struct{ key, value string }

// matchStatic checks the match conditions, cheapest first, and stops at the
// first that fails. It does not look at `when`.
func (r *rule) matchStatic(w *Workload) bool {
	if r.privileged != nil && *r.privileged != w.Privileged {
		return false
	}
	if r.hostPaths != nil && *r.hostPaths != (len(w.HostPaths) > 0) {
		return false
	}
	if r.cpuGt != nil && !(w.Resources.CPU > *r.cpuGt) {
		return false
	}
	if r.memoryMBGt != nil && !(w.Resources.MemoryMB > *r.memoryMBGt) {
		return false
	}
	if r.pidsGt != nil && !(w.Resources.Pids > *r.pidsGt) {
		return false
	}
	for _, l := range r.labels {
		if v, ok := w.Labels[l.key]; !ok || v != l.value {
			return false
		}
	}
	if len(r.labelsExist) > 0 && r.existingLabel(w) == "" {
		return false
	}
	if len(r.tenants) > 0 && r.tenant(w) == "" {
		return false
	}
	if len(r.images) > 0 && r.image(w) == nil {
		return false
	}
	return true
}

func (r *rule) existingLabel(w *Workload) string {
	for _, k := range r.labelsExist {
		if _, ok := w.Labels[k]; ok {
			return k
		}
	}
	return ""
}

func (r *rule) tenant(w *Workload) string {
	t := w.Tenant()
	if t == "" {
		return ""
	}
	for _, want := range r.tenants {
		if t == want {
			return t
		}
	}
	return ""
}

func (r *rule) image(w *Workload) *glob {
	for _, g := range r.images {
		if g.match(w.Image) {
			return g
		}
	}
	return nil
}

// reason says why a matched rule matched, naming each condition that held.
// It runs only for matched rules, so Decide pays for strings only there.
func (r *rule) reason(w *Workload, evalErr error) string {
	var parts []string
	for _, l := range r.labels {
		parts = append(parts, "label "+value(l.key)+"="+value(l.value))
	}
	if len(r.labelsExist) > 0 {
		parts = append(parts, "label "+value(r.existingLabel(w))+" present")
	}
	if len(r.tenants) > 0 {
		parts = append(parts, "tenant "+value(r.tenant(w)))
	}
	if len(r.images) > 0 {
		parts = append(parts, "image "+value(w.Image)+" matches "+value(r.image(w).pattern))
	}
	if r.privileged != nil {
		if *r.privileged {
			parts = append(parts, "privileged")
		} else {
			parts = append(parts, "not privileged")
		}
	}
	if r.hostPaths != nil {
		if *r.hostPaths {
			parts = append(parts, "host path "+value(w.HostPaths[0]))
		} else {
			parts = append(parts, "no host path")
		}
	}
	if r.cpuGt != nil {
		parts = append(parts, "cpu "+formatFloat(w.Resources.CPU)+" > "+formatFloat(*r.cpuGt))
	}
	if r.memoryMBGt != nil {
		parts = append(parts, "memory_mb "+strconv.FormatInt(w.Resources.MemoryMB, 10)+" > "+strconv.FormatInt(*r.memoryMBGt, 10))
	}
	if r.pidsGt != nil {
		parts = append(parts, "pids "+strconv.FormatInt(w.Resources.Pids, 10)+" > "+strconv.FormatInt(*r.pidsGt, 10))
	}
	if r.prg != nil {
		if evalErr != nil {
			parts = append(parts, "when: evaluation error: "+prose(evalErr.Error()))
		} else {
			parts = append(parts, "when: "+r.whenText+" was true")
		}
	}
	return strings.Join(parts, ", ")
}

// summary describes the conditions for RuleInfo.
func (r *rule) summary() string {
	var parts []string
	if len(r.labels) > 0 {
		kv := make([]string, len(r.labels))
		for i, l := range r.labels {
			kv[i] = l.key + "=" + l.value
		}
		parts = append(parts, "labels "+strings.Join(kv, ","))
	}
	if len(r.labelsExist) > 0 {
		parts = append(parts, "any label of "+strings.Join(r.labelsExist, ","))
	}
	if len(r.tenants) > 0 {
		parts = append(parts, "tenant in "+strings.Join(r.tenants, ","))
	}
	if len(r.images) > 0 {
		pats := make([]string, len(r.images))
		for i, g := range r.images {
			pats[i] = g.pattern
		}
		parts = append(parts, "image matches "+strings.Join(pats, ","))
	}
	if r.privileged != nil {
		if *r.privileged {
			parts = append(parts, "privileged")
		} else {
			parts = append(parts, "not privileged")
		}
	}
	if r.hostPaths != nil {
		if *r.hostPaths {
			parts = append(parts, "host paths")
		} else {
			parts = append(parts, "no host paths")
		}
	}
	if r.cpuGt != nil {
		parts = append(parts, "cpu > "+formatFloat(*r.cpuGt))
	}
	if r.memoryMBGt != nil {
		parts = append(parts, fmt.Sprintf("memory_mb > %d", *r.memoryMBGt))
	}
	if r.pidsGt != nil {
		parts = append(parts, fmt.Sprintf("pids > %d", *r.pidsGt))
	}
	return strings.Join(parts, "; ")
}

func formatFloat(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }
