package monitor

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
)

// Main is the monitor's main function: args are the command line after the
// program name, the task directory alone (or SpareArg: it comes on
// TaskDirFD). It returns the exit code.
func Main(args []string) int {
	// The agent's death must not reach us, nor a stray terminal signal.
	signal.Ignore(unix.SIGHUP, unix.SIGINT, unix.SIGPIPE)
	if len(args) >= 1 && args[0] == SpareArg {
		dir, err := awaitTask()
		if err != nil {
			// The agent finds no status and says the monitor ended
			// without one; this goes where the task's log would.
			fmt.Fprintf(os.Stderr, "berth-monitor: %v\n", err)
			return 1
		}
		if dir == "" {
			return 0 // let go unused
		}
		retitle(dir)
		args = []string{dir}
		if err := foreground(); err != nil {
			// The task is not run in the background: it fails.
			return failed(dir, err)
		}
	}
	if len(args) != 1 || !filepath.IsAbs(args[0]) {
		fmt.Fprintln(os.Stderr, "berth-monitor: needs the absolute task directory; it is started by the berth agent")
		return 2
	}
	dir := args[0]
	ready := os.NewFile(ReadyFD, "ready")
	if err := run(dir, ready); err != nil {
		fmt.Fprintf(os.Stderr, "berth-monitor %s: %v\n", dir, err)
		return 1
	}
	return 0
}

// foreground gives every thread the niceness NiceEnv names: a spare was
// started in the background, and what it starts for its task (runc, the
// container) inherits the niceness of the thread that starts it.
func foreground() error {
	v := os.Getenv(NiceEnv)
	if v == "" {
		return nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return fmt.Errorf("%s=%q: %w", NiceEnv, v, err)
	}
	if err := proc.SetNice(n); err != nil {
		return fmt.Errorf("leave the background (niceness %d) for the task: %w", n, err)
	}
	return nil
}

// failed records err as the start's failure in dir, and returns the
// monitor's exit code.
func failed(dir string, err error) int {
	m := &mon{dir: dir, ready: os.NewFile(ReadyFD, "ready")}
	fmt.Fprintf(os.Stderr, "berth-monitor %s: %v\n", dir, m.fail(err))
	return 1
}

// awaitTask waits, as a spare, for the task directory, and then takes on
// what a monitor started for its task has from the start: the directory
// as working directory, its log as stdout and stderr. It returns "" when
// the agent lets it go unused (or is gone).
func awaitTask() (string, error) {
	f := os.NewFile(TaskDirFD, "task")
	data, err := io.ReadAll(io.LimitReader(f, unix.PathMax))
	f.Close()
	dir := strings.TrimSpace(string(data))
	if err != nil || dir == "" {
		return "", nil
	}
	if !filepath.IsAbs(dir) {
		return dir, nil // Main refuses it
	}
	if err := os.Chdir(dir); err != nil {
		return "", err
	}
	logf, err := os.OpenFile(filepath.Join(dir, LogFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return "", err
	}
	defer logf.Close()
	for _, fd := range []int{1, 2} {
		if err := unix.Dup3(int(logf.Fd()), fd, 0); err != nil {
			return "", fmt.Errorf("log to %s: %w", logf.Name(), err)
		}
	}
	return dir, nil
}

// retitle makes a spare's command line name its task directory, as that of
// a monitor started for its task does: the arguments are rewritten where
// the kernel keeps them (setproctitle), over the room SpareTitle kept.
// os.Args is not read afterwards.
func retitle(dir string) {
	if len(os.Args) < 3 {
		return
	}
	first := unsafe.StringData(os.Args[1])
	last := os.Args[len(os.Args)-1]
	end := unsafe.Add(unsafe.Pointer(unsafe.StringData(last)), len(last))
	n := int(uintptr(end) - uintptr(unsafe.Pointer(first)))
	if len(dir) >= n {
		return
	}
	area := unsafe.Slice(first, n)
	copy(area, dir)
	clear(area[len(dir):])
}

func run(dir string, ready *os.File) error {
	var cfg Config
	if err := fileutil.ReadJSON(filepath.Join(dir, ConfigFile), &cfg); err != nil {
		signalReady(ready)
		return err
	}
	// Listen for stop requests before the record below tells the agent
	// that it may send them (SIGUSR1 would otherwise end us).
	stops := make(chan os.Signal, 1)
	signal.Notify(stops, unix.SIGUSR1)
	// Our record is how an agent, this one or a restarted one, finds us.
	// Only we write it: its version says we hear stop requests.
	ident, err := proc.Identify(os.Getpid())
	if err == nil {
		err = fileutil.ReplaceJSON(filepath.Join(dir, PidFile), PidRecord{Ident: ident, BootID: cfg.BootID, Version: Version})
	}
	m := &mon{dir: dir, cfg: cfg, ready: ready, stops: stops}
	if err != nil {
		return m.fail(fmt.Errorf("record the monitor's identity: %w", err))
	}
	switch {
	case cfg.Kind == KindRunc && cfg.Runc != nil:
		return m.runContainer()
	case cfg.Kind == KindPorts && cfg.Ports != nil:
		return m.drainPorts()
	default:
		return m.fail(fmt.Errorf("monitor.json: kind %q without its section: this monitor speaks protocol %d", cfg.Kind, Version))
	}
}

// mon is one monitor's state.
type mon struct {
	dir   string
	cfg   Config
	ready *os.File
	// stops receives SIGUSR1: "stop.json has a request".
	stops chan os.Signal
}

func (m *mon) writeStatus(st Status) error {
	st.Version = Version
	return fileutil.ReplaceJSON(filepath.Join(m.dir, StatusFile), st)
}

// fail records that the task could not run and releases the agent waiting
// for it.
func (m *mon) fail(err error) error {
	st := Status{State: StateFailed, ExitCode: -1, Error: err.Error(), FinishedAt: time.Now().UTC()}
	if werr := m.writeStatus(st); werr != nil {
		err = errors.Join(err, werr)
	}
	signalReady(m.ready)
	return err
}

// readStop returns the pending stop request, if any.
func (m *mon) readStop() (StopRequest, bool) {
	var r StopRequest
	if err := fileutil.ReadJSON(filepath.Join(m.dir, StopFile), &r); err != nil {
		return r, false
	}
	return r, true
}

// signalEnded tells the agent the task's end is recorded, when it handed
// us the pipe for it.
func signalEnded() {
	var st unix.Stat_t
	if unix.Fstat(EndedFD, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return
	}
	f := os.NewFile(EndedFD, "ended")
	_, _ = f.Write([]byte{1})
	f.Close()
}

func signalReady(ready *os.File) {
	if ready != nil {
		_, _ = ready.Write([]byte{1})
		ready.Close()
	}
}
