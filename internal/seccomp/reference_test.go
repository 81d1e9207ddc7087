package seccomp

import (
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// refEval is a reference evaluator written straight from the semantics of
// runc 1.1.5 + libseccomp 2.5.4 (see the package comment): it decides one
// system call by walking the profile, without building any program.
type refEval struct {
	p     *specs.LinuxSeccomp
	cache map[[2]uint32]refCall
}

// refCall is what the evaluator found for an (arch, nr): a verdict that
// does not depend on the arguments, or the rules to check.
type refCall struct {
	fixed   bool
	verdict uint32
	def     uint32
	arch    specs.Arch
	rules   []refRule
}

type refRule struct {
	args   []specs.LinuxSeccompArg
	action uint32
}

func newRefEval(p *specs.LinuxSeccomp) *refEval {
	return &refEval{p: p, cache: map[[2]uint32]refCall{}}
}

func (r *refEval) verdict(d seccompData) uint32 {
	key := [2]uint32{d.arch, d.nr}
	c, ok := r.cache[key]
	if !ok {
		c = refLookup(r.p, d.arch, d.nr)
		r.cache[key] = c
	}
	if c.fixed {
		return c.verdict
	}
	return c.decide(d.args)
}

func refLookup(p *specs.LinuxSeccomp, archVal, nrVal uint32) refCall {
	d := struct{ arch, nr uint32 }{archVal, nrVal}
	fixed := func(v uint32) refCall { return refCall{fixed: true, verdict: v} }
	act := func(a specs.LinuxSeccompAction, errno *uint) uint32 {
		switch a {
		case specs.ActKill, specs.ActKillThread:
			return 0
		case specs.ActKillProcess:
			return 0x80000000
		case specs.ActTrap:
			return 0x30000
		case specs.ActErrno:
			if errno == nil {
				return 0x50001
			}
			return 0x50000 | uint32(*errno&0xffff)
		case specs.ActLog:
			return 0x7ffc0000
		case specs.ActAllow:
			return 0x7fff0000
		}
		panic("reference: action " + a)
	}
	const (
		enosys  = 0x50026
		badArch = 0
		bit30   = 0x40000000
	)
	def := act(p.DefaultAction, p.DefaultErrnoRet)
	listed := map[specs.Arch]bool{}
	for _, a := range p.Architectures {
		listed[a] = true
	}
	tables := map[specs.Arch]map[string]uint32{specs.ArchX86_64: sysX8664, specs.ArchX86: sysX86, specs.ArchX32: sysX32}
	muxed := func(arch specs.Arch, name string) bool {
		_, ok := x86Mux[name]
		return ok && arch == specs.ArchX86
	}

	// runc's -ENOSYS stub
	stub := p.DefaultAction != specs.ActAllow && p.DefaultAction != specs.ActLog &&
		(p.DefaultErrnoRet == nil || *p.DefaultErrnoRet != enosys)
	highest := func(arch specs.Arch) uint32 {
		var max uint32
		for _, sc := range p.Syscalls {
			for _, n := range sc.Names {
				if nr, ok := tables[arch][n]; ok && !muxed(arch, n) && nr > max {
					max = nr
				}
			}
		}
		return max
	}
	var arch specs.Arch // the ABI whose rules apply
	switch {
	case d.arch == 0xC000003E:
		arch = specs.ArchX86_64
		if d.nr&bit30 != 0 {
			arch = specs.ArchX32
		}
		if stub && listed[arch] {
			if max := highest(arch); max != 0 && d.nr > max {
				return fixed(enosys)
			}
		}
		if !listed[specs.ArchX32] && d.nr >= bit30 && d.nr != 0xffffffff {
			return fixed(badArch)
		}
	case d.arch == 0x40000003 && listed[specs.ArchX86]:
		arch = specs.ArchX86
		if stub {
			if max := highest(arch); max != 0 && d.nr > max {
				return fixed(enosys)
			}
		}
	default:
		return fixed(badArch)
	}

	// The rules that apply to d.nr, in the order runc adds them.
	type arule = refRule
	var rules []arule
	for _, sc := range p.Syscalls {
		a := act(sc.Action, sc.ErrnoRet)
		if a == def {
			continue
		}
		// conditions on one argument twice: one rule a condition
		sets := [][]specs.LinuxSeccompArg{sc.Args}
		for i := range sc.Args {
			for j := 0; j < i; j++ {
				if sc.Args[i].Index == sc.Args[j].Index {
					sets = nil
				}
			}
		}
		if sets == nil {
			for _, c := range sc.Args {
				sets = append(sets, []specs.LinuxSeccompArg{c})
			}
		}
		for _, n := range sc.Names {
			for _, set := range sets {
				if muxed(arch, n) {
					mux := x86Mux[n]
					if d.nr == mux[0] {
						args := []specs.LinuxSeccompArg{{Index: 0, Op: specs.OpEqualTo, Value: uint64(mux[1])}}
						for _, c := range set {
							if c.Index != 0 {
								args = append(args, c)
							}
						}
						rules = append(rules, arule{args, a})
					}
				}
				if nr, ok := tables[arch][n]; ok && nr == d.nr {
					rules = append(rules, arule{set, a})
				}
			}
		}
	}

	return refCall{def: def, arch: arch, rules: rules}
}

func (rc refCall) decide(args [6]uint64) uint32 {
	arch, rules, def := rc.arch, rc.rules, rc.def
	type arule = refRule
	holds := func(c specs.LinuxSeccompArg) (hold, trivial bool) {
		v := args[c.Index]
		mask, want := ^uint64(0), c.Value
		if c.Op == specs.OpMaskedEqual {
			mask, want = c.Value, c.ValueTwo
		}
		if arch != specs.ArchX86_64 { // 32-bit ABIs: low words only
			v, mask, want = v&0xffffffff, mask&0xffffffff, want&0xffffffff
		}
		want &= mask
		switch c.Op {
		case specs.OpEqualTo:
			return v == want, false
		case specs.OpNotEqual:
			return v != want, false
		case specs.OpLessThan:
			return v < want, false
		case specs.OpLessEqual:
			return v <= want, false
		case specs.OpGreaterThan:
			return v > want, false
		case specs.OpGreaterEqual:
			return v >= want, false
		case specs.OpMaskedEqual:
			return v&mask == want, mask == 0
		}
		panic("reference: op " + c.Op)
	}
	unconditional := func(r arule) bool {
		for _, c := range r.args {
			if _, trivial := holds(c); !trivial {
				return false
			}
		}
		return true
	}
	// an unconditional rule beats all conditional ones
	for _, r := range rules {
		if unconditional(r) {
			return r.action
		}
	}
	for _, r := range rules {
		all := true
		for _, c := range r.args {
			if h, _ := holds(c); !h {
				all = false
			}
		}
		if all {
			return r.action
		}
	}
	return def
}
