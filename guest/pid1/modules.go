//go:build linux

package pid1

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// readModuleList parses the module list: one path per line; blank lines and
// #-comments are skipped.
func readModuleList(r io.Reader) ([]string, error) {
	var paths []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		paths = append(paths, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read module list: %w", err)
	}
	return paths, nil
}

// loadModules loads every module of the list in order with load. A module
// that is already loaded is fine. One that reports ENODEV is skipped: that is
// a driver for hardware this guest lacks, such as crc32c-intel on a CPU
// without SSE4.2 (TCG), listed because the same initramfs also serves KVM
// guests; warn is told about it.
func loadModules(listPath string, load func(path string) error, warn func(string)) error {
	f, err := os.Open(listPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a kernel with everything built in needs no list
	}
	if err != nil {
		return fmt.Errorf("open module list: %w", err)
	}
	defer f.Close()
	paths, err := readModuleList(f)
	if err != nil {
		return err
	}
	for _, p := range paths {
		err := load(p)
		switch {
		case err == nil, errors.Is(err, unix.EEXIST):
		case errors.Is(err, unix.ENODEV):
			warn(fmt.Sprintf("module %s: no device for it, skipped", p))
		default:
			return fmt.Errorf("load module %s: %w", p, err)
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
