package seccomp

import (
	"encoding/binary"
	"fmt"
	"testing"
)

// seccompData is struct seccomp_data.
type seccompData struct {
	nr   uint32
	arch uint32
	ip   uint64
	args [6]uint64
}

func (d *seccompData) bytes() []byte {
	b := make([]byte, 64)
	binary.LittleEndian.PutUint32(b[0:], d.nr)
	binary.LittleEndian.PutUint32(b[4:], d.arch)
	binary.LittleEndian.PutUint64(b[8:], d.ip)
	for i, a := range d.args {
		binary.LittleEndian.PutUint64(b[16+8*i:], a)
	}
	return b
}

type sockFilter struct {
	code   uint16
	jt, jf uint8
	k      uint32
}

func decode(t testing.TB, prog []byte) []sockFilter {
	t.Helper()
	if len(prog)%8 != 0 || len(prog) == 0 {
		t.Fatalf("program of %d bytes is not a list of sock_filter", len(prog))
	}
	out := make([]sockFilter, len(prog)/8)
	for i := range out {
		b := prog[8*i:]
		out[i] = sockFilter{binary.LittleEndian.Uint16(b), b[2], b[3], binary.LittleEndian.Uint32(b[4:])}
	}
	return out
}

// run is a classic BPF interpreter for seccomp filters. It returns the
// filter's return value, or an error for anything the kernel's checker
// would refuse on the way (unknown opcode, out-of-range load or jump,
// falling off the end).
func run(prog []sockFilter, data []byte) (uint32, error) {
	var a, x uint32
	var mem [16]uint32
	for pc := 0; pc < len(prog); pc++ {
		in := prog[pc]
		jump := func(cond bool) {
			if cond {
				pc += int(in.jt)
			} else {
				pc += int(in.jf)
			}
		}
		switch in.code {
		case 0x20: // ld w abs
			if in.k%4 != 0 || int(in.k)+4 > len(data) {
				return 0, fmt.Errorf("pc %d: load at %d", pc, in.k)
			}
			a = binary.LittleEndian.Uint32(data[in.k:])
		case 0x60, 0x61: // ld/ldx mem
			if in.k >= 16 {
				return 0, fmt.Errorf("pc %d: mem[%d]", pc, in.k)
			}
			if in.code == 0x60 {
				a = mem[in.k]
			} else {
				x = mem[in.k]
			}
		case 0x02, 0x03: // st/stx
			if in.k >= 16 {
				return 0, fmt.Errorf("pc %d: mem[%d]", pc, in.k)
			}
			if in.code == 0x02 {
				mem[in.k] = a
			} else {
				mem[in.k] = x
			}
		case 0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3c, 0x44, 0x4c, 0x54, 0x5c, 0x64, 0x6c, 0x74, 0x7c, 0x84, 0x94, 0x9c, 0xa4, 0xac:
			v := in.k // ALU: K or X operand
			if in.code&0x08 != 0 {
				v = x
			}
			switch in.code & 0xf0 {
			case 0x00:
				a += v
			case 0x10:
				a -= v
			case 0x20:
				a *= v
			case 0x30:
				if v == 0 {
					return 0, nil // division by zero ends the filter with 0
				}
				a /= v
			case 0x40:
				a |= v
			case 0x50:
				a &= v
			case 0x60:
				a <<= v & 31
			case 0x70:
				a >>= v & 31
			case 0x80:
				a = -a
			case 0x90:
				if v == 0 {
					return 0, nil
				}
				a %= v
			case 0xa0:
				a ^= v
			}
		case 0x05: // ja
			pc += int(in.k)
		case 0x15, 0x1d: // jeq k/x
			jump(a == pick(in, x))
		case 0x25, 0x2d: // jgt
			jump(a > pick(in, x))
		case 0x35, 0x3d: // jge
			jump(a >= pick(in, x))
		case 0x45, 0x4d: // jset
			jump(a&pick(in, x) != 0)
		case 0x06: // ret k
			return in.k, nil
		case 0x16: // ret a
			return a, nil
		case 0x07: // tax
			x = a
		case 0x87: // txa
			a = x
		default:
			return 0, fmt.Errorf("pc %d: unknown opcode %#x", pc, in.code)
		}
		if pc >= len(prog) {
			return 0, fmt.Errorf("pc %d: jump past the end", pc)
		}
	}
	return 0, fmt.Errorf("fell off the end of the program")
}

func pick(in sockFilter, x uint32) uint32 {
	if in.code&0x08 != 0 {
		return x
	}
	return in.k
}

func TestInterpreter(t *testing.T) {
	// jeq/jgt/jge/jset, ja, alu, tax/txa, st/ld mem, ret a
	prog := []sockFilter{
		{0x20, 0, 0, 0},          // 0 ld nr
		{0x15, 0, 2, 7},          // 1 jeq 7 ? 2 : 4
		{0x04, 0, 0, 1},          // 2 a += 1
		{0x16, 0, 0, 0},          // 3 ret a
		{0x25, 0, 1, 100},        // 4 jgt 100 ? 5 : 6
		{0x06, 0, 0, 0xdead},     // 5 ret
		{0x35, 0, 2, 50},         // 6 jge 50 ? 7 : 9
		{0x05, 0, 0, 3},          // 7 ja 11
		{0x06, 0, 0, 1},          // 8 (skipped)
		{0x45, 1, 0, 1},          // 9 jset 1 ? 11 : 10
		{0x06, 0, 0, 0xe0},       // 10 ret even
		{0x07, 0, 0, 0},          // 11 tax
		{0x02, 0, 0, 3},          // 12 mem[3] = a
		{0x00 | 0x0c, 0, 0, 0},   // 13 a += x
		{0x61, 0, 0, 3},          // 14 x = mem[3]
		{0x1d, 0, 1, 0},          // 15 jeq x ? 16 : 17
		{0x06, 0, 0, 0xbad},      // 16
		{0x87, 0, 0, 0},          // 17 txa
		{0x54, 0, 0, 0xff},       // 18 a &= 0xff
		{0x16, 0, 0, 0},          // 19 ret a
		{0xff, 0, 0, 0},          // 20 never reached
		{0x06, 0, 0, 0x7fff0000}, // 21
	}
	for nr, want := range map[uint32]uint32{7: 8, 101: 0xdead, 60: 60, 2: 0xe0, 3: 3} {
		d := seccompData{nr: nr}
		got, err := run(prog, d.bytes())
		if err != nil || got != want {
			t.Errorf("nr %d: got %#x, %v; want %#x", nr, got, err, want)
		}
	}
	if _, err := run([]sockFilter{{0xff, 0, 0, 0}}, make([]byte, 64)); err == nil {
		t.Error("unknown opcode accepted")
	}
	if _, err := run([]sockFilter{{0x20, 0, 0, 64}, {0x06, 0, 0, 0}}, make([]byte, 64)); err == nil {
		t.Error("load past seccomp_data accepted")
	}
}
