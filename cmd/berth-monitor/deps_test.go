package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// deps lists the packages a main package links.
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gobin, "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	return strings.Fields(string(out))
}

// The monitor runs once per workload: it links the standard library,
// x/sys and berth's few small helpers, never libvirt, CEL, the registry
// client, CNI, cgroups libraries or the CLI.
func TestMonitorLinksNothingHeavy(t *testing.T) {
	for _, d := range deps(t, "github.com/berthd/berth/cmd/berth-monitor") {
		if !strings.Contains(d, ".") {
			continue // the standard library
		}
		switch {
		case strings.HasPrefix(d, "golang.org/x/sys/"),
			strings.HasPrefix(d, "github.com/berthd/berth/supervisor/monitor"),
			strings.HasPrefix(d, "github.com/berthd/berth/internal/fileutil"),
			strings.HasPrefix(d, "github.com/berthd/berth/internal/proc"),
			d == "github.com/berthd/berth/internal/attachio",
			d == "github.com/berthd/berth/internal/ptyio",
			d == "github.com/berthd/berth/cmd/berth-monitor",
			strings.HasPrefix(d, "vendor/"):
		default:
			t.Errorf("berth-monitor links %s", d)
		}
	}
}

// testOnlyModules are what the tests use and nothing that ships may link:
// the OpenAPI validator, the client generator, the browser driver.
var testOnlyModules = []string{"github.com/getkin/kin-openapi/", "github.com/oapi-codegen/", "github.com/chromedp/"}

// What ships (the agent and CLI, the monitor, the guest init, the demo
// image builder, the bench) depends on no test-only package.
func TestShippedBinariesLinkNoTestCode(t *testing.T) {
	for _, pkg := range []string{"./cmd/berth", "./cmd/berth-monitor", "./cmd/berth-init", "./hack/mkimage", "./bench/cmd/berth-bench"} {
		for _, d := range deps(t, "github.com/berthd/berth/"+strings.TrimPrefix(pkg, "./")) {
			for _, m := range testOnlyModules {
				if strings.HasPrefix(d, m) {
					t.Errorf("%s links the test-only package %s", pkg, d)
				}
			}
			if !strings.HasPrefix(d, "github.com/berthd/berth/") && d != "testing" {
				continue // the standard library's own internals are its business
			}
			if d == "testing" || strings.HasSuffix(d, "test") || strings.Contains(d, "/internal/testimage") || strings.HasSuffix(d, "/fake") {
				t.Errorf("%s links the test-only package %s", pkg, d)
			}
		}
	}
}
