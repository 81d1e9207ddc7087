package placement

import "strconv"

// Decide places w on a node with facts n under policy p. It is a pure
// function: the same inputs give the same Decision, and it never blocks,
// logs or fails; problems are verdicts.
//
// Every rule is evaluated, so that the Decision lists all that matched.
// The strongest outcome among them wins (deny > vm > container), the
// default applies only when none matched, a vm request raises container to
// vm, and a container request where vm is required is refused. A `when`
// expression that fails to evaluate counts as true: a broken rule must err
// towards isolation, not away from it.
func Decide(w Workload, p *Policy, n NodeFacts) Decision {
	if p == nil || p.def == "" {
		// Only a zero Policy gets here; the agent always has one. Fail
		// closed.
		return Decision{
			Verdict:      VerdictDeny,
			Isolation:    IsolationVM,
			DecidingRule: DecidedByDefault,
			Explanation:  "denied: no isolation policy is loaded",
		}
	}

	var (
		act    *activation
		deny   *rule // first matching deny rule
		strong *rule // first matching rule with the strongest non-deny outcome
		d      = Decision{PolicyVersion: p.version}
	)
	for i := range p.rules {
		r := &p.rules[i]
		if r.outcome == "" {
			continue // a rule about exec alone places nothing
		}
		reason, ok := r.match(&w, &n, &act)
		if !ok {
			continue
		}
		d.Matched = append(d.Matched, Match{Rule: r.name, Outcome: r.outcome, Reason: reason})
		switch {
		case r.outcome == OutcomeDeny:
			if deny == nil {
				deny = r
			}
		case strong == nil || r.outcome.rank() > strong.outcome.rank():
			strong = r
		}
	}

	// What the policy requires, leaving deny aside: the strongest matching
	// rule, or else the default. (When only deny rules matched, this is
	// what the workload would have got without them.)
	required, by := p.def, DecidedByDefault
	var cause string
	switch {
	case strong != nil:
		required, by = strong.outcome, strong.name
		cause = ruleCause(strong.name, reasonOf(d.Matched, strong.name), required)
	case p.def == OutcomeDeny:
		// Only reached for denials; report the weakest isolation.
		required = OutcomeContainer
	default:
		cause = "the policy default requires " + string(required) + " (no rule matched)"
	}
	d.Isolation = Isolation(required)

	req := w.Isolation
	if req == "" {
		req = IsolationAuto
	}
	if req == IsolationVM {
		d.Isolation = IsolationVM
	}
	tail := matchedSuffix(len(d.Matched)) + "; policy " + p.version

	switch {
	case deny != nil:
		d.Verdict, d.DecidingRule = VerdictDeny, deny.name
		d.Explanation = "denied: rule " + strconv.Quote(deny.name) + " (" + reasonOf(d.Matched, deny.name) + ") denies it" + tail
	case len(d.Matched) == 0 && p.def == OutcomeDeny:
		d.Verdict, d.DecidingRule = VerdictDeny, DecidedByDefault
		d.Explanation = "denied: no rule matched and the default denies" + tail
	case req != IsolationAuto && req != IsolationContainer && req != IsolationVM:
		d.Verdict, d.DecidingRule = VerdictRefused, DecidedByRequest
		d.Explanation = "refused: isolation request " + strconv.Quote(string(req)) + " is not one of auto, container or vm" + tail
	case req == IsolationContainer && required == OutcomeVM:
		d.Verdict, d.DecidingRule = VerdictRefused, by
		d.Explanation = "refused: container was requested, but " + cause + "; a request may raise isolation, never lower it" + tail
	default:
		d.DecidingRule = by
		if req == IsolationVM && required != OutcomeVM {
			d.DecidingRule = DecidedByRequest
			cause = "the submitter requested vm (the policy alone requires container)"
		}
		if ok, why := n.available(d.Isolation); !ok {
			d.Verdict = VerdictUnschedulable
			d.Explanation = "unschedulable: " + cause + ", but this node cannot run " + string(d.Isolation) + " workloads: " + prose(why) + tail
		} else {
			d.Verdict = VerdictAllow
			d.Explanation = string(d.Isolation) + ": " + cause + tail
		}
	}
	if d.Verdict == VerdictAllow {
		decideNetwork(&d, &w, p, tail)
	}
	return d
}

// match reports whether r matches w on n and why: its static conditions,
// then its `when`, evaluated in *act (made at the first rule that needs
// it). A `when` that fails to evaluate counts as true, and says so.
func (r *rule) match(w *Workload, n *NodeFacts, act **activation) (reason string, ok bool) {
	if !r.matchStatic(w) {
		return "", false
	}
	var evalErr error
	if r.prg != nil {
		if *act == nil {
			*act = &activation{}
			(*act).init(w, n)
		}
		ok, err := evalCEL(r.prg, *act)
		if err == nil && !ok {
			return "", false
		}
		evalErr = err
	}
	return r.reason(w, evalErr), true
}

// decideNetwork settles the network mode of an allowed workload: a
// matching rule with network: none forces loopback only (refusing a
// workload that publishes ports or asks for the host network, rather than
// silently cutting it off); the host network needs a matching rule that
// allows it, and a container.
func decideNetwork(d *Decision, w *Workload, p *Policy, tail string) {
	var none, host string
	for _, m := range d.Matched {
		if !p.network {
			break
		}
		r := p.rule(m.Rule)
		if r == nil {
			continue
		}
		switch {
		case r.network == NetworkNone && none == "":
			none = r.name
		case r.network == NetworkHost && host == "":
			host = r.name
		}
	}
	req := w.Network
	if req == "" {
		req = NetworkBridge
	}
	refuse := func(rule, why string) {
		d.Verdict, d.DecidingRule = VerdictRefused, rule
		d.Explanation = "refused: " + why + tail
	}
	switch {
	case req == NetworkHost && d.Isolation != IsolationContainer:
		refuse(DecidedByRequest, "the host network exists only for containers, and this workload runs in a vm")
	case req == NetworkHost && none != "":
		refuse(none, "the host network was requested, but rule "+strconv.Quote(none)+" forces network none")
	case req == NetworkHost && host == "":
		refuse(DecidedByRequest, "the host network was requested, and no policy rule allows it for this workload (a rule with network: host must match)")
	case none != "" && w.Ports > 0:
		refuse(none, "rule "+strconv.Quote(none)+" forces network none, but the workload publishes ports")
	case none != "":
		d.Network = NetworkNone
		d.Explanation += "; network none (rule " + strconv.Quote(none) + ")"
	default:
		d.Network = req
	}
}

// ruleCause is "rule "name" (reason) requires outcome".
func ruleCause(name, reason string, o Outcome) string {
	return "rule " + strconv.Quote(name) + " (" + reason + ") requires " + string(o)
}

func reasonOf(ms []Match, rule string) string {
	for _, m := range ms {
		if m.Rule == rule {
			return m.Reason
		}
	}
	return ""
}

func matchedSuffix(n int) string {
	if n < 2 {
		return ""
	}
	return "; " + strconv.Itoa(n) + " rules matched"
}
