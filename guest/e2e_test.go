package guest_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/vmdriver/initramfs"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

// This end-to-end test boots the real guest side of berth's VM driver in
// plain QEMU (no libvirt): the host's kernel, an initramfs built by
// vmdriver/initramfs around a freshly built berth-init, a busybox root disk
// from vmdriver/rootdisk, a config disk from EncodeConfig and the three
// virtio-serial ports, wired exactly as package guest documents. TCG only:
// nested KVM guests hang on these machines.

const busybox = "/bin/busybox"

// vmEnv is what every boot of the test shares.
type vmEnv struct {
	kernel initramfs.Kernel
	initrd string
	base   string
}

func setupVMEnv(t *testing.T) *vmEnv {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("skipping VM end-to-end test: qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
	}
	k, err := initramfs.FindKernel("/boot", "/lib/modules")
	if err != nil {
		t.Skip("skipping VM end-to-end test: no guest kernel with modules in /boot and /lib/modules (apt-get install linux-image-amd64)")
	}
	// Everything else is a requirement of the project's machines: its
	// absence is a failure, not a reason to skip.
	for _, tool := range []string{"mkfs.ext4", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: install e2fsprogs and qemu-utils", tool)
		}
	}
	if _, err := os.Stat(busybox); err != nil {
		t.Fatalf("%s not found: install busybox-static", busybox)
	}

	work := t.TempDir()
	initBin := filepath.Join(work, "berth-init")
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go toolchain not found to build berth-init: %v", err)
	}
	build := exec.Command(gobin, "build", "-trimpath", "-ldflags=-s -w", "-o", initBin, "github.com/berthd/berth/cmd/berth-init")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build berth-init: %v\n%s", err, out)
	}
	ctx := context.Background()
	initrd, err := initramfs.Build(ctx, initramfs.Options{Kernel: k, InitPath: initBin, CacheDir: filepath.Join(work, "cache")})
	if err != nil {
		t.Fatal(err)
	}
	rootfs := filepath.Join(work, "rootfs")
	buildBusyboxRootfs(t, rootfs)
	base, err := rootdisk.Base(ctx, rootfs, "test-busybox", filepath.Join(work, "cache"), rootdisk.WithHeadroom(64<<20))
	if err != nil {
		t.Fatal(err)
	}
	return &vmEnv{kernel: k, initrd: initrd, base: base}
}

// buildBusyboxRootfs makes a minimal image: busybox with its applets, a
// passwd file and an empty /tmp.
func buildBusyboxRootfs(t *testing.T, dir string) {
	t.Helper()
	for _, d := range []string{"bin", "etc", "tmp", "root", "home/app"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(dir, "tmp"), 0o1777)
	data, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin/busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			if err := os.Symlink("busybox", filepath.Join(dir, "bin", applet)); err != nil {
				t.Fatal(err)
			}
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
		"etc/group":  "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// vmResult is what one boot left behind.
type vmResult struct {
	stdout, stderr, console string
	last, started           *guest.Status
	statusErr               error
	bootToStart, total      time.Duration
}

// bootOptions tune one boot.
type bootOptions struct {
	// afterStart runs once the guest reported "started"; it gets the QMP
	// socket and the stdout file.
	afterStart func(t *testing.T, qmp, stdout string)
}

func (e *vmEnv) boot(t *testing.T, cfg guest.Config, opts bootOptions) vmResult {
	t.Helper()
	dir := t.TempDir()
	overlay := filepath.Join(dir, "root.qcow2")
	if err := rootdisk.Overlay(context.Background(), e.base, overlay); err != nil {
		t.Fatal(err)
	}
	cfgData, err := guest.EncodeConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgDisk := filepath.Join(dir, "config.img")
	if err := os.WriteFile(cfgDisk, cfgData, 0o644); err != nil {
		t.Fatal(err)
	}
	// A unix socket path must fit in 108 bytes; test temp dirs may not.
	sockDir, err := os.MkdirTemp("", "berth-qmp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	qmp := filepath.Join(sockDir, "qmp.sock")
	p := func(name string) string { return filepath.Join(dir, name) }
	// Inside QEMU option lists a comma separates options; ",," is a literal
	// comma, which test directory names (from subtest names) may contain.
	opt := func(path string) string { return strings.ReplaceAll(path, ",", ",,") }

	args := []string{
		"-machine", "q35", "-accel", "tcg", "-m", "256",
		"-nodefaults", "-nographic", "-no-reboot",
		"-kernel", e.kernel.Path, "-initrd", e.initrd,
		"-append", "console=ttyS0 panic=-1 quiet",
		"-chardev", "file,id=console,path=" + opt(p("console.log")),
		"-serial", "chardev:console",
		"-qmp", "unix:" + opt(qmp) + ",server=on,wait=off",
		"-device", "virtio-serial-pci,id=vser0",
	}
	for i, port := range []string{guest.StdoutPort, guest.StderrPort, guest.StatusPort} {
		id := fmt.Sprintf("port%d", i)
		args = append(args,
			"-chardev", fmt.Sprintf("file,id=%s,path=%s", id, opt(p(port))),
			"-device", fmt.Sprintf("virtserialport,bus=vser0.0,chardev=%s,name=%s", id, port))
	}
	args = append(args,
		"-drive", "if=none,id=root,format=qcow2,file="+opt(overlay),
		"-device", "virtio-blk-pci,drive=root,serial="+guest.RootDiskSerial,
		"-drive", "if=none,id=config,format=raw,readonly=on,file="+opt(cfgDisk),
		"-device", "virtio-blk-pci,drive=config,serial="+guest.ConfigDiskSerial,
	)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waiting := true
	t.Cleanup(func() {
		// Never leave a VM behind, whatever failed.
		if waiting {
			cmd.Process.Kill()
			<-exited
		}
	})

	res := vmResult{}
	statusPath := p(guest.StatusPort)
	var waitErr error
	for waiting {
		select {
		case waitErr = <-exited:
			waiting = false
		case <-time.After(20 * time.Millisecond):
			if res.bootToStart == 0 {
				if data, _ := os.ReadFile(statusPath); bytes.Contains(data, []byte(`"started"`)) {
					res.bootToStart = time.Since(start)
					if opts.afterStart != nil {
						opts.afterStart(t, qmp, p(guest.StdoutPort))
					}
				}
			}
		}
	}
	res.total = time.Since(start)
	read := func(name string) string { data, _ := os.ReadFile(p(name)); return string(data) }
	res.stdout, res.stderr, res.console = read(guest.StdoutPort), read(guest.StderrPort), read("console.log")
	if waitErr != nil {
		t.Fatalf("qemu: %v\n%s\nconsole:\n%s", waitErr, qemuOut.String(), res.console)
	}
	f, err := os.Open(statusPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res.last, res.started, res.statusErr = guest.ReadLastStatus(f)
	if m := regexp.MustCompile(`started pid \d+ ([0-9.]+s) after boot`).FindStringSubmatch(res.console); m != nil {
		t.Logf("guest: workload started %s after kernel boot; host: status 'started' after %v, VM gone after %v",
			m[1], res.bootToStart.Round(time.Millisecond), res.total.Round(time.Millisecond))
	}
	return res
}

func (r vmResult) wantExit(t *testing.T, code, sig int) {
	t.Helper()
	if r.statusErr != nil || r.last.Event != guest.EventExited || r.last.ExitCode != code || r.last.Signal != sig {
		t.Fatalf("result = %+v (%v), want exited %d signal %d\nstdout: %q\nstderr: %q\nconsole:\n%s",
			r.last, r.statusErr, code, sig, r.stdout, r.stderr, r.console)
	}
	if r.started == nil || r.started.PID <= 1 {
		t.Errorf("no started record with a pid: %+v", r.started)
	}
}

func (r vmResult) wantError(t *testing.T, code int, msg string) {
	t.Helper()
	if r.statusErr != nil || r.last.Event != guest.EventError || r.last.ExitCode != code || !strings.Contains(r.last.Message, msg) {
		t.Fatalf("result = %+v (%v), want error %d mentioning %q\nconsole:\n%s", r.last, r.statusErr, code, msg, r.console)
	}
	if r.started != nil {
		t.Errorf("started reported for a command that never ran: %+v", r.started)
	}
	if !strings.Contains(r.console, msg) {
		t.Errorf("error not printed on the console:\n%s", r.console)
	}
}

func TestVMEndToEnd(t *testing.T) {
	env := setupVMEnv(t)
	baseBefore, err := os.Stat(env.base)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Every guest wrote to its root disk; none may have reached the
		// shared base under its overlay.
		after, err := os.Stat(env.base)
		if err != nil || !after.ModTime().Equal(baseBefore.ModTime()) || after.Size() != baseBefore.Size() {
			t.Errorf("base image changed under the overlays: %v", err)
		}
	})

	t.Run("exit code and output streams", func(t *testing.T) {
		r := env.boot(t, guest.Config{Args: []string{"sh", "-c", "echo out; echo err >&2; exit 7"}}, bootOptions{})
		r.wantExit(t, 7, 0)
		if r.stdout != "out\n" || r.stderr != "err\n" {
			t.Errorf("stdout %q, stderr %q; want \"out\\n\", \"err\\n\"", r.stdout, r.stderr)
		}
	})

	t.Run("env, workdir, user and hostname", func(t *testing.T) {
		r := env.boot(t, guest.Config{
			Args:     []string{"sh", "-c", `pwd; echo "$FOO"; id -u; id -g; id -G; echo "$HOME"; hostname; echo "$PATH"; touch /tmp/x && echo writable; ip addr show lo | grep -q "inet 127.0.0.1" && echo loopback`},
			Env:      []string{"FOO=bar baz", "FOO=from-last"},
			Workdir:  "/srv/app", // not in the image: created, as runc does
			User:     "1000",
			Hostname: "e2e-guest",
		}, bootOptions{})
		r.wantExit(t, 0, 0)
		want := "/srv/app\nfrom-last\n1000\n1000\n1000 50\n/home/app\ne2e-guest\n" + guest.DefaultPath + "\nwritable\nloopback\n"
		if r.stdout != want {
			t.Errorf("stdout = %q\nwant     %q\nstderr: %q", r.stdout, want, r.stderr)
		}
	})

	t.Run("command not found", func(t *testing.T) {
		r := env.boot(t, guest.Config{Args: []string{"no-such-command", "arg"}}, bootOptions{})
		r.wantError(t, guest.ExitCodeNotFound, "no-such-command")
	})

	t.Run("not executable", func(t *testing.T) {
		r := env.boot(t, guest.Config{Args: []string{"/etc/passwd"}}, bootOptions{})
		r.wantError(t, guest.ExitCodeCannotExec, "/etc/passwd")
	})

	t.Run("killed by signal", func(t *testing.T) {
		r := env.boot(t, guest.Config{Args: []string{"sh", "-c", "kill -KILL $$"}}, bootOptions{})
		r.wantExit(t, 137, 9)
	})

	t.Run("leftover processes and large output", func(t *testing.T) {
		// A daemonized child keeps stdout open forever; the workload still
		// ends when its main process does, with all output delivered.
		const size = 1 << 20
		r := env.boot(t, guest.Config{Args: []string{"sh", "-c",
			fmt.Sprintf("(sleep 1000 &); head -c %d /dev/zero | tr '\\0' x; echo done >&2", size)}}, bootOptions{})
		r.wantExit(t, 0, 0)
		if len(r.stdout) != size || strings.Trim(r.stdout, "x") != "" || r.stderr != "done\n" {
			t.Errorf("stdout has %d bytes (want %d of 'x'), stderr %q", len(r.stdout), size, r.stderr)
		}
	})

	t.Run("graceful stop by ACPI power button", func(t *testing.T) {
		r := env.boot(t, guest.Config{Args: []string{"sh", "-c",
			"trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 1; done"}}, bootOptions{
			afterStart: func(t *testing.T, qmp, stdout string) {
				// Press only once the trap is set, or the shell dies of
				// the default SIGTERM action instead.
				deadline := time.Now().Add(time.Minute)
				for {
					if data, _ := os.ReadFile(stdout); bytes.Contains(data, []byte("ready")) {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("workload never printed ready")
					}
					time.Sleep(20 * time.Millisecond)
				}
				if err := qmpCommand(qmp, "system_powerdown"); err != nil {
					t.Fatalf("system_powerdown: %v", err)
				}
			},
		})
		r.wantExit(t, 3, 0)
		if r.stdout != "ready\ngot-term\n" {
			t.Errorf("stdout = %q, want the trap's output", r.stdout)
		}
	})
}

// Probe mode needs nothing but the kernel and the initramfs: berth-init
// prints the marker and the guest powers itself off.
func TestVMProbeMode(t *testing.T) {
	env := setupVMEnv(t)
	console := filepath.Join(t.TempDir(), "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-machine", "q35", "-accel", "tcg", "-m", "160",
		"-nodefaults", "-nographic", "-no-reboot",
		"-kernel", env.kernel.Path, "-initrd", env.initrd,
		"-append", "console=ttyS0 panic=-1 quiet "+guest.ProbeParam,
		"-chardev", "file,id=console,path="+strings.ReplaceAll(console, ",", ",,"),
		"-serial", "chardev:console")
	out, err := cmd.CombinedOutput()
	data, _ := os.ReadFile(console)
	if err != nil {
		t.Fatalf("qemu: %v\n%s\nconsole:\n%s", err, out, data)
	}
	if !guest.ProbeReached(data) {
		t.Fatalf("console lacks the probe marker:\n%s", data)
	}
	if bytes.Contains(data, []byte("Kernel panic")) || bytes.Contains(data, []byte("power off: ")) {
		t.Errorf("the probe guest did not power off cleanly:\n%s", data)
	}
	line := regexp.MustCompile(regexp.QuoteMeta(guest.ProbeMarker) + ` [0-9.]+s after boot`).Find(data)
	if line == nil {
		t.Errorf("marker line lacks the boot time:\n%s", data)
	}
	t.Logf("TCG probe guest: %q; QEMU gone after %v", line, time.Since(start).Round(time.Millisecond))
}

// qmpCommand runs one QMP command without arguments and waits for its
// return.
func qmpCommand(sock, command string) error {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	if _, err := r.ReadBytes('\n'); err != nil { // greeting
		return fmt.Errorf("qmp greeting: %w", err)
	}
	for _, cmd := range []string{"qmp_capabilities", command} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			return err
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return fmt.Errorf("qmp %s: %w", cmd, err)
			}
			var msg struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Desc string `json:"desc"`
				} `json:"error"`
			}
			if err := json.Unmarshal(line, &msg); err != nil {
				return fmt.Errorf("qmp %s: %w", cmd, err)
			}
			if msg.Error != nil {
				return fmt.Errorf("qmp %s: %s", cmd, msg.Error.Desc)
			}
			if msg.Return != nil {
				break
			}
			// Anything else is an asynchronous event; keep reading.
		}
	}
	return nil
}
