// Package monitortest builds the real berth-monitor binary (and berth-entry
// next to it) once per test process, so driver and agent tests run the
// monitor that ships.
package monitortest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// envPath hands the built binary's path to child processes of the test.
const envPath = "BERTH_TEST_MONITOR"

var (
	built bool
	once  sync.Once
	path  string
	err   error
)

// Path returns the path of a berth-monitor built from this checkout. The
// binary lives in a temporary directory removed by Cleanup (call it from
// TestMain after m.Run).
func Path(tb testing.TB) string {
	tb.Helper()
	p, err := Build()
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// Build is Path for TestMain, which has no testing.TB.
func Build() (string, error) {
	once.Do(func() {
		// A test binary re-run as an agent process inherits its parent's.
		if p := os.Getenv(envPath); p != "" {
			path = p
			return
		}
		var dir string
		dir, err = os.MkdirTemp("", "berth-monitor-")
		if err != nil {
			return
		}
		path = filepath.Join(dir, "berth-monitor")
		gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, serr := os.Stat(gobin); serr != nil {
			gobin = "go"
		}
		cmd := exec.Command(gobin, "build", "-trimpath", "-o", path, "github.com/berthd/berth/cmd/berth-monitor")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, berr := cmd.CombinedOutput()
		if berr != nil {
			err = fmt.Errorf("build berth-monitor: %v: %s", berr, strings.TrimSpace(string(out)))
			return
		}
		// berth-entry goes next to it, where the container driver looks.
		_, self, _, _ := runtime.Caller(0)
		script := filepath.Join(filepath.Dir(self), "..", "..", "cmd", "berth-entry", "build.sh")
		if out, berr := exec.Command(script, filepath.Join(dir, "berth-entry")).CombinedOutput(); berr != nil {
			err = fmt.Errorf("build berth-entry: %v: %s", berr, strings.TrimSpace(string(out)))
			return
		}
		os.Setenv(envPath, path)
		built = true
	})
	return path, err
}

// Cleanup removes the built binary.
func Cleanup() {
	if built {
		os.RemoveAll(filepath.Dir(path))
	}
}
