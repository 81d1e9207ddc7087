package e2e

import (
	"bufio"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// logDirEnv names a directory that receives a copy of every log of a
// failed run (Nomad server and clients with the plugin's lines, berth
// agents); without it a failure shows their errors and warnings only.
const logDirEnv = "BERTH_NOMAD_E2E_LOGS"

var problemRE = regexp.MustCompile(`(?i)\[(error|warn)\]|level=(error|warn)|"level":"(error|warn)"`)

// reportLogs shows the errors and warnings of the test's logs and, with
// BERTH_NOMAD_E2E_LOGS, copies the logs there.
func reportLogs(t *testing.T, root string) {
	keep := os.Getenv(logDirEnv)
	if keep != "" {
		keep = filepath.Join(keep, filepath.Base(root))
	}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() {
			// Alloc dirs hold the tasks' own files, not ours.
			if d.Name() == "alloc" || d.Name() == "workloads" || d.Name() == "vms" {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".log") || !d.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		if keep != "" {
			if data, err := os.ReadFile(p); err == nil {
				dst := filepath.Join(keep, rel)
				if os.MkdirAll(filepath.Dir(dst), 0o755) == nil {
					os.WriteFile(dst, data, 0o644)
				}
			}
		}
		f, err := os.Open(p)
		if err != nil {
			return nil
		}
		defer f.Close()
		var lines []string
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if problemRE.MatchString(sc.Text()) {
				lines = append(lines, sc.Text())
			}
		}
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		if len(lines) > 0 {
			t.Logf("errors and warnings in %s:\n%s", rel, strings.Join(lines, "\n"))
		}
		return nil
	})
	if keep != "" {
		t.Logf("logs copied to %s", keep)
	}
}

// domainsOf lists the libvirt domains of berth agents whose data dir is
// below root: berth's VM driver names its domains with the prefix berth-
// and records its root in the domain's metadata. Other domains on the
// host are only read, never touched.
func domainsOf(root string) []string {
	out, err := exec.Command("virsh", "-c", "qemu:///system", "list", "--all", "--name").Output()
	if err != nil {
		return nil
	}
	mine := regexp.MustCompile(`<(\w+:)?root>` + regexp.QuoteMeta(root+"/"))
	var doms []string
	for _, name := range strings.Fields(string(out)) {
		if !strings.HasPrefix(name, "berth-") {
			continue
		}
		xml, err := exec.Command("virsh", "-c", "qemu:///system", "dumpxml", name).Output()
		if err == nil && mine.Match(xml) {
			doms = append(doms, name)
		}
	}
	return doms
}

// requireNoDomains fails the test if a VM of the test's agents is left,
// and destroys it.
func requireNoDomains(t *testing.T, root string) {
	for _, name := range domainsOf(root) {
		t.Errorf("libvirt domain %s of the test left behind", name)
		if out, err := exec.Command("virsh", "-c", "qemu:///system", "destroy", name).CombinedOutput(); err != nil {
			t.Logf("virsh destroy %s: %v: %s", name, err, out)
		}
	}
}
