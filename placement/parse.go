package placement

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"cel.dev/cel-go/cel"
	"gopkg.in/yaml.v3"
)

const (
	// APIVersion and Kind identify an isolation policy file.
	APIVersion = "berth.dev/v1"
	Kind       = "IsolationPolicy"

	// MaxSize is the largest policy file Parse accepts. Real policies are a
	// few KiB; the limit keeps a mistaken or hostile file from costing the
	// agent memory and CPU on every reload.
	MaxSize = 1 << 20
	// maxRules bounds the work of compiling one policy.
	maxRules = 1000
)

var (
	policyKeys = []string{"apiVersion", "kind", "default", "rules"}
	ruleKeys   = []string{"name", "description", "match", "when", "isolation", "action", "network", "exec"}
	matchKeys  = []string{"labels", "labels_exist", "images", "tenants", "privileged", "host_paths", "cpu_gt", "memory_mb_gt", "pids_gt"}

	// ruleName is a DNS label: rule names end up in API fields, metrics
	// labels and log lines, where anything looser needs quoting.
	ruleName = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	// yamlLine pulls the line out of yaml.v3's syntax errors, which carry
	// no column.
	yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)
)

// Parse reads a policy file. filename is used in messages and reported by
// Source. On any problem it returns an ErrorList holding every problem found,
// each with its position.
func Parse(filename string, data []byte) (*Policy, error) {
	e := &errs{file: filename}
	if len(data) > MaxSize {
		e.add(0, 0, "policy file is %d bytes; the limit is %d", len(data), MaxSize)
		return nil, e.err()
	}
	root := decode(e, data)
	if root == nil {
		return nil, e.err()
	}
	if noAliases(e, root); len(e.list) > 0 {
		// An alias would have to be followed to check what it stands
		// for; refuse before doing that.
		return nil, e.err()
	}
	sum := sha256.Sum256(data)
	p := &Policy{source: filename, version: "sha256:" + hex.EncodeToString(sum[:8])}
	(&parser{e: e, data: data}).policy(root, p)
	if err := e.err(); err != nil {
		return nil, err
	}
	return p, nil
}

// decode parses data as exactly one YAML document and returns its root
// node, or nil after reporting why there is none.
func decode(e *errs, data []byte) (root *yaml.Node) {
	defer func() {
		// yaml.v3 has panicked on crafted input before; a policy reload
		// must reject such a file, not take the agent down.
		if r := recover(); r != nil {
			e.add(0, 0, "YAML parser failed: %v", r)
			root = nil
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			e.add(1, 1, "empty file: expected an isolation policy (apiVersion: %s, kind: %s)", APIVersion, Kind)
		} else {
			yamlError(e, err)
		}
		return nil
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
	case err != nil:
		yamlError(e, err)
		return nil
	default:
		e.add(next.Line, next.Column, "a policy file holds one YAML document; remove everything after the first ---")
		return nil
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		e.add(1, 1, "empty file: expected an isolation policy (apiVersion: %s, kind: %s)", APIVersion, Kind)
		return nil
	}
	return doc.Content[0]
}

func yamlError(e *errs, err error) {
	msg := err.Error()
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		e.add(line, 0, "YAML syntax: %s", m[2])
		return
	}
	e.add(0, 0, "YAML syntax: %s", strings.TrimPrefix(msg, "yaml: "))
}

// noAliases reports every anchor, with how often it is used. Anchors and
// aliases buy little in a policy and cost a lot: an alias bomb expands a
// small file into gigabytes, and a rule shared by reference is a rule
// nobody sees when reading the file.
func noAliases(e *errs, root *yaml.Node) {
	type anchor struct {
		n    *yaml.Node
		uses int
	}
	var anchors []*anchor
	byNode := make(map[*yaml.Node]*anchor)
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Anchor != "" {
			a := &anchor{n: n}
			anchors = append(anchors, a)
			byNode[n] = a
		}
		if n.Kind == yaml.AliasNode {
			// Aliases can only refer back, so the anchor is known; an
			// alias to nothing is a YAML syntax error.
			if a := byNode[n.Alias]; a != nil {
				a.uses++
			}
			return
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(root)
	for _, a := range anchors {
		e.add(a.n.Line, a.n.Column, "anchor &%s (%s): anchors and aliases are not supported; write the value out", a.n.Anchor, aliasCount(a.uses))
	}
}

func aliasCount(n int) string {
	switch n {
	case 0:
		return "not used"
	case 1:
		return "used once"
	}
	return fmt.Sprintf("used %d times", n)
}

// parser checks one decoded file and fills in a Policy.
type parser struct {
	e     *errs
	data  []byte
	lines [][]byte // split lazily, for positions inside CEL expressions
}

func (p *parser) errorf(n *yaml.Node, format string, args ...any) {
	p.e.add(n.Line, n.Column, format, args...)
}

func (p *parser) policy(root *yaml.Node, pol *Policy) {
	if root.Kind != yaml.MappingNode {
		p.errorf(root, "a policy is a mapping with apiVersion, kind, default and rules; got %s", describe(root))
		return
	}
	f := p.fields(root, "", policyKeys)
	for _, k := range []string{"apiVersion", "kind", "default"} {
		if f[k] == nil {
			p.errorf(root, "missing required key %q", k)
		}
	}
	if n := f["apiVersion"]; n != nil {
		if v, ok := p.str(n, "apiVersion"); ok && v != APIVersion {
			p.errorf(n, "apiVersion must be %q, got %q", APIVersion, v)
		}
	}
	if n := f["kind"]; n != nil {
		if v, ok := p.str(n, "kind"); ok && v != Kind {
			p.errorf(n, "kind must be %q, got %q", Kind, v)
		}
	}
	if n := f["default"]; n != nil {
		if v, ok := p.str(n, "default"); ok {
			switch o := Outcome(v); o {
			case OutcomeContainer, OutcomeVM, OutcomeDeny:
				pol.def = o
			default:
				p.errorf(n, "default must be container, vm or deny, got %q", v)
			}
		}
	}
	n := f["rules"]
	if n == nil || isNull(n) {
		return
	}
	if n.Kind != yaml.SequenceNode {
		p.errorf(n, "rules must be a list of rules, got %s", describe(n))
		return
	}
	if len(n.Content) > maxRules {
		p.errorf(n, "%d rules; the limit is %d", len(n.Content), maxRules)
		return
	}
	seen := make(map[string]int, len(n.Content))
	pol.rules = make([]rule, 0, len(n.Content))
	for i, rn := range n.Content {
		r, ok := p.rule(rn, i)
		if r.name != "" {
			if line, dup := seen[r.name]; dup {
				p.errorf(rn, "duplicate rule name %q (first defined at line %d)", r.name, line)
				ok = false
			} else {
				seen[r.name] = rn.Line
			}
		}
		if ok {
			pol.rules = append(pol.rules, r)
			pol.network = pol.network || r.network != ""
		}
	}
}

// rule checks one rule. ok is false when anything in it was wrong; r.name
// is set whenever the name itself was valid, for duplicate detection.
func (p *parser) rule(n *yaml.Node, i int) (r rule, ok bool) {
	if n.Kind != yaml.MappingNode {
		p.errorf(n, "rules[%d]: a rule is a mapping with name, match and/or when, and isolation or action; got %s", i, describe(n))
		return r, false
	}
	before := len(p.e.list)
	r.line = n.Line
	// Name the rule in every message about it, so find the name first.
	ctx := fmt.Sprintf("rules[%d]", i)
	for j := 0; j+1 < len(n.Content); j += 2 {
		k, v := n.Content[j], n.Content[j+1]
		if k.Value == "name" && v.Kind == yaml.ScalarNode && v.ShortTag() == "!!str" && ruleName.MatchString(v.Value) {
			ctx = fmt.Sprintf("rule %q", v.Value)
			break
		}
	}
	f := p.fields(n, ctx+": ", ruleKeys)
	if nn := f["name"]; nn == nil {
		p.errorf(n, "%s: missing required key \"name\"", ctx)
	} else if v, ok := p.str(nn, ctx+": name"); ok {
		switch {
		case !ruleName.MatchString(v):
			p.errorf(nn, "%s: name %q must be a DNS label: lower-case letters, digits and '-', at most 63, starting and ending with a letter or digit", ctx, v)
		case v == DecidedByDefault || v == DecidedByRequest:
			p.errorf(nn, "%s: name %q is reserved: decisions use it for the policy default and the submitter's request", ctx, v)
		default:
			r.name = v
		}
	}
	if dn := f["description"]; dn != nil {
		r.description, _ = p.str(dn, ctx+": description")
	}

	iso, act := f["isolation"], f["action"]
	switch {
	case iso != nil && act != nil:
		p.errorf(act, "%s: give either isolation (container or vm) or action (deny), not both", ctx)
	case iso == nil && act == nil && f["exec"] != nil:
		// A rule about exec alone: it places nothing.
	case iso == nil && act == nil:
		p.errorf(n, "%s: missing outcome: give isolation (container or vm) or action (deny), or exec: deny", ctx)
	case iso != nil:
		if v, ok := p.str(iso, ctx+": isolation"); ok {
			switch o := Outcome(v); o {
			case OutcomeContainer, OutcomeVM:
				r.outcome = o
			case OutcomeDeny:
				p.errorf(iso, "%s: isolation must be container or vm; to reject workloads write action: deny", ctx)
			default:
				p.errorf(iso, "%s: isolation must be container or vm, got %q", ctx, v)
			}
		}
	default:
		if v, ok := p.str(act, ctx+": action"); ok {
			if v == string(OutcomeDeny) {
				r.outcome = OutcomeDeny
			} else {
				p.errorf(act, "%s: action must be deny, got %q (to choose an isolation write isolation: container or vm)", ctx, v)
			}
		}
	}

	if nn := f["network"]; nn != nil && r.outcome == "" && iso == nil && act == nil {
		// A rule without an outcome never takes part in a placement:
		// its network would be ignored, silently.
		p.errorf(nn, "%s: network needs an outcome in the same rule (isolation or action); a rule with exec alone places nothing", ctx)
	} else if nn != nil {
		if v, ok := p.str(nn, ctx+": network"); ok {
			switch v {
			case NetworkNone:
				r.network = v
			case NetworkHost:
				if r.outcome != "" && r.outcome != OutcomeContainer {
					p.errorf(nn, "%s: network: host needs isolation: container (the host network exists only for containers)", ctx)
				} else {
					r.network = v
				}
			default:
				p.errorf(nn, "%s: network must be none (force loopback only) or host (allow the host network), got %q", ctx, v)
			}
		}
	}

	if en := f["exec"]; en != nil {
		if v, ok := p.str(en, ctx+": exec"); ok {
			switch v {
			case ExecDeny:
				r.execDeny = true
			case ExecAllow:
			default:
				p.errorf(en, "%s: exec must be deny (no exec sessions into matched workloads) or allow, got %q", ctx, v)
			}
		}
	}

	conditions := 0
	mn, wn := f["match"], f["when"]
	if mn != nil {
		conditions += p.match(mn, ctx, &r)
	}
	if wn != nil {
		conditions++
		if v, ok := p.str(wn, ctx+": when"); ok && strings.TrimSpace(v) == "" {
			p.errorf(wn, "%s: when is empty; write an expression or remove the key", ctx)
		} else if ok {
			r.when, r.whenText = v, prose(v)
			r.prg = p.when(wn, ctx, v)
		}
	}
	// A rule without conditions would match every workload, which is
	// almost always a half-written rule. A match that is not a mapping is
	// already reported.
	if conditions == 0 && (mn == nil || isNull(mn) || mn.Kind == yaml.MappingNode) {
		p.errorf(n, "%s: no conditions: give match conditions or a when expression (write when: \"true\" to match every workload on purpose)", ctx)
	}
	return r, len(p.e.list) == before
}

// match fills in r's conditions and returns how many were given, valid
// or not.
func (p *parser) match(n *yaml.Node, ctx string, r *rule) int {
	if isNull(n) {
		return 0
	}
	if n.Kind != yaml.MappingNode {
		p.errorf(n, "%s: match must be a mapping of conditions, got %s", ctx, describe(n))
		return 0
	}
	f := p.fields(n, ctx+": match: ", matchKeys)
	if ln := f["labels"]; ln != nil {
		if ln.Kind != yaml.MappingNode {
			p.errorf(ln, "%s: match.labels must be a mapping of label to value, got %s", ctx, describe(ln))
		} else if len(ln.Content) == 0 {
			p.errorf(ln, "%s: match.labels is empty; remove it or name a label", ctx)
		} else {
			lf := p.fields(ln, ctx+": match.labels: ", nil)
			for k, v := range lf {
				if k == "" {
					p.errorf(ln, "%s: match.labels: empty label name", ctx)
					continue
				}
				if s, ok := p.str(v, ctx+": match.labels."+k); ok {
					r.labels = append(r.labels, label{k, s})
				}
			}
			slices.SortFunc(r.labels, func(a, b label) int { return strings.Compare(a.key, b.key) })
		}
	}
	if ln := f["labels_exist"]; ln != nil {
		r.labelsExist = p.strList(ln, ctx+": match.labels_exist", "label name")
	}
	if tn := f["tenants"]; tn != nil {
		r.tenants = p.strList(tn, ctx+": match.tenants", "tenant")
	}
	if in := f["images"]; in != nil {
		pats := p.strList(in, ctx+": match.images", "image pattern")
		for j, pat := range pats {
			g, err := compileGlob(pat)
			if err != nil {
				p.errorf(in.Content[j], "%s: match.images[%d]: bad pattern %q: %v", ctx, j, pat, err)
				continue
			}
			r.images = append(r.images, g)
		}
	}
	if pn := f["privileged"]; pn != nil {
		if pn.Kind == yaml.ScalarNode && pn.ShortTag() == "!!bool" {
			var b bool
			if err := pn.Decode(&b); err == nil {
				r.privileged = &b
			} else {
				p.errorf(pn, "%s: match.privileged: %v", ctx, err)
			}
		} else {
			p.errorf(pn, "%s: match.privileged must be true or false, got %s", ctx, describe(pn))
		}
	}
	if hn := f["host_paths"]; hn != nil {
		var b bool
		if hn.Kind == yaml.ScalarNode && hn.ShortTag() == "!!bool" && hn.Decode(&b) == nil {
			r.hostPaths = &b
		} else {
			p.errorf(hn, "%s: match.host_paths must be true or false, got %s", ctx, describe(hn))
		}
	}
	if cn := f["cpu_gt"]; cn != nil {
		r.cpuGt = p.cpu(cn, ctx+": match.cpu_gt")
	}
	if mn := f["memory_mb_gt"]; mn != nil {
		r.memoryMBGt = p.count(mn, ctx+": match.memory_mb_gt")
	}
	if pn := f["pids_gt"]; pn != nil {
		r.pidsGt = p.count(pn, ctx+": match.pids_gt")
	}
	return len(n.Content) / 2
}

// when compiles a CEL expression, reporting each problem at its place in
// the file.
func (p *parser) when(n *yaml.Node, ctx, expr string) cel.Program {
	prg, problems := compileCEL(expr)
	for _, c := range problems {
		line, col := p.exprPos(n, c.line, c.col)
		p.e.add(line, col, "%s: when: %s", ctx, c.msg)
	}
	return prg
}

// exprPos maps a position inside a `when` expression to the file. Literal
// blocks (|) map line by line; folded text (> blocks and plain scalars over
// several lines, where YAML joins lines with a space) is followed across its
// lines. Quoted scalars map exactly on their first line. Anything else gets
// the position where the value starts.
func (p *parser) exprPos(n *yaml.Node, line, col int) (int, int) {
	if p.lines == nil {
		p.lines = bytes.Split(p.data, []byte("\n"))
	}
	switch {
	case n.Style&yaml.LiteralStyle != 0:
		l := n.Line + line
		text := p.line(l)
		if indent := len(text) - len(bytes.TrimLeft(text, " ")); l > n.Line && indent > 0 {
			return l, indent + col + 1
		}
	case line != 1:
	case n.Style&yaml.FoldedStyle != 0:
		if l, c, ok := p.folded(n.Line+1, 0, col); ok {
			return l, c
		}
	case n.Style&(yaml.SingleQuotedStyle|yaml.DoubleQuotedStyle) != 0:
		if c := n.Column + 1 + col; c <= utf8.RuneCount(p.line(n.Line))+1 {
			return n.Line, c
		}
	default:
		if l, c, ok := p.folded(n.Line, n.Column, col); ok {
			return l, c
		}
	}
	return n.Line, n.Column
}

// folded finds column col of text that starts at line l (at column start,
// or at the indentation when start is 0) and continues over the following
// lines, each joined to the previous one by a single space.
func (p *parser) folded(l, start, col int) (int, int, bool) {
	for ; l <= len(p.lines); l++ {
		text := []rune(string(p.line(l)))
		from := start - 1
		if start == 0 {
			from = len(text) - len([]rune(strings.TrimLeft(string(text), " ")))
		}
		if from < 0 || from > len(text) {
			return 0, 0, false
		}
		content := []rune(strings.TrimRight(string(text[from:]), " \t\r"))
		if col <= len(content) {
			return l, from + col + 1, true
		}
		col -= len(content) + 1
		start = 0
	}
	return 0, 0, false
}

func (p *parser) line(l int) []byte {
	if l < 1 || l > len(p.lines) {
		return nil
	}
	return p.lines[l-1]
}

// fields checks that n's keys are strings from allowed (any string when
// allowed is nil), each given once, and returns the values by key.
func (p *parser) fields(n *yaml.Node, ctx string, allowed []string) map[string]*yaml.Node {
	out := make(map[string]*yaml.Node, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || k.ShortTag() != "!!str" {
			p.errorf(k, "%skeys must be strings, got %s", ctx, describe(k))
			continue
		}
		if _, dup := out[k.Value]; dup {
			p.errorf(k, "%skey %q given twice", ctx, k.Value)
			continue
		}
		if allowed != nil && !slices.Contains(allowed, k.Value) {
			msg := fmt.Sprintf("%sunknown key %q", ctx, k.Value)
			if s := suggest(k.Value, allowed); s != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			}
			p.errorf(k, "%s; valid keys: %s", msg, strings.Join(allowed, ", "))
			continue
		}
		out[k.Value] = v
	}
	return out
}

// str returns n's value if n is a string.
func (p *parser) str(n *yaml.Node, what string) (string, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!str" {
		return n.Value, true
	}
	msg := fmt.Sprintf("%s must be a string, got %s", what, describe(n))
	if n.Kind == yaml.ScalarNode && !isNull(n) {
		msg += fmt.Sprintf("; quote it if you mean the text: %q", n.Value)
	}
	p.errorf(n, "%s", msg)
	return "", false
}

// strList returns a non-empty list of non-empty strings.
func (p *parser) strList(n *yaml.Node, what, item string) []string {
	if n.Kind != yaml.SequenceNode {
		p.errorf(n, "%s must be a list of %ss, got %s", what, item, describe(n))
		return nil
	}
	if len(n.Content) == 0 {
		p.errorf(n, "%s is empty, so it never matches; remove it or list at least one %s", what, item)
		return nil
	}
	out := make([]string, 0, len(n.Content))
	for j, c := range n.Content {
		s, ok := p.str(c, fmt.Sprintf("%s[%d]", what, j))
		if !ok {
			continue
		}
		if s == "" {
			p.errorf(c, "%s[%d]: empty %s", what, j, item)
			continue
		}
		out = append(out, s)
	}
	return out
}

// cpu reads a non-negative number of cores.
func (p *parser) cpu(n *yaml.Node, what string) *float64 {
	if n.Kind != yaml.ScalarNode || (n.ShortTag() != "!!int" && n.ShortTag() != "!!float") {
		p.errorf(n, "%s must be a number of cores, got %s", what, describe(n))
		return nil
	}
	var f float64
	if err := n.Decode(&f); err != nil {
		p.errorf(n, "%s: %v", what, err)
		return nil
	}
	if math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
		p.errorf(n, "%s must be a finite number of cores, zero or more; got %s", what, n.Value)
		return nil
	}
	return &f
}

// count reads a non-negative integer.
func (p *parser) count(n *yaml.Node, what string) *int64 {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!float" && strings.Trim(n.Value, "+-0123456789_") == "" {
		// yaml.v3 reads integers that overflow int64 as floats.
		p.errorf(n, "%s: %s is too large", what, n.Value)
		return nil
	}
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
		p.errorf(n, "%s must be a whole number, got %s", what, describe(n))
		return nil
	}
	var v int64
	if err := n.Decode(&v); err != nil {
		p.errorf(n, "%s: %s is out of range", what, n.Value)
		return nil
	}
	if v < 0 {
		p.errorf(n, "%s must be zero or more, got %d", what, v)
		return nil
	}
	return &v
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" }

// describe names a node's type and value for messages.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		v := n.Value
		if len(v) > 40 {
			v = v[:40] + "..."
		}
		switch n.ShortTag() {
		case "!!null":
			return "nothing (null)"
		case "!!str":
			return fmt.Sprintf("the string %q", v)
		case "!!int":
			return "the integer " + v
		case "!!float":
			return "the number " + v
		case "!!bool":
			return "the boolean " + v
		default:
			return fmt.Sprintf("%s %q", n.ShortTag(), v)
		}
	}
	return "nothing"
}

// suggest returns the candidate closest to s when it is close enough to be
// a typo.
func suggest(s string, candidates []string) string {
	best, bestDist := "", 3
	for _, c := range candidates {
		if d := editDistance(strings.ToLower(s), strings.ToLower(c)); d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance, for short keys only.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return math.MaxInt
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
