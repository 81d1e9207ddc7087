package monitor

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Entry is how a container's processes start when berth installs their
// seccomp filter itself: runc executes berth-entry (cmd/berth-entry), which
// installs the filter berth compiled once for the container's profile and
// executes the process's own program. runc would compile the profile on
// every start.
type Entry struct {
	// Program is the berth-entry binary on the host.
	Program string `json:"program"`
	// Filter is the compiled seccomp program (struct sock_filter[]).
	Filter string `json:"filter"`
}

// EntryArg0 is args[0] of a process started through berth-entry: the
// program the monitor passes as the process's fd 3 (the process's own
// arguments follow). The filter is fd 4 and the report pipe fd 5, so runc
// preserves EntryFDs descriptors.
const (
	EntryArg0 = "/proc/self/fd/3"
	EntryFDs  = 3
)

// EntryArgs are the args of a process whose own are args, started
// through berth-entry.
func EntryArgs(args []string) []string {
	return append([]string{EntryArg0}, args...)
}

// entryReportLimit bounds what berth-entry may report.
const entryReportLimit = 64 << 10

// entryFiles are what runc passes to berth-entry.
type entryFiles struct {
	// extra are fds 3, 4 and 5 of runc (and of berth-entry).
	extra []*os.File
	// report is the read end of the pipe berth-entry reports on.
	report *os.File
}

// openEntry opens e's program and filter and a report pipe. With e nil
// there is nothing to pass (the process starts without berth-entry).
func openEntry(e *Entry) (*entryFiles, error) {
	if e == nil {
		return &entryFiles{}, nil
	}
	prog, err := sealedProgram(e.Program)
	if err != nil {
		return nil, err
	}
	filter, err := os.Open(e.Filter)
	if err != nil {
		prog.Close()
		return nil, fmt.Errorf("open the seccomp filter: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		prog.Close()
		filter.Close()
		return nil, err
	}
	return &entryFiles{extra: []*os.File{prog, filter, w}, report: r}, nil
}

// runcArgs are the runc options that pass the files on.
func (f *entryFiles) runcArgs() []string {
	if f.report == nil {
		return nil
	}
	return []string{"--preserve-fds", fmt.Sprint(EntryFDs)}
}

// started closes our copies of what runc passed on (runc has exited), so
// the report pipe ends when berth-entry executes the process or exits.
func (f *entryFiles) started() {
	for _, file := range f.extra {
		file.Close()
	}
	f.extra = nil
}

// wait reads berth-entry's report until the process's own program runs
// (end of file without a word) and returns why it did not run otherwise.
// runc returns before its process executes anything, so this is where a
// program that is not there, or a filter the kernel refused, shows.
func (f *entryFiles) wait(deadline time.Time) error {
	if f.report == nil {
		return nil
	}
	f.started()
	defer f.close()
	if err := f.report.SetReadDeadline(deadline); err != nil {
		return err
	}
	msg, err := io.ReadAll(io.LimitReader(f.report, entryReportLimit))
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("the container process did not start its program by %s", deadline.Format(time.RFC3339))
	}
	if err != nil {
		return fmt.Errorf("read berth-entry's report: %w", err)
	}
	if len(msg) > 0 {
		return fmt.Errorf("unable to start container process: %s", strings.TrimSpace(string(msg)))
	}
	return nil
}

// close releases everything.
func (f *entryFiles) close() {
	f.started()
	if f.report != nil {
		f.report.Close()
		f.report = nil
	}
}

// sealedProgram is a copy of the program at path that the container's
// process executes: a memfd sealed against every change and executable
// only (mode 0111). The process runs in the container, where a process of
// the workload could otherwise reach the file it executes through /proc
// (/proc/PID/exe) and overwrite the host's berth-entry for every later
// container (as with runc's CVE-2019-5736), or, the file being readable
// to it, read and write the starting process's memory before its filter
// is in place: the kernel makes a process that executes a file it cannot
// read non-dumpable from the start, so no process of the container's
// user namespace can trace it or open its memory.
func sealedProgram(path string) (*os.File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read berth-entry: %w", err)
	}
	fd, err := unix.MemfdCreate("berth-entry", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("copy berth-entry: %w", err)
	}
	f := os.NewFile(uintptr(fd), "berth-entry")
	if _, err := f.Write(data); err != nil {
		f.Close()
		return nil, fmt.Errorf("copy berth-entry: %w", err)
	}
	if err := unix.Fchmod(fd, 0o111); err != nil {
		f.Close()
		return nil, fmt.Errorf("copy berth-entry: %w", err)
	}
	const seals = unix.F_SEAL_SEAL | unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_WRITE
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		f.Close()
		return nil, fmt.Errorf("seal the copy of berth-entry: %w", err)
	}
	return f, nil
}
