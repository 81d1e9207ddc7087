// Package deb builds berth's Debian packages with nfpm: berth, the node
// (agent, per-workload monitor, guest init, systemd unit, configuration
// under /etc/berth), and berth-client, the CLI alone for laptops and
// fleet controllers. `make deb` runs it through deploy/deb/mkdeb.
package deb

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
)

// Options say where the pieces are and what to call the result.
type Options struct {
	// BinDir holds berth, berth-monitor, berth-init and berth-entry as `make build`
	// leaves them in bin/.
	BinDir string
	// SrcDir is the repository: configs/, deploy/, README.md.
	SrcDir string
	// OutDir receives the .deb files.
	OutDir string
	// Version is the release (v1.2.0) or `git describe` output; see
	// Version.
	Version string
	// Arch is Debian's name of the binaries' architecture (amd64).
	Arch string
	// MTime stamps every file, so the same inputs make the same package.
	MTime time.Time
}

// Depends are what the agent runs at run time (not what builds or tests
// it): runc for containers; libvirt's daemon, QEMU and qemu-img for VMs
// (libvirt-daemon-system brings libvirt0, which the agent loads);
// the CNI plugins, iptables and iproute2 for the workload network;
// e2fsprogs for sized disks and volumes (mkfs.ext4); ca-certificates for
// registries over TLS.
var Depends = []string{
	"libc6",
	"runc",
	"libvirt-daemon-system",
	"qemu-system-x86",
	"qemu-utils",
	"containernetworking-plugins",
	"iptables",
	"iproute2",
	"e2fsprogs",
	"ca-certificates",
}

// Recommends: VMs boot the node's own kernel from /boot, which a Debian
// node booted from Debian's kernel has; a node that boots another way
// (a container, a custom kernel) needs one installed for guests.
var Recommends = []string{"linux-image-amd64"}

// Suggests: busybox-static is what `make demo-image` builds the
// quickstart's image from.
var Suggests = []string{"busybox-static"}

// Conffiles are the files dpkg keeps an operator's edits of.
var Conffiles = []string{"/etc/berth/berth.yaml", "/etc/berth/policy.yaml"}

var release = regexp.MustCompile(`^v?([0-9]+\.[0-9]+[0-9A-Za-z.+~-]*)$`)

// Version turns a release tag (v1.2.0, 1.2.0-3-gabc) into a Debian
// version; anything else (a bare commit, "dev") becomes 0~git.COMMIT, which
// sorts before every release.
func Version(v string) string {
	v = strings.TrimSpace(v)
	if m := release.FindStringSubmatch(v); m != nil {
		// git describe's -N-gHASH(-dirty) suffix sorts after the tag;
		// a "-" would start a Debian revision.
		return strings.ReplaceAll(m[1], "-", "+")
	}
	clean := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.':
			return r
		}
		return '.'
	}, v)
	if clean == "" {
		clean = "unknown"
	}
	return "0~git." + clean
}

// Build writes berth_VERSION_ARCH.deb and berth-client_VERSION_ARCH.deb
// into OutDir and returns their paths.
func Build(o Options) ([]string, error) {
	if o.Arch == "" {
		o.Arch = "amd64"
	}
	if o.MTime.IsZero() {
		o.MTime = time.Unix(0, 0).UTC()
	}
	src := func(p string) string { return filepath.Join(o.SrcDir, p) }
	bin := func(p string) string { return filepath.Join(o.BinDir, p) }
	for _, p := range []string{bin("berth"), bin("berth-monitor"), bin("berth-init"), bin("berth-entry")} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%w (make build makes it)", err)
		}
	}
	file := func(from, to string, mode os.FileMode) *files.Content {
		return &files.Content{Source: from, Destination: to, FileInfo: &files.ContentFileInfo{Mode: mode, Owner: "root", Group: "root"}}
	}
	conf := func(from, to string) *files.Content {
		c := file(from, to, 0o644)
		c.Type = files.TypeConfig
		return c
	}
	dir := func(to string, mode os.FileMode) *files.Content {
		return &files.Content{Destination: to, Type: files.TypeDir, FileInfo: &files.ContentFileInfo{Mode: mode, Owner: "root", Group: "root"}}
	}
	scripts := func(name string) (string, error) {
		p := src(filepath.Join("deploy", "deb", name))
		_, err := os.Stat(p)
		return p, err
	}
	postinst, err := scripts("postinst")
	if err != nil {
		return nil, err
	}
	prerm, err := scripts("prerm")
	if err != nil {
		return nil, err
	}
	postrm, err := scripts("postrm")
	if err != nil {
		return nil, err
	}

	node := &nfpm.Info{
		Name:          "berth",
		Arch:          o.Arch,
		Version:       Version(o.Version),
		VersionSchema: "none",
		Section:       "admin",
		Priority:      "optional",
		Maintainer:    "berth maintainers <berth@localhost>",
		Homepage:      "https://berth.dev",
		Description: "workload agent: containers or VMs as the node's isolation policy decides\n" +
			"berth runs workloads on a node as runc containers or libvirt VMs under\n" +
			"an operator's isolation policy, with an HTTP API, a CLI and Prometheus\n" +
			"metrics. This package is the node: the agent (a systemd service), its\n" +
			"per-workload monitor, the guest init and the configuration in /etc/berth.",
		MTime: o.MTime,
		Overridables: nfpm.Overridables{
			Depends:    Depends,
			Recommends: Recommends,
			Suggests:   Suggests,
			// The node package has the CLI too: the same binary.
			Conflicts: []string{"berth-client"},
			Replaces:  []string{"berth-client"},
			Provides:  []string{"berth-client"},
			Contents: files.Contents{
				file(bin("berth"), "/usr/bin/berth", 0o755),
				file(bin("berth-monitor"), "/usr/lib/berth/berth-monitor", 0o755),
				// Next to the monitor, where the agent looks for it.
				file(bin("berth-entry"), "/usr/lib/berth/berth-entry", 0o755),
				file(bin("berth-init"), "/usr/lib/berth/berth-init", 0o755),
				file(src("deploy/berth.service"), "/lib/systemd/system/berth.service", 0o644),
				dir("/etc/berth", 0o755),
				conf(src("deploy/deb/berth.yaml"), "/etc/berth/berth.yaml"),
				conf(src("configs/policy.yaml"), "/etc/berth/policy.yaml"),
				dir("/var/lib/berth", 0o700),
				file(src("README.md"), "/usr/share/doc/berth/README.md", 0o644),
				file(src("deploy/README.md"), "/usr/share/doc/berth/deploy.md", 0o644),
				file(src("configs/berth.yaml"), "/usr/share/doc/berth/examples/berth.yaml", 0o644),
			},
			Scripts: nfpm.Scripts{PostInstall: postinst, PreRemove: prerm, PostRemove: postrm},
		},
	}
	client := &nfpm.Info{
		Name:          "berth-client",
		Arch:          o.Arch,
		Version:       Version(o.Version),
		VersionSchema: "none",
		Section:       "admin",
		Priority:      "optional",
		Maintainer:    node.Maintainer,
		Homepage:      node.Homepage,
		Description: "command-line client of the berth workload agent\n" +
			"berth submits, lists, follows and stops workloads on berth nodes,\n" +
			"manages their images and reads node status, policy and events over\n" +
			"the agent's API. The binary does not link libvirt: this package needs\n" +
			"none of the node's runtimes. Install berth on the nodes themselves.",
		MTime: o.MTime,
		Overridables: nfpm.Overridables{
			Depends:   []string{"libc6"},
			Conflicts: []string{"berth"},
			Contents: files.Contents{
				file(bin("berth"), "/usr/bin/berth", 0o755),
				file(src("README.md"), "/usr/share/doc/berth-client/README.md", 0o644),
			},
		},
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, err
	}
	var out []string
	for _, info := range []*nfpm.Info{node, client} {
		p, err := write(info, o.OutDir)
		if err != nil {
			return out, fmt.Errorf("package %s: %w", info.Name, err)
		}
		out = append(out, p)
	}
	return out, nil
}

func write(info *nfpm.Info, outDir string) (string, error) {
	info = nfpm.WithDefaults(info)
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return "", err
	}
	path := filepath.Join(outDir, deb.Default.ConventionalFileName(info))
	f, err := os.Create(path + ".tmp")
	if err != nil {
		return "", err
	}
	defer os.Remove(path + ".tmp")
	if err := deb.Default.Package(info, f); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return path, os.Rename(path+".tmp", path)
}
