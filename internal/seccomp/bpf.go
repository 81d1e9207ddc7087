package seccomp

import (
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// insn is a struct sock_filter.
type insn struct {
	code   uint16
	jt, jf uint8
	k      uint32
}

// classic BPF opcodes (linux/bpf_common.h) the compiler emits.
const (
	opLdAbsW uint16 = 0x20 // BPF_LD|BPF_W|BPF_ABS
	opAndK   uint16 = 0x54 // BPF_ALU|BPF_AND|BPF_K
	opJa     uint16 = 0x05 // BPF_JMP|BPF_JA
	opJeqK   uint16 = 0x15 // BPF_JMP|BPF_JEQ|BPF_K
	opJgtK   uint16 = 0x25 // BPF_JMP|BPF_JGT|BPF_K
	opJgeK   uint16 = 0x35 // BPF_JMP|BPF_JGE|BPF_K
	opRetK   uint16 = 0x06 // BPF_RET|BPF_K
)

// maxJump is the longest conditional jump: jt and jf are 8 bits.
const maxJump = 255

// Every fragment built below is self-contained: its jumps go forward and
// land inside it (its leaves return), so fragments concatenate without
// relocation.

// assemble lays out the program:
//
//	ld [arch]
//	jeq AUDIT_ARCH_X86_64 -> x86_64 block   (via ja when i386 is filtered)
//	jeq AUDIT_ARCH_I386   -> i386 block     (when SCMP_ARCH_X86 is listed)
//	ret bad-arch action
//	i386 block: ld [nr]; binary search on nr
//	x86_64 block: ld [nr]; binary search on nr
func assemble(x64 archBlock, x86 archBlock, hasX86 bool) ([]insn, error) {
	x64Frag, err := archFragment(x64)
	if err != nil {
		return nil, err
	}
	prog := []insn{{code: opLdAbsW, k: offArch}}
	if !hasX86 {
		prog = append(prog,
			insn{code: opJeqK, jt: 1, k: auditArchX8664},
			insn{code: opRetK, k: badArchAction})
		return append(prog, x64Frag...), nil
	}
	x86Frag, err := archFragment(x86)
	if err != nil {
		return nil, err
	}
	prog = append(prog,
		insn{code: opJeqK, jt: 0, jf: 1, k: auditArchX8664},
		insn{code: opJa, k: uint32(2 + len(x86Frag))},
		insn{code: opJeqK, jt: 1, jf: 0, k: auditArchI386},
		insn{code: opRetK, k: badArchAction})
	prog = append(prog, x86Frag...)
	return append(prog, x64Frag...), nil
}

func archFragment(b archBlock) ([]insn, error) {
	leafCode := make([][]insn, len(b.leaves))
	for i, l := range b.leaves {
		code, err := l.code()
		if err != nil {
			return nil, err
		}
		leafCode[i] = code
	}
	t := treeBuilder{spans: b.spans, leafCode: leafCode}
	out := make([]insn, 0, 1+t.size(0, len(b.spans)))
	out = append(out, insn{code: opLdAbsW, k: offNr})
	return t.emit(out, 0, len(b.spans)), nil
}

// treeBuilder lays out a binary search over spans with the syscall number
// in A:
//
//	jge spans[mid].lo, right
//	<left half>
//	right: <right half>
//
// with a ja trampoline when the left half is longer than a conditional
// jump reaches.
type treeBuilder struct {
	spans    []span
	leafCode [][]insn
}

// size is the length of the code for spans[lo:hi].
func (t treeBuilder) size(lo, hi int) int {
	if hi-lo == 1 {
		return len(t.leafCode[t.spans[lo].leaf])
	}
	mid := (lo + hi) / 2
	left := t.size(lo, mid)
	n := 1 + left + t.size(mid, hi)
	if left > maxJump {
		n++
	}
	return n
}

func (t treeBuilder) emit(out []insn, lo, hi int) []insn {
	if hi-lo == 1 {
		return append(out, t.leafCode[t.spans[lo].leaf]...)
	}
	mid := (lo + hi) / 2
	left := t.size(lo, mid)
	k := t.spans[mid].lo
	if left <= maxJump {
		out = append(out, insn{code: opJgeK, jt: uint8(left), k: k})
	} else {
		out = append(out,
			insn{code: opJgeK, jt: 0, jf: 1, k: k},
			insn{code: opJa, k: uint32(left)})
	}
	out = t.emit(out, lo, mid)
	return t.emit(out, mid, hi)
}

// code returns the leaf's action, or checks its rules in order and returns
// the first matching rule's action, else the leaf's.
func (l leaf) code() ([]insn, error) {
	var out []insn
	if l.rule != nil {
		for _, r := range l.rule.rules {
			code, err := ruleCode(r)
			if err != nil {
				return nil, err
			}
			out = append(out, code...)
		}
	}
	return append(out, insn{code: opRetK, k: l.ret}), nil
}

// fail marks a jump to the end of the rule (the next rule's code).
const fail = -1

type ruleEmitter struct {
	ins          []insn
	failT, failF []bool
}

func (e *ruleEmitter) op(code uint16, k uint32) {
	e.ins = append(e.ins, insn{code: code, k: k})
	e.failT = append(e.failT, false)
	e.failF = append(e.failF, false)
}

// jmp appends a conditional jump; jt and jf are offsets or fail.
func (e *ruleEmitter) jmp(code uint16, k uint32, jt, jf int) {
	in := insn{code: code, k: k}
	if jt != fail {
		in.jt = uint8(jt)
	}
	if jf != fail {
		in.jf = uint8(jf)
	}
	e.ins = append(e.ins, in)
	e.failT = append(e.failT, jt == fail)
	e.failF = append(e.failF, jf == fail)
}

// cmp32 compares the accumulator (one 32-bit word) with k: on success it
// falls through, else jumps to fail.
func (e *ruleEmitter) cmp32(op specs.LinuxSeccompOperator, k uint32) {
	switch op {
	case specs.OpEqualTo, specs.OpMaskedEqual:
		e.jmp(opJeqK, k, 0, fail)
	case specs.OpNotEqual:
		e.jmp(opJeqK, k, fail, 0)
	case specs.OpGreaterThan:
		e.jmp(opJgtK, k, 0, fail)
	case specs.OpGreaterEqual:
		e.jmp(opJgeK, k, 0, fail)
	case specs.OpLessThan:
		e.jmp(opJgeK, k, fail, 0)
	case specs.OpLessEqual:
		e.jmp(opJgtK, k, fail, 0)
	}
}

func (e *ruleEmitter) load(off uint32, mask uint32) {
	e.op(opLdAbsW, off)
	if mask != 0xffffffff {
		e.op(opAndK, mask)
	}
}

func ruleCode(r rule) ([]insn, error) {
	e := &ruleEmitter{}
	for _, c := range r.conds {
		lo := uint32(offArgs + 8*c.arg)
		hi := lo + 4
		mlo, mhi := uint32(c.mask), uint32(c.mask>>32)
		dlo, dhi := uint32(c.datum), uint32(c.datum>>32)
		if mhi == 0 {
			// a 32-bit ABI (normCond truncated it), or a mask without
			// high bits: the high word is not compared.
			e.load(lo, mlo)
			e.cmp32(c.op, dlo)
			continue
		}
		switch c.op {
		case specs.OpEqualTo:
			e.load(hi, 0xffffffff)
			e.jmp(opJeqK, dhi, 0, fail)
			e.load(lo, 0xffffffff)
			e.jmp(opJeqK, dlo, 0, fail)
		case specs.OpNotEqual:
			e.load(hi, 0xffffffff)
			e.jmp(opJeqK, dhi, 0, 2) // high words differ: not equal
			e.load(lo, 0xffffffff)
			e.jmp(opJeqK, dlo, fail, 0)
		case specs.OpMaskedEqual:
			e.load(hi, mhi)
			e.jmp(opJeqK, dhi, 0, fail)
			if mlo != 0 {
				e.load(lo, mlo)
				e.jmp(opJeqK, dlo, 0, fail)
			}
		case specs.OpGreaterThan, specs.OpGreaterEqual:
			e.load(hi, 0xffffffff)
			e.jmp(opJgtK, dhi, 3, 0) // high word above: greater
			e.jmp(opJeqK, dhi, 0, fail)
			e.load(lo, 0xffffffff)
			if c.op == specs.OpGreaterThan {
				e.jmp(opJgtK, dlo, 0, fail)
			} else {
				e.jmp(opJgeK, dlo, 0, fail)
			}
		case specs.OpLessThan, specs.OpLessEqual:
			e.load(hi, 0xffffffff)
			e.jmp(opJgtK, dhi, fail, 0)
			e.jmp(opJeqK, dhi, 0, 2) // high word below: less
			e.load(lo, 0xffffffff)
			if c.op == specs.OpLessThan {
				e.jmp(opJgeK, dlo, fail, 0)
			} else {
				e.jmp(opJgtK, dlo, fail, 0)
			}
		default:
			return nil, fmt.Errorf("seccomp: operator %q", c.op)
		}
	}
	e.op(opRetK, r.action)
	end := len(e.ins)
	for i := range e.ins {
		d := end - (i + 1)
		if (e.failT[i] || e.failF[i]) && d > maxJump {
			return nil, unsupported("rule too long for a conditional jump")
		}
		if e.failT[i] {
			e.ins[i].jt = uint8(d)
		}
		if e.failF[i] {
			e.ins[i].jf = uint8(d)
		}
	}
	return e.ins, nil
}
