package monitor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/proc"
)

// ExecReportFD is the pipe (the exec shim's fd 3) on which `berth-monitor
// exec` reports to the agent, one JSON ExecReport a line: first the
// process's pid (or why it did not start), then its end.
const ExecReportFD = 3

// ExecLifelineFD is the read end of a pipe (fd 4) whose write end only
// the agent holds: its end of file (the agent closed the session, or
// died) makes the shim kill the session. A pipe, not a parent-death
// signal, which fires when the agent's forking thread ends, not the agent.
const ExecLifelineFD = 4

// ExecReport is one line of an exec shim's report.
type ExecReport struct {
	// Pid is the exec'd process, as seen from the host, once it runs.
	Pid int `json:"pid,omitempty"`
	// Error says why the process did not start (runc's explanation).
	Error string `json:"error,omitempty"`
	// Exited is set on the last line, with ExitCode (128+Signal for a
	// killed process) and Signal.
	Exited   bool `json:"exited,omitempty"`
	ExitCode int  `json:"exit_code"`
	Signal   int  `json:"signal,omitempty"`
}

// ExecArgs are the arguments of `berth-monitor exec`, in order.
type ExecArgs struct {
	Runc, RuncRoot, RuncLog, Process, PidFile string
	ConsoleSocket                             string // "-" without a terminal
	// Netns is a network namespace the shim joins before runc, for a
	// container whose user namespace cannot join it ("-": none; see
	// ctrdriver's exec).
	Netns string
	// Entry starts the process through berth-entry (its args[0] is
	// EntryArg0); nil: runc starts it.
	Entry *Entry
	ID    string
}

// List is the command line after "exec".
func (a ExecArgs) List() []string {
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	program, filter := "-", "-"
	if a.Entry != nil {
		program, filter = a.Entry.Program, a.Entry.Filter
	}
	return []string{a.Runc, a.RuncRoot, a.RuncLog, a.Process, a.PidFile, dash(a.ConsoleSocket), dash(a.Netns), program, filter, a.ID}
}

// execKillBound bounds how long the shim tries to kill its session.
const execKillBound = 30 * time.Second

// execEntryTimeout bounds how long berth-entry may take to start the
// exec'd program once runc returned.
const execEntryTimeout = 30 * time.Second

// ExecMain is `berth-monitor exec`: the parent of one exec session's
// process. It is started by the agent in a session of its own with its
// stdio for the process, runs `runc exec --detach` so the process is
// re-parented to it (a subreaper), and reports the process's pid and end
// on ExecReportFD. When the agent closes its lifeline (ExecLifelineFD), or
// dies, or SIGTERM comes, it kills the session's processes: an exec
// session never outlives the agent that serves it.
func ExecMain(args []string) int {
	report := os.NewFile(ExecReportFD, "report")
	send := func(r ExecReport) {
		b, _ := json.Marshal(r)
		_, _ = report.Write(append(b, '\n'))
	}
	if len(args) != 10 {
		send(ExecReport{Error: "berth-monitor exec: wrong arguments; it is started by the berth agent"})
		return 2
	}
	a := ExecArgs{Runc: args[0], RuncRoot: args[1], RuncLog: args[2], Process: args[3], PidFile: args[4], ConsoleSocket: args[5], Netns: args[6], ID: args[9]}
	if args[7] != "-" {
		a.Entry = &Entry{Program: args[7], Filter: args[8]}
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		send(ExecReport{Error: fmt.Sprintf("become child subreaper: %v", err)})
		return 1
	}
	var pid int
	var shown atomic.Int64 // pid, for the death handler
	deaths := make(chan os.Signal, 1)
	signal.Notify(deaths, unix.SIGTERM, unix.SIGHUP)
	signal.Ignore(unix.SIGPIPE, unix.SIGINT)
	killSession := func() {
		self := os.Getpid()
		// Bounded: a process SIGKILL cannot end (in uninterruptible
		// sleep on a hung filesystem) must not keep the shim, and the
		// agent's Close waiting on it, forever; it dies when its wait
		// ends, and the container's cgroup still holds it.
		ctx, cancel := context.WithTimeout(context.Background(), execKillBound)
		defer cancel()
		_ = proc.KillAll(ctx, proc.AllPids, func(p proc.Info) bool {
			return p.Pid != self && (p.Session == self || (shown.Load() > 0 && (p.Session == int(shown.Load()) || p.Pgrp == int(shown.Load()))))
		})
	}
	// exiting is held by whoever ends the shim: a main that saw the
	// process end must not exit while the agent's death is being handled.
	var exiting sync.Mutex
	go func() {
		// A read of the lifeline ends only with its end of file.
		lifeline := os.NewFile(ExecLifelineFD, "lifeline")
		_, _ = io.Copy(io.Discard, lifeline)
		deaths <- unix.SIGTERM
	}()
	go func() {
		<-deaths
		exiting.Lock()
		killSession()
		os.Exit(1)
	}()

	runcArgs := []string{"--root", a.RuncRoot, "--log", a.RuncLog, "--log-format", "json", "exec", "--detach", "--pid-file", a.PidFile, "--process", a.Process}
	if a.ConsoleSocket != "-" {
		runcArgs = append(runcArgs, "--console-socket", a.ConsoleSocket)
	}
	if a.Netns != "-" {
		// runc, and the process it starts, are born in the container's
		// network namespace: this thread joins it, and forks runc.
		runtime.LockOSThread()
		if err := joinNetns(a.Netns); err != nil {
			send(ExecReport{Error: err.Error()})
			return 1
		}
	}
	entry, err := openEntry(a.Entry)
	if err != nil {
		send(ExecReport{Error: err.Error()})
		return 1
	}
	defer entry.close()
	runcArgs = append(runcArgs, entry.runcArgs()...)
	cmd := exec.Command(a.Runc, append(runcArgs, a.ID)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = entry.extra
	err = cmd.Run()
	entry.started()
	if err != nil {
		exiting.Lock()
		reapAll()
		send(ExecReport{Error: runcError(a.RuncLog, err)})
		return 1
	}
	if err := entry.wait(time.Now().Add(execEntryTimeout)); err != nil {
		exiting.Lock()
		killSession() // berth-entry has exited, unless it hung
		reapAll()
		send(ExecReport{Error: err.Error()})
		return 1
	}
	data, err := os.ReadFile(a.PidFile)
	if err == nil {
		pid, err = strconv.Atoi(strings.TrimSpace(string(data)))
	}
	shown.Store(int64(pid))
	if err != nil {
		exiting.Lock()
		killSession()
		send(ExecReport{Error: fmt.Sprintf("read the exec'd process's pid: %v", err)})
		return 1
	}
	// The process holds its own copies of our stdio: its output ends when
	// it (and what it started) closes them, not when we do.
	if null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0); err == nil {
		for fd := 0; fd <= 2; fd++ {
			_ = unix.Dup2(int(null.Fd()), fd)
		}
		null.Close()
	}
	send(ExecReport{Pid: pid})
	res := reap(pid)
	exiting.Lock()
	send(ExecReport{Exited: true, ExitCode: res.code, Signal: res.sig})
	return 0
}

// joinNetns moves the calling thread into the network namespace at path.
func joinNetns(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open the container's network namespace: %w", err)
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("join the container's network namespace %s: %w", path, err)
	}
	return nil
}
