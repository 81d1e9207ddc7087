//go:build linux

package main

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestRefusesOutsideVM runs main in a child process (not PID 1): it must
// refuse before touching anything, since as root on a host it would mount,
// kill every process and power the machine off.
func TestRefusesOutsideVM(t *testing.T) {
	if os.Getenv("BERTH_INIT_RUN_MAIN") == "1" {
		main()
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestRefusesOutsideVM$")
	cmd.Env = append(os.Environ(), "BERTH_INIT_RUN_MAIN=1")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("berth-init outside a VM: %v, want exit status 2\n%s", err, out)
	}
	if !strings.Contains(string(out), "must run as PID 1") {
		t.Errorf("output %q does not say why", out)
	}
}
