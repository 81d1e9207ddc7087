// Package hangtest holds the fault tests of a hung libvirtd: Libvirtd, a
// private libvirtd that a test may freeze and kill (the VM driver's tests
// use it too), and the agent's test with a VM driver on it, kept here so
// that neither the agent's nor the VM driver's tests build the other.
package hangtest

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// Libvirtd is a libvirtd of the test's own, which the test may
// freeze (SIGSTOP) and kill. It never is the machine's shared libvirtd,
// which holds other people's domains: it runs as nobody, so it is a
// session daemon with its own socket, configuration, state and cache
// under a temporary directory, and makes no privileged change to the host.
type Libvirtd struct {
	tb   testing.TB
	dir  string
	cmd  *exec.Cmd
	sock string
	// URI reaches it: the qemu session driver through its own socket.
	URI string
	// exited is closed when the daemon has been reaped.
	exited chan struct{}
}

// StartLibvirtd starts a private libvirtd and waits for its socket.
// It is killed (and reaped) when the test ends.
func StartLibvirtd(tb testing.TB) *Libvirtd {
	tb.Helper()
	if testing.Short() {
		tb.Skip("starts a private libvirtd; skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		tb.Skip("starts a private libvirtd as nobody; needs root")
	}
	bin, err := exec.LookPath("libvirtd")
	if err != nil {
		if bin, err = exec.LookPath("/usr/sbin/libvirtd"); err != nil {
			tb.Skip("libvirtd is not installed; install libvirt-daemon-system")
		}
	}
	nobody, err := user.Lookup("nobody")
	if err != nil {
		tb.Skipf("no user nobody to run a private libvirtd as: %v", err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)

	// A short path: the socket path must fit in a sockaddr_un.
	dir, err := os.MkdirTemp("", "berth-lvd-")
	if err != nil {
		tb.Fatal(err)
	}
	home, run := filepath.Join(dir, "home"), filepath.Join(dir, "run")
	for _, d := range []string{home, run} {
		if err := os.Mkdir(d, 0o700); err != nil {
			tb.Fatal(err)
		}
		if err := os.Chown(d, uid, gid); err != nil {
			tb.Fatal(err)
		}
	}
	// nobody must reach its home; QEMU (nobody too) the driver root below.
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "libvirtd.log"))
	if err != nil {
		tb.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin)
	cmd.Dir = home
	cmd.Env = []string{
		"HOME=" + home,
		"XDG_RUNTIME_DIR=" + run,
		"XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"XDG_CACHE_HOME=" + filepath.Join(home, ".cache"),
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}},
		// Its own process group: the cleanup kills what it spawned too,
		// and nothing else.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start private libvirtd: %v", err)
	}
	p := &Libvirtd{tb: tb, dir: dir, cmd: cmd, exited: make(chan struct{})}
	p.sock = filepath.Join(run, "libvirt", "libvirt-sock")
	p.URI = "qemu+unix:///session?socket=" + p.sock
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	tb.Cleanup(p.cleanup)

	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", p.sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-p.exited:
			log, _ := os.ReadFile(logf.Name())
			tb.Fatalf("private libvirtd exited at start:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("private libvirtd did not listen on %s within 30s", p.sock)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return p
}

// Dir is a directory of the test's, traversable by QEMU.
func (p *Libvirtd) Dir() string { return p.dir }

// Freeze stops the daemon (SIGSTOP): its socket still accepts
// connections, and nothing answers.
func (p *Libvirtd) Freeze() { p.signal(syscall.SIGSTOP) }

// Thaw resumes it (SIGCONT).
func (p *Libvirtd) Thaw() { p.signal(syscall.SIGCONT) }

func (p *Libvirtd) signal(sig syscall.Signal) {
	p.tb.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.tb.Fatalf("signal private libvirtd: %v", err)
	}
}

// Kill kills the daemon and waits until it is reaped; its socket file
// stays behind, refusing connections, as after a crash.
func (p *Libvirtd) Kill() {
	p.tb.Helper()
	if err := p.kill(); err != nil {
		p.tb.Fatal(err)
	}
}

func (p *Libvirtd) kill() error {
	pid := p.cmd.Process.Pid
	select {
	case <-p.exited:
		return nil
	default:
		// The group is the daemon's own (Setpgid), and the daemon is
		// not reaped yet: it and its children, nothing else. SIGKILL
		// ends stopped processes too.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		return errors.New("private libvirtd not reaped 10s after SIGKILL")
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		return errors.New("private libvirtd (pid " + strconv.Itoa(pid) + ") still exists after it was reaped")
	}
	return nil
}

func (p *Libvirtd) cleanup() {
	if err := p.kill(); err != nil {
		p.tb.Error(err)
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, 0); !errors.Is(err, syscall.ESRCH) {
		p.tb.Errorf("processes of the private libvirtd's group are left: %v", err)
	}
	if p.tb.Failed() {
		if log, err := os.ReadFile(filepath.Join(p.dir, "libvirtd.log")); err == nil {
			p.tb.Logf("private libvirtd log:\n%s", log)
		}
	}
	os.RemoveAll(p.dir)
}
