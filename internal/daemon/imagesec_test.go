package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// secretImage is busybox with what a local user must never reach through
// the data dir: a setuid-root copy of busybox and a private file. Its
// workloads run as nobody (uid 65534) when asNobody is set, so the test
// proves containers of a non-root user still read their image.
const (
	secretImage       = "berth.test/secret:1"
	secretImageNobody = "berth.test/secret:nobody"
	secretText        = "image-private-content"
)

func importSecretImages(t *testing.T, c *client.Client) {
	t.Helper()
	base, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	bin, err := os.ReadFile(ociimage.BusyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	layer, err := ociimage.Layer(
		ociimage.File{Name: "busybox-suid", Mode: 0o4755, Body: string(bin)}, // busybox runs as busybox when its name starts so
		ociimage.File{Name: "secret", Mode: 0o644, Body: secretText},
	)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg := cf.Config.DeepCopy()
	cfg.User = "nobody"
	asNobody, err := mutate.Config(img, *cfg)
	if err != nil {
		t.Fatal(err)
	}
	for ref, img := range map[string]v1.Image{secretImage: img, secretImageNobody: asNobody} {
		var buf bytes.Buffer
		if err := ociimage.WriteOCIArchive(&buf, img, ref); err != nil {
			t.Fatal(err)
		}
		if _, err := c.ImportImage(context.Background(), &buf, ""); err != nil {
			t.Fatalf("import %s: %v", ref, err)
		}
	}
}

// reachableDataDir makes a data dir whose parents every user may
// traverse, as /var/lib/berth's are: t.TempDir's are 0700, which would
// hide everything and prove nothing.
func reachableDataDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "berth-imagesec-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "data")
}

// access is what an unprivileged host user can do with a path.
type access struct {
	stat, list, read, exec bool
}

func (a access) String() string {
	var s []string
	for name, ok := range map[string]bool{"stat": a.stat, "list": a.list, "read": a.read, "exec": a.exec} {
		if ok {
			s = append(s, name)
		}
	}
	sort.Strings(s)
	return strings.Join(s, ",")
}

// probeScript reads paths, one a line, and prints what the user it runs
// as can do with each it can reach at all.
const probeScript = `while IFS= read -r p; do
  if [ -e "$p" ] || [ -L "$p" ]; then r=stat; else continue; fi
  if [ -d "$p" ]; then
    if ls "$p" >/dev/null 2>&1; then r="$r list"; fi
  elif [ -f "$p" ]; then
    if (exec 3<"$p") 2>/dev/null; then r="$r read"; fi
    if [ -x "$p" ]; then r="$r exec"; fi
  fi
  printf '%s\t%s\n' "$r" "$p"
done
`

// asNobody runs a shell command as the unprivileged host user nobody.
func asNobody(t *testing.T, stdin io.Reader, script string, args ...string) (string, error) {
	t.Helper()
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) is not installed")
	}
	cmd := exec.Command("setpriv", append([]string{"--reuid=nobody", "--regid=nogroup", "--clear-groups", "/bin/sh", "-c", script, "sh"}, args...)...)
	cmd.Stdin = stdin
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// probe tells, for each path, what nobody can do with it; paths it cannot
// reach are left out.
func probe(t *testing.T, paths []string) map[string]access {
	t.Helper()
	out, err := asNobody(t, strings.NewReader(strings.Join(paths, "\n")+"\n"), probeScript)
	if err != nil {
		t.Fatalf("probe as nobody: %v\n%s", err, out)
	}
	got := map[string]access{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		flags, p, ok := strings.Cut(line, "\t")
		if !ok {
			continue
		}
		var a access
		for _, f := range strings.Fields(flags) {
			switch f {
			case "stat":
				a.stat = true
			case "list":
				a.list = true
			case "read":
				a.read = true
			case "exec":
				a.exec = true
			}
		}
		got[p] = a
	}
	return got
}

// walk lists every path under dir as root, and the directories of the
// overlay mounts under it (their lower, upper and work dirs), which
// /proc/self/mountinfo shows every user.
func walk(t *testing.T, dir string) (paths, overlays []string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			paths = append(paths, p)
		}
		return nil
	})
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 || !strings.HasPrefix(fields[4], dir) || !strings.Contains(line, " - overlay ") {
			continue
		}
		for _, opt := range strings.Split(fields[len(fields)-1], ",") {
			key, val, _ := strings.Cut(opt, "=")
			switch key {
			case "lowerdir", "upperdir", "workdir":
				for _, d := range strings.Split(val, ":") {
					overlays = append(overlays, d)
					paths = append(paths, d, filepath.Join(d, "busybox-suid"), filepath.Join(d, "secret"), filepath.Join(d, "bin", "busybox"))
				}
			}
		}
		// The merged tree: what the workload sees.
		overlays = append(overlays, fields[4])
		paths = append(paths, filepath.Join(fields[4], "busybox-suid"), filepath.Join(fields[4], "secret"))
	}
	return paths, overlays
}

// allowedReach is what nobody may do with a path under the data dir: learn
// that it exists (a search-only directory on the way lets it stat what it
// names), never list, open or run anything; and of the image store and
// the overlays not even that below their top.
func allowedReach(dataDir string, overlays []string, p string, a access) bool {
	rel, err := filepath.Rel(dataDir, p)
	if err != nil || strings.HasPrefix(rel, "..") {
		return false
	}
	if a.list || a.read || a.exec {
		return false
	}
	if strings.HasPrefix(rel, "images"+string(filepath.Separator)) {
		return false
	}
	for _, o := range overlays {
		if p == o || strings.HasPrefix(p, o+string(filepath.Separator)) {
			return false
		}
	}
	return true
}

// checkUnreachable walks the data dir as root and tries every path as
// nobody.
func checkUnreachable(t *testing.T, dataDir string, skip func(rel string) bool) {
	t.Helper()
	// The test proves nothing unless nobody could get to the data dir.
	if got := probe(t, []string{dataDir}); !got[dataDir].stat {
		t.Fatalf("nobody cannot even reach %s: the test would prove nothing", dataDir)
	}
	paths, overlays := walk(t, dataDir)
	if len(overlays) == 0 {
		t.Error("no overlay is mounted under the data dir: the test would not look at one")
	}
	reached := probe(t, paths)
	var bad []string
	skipped := 0
	for _, p := range paths {
		a, ok := reached[p]
		if !ok || allowedReach(dataDir, overlays, p, a) {
			continue
		}
		if rel, _ := filepath.Rel(dataDir, p); skip != nil && skip(rel) {
			skipped++
			continue
		}
		bad = append(bad, fmt.Sprintf("%s (%s)", p, a))
	}
	t.Logf("probed %d paths under %s as nobody; %d outside this test's scope", len(paths), dataDir, skipped)
	if len(bad) > 0 {
		sort.Strings(bad)
		if len(bad) > 40 {
			bad = append(bad[:40], fmt.Sprintf("... and %d more", len(bad)-40))
		}
		t.Errorf("nobody reaches %d paths under the data dir:\n%s", len(bad), strings.Join(bad, "\n"))
	}
}

// checkSetuidNotRunnable runs the image's setuid-root busybox as nobody
// by every path the data dir has to it: none may start, let alone as root.
func checkSetuidNotRunnable(t *testing.T, dataDir string) {
	t.Helper()
	var suids []string
	paths, _ := walk(t, dataDir)
	for _, p := range paths {
		if filepath.Base(p) == "busybox-suid" {
			if fi, err := os.Stat(p); err == nil && fi.Mode()&fs.ModeSetuid != 0 {
				suids = append(suids, p)
			}
		}
	}
	if len(suids) == 0 {
		t.Fatal("found no setuid binary of the image under the data dir: the test would prove nothing")
	}
	for _, p := range suids {
		out, err := asNobody(t, nil, `exec "$1" id -u`, p)
		if err == nil || strings.TrimSpace(out) == "0" {
			t.Errorf("nobody ran the image's setuid-root %s: %q, %v", p, out, err)
			continue
		}
		t.Logf("nobody runs %s: %s", p, strings.TrimSpace(out))
	}
}

// TestImageTreesUnreachable (issue 15, item 1): with containers running
// from an image that holds a setuid-root binary and a private file, no
// path under the data dir that leads into an image tree, an overlay or a
// workload's files can be opened, listed or executed by the unprivileged
// host user nobody, nor its setuid binary run; the containers, one of them
// as an unprivileged user, still read their image.
func TestImageTreesUnreachable(t *testing.T) {
	requireRunc(t)
	dataDir := reachableDataDir(t)
	c, _ := serve(t, testConfig(t, dataDir, "127.0.0.1:0"))
	importBusybox(t, c)
	importSecretImages(t, c)
	ctx := context.Background()

	// Workloads read their image, as root and as nobody.
	for _, ref := range []string{secretImage, secretImageNobody} {
		w, out, _ := run(t, c, api.WorkloadSpec{Image: ref, Command: []string{"sh", "-c", "cat /secret; id -u"}})
		if exitCode(w) != 0 || !strings.HasPrefix(out, secretText) {
			t.Errorf("%s: exit %d, %q (%s)", ref, exitCode(w), out, w.Error)
		}
	}
	// One keeps running, so its overlay is mounted while we look.
	sub, err := c.Submit(ctx, sh("echo running; sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, sub.ID)
	held, err := c.Submit(ctx, api.WorkloadSpec{Image: secretImageNobody, Command: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, held.ID)

	checkUnreachable(t, dataDir, nil)
	checkSetuidNotRunnable(t, dataDir)
}

// TestImageTreesUnreachableWithVMs runs the same check with a VM running
// from the image (its root disk built from the unpacked tree) next to a
// container: nothing of either, the VM driver's directories included, is
// reachable by another host user, while QEMU (its group) boots the VM.
func TestImageTreesUnreachableWithVMs(t *testing.T) {
	requireLibvirt(t)
	dataDir := filepath.Join(vmDataDir(t), "data")
	if err := os.Chmod(filepath.Dir(dataDir), 0o755); err != nil {
		t.Fatal(err)
	}
	c, _ := serve(t, withVMs(t, testConfig(t, dataDir, "127.0.0.1:0")))
	importSecretImages(t, c)
	ctx := context.Background()
	vm, err := c.Submit(ctx, api.WorkloadSpec{Image: secretImage, Isolation: api.IsolationVM, Command: []string{"sh", "-c", "cat /secret; sleep 1000"}, Resources: api.Resources{MemoryMB: 128}})
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, vm.ID)
	ctr, err := c.Submit(ctx, api.WorkloadSpec{Image: secretImage, Command: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, ctr.ID)

	// The VM driver's directories (disks, config disks with the command
	// and environment, the image's root disk) are QEMU's group's alone.
	checkUnreachable(t, dataDir, nil)
	checkSetuidNotRunnable(t, dataDir)
}

// TestRegistriesThroughTheAPI (issue 15, item 4): what a submitter sees of
// the registry rules, through the API: a loopback registry not listed is
// refused naming the key; a registry's 401 and 403 are their own reasons,
// never the agent's 401/403 nor audited as refused API requests; and no
// byte of a registry's answer reaches the problem.
func TestRegistriesThroughTheAPI(t *testing.T) {
	requireRunc(t)
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	open := testimage.StartRegistry(t)
	if _, err := testimage.Push(ctx, open, "team/busybox:1", img); err != nil {
		t.Fatal(err)
	}
	const leak = "LOCAL-SERVICE-ANSWER"
	refusing := func(status int) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(status)
			io.WriteString(w, strings.Repeat(leak, 1000))
		}))
		t.Cleanup(srv.Close)
		return strings.TrimPrefix(srv.URL, "http://")
	}
	unauthorized, forbidden, failing := refusing(http.StatusUnauthorized), refusing(http.StatusForbidden), refusing(http.StatusInternalServerError)

	auditFile := filepath.Join(t.TempDir(), "audit.log")
	cfg := testConfig(t, t.TempDir(), "127.0.0.1:0")
	cfg.Audit.File = auditFile
	cfg.Images.InsecureRegistries = []string{unauthorized, forbidden, failing}
	c, _ := serve(t, cfg)

	_, err = c.PullImage(ctx, open+"/team/busybox:1")
	var p *api.Problem
	if !errors.As(err, &p) || p.Reason != api.ReasonDenied || !strings.Contains(p.Detail, "images.insecure_registries") {
		t.Errorf("pull from an unlisted loopback registry: %v, want %s naming images.insecure_registries", err, api.ReasonDenied)
	}
	for _, tc := range []struct {
		host, reason string
	}{
		{unauthorized, "registry_unauthorized"},
		{forbidden, "registry_forbidden"},
		{failing, api.ReasonUnavailable},
	} {
		_, err := c.PullImage(ctx, tc.host+"/team/private:1")
		var p *api.Problem
		if !errors.As(err, &p) || p.Reason != tc.reason {
			t.Errorf("pull from %s: %v, want reason %s", tc.host, err, tc.reason)
			continue
		}
		t.Logf("%d %s: %s", p.Status, p.Reason, p.Detail)
		if p.Status == http.StatusUnauthorized || p.Status == http.StatusForbidden {
			t.Errorf("a registry's refusal became the agent's own %d", p.Status)
		}
		if strings.Contains(p.Detail, leak) || strings.Contains(p.Title, leak) {
			t.Errorf("the problem carries the registry's answer: %s", p.Detail)
		}
	}
	audit, err := os.ReadFile(auditFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(audit), "\n") {
		if strings.Contains(line, "api request refused") && (strings.Contains(line, unauthorized) || strings.Contains(line, forbidden)) {
			t.Errorf("a registry's refusal was audited as a refused API request: %s", line)
		}
		if strings.Contains(line, leak) {
			t.Errorf("the audit log carries the registry's answer: %s", line)
		}
	}
}

// TestImageBudgetsThroughTheAPI (issue 15, item 2, the image part): an
// image over images.max_unpacked_bytes and anything under the free-space
// floor are refused with resource_exhausted naming the key, and leave no
// image behind.
func TestImageBudgetsThroughTheAPI(t *testing.T) {
	requireRunc(t)
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	var archive bytes.Buffer
	if err := ociimage.WriteOCIArchive(&archive, img, testImage); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		set  func(*config.Config)
		key  string
	}{
		{"unpacked bytes", func(c *config.Config) { c.Images.MaxUnpackedBytes = 64 << 10 }, "images.max_unpacked_bytes"},
		{"entries", func(c *config.Config) { c.Images.MaxEntries = 10 }, "images.max_entries"},
		{"free-space floor", func(c *config.Config) { c.Storage.MinFreeBytes = 1 << 62 }, "storage.min_free_bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, t.TempDir(), "127.0.0.1:0")
			tc.set(cfg)
			c, _ := serve(t, cfg)
			_, err := c.ImportImage(context.Background(), bytes.NewReader(archive.Bytes()), "")
			var p *api.Problem
			if !errors.As(err, &p) || p.Reason != api.ReasonResourceExhausted || !strings.Contains(p.Detail, tc.key) {
				t.Fatalf("import: %v, want %s naming %s", err, api.ReasonResourceExhausted, tc.key)
			}
			t.Log(p.Detail)
			if imgs, err := c.Images(context.Background()); err != nil || len(imgs) != 0 {
				t.Errorf("images after the refusal: %+v, %v", imgs, err)
			}
		})
	}
}

// TestImageConfigValidation: a bad registry pattern or a negative budget
// names its key.
func TestImageConfigValidation(t *testing.T) {
	for body, key := range map[string]string{
		"images:\n  insecure_registries: [\"http://127.0.0.1:5000\"]\n": "images.insecure_registries[0]",
		"images:\n  allowed_registries: [\"ok.io\", \"a.*.io\"]\n":      "images.allowed_registries[1]",
		"images:\n  max_unpacked_bytes: -1\n":                           "images.max_unpacked_bytes",
		"images:\n  max_entries: -5\n":                                  "images.max_entries",
		"storage:\n  min_free_bytes: -1\n":                              "storage.min_free_bytes",
	} {
		file := filepath.Join(t.TempDir(), "berth.yaml")
		if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(file, nil)
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("config %q: %v, want an error naming %s", body, err, key)
		}
	}
}
