//go:build linux

package pid1

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// listedModule is one line of a module list: a module file and the CPU
// modalias patterns it is for (none: any CPU).
type listedModule struct {
	path string
	cpu  []string
}

// readModuleList parses the module list: one path per line, each perhaps
// followed by CPU modalias patterns; blank lines and #-comments are
// skipped.
func readModuleList(r io.Reader) ([]listedModule, error) {
	var mods []listedModule
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		mods = append(mods, listedModule{path: f[0], cpu: f[1:]})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read module list: %w", err)
	}
	return mods, nil
}

// cpuModaliasPath is the CPU's modalias, as udev matches it against the
// modules' "cpu:" aliases.
const cpuModaliasPath = "/sys/devices/system/cpu/modalias"

// forCPU reports whether a module for the CPUs matching patterns is for the
// CPU whose modalias is cpu: a module for any CPU (no patterns) is, and so
// is every module when the CPU's modalias could not be read (the kernel
// then decides, refusing with ENODEV).
func forCPU(patterns []string, cpu string) bool {
	if len(patterns) == 0 || cpu == "" {
		return true
	}
	for _, p := range patterns {
		if ok, err := path.Match(p, cpu); ok || err != nil {
			return true
		}
	}
	return false
}

// loadModules loads every module of the list in order with load. A module
// for CPU features this guest's CPU lacks (crc32c-intel without SSE4.2, as
// under TCG) is skipped without loading: the same initramfs serves KVM
// guests, which have them. A module that is already loaded is fine. One
// that reports ENODEV is skipped: that is a driver for hardware this guest
// lacks; warn is told about it.
func loadModules(listPath, cpuModalias string, load func(path string) error, warn func(string)) error {
	f, err := os.Open(listPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a kernel with everything built in needs no list
	}
	if err != nil {
		return fmt.Errorf("open module list: %w", err)
	}
	defer f.Close()
	mods, err := readModuleList(f)
	if err != nil {
		return err
	}
	var cpu string
	if b, err := os.ReadFile(cpuModalias); err == nil {
		cpu = strings.TrimSpace(string(b))
	}
	for _, m := range mods {
		if !forCPU(m.cpu, cpu) {
			continue
		}
		err := load(m.path)
		switch {
		case err == nil, errors.Is(err, unix.EEXIST):
		case errors.Is(err, unix.ENODEV):
			warn(fmt.Sprintf("module %s: no device for it, skipped", m.path))
		default:
			return fmt.Errorf("load module %s: %w", m.path, err)
		}
	}
	return nil
}

// finitModule loads one module file into the kernel. finit_module lets the
// kernel read the file itself, so the module never has to be copied through
// user memory.
func finitModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil {
		return err
	}
	return nil
}
