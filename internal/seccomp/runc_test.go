package seccomp

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/berthd/berth/internal/seccomp/seccomptest"
)

const (
	runcPath    = "/usr/sbin/runc"
	busyboxPath = "/bin/busybox"
)

// TestMatchesRunc starts a container with runc for each test profile,
// reads the seccomp filter runc installed in its init (ptrace
// PTRACE_SECCOMP_GET_FILTER), and runs both that filter and ours over the
// comparison grid. The only difference allowed is where ours allows a
// syscall that the profile names and runc's filter gives the default action
// or ENOSYS, because libseccomp does not know the name: a syscall newer
// than libseccomp 2.5.4's tables (then ours also moves the -ENOSYS
// threshold past that syscall's number, which is allowed too).
func TestMatchesRunc(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: needs root to run runc and ptrace the container")
	}
	if _, err := os.Stat(runcPath); err != nil {
		t.Skipf("skipped: runc is missing: %v", err)
	}
	inputs := gridInputs()
	for _, tp := range testProfiles {
		t.Run(tp.name, func(t *testing.T) {
			p := tp.profile()
			theirs := decode(t, runcFilter(t, p))
			raw, err := Compile(p)
			if err != nil {
				t.Fatal(err)
			}
			ours := decode(t, raw)
			t.Logf("runc's filter: %d instructions; ours: %d", len(theirs), len(ours))
			compareFilters(t, p, ours, theirs, inputs)
		})
	}
}

// reporter is what compareFilters reports to: a *testing.T, or a
// recorder in TestCompareFilters.
type reporter interface {
	Logf(format string, args ...any)
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
}

func compareFilters(t reporter, p *specs.LinuxSeccomp, ours, theirs []sockFilter, inputs []seccompData) {
	def, err := actionValue(p.DefaultAction, p.DefaultErrnoRet)
	if err != nil {
		t.Fatalf("%v", err)
		return
	}
	// Names the profile allows that runc's libseccomp may not know: those
	// newer than its tables. libseccomp 2.5.4's tables end at Linux 5.17's
	// set_mempolicy_home_node, 450 on all three ABIs; everything up to it
	// (and x32's 512-547) it knows, so a difference there is a failure.
	const libseccompLast = 450
	named := map[[2]uint32]string{} // (arch, nr) -> name
	newer := func(nr uint32) bool {
		n := nr &^ x32SyscallBit
		return n > libseccompLast && n < 512
	}
	for _, sc := range p.Syscalls {
		if sc.Action != specs.ActAllow {
			continue
		}
		for _, n := range sc.Names {
			if nr, ok := sysX8664[n]; ok && newer(nr) {
				named[[2]uint32{archX8664, nr}] = n
			}
			if nr, ok := sysX32[n]; ok && newer(nr) {
				named[[2]uint32{archX8664, nr}] = n
			}
			if nr, ok := sysX86[n]; ok && newer(nr) {
				named[[2]uint32{archI386, nr}] = n
			}
		}
	}

	type key = [2]uint32
	type verdicts struct{ ours, theirs uint32 }
	unknown := map[key]string{}     // syscalls runc's libseccomp does not know
	diffs := map[key][]verdicts{}   // other differences, by (arch, nr)
	diffArgs := map[key][6]uint64{} // an example
	seen := map[uint32]int{}        // runc's verdicts, to show the grid is not trivial
	for _, d := range inputs {
		o, err := run(ours, d.bytes())
		if err != nil {
			t.Fatalf("ours: %s nr %#x: %v", archName(d), d.nr, err)
			return
		}
		r, err := run(theirs, d.bytes())
		if err != nil {
			t.Fatalf("runc's: %s nr %#x: %v", archName(d), d.nr, err)
			return
		}
		seen[r]++
		if o == r {
			continue
		}
		k := key{d.arch, d.nr}
		if name, ok := named[k]; ok && o == retAllow && (r == def || r == enosysAction) {
			unknown[k] = name
			continue
		}
		diffs[k] = append(diffs[k], verdicts{o, r})
		if _, ok := diffArgs[k]; !ok {
			diffArgs[k] = d.args
		}
	}
	var dist []string
	for v, n := range seen {
		dist = append(dist, fmt.Sprintf("%s %d", describe(v), n))
	}
	slices.Sort(dist)
	t.Logf("%d inputs; runc's verdicts: %s", len(inputs), strings.Join(dist, ", "))
	for k, name := range unknown {
		t.Logf("allowed difference: %s (arch %#x nr %#x) is allowed by ours; runc's libseccomp does not know it", name, k[0], k[1])
	}

	// Ours counts those names for the -ENOSYS threshold, runc does not:
	// between runc's threshold and ours, runc says ENOSYS and ours the
	// default. Allowed only when an unknown name moved the threshold.
	for k, vs := range diffs {
		moved := false
		for u := range unknown {
			if u[0] == k[0] && u[1]&x32SyscallBit == k[1]&x32SyscallBit && k[1] < u[1] {
				moved = true
			}
		}
		ok := moved
		for _, v := range vs {
			ok = ok && v.theirs == enosysAction && v.ours == def
		}
		if ok {
			t.Logf("allowed difference: arch %#x nr %#x: runc ENOSYS (its highest known syscall is lower), ours %s", k[0], k[1], describe(def))
			delete(diffs, k)
		}
	}
	n := 0
	for k, vs := range diffs {
		n++
		if n <= 30 {
			t.Errorf("arch %#x nr %#x: ours %s, runc %s (e.g. args %#x; %d inputs differ)",
				k[0], k[1], describe(vs[0].ours), describe(vs[0].theirs), diffArgs[k], len(vs))
		}
	}
	if n > 0 {
		t.Errorf("%d syscall numbers differ from runc's filter", n)
	}
}

type recorder struct{ logs, errs []string }

func (r *recorder) Logf(f string, a ...any)   { r.logs = append(r.logs, fmt.Sprintf(f, a...)) }
func (r *recorder) Errorf(f string, a ...any) { r.errs = append(r.errs, fmt.Sprintf(f, a...)) }
func (r *recorder) Fatalf(f string, a ...any) { r.errs = append(r.errs, fmt.Sprintf(f, a...)) }

// TestCompareFilters checks the comparison of TestMatchesRunc itself, with
// stand-ins for runc's filter: one from a libseccomp that does not know
// fchmodat2 (an allowed difference, which moves the -ENOSYS threshold
// too), and one that allows what ours does not (a failure).
func TestCompareFilters(t *testing.T) {
	p := DefaultProfile()
	raw, err := Compile(p)
	if err != nil {
		t.Fatal(err)
	}
	ours := decode(t, raw)
	inputs := gridInputs()

	older := DefaultProfile()
	older.Syscalls[0].Names = slices.DeleteFunc(slices.Clone(older.Syscalls[0].Names), func(n string) bool { return n == "fchmodat2" })
	raw, err = Compile(older)
	if err != nil {
		t.Fatal(err)
	}
	var r recorder
	compareFilters(&r, p, ours, decode(t, raw), inputs)
	if len(r.errs) != 0 {
		t.Errorf("a filter without fchmodat2 was not accepted: %q", r.errs)
	}
	joined := strings.Join(r.logs, "\n")
	for _, want := range []string{"fchmodat2 (arch 0xc000003e nr 0x1c4)", "fchmodat2 (arch 0xc000003e nr 0x400001c4)",
		"fchmodat2 (arch 0x40000003 nr 0x1c4)", "arch 0xc000003e nr 0x1c2: runc ENOSYS", "arch 0x40000003 nr 0x1c3: runc ENOSYS"} {
		if !strings.Contains(joined, want) {
			t.Errorf("no log of %q in:\n%s", want, joined)
		}
	}

	wider := DefaultProfile()
	wider.Syscalls[0].Names = append(slices.Clone(wider.Syscalls[0].Names), "mount")
	raw, err = Compile(wider)
	if err != nil {
		t.Fatal(err)
	}
	r = recorder{}
	compareFilters(&r, p, ours, decode(t, raw), inputs)
	if len(r.errs) == 0 {
		t.Error("a filter that allows mount was accepted")
	}
	r = recorder{}
	compareFilters(&r, wider, decode(t, raw), ours, inputs)
	if len(r.errs) == 0 {
		t.Error("ours allowing mount, which runc knows and denies, was accepted")
	}
}

// runcFilter runs a container under the profile with runc and returns the
// seccomp filter of its init process.
func runcFilter(t *testing.T, p *specs.LinuxSeccomp) []byte {
	t.Helper()
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle")
	state := filepath.Join(dir, "state")
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{filepath.Join(rootfs, "bin"), state} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, busyboxPath, filepath.Join(rootfs, "bin", "busybox"), 0o755)
	for _, l := range []string{"sh", "sleep"} {
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", l)); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command(runcPath, "spec", "--bundle", bundle).CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v: %s", err, out)
	}

	// Edit runc's own config as JSON, leaving what we do not touch as is.
	cfgPath := filepath.Join(bundle, "config.json")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	proc := cfg["process"].(map[string]any)
	proc["args"] = []string{"/bin/sleep", "1000"}
	proc["terminal"] = false
	proc["noNewPrivileges"] = true
	linux := cfg["linux"].(map[string]any)
	linux["seccomp"] = p
	if b, err = json.MarshalIndent(cfg, "", "\t"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, b, 0o644); err != nil {
		t.Fatal(err)
	}

	id := fmt.Sprintf("berth-seccomp-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	runc := func(args ...string) *exec.Cmd {
		return exec.Command(runcPath, append([]string{"--root", state}, args...)...)
	}
	// Registered after t.TempDir, so it runs before the directories go.
	t.Cleanup(func() {
		if out, err := runc("delete", "--force", id).CombinedOutput(); err != nil {
			t.Logf("runc delete: %v: %s", err, out)
		}
	})

	// The container's stdio: a file, so that nothing waits on a pipe the
	// detached container keeps open.
	logf, err := os.Create(filepath.Join(dir, "stdio.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := runc("--log", filepath.Join(dir, "runc.log"), "run", "--detach", "--bundle", bundle, id)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, logf, logf
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(logf.Name())
		rlog, _ := os.ReadFile(filepath.Join(dir, "runc.log"))
		t.Fatalf("runc run: %v\n%s\n%s", err, out, rlog)
	}
	out, err := runc("state", id).Output()
	if err != nil {
		t.Fatalf("runc state: %v", err)
	}
	var st struct {
		Pid    int    `json:"pid"`
		Status string `json:"status"`
	}
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runc state %s: %v", out, err)
	}
	if st.Status != "running" {
		t.Fatalf("container is %s, not running", st.Status)
	}
	filter, err := seccomptest.ReadFilter(st.Pid)
	if err != nil {
		t.Fatalf("reading the filter of pid %d: %v", st.Pid, err)
	}
	return filter
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatalf("%v (busybox-static provides %s)", err, src)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
