//go:build linux

package pid1

import (
	"fmt"
	"io"
	"os"

	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/ptyio"
)

// The size of the main process's terminal until an attach sets one, as a
// container's console starts.
const (
	defaultRows = 24
	defaultCols = 80
)

// mainIO is the workload's main process's standard streams: the files it
// gets and the ends berth-init keeps (see guest.Config.Stdin and TTY).
type mainIO struct {
	console *guest.Console
	// child is the process's stdin, stdout and stderr; childEnds are
	// berth-init's copies of them, closed once it started.
	child     []*os.File
	childEnds []*os.File
	master    *os.File // the terminal, with TTY
	stdin     *os.File // the write end of its stdin pipe, with Stdin and no TTY
	outR      *os.File // without TTY
	errR      *os.File
}

// newMainIO prepares the main process's streams: a terminal owned by its
// user (80x24), or /dev/null or a pipe for stdin and pipes for stdout and
// stderr.
func newMainIO(cfg *guest.Config, user *userSpec) (*mainIO, error) {
	m := &mainIO{}
	opts := guest.ConsoleOptions{TTY: cfg.TTY}
	if cfg.TTY {
		master, slave, err := openPTY(user.uid, user.gid)
		if err != nil {
			return nil, fmt.Errorf("the workload's terminal: %w", err)
		}
		m.master, m.childEnds, m.child = master, []*os.File{slave}, []*os.File{slave, slave, slave}
		if err := ptyio.Resize(master, defaultRows, defaultCols); err != nil {
			m.closeAll()
			return nil, fmt.Errorf("the workload's terminal: %w", err)
		}
		opts.Resize = func(rows, cols uint16) error { return ptyio.Resize(master, rows, cols) }
		if cfg.Stdin {
			opts.Stdin = ttyInput{master}
		}
		m.console = guest.NewConsole(opts)
		return m, nil
	}
	var stdin *os.File
	if cfg.Stdin {
		r, w, err := os.Pipe()
		if err != nil {
			return nil, fmt.Errorf("create stdin pipe: %w", err)
		}
		stdin, m.stdin, opts.Stdin = r, w, w
	} else {
		f, err := os.Open("/dev/null")
		if err != nil {
			return nil, fmt.Errorf("open /dev/null: %w", err)
		}
		stdin = f
	}
	m.childEnds = append(m.childEnds, stdin)
	outR, outW, err := os.Pipe()
	if err != nil {
		m.closeAll()
		return nil, fmt.Errorf("create stdout pipe: %w", err)
	}
	m.outR, m.childEnds = outR, append(m.childEnds, outW)
	errR, errW, err := os.Pipe()
	if err != nil {
		m.closeAll()
		return nil, fmt.Errorf("create stderr pipe: %w", err)
	}
	m.errR, m.childEnds = errR, append(m.childEnds, errW)
	m.child = []*os.File{stdin, outW, errW}
	m.console = guest.NewConsole(opts)
	return m, nil
}

// relay is one output stream berth-init copies to a port and the console.
type relay struct {
	dst, tee io.Writer
	src      *os.File
	name     string
}

func (m *mainIO) relays(in *initProc) []relay {
	if m.master != nil {
		return []relay{{in.stdout, m.console.Stdout(), m.master, "terminal"}}
	}
	return []relay{{in.stdout, m.console.Stdout(), m.outR, "stdout"}, {in.stderr, m.console.Stderr(), m.errR, "stderr"}}
}

// closeChildEnds closes berth-init's copies of the process's ends: only
// the workload may hold them, or its output never reaches end of file.
func (m *mainIO) closeChildEnds() {
	for _, f := range m.childEnds {
		f.Close()
	}
	m.childEnds = nil
}

// closeOurEnds closes the process's input once it ended (the relays close
// the output ends they drained).
func (m *mainIO) closeOurEnds() {
	if m.stdin != nil {
		m.stdin.Close()
	}
}

// closeAll closes everything, for a process that never started.
func (m *mainIO) closeAll() {
	m.closeChildEnds()
	for _, f := range []*os.File{m.master, m.stdin, m.outR, m.errR} {
		if f != nil {
			f.Close()
		}
	}
}
