package ctrdriver

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/seccomp"
	"github.com/berthd/berth/supervisor/monitor"
)

// EntryName is the program that starts every container process when berth
// installs the seccomp filter itself (cmd/berth-entry); it is looked for
// next to the monitor binary.
const EntryName = "berth-entry"

// Annotations of a bundle whose processes start through berth-entry: the
// program and the compiled filter, which the container's execs use too.
const (
	annotationEntry  = "io.berth.entry.program"
	annotationFilter = "io.berth.entry.seccomp-filter"
)

// seccompLoader says who installs a container's seccomp filter: berth-entry
// with the program berth compiled once from the profile, or, where that is
// not possible, runc, which compiles the profile on every start (about 15
// ms of a /bin/true's start: libseccomp and runc's own patching).
type seccompLoader struct {
	// entry is nil when runc installs the profile; reason says why.
	entry  *monitor.Entry
	reason string
}

// newSeccompLoader compiles profile into dir once, when program (the
// berth-entry binary) is there to install it.
func newSeccompLoader(program, dir string, profile *specs.LinuxSeccomp) seccompLoader {
	if runtime.GOARCH != "amd64" {
		return seccompLoader{reason: "berth-entry is built for x86_64 only"}
	}
	if _, err := os.Stat(program); err != nil {
		return seccompLoader{reason: fmt.Sprintf("%s is missing: %v", EntryName, err)}
	}
	prog, err := seccomp.Compile(profile)
	if err != nil {
		return seccompLoader{reason: fmt.Sprintf("the profile does not compile: %v", err)}
	}
	// Named by its content: a running container's execs keep using the
	// filter it started with, whatever a later agent compiles.
	sum := sha256.Sum256(prog)
	path := filepath.Join(dir, "seccomp-"+hex.EncodeToString(sum[:8])+".bpf")
	if err := fileutil.Replace(path, prog, 0o600); err != nil {
		return seccompLoader{reason: fmt.Sprintf("write the compiled filter: %v", err)}
	}
	return seccompLoader{entry: &monitor.Entry{Program: program, Filter: path}}
}

// apply makes s start its process through berth-entry, which installs the
// filter instead of runc.
func (l seccompLoader) apply(s *specs.Spec) {
	if l.entry == nil {
		return
	}
	s.Linux.Seccomp = nil
	s.Process.Args = monitor.EntryArgs(s.Process.Args)
	// runc looks the program up and executes it holding the bundle's
	// capabilities, even for a user other than root (whose execve drops
	// them). berth-entry does both after runc's execve, which keeps
	// ambient capabilities only: lent as such, and dropped by berth-entry
	// before the workload's execve, which then ends as runc's would.
	if c := s.Process.Capabilities; c != nil {
		c.Inheritable = append([]string(nil), c.Permitted...)
		c.Ambient = append([]string(nil), c.Permitted...)
	}
	if s.Annotations == nil {
		s.Annotations = map[string]string{}
	}
	s.Annotations[annotationEntry] = l.entry.Program
	s.Annotations[annotationFilter] = l.entry.Filter
}

// EntryOf is how the container of spec (its bundle's) starts its
// processes: through berth-entry (with this filter), or nil (runc
// installs the bundle's profile).
func EntryOf(spec *specs.Spec) *monitor.Entry {
	program, filter := spec.Annotations[annotationEntry], spec.Annotations[annotationFilter]
	if program == "" || filter == "" {
		return nil
	}
	return &monitor.Entry{Program: program, Filter: filter}
}

// describe reports the loader in node status.
func (l seccompLoader) describe(details map[string]string) {
	if l.entry != nil {
		details["seccomp"] = "berth-entry"
		return
	}
	details["seccomp"] = "runc"
	details["seccomp_reason"] = l.reason
}

// WithoutEntry makes the spec of a bundle berth wrote into the one runc
// alone would run: the process's own args, and the profile for runc to
// compile and install (the bench's runc baselines run berth's bundles so).
func WithoutEntry(s *specs.Spec) {
	if EntryOf(s) == nil {
		return
	}
	s.Process.Args = s.Process.Args[1:]
	if c := s.Process.Capabilities; c != nil {
		c.Inheritable, c.Ambient = nil, nil
	}
	s.Linux.Seccomp = seccomp.DefaultProfile()
	delete(s.Annotations, annotationEntry)
	delete(s.Annotations, annotationFilter)
}
