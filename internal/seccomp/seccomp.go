// Package seccomp compiles an OCI seccomp profile (specs.LinuxSeccomp) into
// the classic BPF program that seccomp(SECCOMP_SET_MODE_FILTER) loads, in
// Go, without cgo or libseccomp, so that berth compiles its profile once
// instead of having runc compile it with libseccomp on every container
// start.
//
// The program it returns behaves as the one runc 1.1.5 (with libseccomp
// 2.5.4 and runc's patchbpf "-ENOSYS stub") installs for the same profile;
// the x86 architectures only (SCMP_ARCH_X86_64, SCMP_ARCH_X86,
// SCMP_ARCH_X32). In detail:
//
//   - Architectures: the native x86_64 ABI is always filtered, as
//     libseccomp's filter always holds its native architecture; the listed
//     ones are added. With x32 listed, x86_64 and x32 share the
//     AUDIT_ARCH_X86_64 block and an x86_64-arch call whose number is not
//     a rule's gets the default action; without it, a number with the x32
//     bit (0x40000000) set gets the bad-arch action, except -1. Any other
//     AUDIT_ARCH (or i386 when SCMP_ARCH_X86 is not listed) gets the
//     bad-arch action, SECCOMP_RET_KILL_THREAD, as libseccomp's default.
//   - -ENOSYS stub: unless the default action is SCMP_ACT_ALLOW or
//     SCMP_ACT_LOG, for each listed ABI a syscall number above the highest
//     one the profile names (in any rule) for that ABI returns
//     ERRNO(ENOSYS) (x86_64 and x32 told apart by the x32 bit), so that
//     libc falls back from syscalls newer than the profile. No listed
//     architectures, no stub. runc's i386 highest number leaves out the
//     socketcall and ipc families (libseccomp resolves them to pseudo
//     numbers), and so does this package. runc skips the stub when
//     defaultErrnoRet equals SCMP_ACT_ERRNO(ENOSYS) (0x50026, not 38: a
//     runc 1.1.5 slip), and so does this package.
//   - Syscall numbers come from zsyscalls_x86.go, generated (go generate)
//     from the kernel's uapi headers plus gen/newer.tbl for syscalls newer
//     than the headers (fchmodat2, which Debian 12's libseccomp knows).
//   - Rules: runc flattens each LinuxSyscall to one rule a name, in
//     profile order. A rule whose action (with its errno) equals the
//     default action is dropped. A name the ABI does not have is skipped
//     for that ABI. If a rule has several conditions on the same argument,
//     runc adds one rule a condition (so they are ORed, not ANDed). Per
//     syscall, an unconditional rule wins over every conditional one
//     (libseccomp drops conditional chains when an unconditional rule
//     exists, and a later unconditional rule for a syscall that already
//     has one is ignored); otherwise the first conditional rule whose
//     conditions all hold decides, else the default action.
//   - Conditions: on x86_64 the 64-bit argument is compared (on both
//     32-bit halves); on i386 and x32 (32-bit ABIs for libseccomp) only the
//     low 32 bits of argument and value. For SCMP_CMP_MASKED_EQ, Value is
//     the mask and ValueTwo the expected value, which is masked first
//     ((arg & mask) == (value2 & mask)), and a zero mask makes the
//     condition always true.
//   - i386 socketcall/ipc: as libseccomp does, a rule for a socket(2)
//     family name (socket, bind, connect, ...) or SysV IPC name (semop,
//     msgsnd, shmat, ...) on i386 also becomes a rule for socketcall(2)
//     (ipc(2)) whose argument 0 condition is replaced by "== the call's
//     SYS_xxx number"; its other conditions stay. The direct syscall, where
//     i386 has one, keeps the rule as written.
//
// The program loads the arch, jumps to its ABI's block, and finds the
// syscall number there by binary search over ranges of numbers with the
// same outcome (an action, or a syscall's argument checks), using ja
// trampolines where a conditional jump would be longer than 255.
//
// What the package does not implement makes Compile fail with an error
// wrapping ErrUnsupported, so that the caller can leave seccomp to runc:
// SCMP_ACT_TRACE and SCMP_ACT_NOTIFY, other architectures, flags, a
// listener, an empty default action.
package seccomp

//go:generate go run ./gen -o zsyscalls_x86.go

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ErrUnsupported is wrapped by the errors Compile returns for profiles that
// use what this package does not implement; runc's own seccomp can still
// handle them.
var ErrUnsupported = errors.New("seccomp: not supported by the BPF compiler")

// MaxInstructions is the kernel's limit on a filter's length (BPF_MAXINSNS).
const MaxInstructions = 4096

// seccomp return values (linux/seccomp.h).
const (
	retKillProcess uint32 = 0x80000000
	retKillThread  uint32 = 0x00000000
	retTrap        uint32 = 0x00030000
	retErrno       uint32 = 0x00050000
	retLog         uint32 = 0x7ffc0000
	retAllow       uint32 = 0x7fff0000
)

const (
	auditArchX8664 uint32 = 0xC000003E // AUDIT_ARCH_X86_64
	auditArchI386  uint32 = 0x40000003 // AUDIT_ARCH_I386

	x32SyscallBit uint32 = 0x40000000 // __X32_SYSCALL_BIT

	errnoEPERM  = 1
	errnoENOSYS = 38

	// offsets in struct seccomp_data
	offNr   = 0
	offArch = 4
	offArgs = 16

	// badArchAction is libseccomp's default SCMP_FLTATR_ACT_BADARCH
	// (SCMP_ACT_KILL), which runc does not change.
	badArchAction = retKillThread
	enosysAction  = retErrno | errnoENOSYS
)

// abi is one of the three x86 syscall ABIs.
type abi int

const (
	abiX8664 abi = iota
	abiX86
	abiX32
	numABIs
)

func (a abi) table() map[string]uint32 {
	switch a {
	case abiX8664:
		return sysX8664
	case abiX86:
		return sysX86
	default:
		return sysX32
	}
}

// wide reports whether libseccomp compares 64-bit arguments for the ABI
// (ARCH_SIZE_64); i386 and x32 are 32-bit ABIs to it.
func (a abi) wide() bool { return a == abiX8664 }

// i386 socketcall(2) and ipc(2) multiplexers and the SYS_xxx call numbers
// of the calls they multiplex (linux/net.h, linux/ipc.h), as libseccomp's
// __PNR_ pseudo syscalls encode them.
const (
	x86Socketcall = 102
	x86IPC        = 117
)

var x86Mux = map[string][2]uint32{
	"socket": {x86Socketcall, 1}, "bind": {x86Socketcall, 2}, "connect": {x86Socketcall, 3},
	"listen": {x86Socketcall, 4}, "accept": {x86Socketcall, 5}, "getsockname": {x86Socketcall, 6},
	"getpeername": {x86Socketcall, 7}, "socketpair": {x86Socketcall, 8}, "send": {x86Socketcall, 9},
	"recv": {x86Socketcall, 10}, "sendto": {x86Socketcall, 11}, "recvfrom": {x86Socketcall, 12},
	"shutdown": {x86Socketcall, 13}, "setsockopt": {x86Socketcall, 14}, "getsockopt": {x86Socketcall, 15},
	"sendmsg": {x86Socketcall, 16}, "recvmsg": {x86Socketcall, 17}, "accept4": {x86Socketcall, 18},
	"recvmmsg": {x86Socketcall, 19}, "sendmmsg": {x86Socketcall, 20},
	"semop": {x86IPC, 1}, "semget": {x86IPC, 2}, "semctl": {x86IPC, 3}, "semtimedop": {x86IPC, 4},
	"msgsnd": {x86IPC, 11}, "msgrcv": {x86IPC, 12}, "msgget": {x86IPC, 13}, "msgctl": {x86IPC, 14},
	"shmat": {x86IPC, 21}, "shmdt": {x86IPC, 22}, "shmget": {x86IPC, 23}, "shmctl": {x86IPC, 24},
}

// cond is one argument comparison, normalised for an ABI: on 32-bit ABIs
// mask and datum are truncated to 32 bits; datum is already masked.
type cond struct {
	arg   uint
	op    specs.LinuxSeccompOperator
	mask  uint64
	datum uint64
}

type rule struct {
	conds  []cond
	action uint32
}

// sysRules is what the profile says about one syscall number.
type sysRules struct {
	uncond bool
	action uint32 // when uncond
	rules  []rule // conditional rules in order, when !uncond
}

func (s *sysRules) add(r rule) {
	switch {
	case s.uncond:
		// an unconditional rule is already there: libseccomp keeps it
	case len(r.conds) == 0:
		s.uncond, s.action, s.rules = true, r.action, nil
	default:
		s.rules = append(s.rules, r)
	}
}

func unsupported(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrUnsupported}, a...)...)
}

// actionValue is runc's getAction: the seccomp return value of an action.
func actionValue(a specs.LinuxSeccompAction, errnoRet *uint) (uint32, error) {
	switch a {
	case specs.ActKill, specs.ActKillThread:
		return retKillThread, nil
	case specs.ActKillProcess:
		return retKillProcess, nil
	case specs.ActTrap:
		return retTrap, nil
	case specs.ActErrno:
		e := uint(errnoEPERM)
		if errnoRet != nil {
			e = *errnoRet
		}
		return retErrno | uint32(e&0xffff), nil
	case specs.ActAllow:
		return retAllow, nil
	case specs.ActLog:
		return retLog, nil
	case "":
		return 0, unsupported("empty action")
	}
	return 0, unsupported("action %s", a)
}

// profile is the checked, flattened profile.
type profile struct {
	defaultAction uint32
	abis          [numABIs]bool // ABIs filtered (x86_64 always)
	listed        [numABIs]bool // ABIs listed in the profile (for the stub)
	stub          bool          // runc's -ENOSYS stub applies
	calls         []call
}

// call is one flattened rule, as runc's configs.Syscall, with its name
// resolved for each ABI.
type call struct {
	name   string
	action uint32
	args   []specs.LinuxSeccompArg
	nr     [numABIs]uint32
	has    [numABIs]bool // the ABI has the syscall
	mux    bool          // an i386 socketcall/ipc family name
}

func check(p *specs.LinuxSeccomp) (*profile, error) {
	if p == nil {
		return nil, unsupported("no profile")
	}
	if len(p.Flags) != 0 {
		return nil, unsupported("flags %v", p.Flags)
	}
	if p.ListenerPath != "" || p.ListenerMetadata != "" {
		return nil, unsupported("seccomp listener")
	}
	def, err := actionValue(p.DefaultAction, p.DefaultErrnoRet)
	if err != nil {
		return nil, fmt.Errorf("default action: %w", err)
	}
	pr := &profile{defaultAction: def}
	pr.abis[abiX8664] = true
	for _, a := range p.Architectures {
		switch a {
		case specs.ArchX86_64:
			pr.listed[abiX8664] = true
		case specs.ArchX86:
			pr.listed[abiX86], pr.abis[abiX86] = true, true
		case specs.ArchX32:
			pr.listed[abiX32], pr.abis[abiX32] = true, true
		default:
			return nil, unsupported("architecture %s", a)
		}
	}
	// runc's generatePatch: no stub for a permissive default action, nor
	// when defaultErrnoRet equals its retErrnoEnosys, which is the action
	// value SCMP_ACT_ERRNO(ENOSYS) and not 38 (so in practice never).
	pr.stub = p.DefaultAction != specs.ActAllow && p.DefaultAction != specs.ActLog &&
		!(p.DefaultErrnoRet != nil && *p.DefaultErrnoRet == uint(enosysAction))

	n := 0
	for _, sc := range p.Syscalls {
		n += len(sc.Names)
	}
	pr.calls = make([]call, 0, n)
	for i, sc := range p.Syscalls {
		act, err := actionValue(sc.Action, sc.ErrnoRet)
		if err != nil {
			return nil, fmt.Errorf("syscalls[%d]: %w", i, err)
		}
		for _, a := range sc.Args {
			if a.Index >= 6 {
				return nil, fmt.Errorf("seccomp: syscalls[%d]: argument index %d out of range", i, a.Index)
			}
			switch a.Op {
			case specs.OpEqualTo, specs.OpNotEqual, specs.OpLessThan, specs.OpLessEqual,
				specs.OpGreaterThan, specs.OpGreaterEqual, specs.OpMaskedEqual:
			default:
				return nil, fmt.Errorf("seccomp: syscalls[%d]: invalid operator %q", i, a.Op)
			}
		}
		for _, name := range sc.Names {
			if name == "" {
				return nil, fmt.Errorf("seccomp: syscalls[%d]: empty syscall name", i)
			}
			c := call{name: name, action: act, args: sc.Args}
			for a := abi(0); a < numABIs; a++ {
				c.nr[a], c.has[a] = a.table()[name]
			}
			_, c.mux = x86Mux[name]
			pr.calls = append(pr.calls, c)
		}
	}
	return pr, nil
}

// lastSyscall is runc's findLastSyscalls for one ABI: the highest number a
// profile name has there, 0 for none. Like libseccomp's
// seccomp_syscall_resolve_name_arch, it does not count i386's socketcall
// and ipc families, which resolve to (negative) pseudo syscall numbers.
func (pr *profile) lastSyscall(a abi) uint32 {
	var last uint32
	for i := range pr.calls {
		c := &pr.calls[i]
		if c.has[a] && !(a == abiX86 && c.mux) && c.nr[a] > last {
			last = c.nr[a]
		}
	}
	return last
}

func normCond(a abi, arg specs.LinuxSeccompArg) (cond, bool) {
	c := cond{arg: arg.Index, op: arg.Op, mask: ^uint64(0), datum: arg.Value}
	if arg.Op == specs.OpMaskedEqual {
		c.mask, c.datum = arg.Value, arg.ValueTwo
	}
	if !a.wide() {
		c.mask &= 0xffffffff
		c.datum &= 0xffffffff
	}
	c.datum &= c.mask
	if c.op == specs.OpMaskedEqual && c.mask == 0 {
		return c, false // always true; libseccomp drops it
	}
	return c, true
}

// sysTable is what each syscall number of an ABI gets, indexed by the
// number less the ABI's base (0, or the x32 bit).
type sysTable struct {
	base  uint32
	rules []sysRules
	used  []bool
}

func (t *sysTable) at(nr uint32) *sysRules {
	i := nr - t.base
	if nr < t.base || i >= uint32(len(t.rules)) || !t.used[i] {
		return nil
	}
	return &t.rules[i]
}

// rulesFor builds what each syscall number of the ABI gets.
func (pr *profile) rulesFor(a abi) *sysTable {
	t := &sysTable{}
	if a == abiX32 {
		t.base = x32SyscallBit
	}
	size := 0
	for i := range pr.calls {
		if c := &pr.calls[i]; c.has[a] {
			size = max(size, int(c.nr[a]-t.base)+1)
		}
	}
	if a == abiX86 {
		size = max(size, x86Socketcall+1, x86IPC+1)
	}
	t.rules, t.used = make([]sysRules, size), make([]bool, size)
	add := func(nr uint32, r rule) {
		i := nr - t.base
		t.used[i] = true
		t.rules[i].add(r)
	}
	for i := range pr.calls {
		c := &pr.calls[i]
		if c.action == pr.defaultAction {
			continue // runc: "This rule is redundant, silently skip it"
		}
		isMux := a == abiX86 && c.mux
		if !c.has[a] && !isMux {
			continue // not a syscall of this ABI
		}
		addGroup := func(args []specs.LinuxSeccompArg) {
			var conds []cond
			for _, arg := range args {
				if cd, ok := normCond(a, arg); ok {
					conds = append(conds, cd)
				}
			}
			if isMux {
				mux := x86Mux[c.name]
				mconds := []cond{{arg: 0, op: specs.OpEqualTo, mask: 0xffffffff, datum: uint64(mux[1])}}
				for _, cd := range conds {
					if cd.arg != 0 {
						mconds = append(mconds, cd)
					}
				}
				add(mux[0], rule{conds: mconds, action: c.action})
			}
			if c.has[a] {
				add(c.nr[a], rule{conds: conds, action: c.action})
			}
		}
		// runc: two conditions on one argument make a rule each.
		split := false
		var seen [6]bool
		for _, arg := range c.args {
			split = split || seen[arg.Index]
			seen[arg.Index] = true
		}
		if !split {
			addGroup(c.args)
			continue
		}
		for i := range c.args {
			addGroup(c.args[i : i+1])
		}
	}
	return t
}

// leaf is what a range of syscall numbers gets: a return value, or the
// conditional rules of one syscall (then ret is the action when none
// matches).
type leaf struct {
	ret  uint32
	rule *sysRules // nil: just ret
}

// span is a range of syscall numbers [lo, next span's lo) with one leaf.
type span struct {
	lo   uint32
	leaf int
}

// archBlock is one AUDIT_ARCH's syscall number dispatch.
type archBlock struct {
	spans  []span
	leaves []leaf
}

// build evaluates target over [0, 2^32) at the given breakpoints (which
// must include every number where target may change) and merges equal
// neighbours.
func build(breaks []uint32, target func(nr uint32) leaf) archBlock {
	slices.Sort(breaks) // nearly sorted already
	breaks = slices.Compact(breaks)
	b := archBlock{spans: make([]span, 0, len(breaks)/2)}
	var rets []int // leaves that only return
	prev := -1
	for _, lo := range breaks {
		l := target(lo)
		id := -1
		if l.rule == nil {
			for _, i := range rets {
				if b.leaves[i].ret == l.ret {
					id = i
					break
				}
			}
		}
		if id < 0 {
			id = len(b.leaves)
			b.leaves = append(b.leaves, l)
			if l.rule == nil {
				rets = append(rets, id)
			}
		}
		if id != prev {
			b.spans = append(b.spans, span{lo: lo, leaf: id})
			prev = id
		}
	}
	return b
}

// breakpoints appends, in order, each number of t that has rules and the
// one after it.
func (t *sysTable) breakpoints(breaks []uint32) []uint32 {
	for i, used := range t.used {
		if used {
			nr := t.base + uint32(i)
			breaks = append(breaks, nr, nr+1)
		}
	}
	return breaks
}

func (pr *profile) lookup(s *sysRules) leaf {
	switch {
	case s == nil:
		return leaf{ret: pr.defaultAction}
	case s.uncond:
		return leaf{ret: s.action}
	default:
		return leaf{ret: pr.defaultAction, rule: s}
	}
}

// Compile turns an OCI seccomp profile into a classic BPF program for
// seccomp(SECCOMP_SET_MODE_FILTER), in the kernel's struct sock_filter
// layout (8 bytes an instruction, little-endian: u16 code, u8 jt, u8 jf, u32 k).
// It returns an error (wrapping ErrUnsupported) for what it does not
// implement (actions, ops, architectures, flags, listener), so the caller can fall back to runc's own seccomp.
func Compile(p *specs.LinuxSeccomp) ([]byte, error) {
	pr, err := check(p)
	if err != nil {
		return nil, err
	}
	var last [numABIs]uint32
	if pr.stub {
		for a := abi(0); a < numABIs; a++ {
			if pr.listed[a] {
				last[a] = pr.lastSyscall(a)
			}
		}
	}
	stubBreaks := func(breaks []uint32, abis ...abi) []uint32 {
		for _, a := range abis {
			if last[a] != 0 && last[a] != 0xFFFFFFFF {
				breaks = append(breaks, last[a]+1)
			}
		}
		return breaks
	}

	// AUDIT_ARCH_X86_64: x86_64, and x32 when listed.
	x64 := pr.rulesFor(abiX8664)
	x32 := &sysTable{base: x32SyscallBit}
	if pr.abis[abiX32] {
		x32 = pr.rulesFor(abiX32)
	}
	breaks := make([]uint32, 0, 2*(len(x64.rules)+len(x32.rules))+8)
	breaks = x64.breakpoints(append(breaks, 0))
	breaks = x32.breakpoints(append(breaks, x32SyscallBit))
	breaks = append(breaks, 0x80000000, 0xC0000000, 0xFFFFFFFF)
	breaks = stubBreaks(breaks, abiX8664, abiX32)
	x64Block := build(breaks, func(nr uint32) leaf {
		if nr&x32SyscallBit != 0 {
			if last[abiX32] != 0 && nr > last[abiX32] {
				return leaf{ret: enosysAction}
			}
		} else if last[abiX8664] != 0 && nr > last[abiX8664] {
			return leaf{ret: enosysAction}
		}
		if nr < x32SyscallBit {
			return pr.lookup(x64.at(nr))
		}
		if !pr.abis[abiX32] && nr != 0xFFFFFFFF {
			return leaf{ret: badArchAction}
		}
		return pr.lookup(x32.at(nr))
	})

	var x86Block archBlock
	if pr.abis[abiX86] {
		x86 := pr.rulesFor(abiX86)
		breaks := x86.breakpoints(make([]uint32, 0, 2*len(x86.rules)+2))
		breaks = stubBreaks(append(breaks, 0), abiX86)
		x86Block = build(breaks, func(nr uint32) leaf {
			if last[abiX86] != 0 && nr > last[abiX86] {
				return leaf{ret: enosysAction}
			}
			return pr.lookup(x86.at(nr))
		})
	}

	prog, err := assemble(x64Block, x86Block, pr.abis[abiX86])
	if err != nil {
		return nil, err
	}
	if len(prog) > MaxInstructions {
		return nil, unsupported("program of %d instructions is over the kernel's limit of %d", len(prog), MaxInstructions)
	}
	out := make([]byte, 8*len(prog))
	for i, in := range prog {
		binary.LittleEndian.PutUint16(out[8*i:], in.code)
		out[8*i+2] = in.jt
		out[8*i+3] = in.jf
		binary.LittleEndian.PutUint32(out[8*i+4:], in.k)
	}
	return out, nil
}
