package seccomp

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const (
	archX8664   = 0xC000003E
	archI386    = 0x40000003
	archAarch64 = 0xC00000B7
)

func uptr(v uint) *uint { return &v }

// opsProfile exercises what berth's profile does not: every operator,
// every action, 64-bit values, two conditions on one argument, a rule
// equal to the default action, unconditional and conditional rules for
// one syscall, masks libseccomp reduces, and i386's socketcall/ipc.
// The allowlist keeps busybox sleep working under runc.
func opsProfile() *specs.LinuxSeccomp {
	var allow []string
	for _, n := range strings.Fields(allowedSyscalls) {
		switch n {
		case "socketcall", "ipc", "bind", "semop", "msgsnd", "semget":
		default:
			allow = append(allow, n)
		}
	}
	arg := func(i uint, op specs.LinuxSeccompOperator, v, v2 uint64) specs.LinuxSeccompArg {
		return specs.LinuxSeccompArg{Index: i, Op: op, Value: v, ValueTwo: v2}
	}
	return &specs.LinuxSeccomp{
		DefaultAction: specs.ActErrno,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchX86, specs.ArchX32},
		Syscalls: []specs.LinuxSyscall{
			{Names: allow, Action: specs.ActAllow},
			{Names: []string{"setns"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpEqualTo, 1, 0), arg(0, specs.OpEqualTo, 0x10000000, 0)}},
			{Names: []string{"unshare"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpMaskedEqual, 0x7E020000, 0), arg(1, specs.OpGreaterThan, 0x100000000, 0)}},
			{Names: []string{"mbind"}, Action: specs.ActErrno, ErrnoRet: uptr(2), Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpLessEqual, 0x100000008, 0)}},
			{Names: []string{"get_mempolicy"}, Action: specs.ActTrap, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpGreaterEqual, 0xffffffff, 0)}},
			{Names: []string{"kcmp"}, Action: specs.ActKillProcess, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpLessThan, 40, 0)}},
			{Names: []string{"syslog"}, Action: specs.ActLog},
			{Names: []string{"ptrace"}, Action: specs.ActKill},
			{Names: []string{"vhangup"}, Action: specs.ActKillThread},
			{Names: []string{"acct"}, Action: specs.ActErrno},
			{Names: []string{"acct"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpEqualTo, 0, 0)}},
			{Names: []string{"move_pages"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpMaskedEqual, 0xf, 0xff)}},
			{Names: []string{"migrate_pages"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpMaskedEqual, 0xffffffff00000000, 0x100000000)}},
			{Names: []string{"getrlimit"}, Action: specs.ActTrap, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpEqualTo, 7, 0)}},
			{Names: []string{"quotactl"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpNotEqual, 5, 0)}},
			{Names: []string{"quotactl"}, Action: specs.ActTrap},
			{Names: []string{"bind"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpEqualTo, 3, 0), arg(2, specs.OpGreaterEqual, 16, 0)}},
			{Names: []string{"semop", "semget"}, Action: specs.ActAllow},
			{Names: []string{"msgsnd"}, Action: specs.ActErrno, ErrnoRet: uptr(13), Args: []specs.LinuxSeccompArg{
				arg(1, specs.OpNotEqual, 0, 0)}},
			{Names: []string{"set_mempolicy"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(0, specs.OpGreaterEqual, 7, 0), arg(0, specs.OpLessEqual, 2, 0)}},
			{Names: []string{"process_vm_readv", "no_such_syscall"}, Action: specs.ActErrno, ErrnoRet: uptr(38)},
			{Names: []string{"mount"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				arg(3, specs.OpMaskedEqual, 0x100000001, 0x100000001), arg(4, specs.OpLessThan, 0x100000000, 0)}},
		},
	}
}

// allowProfile: default allow (no -ENOSYS stub), only SCMP_ARCH_X86
// listed (x86_64 still filtered as libseccomp's native arch, x32 not).
func allowProfile() *specs.LinuxSeccomp {
	return &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow,
		Architectures: []specs.Arch{specs.ArchX86},
		Syscalls: []specs.LinuxSyscall{
			{Names: []string{"ptrace", "kexec_load"}, Action: specs.ActKillProcess},
			{Names: []string{"personality"}, Action: specs.ActErrno, ErrnoRet: uptr(22), Args: []specs.LinuxSeccompArg{
				{Index: 0, Op: specs.OpNotEqual, Value: 0}}},
			{Names: []string{"mount", "umount2", "chown32"}, Action: specs.ActErrno},
			{Names: []string{"socket"}, Action: specs.ActErrno, Args: []specs.LinuxSeccompArg{
				{Index: 0, Op: specs.OpEqualTo, Value: 40}}},
			{Names: []string{"getpid"}, Action: specs.ActAllow}, // the default: dropped
		},
	}
}

// noArchProfile lists no architectures: native x86_64 only, and runc adds
// no -ENOSYS stub.
func noArchProfile() *specs.LinuxSeccomp {
	p := DefaultProfile()
	p.Architectures = nil
	return p
}

// x32OnlyProfile lists only SCMP_ARCH_X32 (x86_64 is filtered as the
// native arch, with no -ENOSYS stub of its own; i386 is a bad arch) and
// sets defaultErrnoRet to ENOSYS (runc still adds its stub).
func x32OnlyProfile() *specs.LinuxSeccomp {
	p := DefaultProfile()
	p.Architectures = []specs.Arch{specs.ArchX32}
	p.DefaultErrnoRet = uptr(38)
	return p
}

var testProfiles = []struct {
	name    string
	profile func() *specs.LinuxSeccomp
}{
	{"berth", DefaultProfile},
	{"ops", opsProfile},
	{"allow", allowProfile},
	{"noarch", noArchProfile},
	{"x32only", x32OnlyProfile},
}

// gridInput is one seccomp_data of the comparison grid.
func gridInputs() []seccompData {
	var nrs []uint32
	for nr := uint32(0); nr < 1024; nr++ {
		nrs = append(nrs, nr)
	}
	extra := []uint32{0x3fffffff, 0x7fffffff, 0x80000000, 0x80000001, 0xbfffffff, 0xc0000000, 0xc0000001, 0xfffffffe, 0xffffffff}
	arg0s := []uint64{0, 40, 0x10000000, 8, 0xffffffff, 1 << 32, 1<<32 | 40, 1<<32 | 8, 0xffffffff_10000000,
		1, 2, 3, 5, 7, 0xf, 0xff, 0x20000, 0x20008, 0x100000008, 0x100000009, 0x80000000_00000000}
	argRest := [][5]uint64{{}, {0x100000001, 16, 0x100000001, 0xffffffff}, {0x100000000, 15, 1, 0x100000000}, {5, 0, 0x100000001, 1}}
	var out []seccompData
	add := func(arch, nr uint32) {
		for _, a0 := range arg0s {
			for _, rest := range argRest {
				d := seccompData{nr: nr, arch: arch, ip: 0x7f0000001000}
				d.args[0] = a0
				copy(d.args[1:], rest[:])
				out = append(out, d)
			}
		}
	}
	for _, arch := range []uint32{archX8664, archI386, archAarch64} {
		for _, nr := range append(slices.Clone(nrs), extra...) {
			add(arch, nr)
		}
	}
	for _, nr := range nrs {
		add(archX8664, 0x40000000+nr) // x32
	}
	return out
}

func describe(v uint32) string {
	switch {
	case v == retAllow:
		return "ALLOW"
	case v == retLog:
		return "LOG"
	case v == retTrap:
		return "TRAP"
	case v == retKillThread:
		return "KILL_THREAD"
	case v == retKillProcess:
		return "KILL_PROCESS"
	case v&0xffff0000 == retErrno:
		return "ERRNO(" + strconv.Itoa(int(v&0xffff)) + ")"
	}
	return fmt.Sprintf("%#x", v)
}

func archName(d seccompData) string {
	switch {
	case d.arch == archX8664 && d.nr&x32SyscallBit != 0:
		return "x86_64/x32"
	case d.arch == archX8664:
		return "x86_64"
	case d.arch == archI386:
		return "i386"
	}
	return fmt.Sprintf("arch %#x", d.arch)
}

func TestCompileMatchesReference(t *testing.T) {
	inputs := gridInputs()
	for _, tp := range testProfiles {
		t.Run(tp.name, func(t *testing.T) {
			p := tp.profile()
			raw, err := Compile(p)
			if err != nil {
				t.Fatal(err)
			}
			prog := decode(t, raw)
			t.Logf("%d instructions", len(prog))
			ref := newRefEval(p)
			bad := 0
			for _, d := range inputs {
				got, err := run(prog, d.bytes())
				if err != nil {
					t.Fatalf("%s nr %#x: %v", archName(d), d.nr, err)
				}
				if want := ref.verdict(d); got != want {
					bad++
					if bad <= 20 {
						t.Errorf("%s nr %#x args %#x: compiled %s, reference %s", archName(d), d.nr, d.args, describe(got), describe(want))
					}
				}
			}
			if bad > 0 {
				t.Errorf("%d of %d inputs differ", bad, len(inputs))
			}
		})
	}
}

// TestBerthProfileSpotChecks pins a few verdicts of berth's profile by hand.
func TestBerthProfileSpotChecks(t *testing.T) {
	raw, err := Compile(DefaultProfile())
	if err != nil {
		t.Fatal(err)
	}
	prog := decode(t, raw)
	eperm, enosys := retErrno|1, retErrno|38
	for _, c := range []struct {
		arch, nr uint32
		arg0     uint64
		want     uint32
	}{
		{archX8664, 0, 0, retAllow},                   // read
		{archX8664, 41, 2, retAllow},                  // socket(AF_INET)
		{archX8664, 41, 40, eperm},                    // socket(AF_VSOCK)
		{archX8664, 56, 0x11, retAllow},               // clone(SIGCHLD)
		{archX8664, 56, 0x10000011, eperm},            // clone(CLONE_NEWUSER)
		{archX8664, 435, 0, enosys},                   // clone3
		{archX8664, 135, 0xffffffff, retAllow},        // personality(query)
		{archX8664, 135, 1, eperm},                    // personality(other)
		{archX8664, 165, 0, eperm},                    // mount
		{archX8664, 449, 0, retAllow},                 // futex_waitv
		{archX8664, 450, 0, eperm},                    // set_mempolicy_home_node
		{archX8664, 452, 0, retAllow},                 // fchmodat2, the highest named
		{archX8664, 453, 0, enosys},                   // newer than the profile
		{archX8664, 0x40000000 + 0, 0, retAllow},      // x32 read
		{archX8664, 0x40000000 + 165, 0, eperm},       // x32 mount
		{archX8664, 0x40000000 + 548, 0, enosys},      // past x32's highest
		{archI386, 3, 0, retAllow},                    // i386 read
		{archI386, 102, 0, retAllow},                  // i386 socketcall
		{archI386, 359, 40, eperm},                    // i386 socket(AF_VSOCK)
		{archI386, 136, 1<<32 | 0xffffffff, retAllow}, // i386 personality: low word only
		{archI386, 21, 0, eperm},                      // i386 mount
		{archI386, 451, 0, eperm},                     // i386 cachestat
		{archI386, 452, 0, retAllow},                  // i386 fchmodat2
		{archI386, 453, 0, enosys},                    // i386 newer
		{archAarch64, 63, 0, retKillThread},           // another arch
		{archX8664, 0xffffffff, 0, enosys},            // -1
		{archX8664, 0x80000000, 0, enosys},            // huge, no x32 bit
	} {
		d := seccompData{arch: c.arch, nr: c.nr}
		d.args[0] = c.arg0
		got, err := run(prog, d.bytes())
		if err != nil || got != c.want {
			t.Errorf("arch %#x nr %d arg0 %#x: got %s (%v), want %s", c.arch, c.nr, c.arg0, describe(got), err, describe(c.want))
		}
	}
}

func TestCompileUnsupported(t *testing.T) {
	base := func(f func(p *specs.LinuxSeccomp)) *specs.LinuxSeccomp {
		p := &specs.LinuxSeccomp{
			DefaultAction: specs.ActErrno,
			Architectures: []specs.Arch{specs.ArchX86_64},
			Syscalls:      []specs.LinuxSyscall{{Names: []string{"read"}, Action: specs.ActAllow}},
		}
		f(p)
		return p
	}
	for name, p := range map[string]*specs.LinuxSeccomp{
		"nil":             nil,
		"no default":      base(func(p *specs.LinuxSeccomp) { p.DefaultAction = "" }),
		"notify default":  base(func(p *specs.LinuxSeccomp) { p.DefaultAction = specs.ActNotify }),
		"trace default":   base(func(p *specs.LinuxSeccomp) { p.DefaultAction = specs.ActTrace }),
		"notify rule":     base(func(p *specs.LinuxSeccomp) { p.Syscalls[0].Action = specs.ActNotify }),
		"trace rule":      base(func(p *specs.LinuxSeccomp) { p.Syscalls[0].Action = specs.ActTrace }),
		"unknown action":  base(func(p *specs.LinuxSeccomp) { p.Syscalls[0].Action = "SCMP_ACT_FOO" }),
		"aarch64":         base(func(p *specs.LinuxSeccomp) { p.Architectures = append(p.Architectures, specs.ArchAARCH64) }),
		"s390x":           base(func(p *specs.LinuxSeccomp) { p.Architectures = []specs.Arch{specs.ArchS390X} }),
		"flags":           base(func(p *specs.LinuxSeccomp) { p.Flags = []specs.LinuxSeccompFlag{specs.LinuxSeccompFlagLog} }),
		"listener":        base(func(p *specs.LinuxSeccomp) { p.ListenerPath = "/run/seccomp.sock" }),
		"listener meta":   base(func(p *specs.LinuxSeccomp) { p.ListenerMetadata = "x" }),
		"spec-allow flag": base(func(p *specs.LinuxSeccomp) { p.Flags = []specs.LinuxSeccompFlag{specs.LinuxSeccompFlagSpecAllow} }),
	} {
		if _, err := Compile(p); !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: err = %v, want ErrUnsupported", name, err)
		}
	}
	// invalid profiles fail too (runc would refuse them)
	for name, p := range map[string]*specs.LinuxSeccomp{
		"arg index": base(func(p *specs.LinuxSeccomp) {
			p.Syscalls[0].Args = []specs.LinuxSeccompArg{{Index: 6, Op: specs.OpEqualTo}}
		}),
		"operator": base(func(p *specs.LinuxSeccomp) {
			p.Syscalls[0].Args = []specs.LinuxSeccompArg{{Index: 0, Op: "SCMP_CMP_FOO"}}
		}),
		"empty name": base(func(p *specs.LinuxSeccomp) { p.Syscalls[0].Names = []string{""} }),
	} {
		if _, err := Compile(p); err == nil {
			t.Errorf("%s: compiled", name)
		}
	}
}

func TestProgramLength(t *testing.T) {
	for _, tp := range testProfiles {
		raw, err := Compile(tp.profile())
		if err != nil {
			t.Fatal(err)
		}
		if n := len(raw) / 8; n >= MaxInstructions {
			t.Errorf("%s: %d instructions", tp.name, n)
		} else {
			t.Logf("%s: %d instructions", tp.name, n)
		}
	}

	// A profile with a conditional rule for every syscall of every ABI
	// needs long jumps (trampolines) and stays valid.
	p := &specs.LinuxSeccomp{
		DefaultAction: specs.ActErrno,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchX86, specs.ArchX32},
	}
	names := map[string]bool{}
	for _, tb := range []map[string]uint32{sysX8664, sysX86, sysX32} {
		for n := range tb {
			names[n] = true
		}
	}
	sorted := slices.Sorted(func(yield func(string) bool) {
		for n := range names {
			if !yield(n) {
				return
			}
		}
	})
	for i, n := range sorted {
		sc := specs.LinuxSyscall{Names: []string{n}, Action: specs.ActAllow}
		switch i % 3 {
		case 1:
			sc.Action, sc.ErrnoRet = specs.ActErrno, uptr(uint(i))
		case 2:
			sc.Args = []specs.LinuxSeccompArg{{Index: uint(i % 6), Op: specs.OpGreaterThan, Value: uint64(i) << 30}}
		}
		p.Syscalls = append(p.Syscalls, sc)
	}
	raw, err := Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	prog := decode(t, raw)
	jas := 0
	for _, in := range prog {
		if in.code == opJa {
			jas++
		}
	}
	t.Logf("every syscall named: %d instructions, %d ja", len(prog), jas)
	if jas < 3 {
		t.Errorf("expected long jumps through ja trampolines, found %d", jas)
	}
	if len(prog) > MaxInstructions {
		t.Fatalf("%d instructions", len(prog))
	}
	ref := newRefEval(p)
	for _, d := range gridInputs() {
		got, err := run(prog, d.bytes())
		if err != nil {
			t.Fatal(err)
		}
		if want := ref.verdict(d); got != want {
			t.Fatalf("%s nr %#x args %#x: compiled %s, reference %s", archName(d), d.nr, d.args, describe(got), describe(want))
		}
	}

	// Over the kernel's limit: ErrUnsupported, for runc to handle.
	for i := range p.Syscalls {
		p.Syscalls[i].Action, p.Syscalls[i].ErrnoRet = specs.ActAllow, nil
		for j := 1; j < 6; j++ {
			p.Syscalls[i].Args = append(p.Syscalls[i].Args, specs.LinuxSeccompArg{Index: uint(j), Op: specs.OpLessThan, Value: 1 << 40})
		}
	}
	if _, err := Compile(p); !errors.Is(err, ErrUnsupported) {
		t.Errorf("oversized program: err = %v, want ErrUnsupported", err)
	}
}

// TestCompileDeterministic: the same profile always gives the same bytes.
func TestCompileDeterministic(t *testing.T) {
	a, err := Compile(DefaultProfile())
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		b, _ := Compile(DefaultProfile())
		if string(a) != string(b) {
			t.Fatal("two compilations differ")
		}
	}
}

func BenchmarkCompile(b *testing.B) {
	p := DefaultProfile()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Compile(p); err != nil {
			b.Fatal(err)
		}
	}
}

// TestCompileTime logs how long berth's profile takes to compile.
func TestCompileTime(t *testing.T) {
	p := DefaultProfile()
	const n = 200
	start := time.Now()
	for range n {
		if _, err := Compile(p); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("Compile(berth profile): %v each", time.Since(start)/n)
	if os.Getenv("SECCOMP_DUMP") != "" {
		raw, _ := Compile(p)
		for i, in := range decode(t, raw) {
			t.Logf("%4d: code %#04x jt %3d jf %3d k %#x", i, in.code, in.jt, in.jf, in.k)
		}
	}
}
