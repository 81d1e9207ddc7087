package deb

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"

	"github.com/berthd/berth/internal/config"
)

func TestVersion(t *testing.T) {
	for in, want := range map[string]string{
		"v1.2.0":                  "1.2.0",
		"1.2.0":                   "1.2.0",
		"v1.2.0-3-gabc1234":       "1.2.0+3+gabc1234",
		"v1.2.0-3-gabc1234-dirty": "1.2.0+3+gabc1234+dirty",
		"53b146b":                 "0~git.53b146b",
		"53b146b-dirty":           "0~git.53b146b.dirty",
		"dev":                     "0~git.dev",
		"":                        "0~git.unknown",
	} {
		if got := Version(in); got != want {
			t.Errorf("Version(%q) = %q, want %q", in, got, want)
		}
	}
}

// need skips when a Debian tool the test drives is missing.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed: the package tests need Debian's dpkg and apt", tool)
		}
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// buildPackages builds the three binaries as the Makefile does, then both
// packages, once per test binary.
func buildPackages(t *testing.T) (node, client string, binDir string) {
	t.Helper()
	if runtime.GOARCH != "amd64" {
		t.Skipf("the packages are built for amd64; this is %s", runtime.GOARCH)
	}
	need(t, "dpkg-deb")
	dir := t.TempDir()
	binDir = filepath.Join(dir, "bin")
	for _, b := range []struct {
		name, pkg string
		env       []string
		args      []string
	}{
		{"berth", "./cmd/berth", nil, []string{"-tags", "libvirt_dlopen"}},
		{"berth-monitor", "./cmd/berth-monitor", []string{"CGO_ENABLED=0"}, []string{"-trimpath"}},
		{"berth-init", "./cmd/berth-init", []string{"CGO_ENABLED=0"}, []string{"-trimpath"}},
	} {
		args := append([]string{"build"}, b.args...)
		args = append(args, "-o", filepath.Join(binDir, b.name), b.pkg)
		cmd := exec.Command("go", args...)
		cmd.Dir = "../.."
		cmd.Env = append(os.Environ(), b.env...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	if out, err := exec.Command("../../cmd/berth-entry/build.sh", filepath.Join(binDir, "berth-entry")).CombinedOutput(); err != nil {
		t.Fatalf("build berth-entry: %v\n%s", err, out)
	}
	paths, err := Build(Options{BinDir: binDir, SrcDir: "../..", OutDir: filepath.Join(dir, "deb"), Version: "v1.2.0-3-gabc1234"})
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) != 2 || filepath.Base(paths[0]) != "berth_1.2.0+3+gabc1234_amd64.deb" || filepath.Base(paths[1]) != "berth-client_1.2.0+3+gabc1234_amd64.deb" {
		t.Fatalf("packages %v", paths)
	}
	return paths[0], paths[1], binDir
}

// entry is one line of dpkg-deb --contents.
type entry struct{ mode, owner string }

func contents(t *testing.T, deb string) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	for _, line := range strings.Split(strings.TrimSpace(run(t, "dpkg-deb", "--contents", deb)), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("dpkg-deb --contents line %q", line)
		}
		out[strings.TrimSuffix(strings.TrimPrefix(f[len(f)-1], "."), "/")] = entry{f[0], f[1]}
	}
	return out
}

func field(t *testing.T, deb, name string) string {
	t.Helper()
	return strings.TrimSpace(run(t, "dpkg-deb", "--field", deb, name))
}

// extract unpacks deb's files into a new directory.
func extract(t *testing.T, deb string) string {
	t.Helper()
	dir := t.TempDir()
	run(t, "dpkg-deb", "--extract", deb, dir)
	return dir
}

func TestPackages(t *testing.T) {
	node, client, binDir := buildPackages(t)

	t.Run("node contents", func(t *testing.T) {
		got := contents(t, node)
		want := map[string]string{
			"/usr/bin/berth":                           "-rwxr-xr-x",
			"/usr/lib/berth/berth-monitor":             "-rwxr-xr-x",
			"/usr/lib/berth/berth-init":                "-rwxr-xr-x",
			"/usr/lib/berth/berth-entry":               "-rwxr-xr-x",
			"/lib/systemd/system/berth.service":        "-rw-r--r--",
			"/etc/berth":                               "drwxr-xr-x",
			"/etc/berth/berth.yaml":                    "-rw-r--r--",
			"/etc/berth/policy.yaml":                   "-rw-r--r--",
			"/var/lib/berth":                           "drwx------",
			"/usr/share/doc/berth/README.md":           "-rw-r--r--",
			"/usr/share/doc/berth/examples/berth.yaml": "-rw-r--r--",
		}
		for path, mode := range want {
			e, ok := got[path]
			switch {
			case !ok:
				t.Errorf("no %s in the package", path)
			case e.mode != mode || e.owner != "root/root":
				t.Errorf("%s: %s %s, want %s root/root", path, e.mode, e.owner, mode)
			}
		}
		for path, e := range got {
			if e.owner != "root/root" {
				t.Errorf("%s is owned by %s", path, e.owner)
			}
			if !strings.HasPrefix(e.mode, "d") {
				if _, ok := want[path]; !ok && !strings.HasPrefix(path, "/usr/share/doc/berth/") {
					t.Errorf("unexpected file %s in the package", path)
				}
			}
		}
	})

	t.Run("node control", func(t *testing.T) {
		if got := field(t, node, "Package"); got != "berth" {
			t.Errorf("Package: %s", got)
		}
		deps := strings.Split(field(t, node, "Depends"), ", ")
		sort.Strings(deps)
		for _, d := range []string{"runc", "libvirt-daemon-system", "qemu-system-x86", "qemu-utils", "containernetworking-plugins", "e2fsprogs"} {
			if i := sort.SearchStrings(deps, d); i == len(deps) || deps[i] != d {
				t.Errorf("berth does not depend on %s: %v", d, deps)
			}
		}
		if got := field(t, node, "Conflicts"); got != "berth-client" {
			t.Errorf("Conflicts: %q", got)
		}
		conffiles := strings.Fields(run(t, "dpkg-deb", "--info", node, "conffiles"))
		sort.Strings(conffiles)
		if strings.Join(conffiles, " ") != "/etc/berth/berth.yaml /etc/berth/policy.yaml" {
			t.Errorf("conffiles %v", conffiles)
		}
		for _, script := range []string{"postinst", "prerm", "postrm"} {
			body := run(t, "dpkg-deb", "--info", node, script)
			if !strings.HasPrefix(body, "#!/bin/sh") {
				t.Errorf("%s: %q", script, body)
			}
			if out, err := exec.Command("sh", "-n", filepath.Join("..", "deb", script)).CombinedOutput(); err != nil {
				t.Errorf("%s does not parse: %v %s", script, err, out)
			}
		}
	})

	t.Run("unit and config", func(t *testing.T) {
		root := extract(t, node)
		unit, err := os.ReadFile(filepath.Join(root, "lib/systemd/system/berth.service"))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range []string{"Type=notify", "ExecStart=/usr/bin/berth agent --config /etc/berth/berth.yaml", "KillMode=process", "WantedBy=multi-user.target"} {
			if !bytes.Contains(unit, []byte("\n"+line+"\n")) {
				t.Errorf("the unit lacks %q:\n%s", line, unit)
			}
		}
		// The packaged config is valid and names the packaged files.
		cfg, err := config.Load(filepath.Join(root, "etc/berth/berth.yaml"), nil)
		if err != nil {
			t.Fatalf("/etc/berth/berth.yaml: %v", err)
		}
		for key, path := range map[string]string{
			"node.monitor_path": cfg.Node.MonitorPath, "vm.init_path": cfg.VM.InitPath, "policy.file": cfg.Policy.File,
		} {
			if !strings.HasPrefix(path, "/") {
				t.Errorf("%s = %q, want an absolute path", key, path)
				continue
			}
			if _, err := os.Stat(filepath.Join(root, path)); err != nil {
				t.Errorf("%s = %s, which the package does not install", key, path)
			}
		}
		// Offline, in the package's tree with the host's targets: the
		// unit's syntax (a bad value is only a warning, so any output
		// fails) and that its ExecStart is there and executable.
		targets, _ := filepath.Glob("/lib/systemd/system/*.target")
		systemd, err := exec.LookPath("systemd-analyze")
		if err != nil || len(targets) == 0 {
			t.Logf("unit not verified: systemd-analyze or the host's systemd targets are missing")
			return
		}
		for _, tg := range targets {
			data, err := os.ReadFile(tg)
			if err == nil {
				err = os.WriteFile(filepath.Join(root, "lib/systemd/system", filepath.Base(tg)), data, 0o644)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		out, err := exec.Command(systemd, "verify", "--man=no", "--root="+root, "/lib/systemd/system/berth.service").CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	})

	t.Run("client", func(t *testing.T) {
		got := contents(t, client)
		if e := got["/usr/bin/berth"]; e.mode != "-rwxr-xr-x" || e.owner != "root/root" {
			t.Errorf("/usr/bin/berth: %+v", e)
		}
		for path, e := range got {
			if !strings.HasPrefix(e.mode, "d") && path != "/usr/bin/berth" && !strings.HasPrefix(path, "/usr/share/doc/berth-client/") {
				t.Errorf("unexpected file %s in berth-client", path)
			}
		}
		if deps := field(t, client, "Depends"); deps != "libc6" {
			t.Errorf("berth-client depends on %q, want libc6 alone", deps)
		}
		// The shipped CLI loads libvirt only when it runs the agent.
		f, err := elf.Open(filepath.Join(binDir, "berth"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		libs, err := f.ImportedLibraries()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range libs {
			if strings.Contains(l, "virt") {
				t.Errorf("the CLI links %s: %v", l, libs)
			}
		}
	})

	t.Run("apt resolves", func(t *testing.T) {
		need(t, "apt-get")
		sim := func(status string, debs ...string) (string, error) {
			args := []string{"-s", "-q", "-o", "Debug::NoLocking=1"}
			if status != "" {
				args = append(args, "-o", "Dir::State::status="+status)
			}
			args = append(args, "install")
			for _, d := range debs {
				abs, _ := filepath.Abs(d)
				args = append(args, abs)
			}
			cmd := exec.Command("apt-get", args...)
			cmd.Env = append(os.Environ(), "LC_ALL=C")
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		// A fresh Debian machine: no package installed, every dependency
		// from the apt cache. Without package lists there is nothing to
		// resolve against.
		lists, _ := filepath.Glob("/var/lib/apt/lists/*_Packages*")
		if len(lists) == 0 {
			t.Skip("no apt package lists (/var/lib/apt/lists): run apt-get update once")
		}
		empty := filepath.Join(t.TempDir(), "status")
		if err := os.WriteFile(empty, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := sim(empty, node)
		if err != nil {
			t.Fatalf("apt cannot install berth on a fresh machine: %v\n%s", err, out)
		}
		for _, p := range []string{"berth", "runc", "libvirt-daemon-system", "qemu-system-x86", "qemu-utils", "containernetworking-plugins"} {
			if !strings.Contains(out, "\nInst "+p+" ") {
				t.Errorf("apt's plan for berth does not install %s", p)
			}
		}
		out, err = sim(empty, client)
		if err != nil {
			t.Fatalf("apt cannot install berth-client on a fresh machine: %v\n%s", err, out)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "Inst ") && (strings.Contains(line, "libvirt") || strings.Contains(line, "qemu") || strings.HasPrefix(line, "Inst runc ")) {
				t.Errorf("berth-client pulls in a node runtime: %s", line)
			}
		}
		// On this machine as it is, and the two packages refuse to share
		// /usr/bin/berth.
		if out, err := sim("", node); err != nil || !strings.Contains(out, "\nInst berth ") {
			t.Errorf("apt cannot install berth here: %v\n%s", err, out)
		}
		if out, err := sim("", node, client); err == nil || !strings.Contains(out, "Conflicts") {
			t.Errorf("apt would install berth and berth-client together: %v\n%s", err, out)
		}
	})
}
