package initramfs

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/berthd/berth/errdefs"
)

// DefaultModules are the drivers berth-init needs, for a kernel that builds
// them as modules (Debian's does; built-in ones are skipped). Their
// dependencies come from the kernel's own depmod indexes, not from this
// list.
var DefaultModules = []string{
	"virtio_pci",     // the PCI transport of every virtio device (q35 and pc machines)
	"virtio_blk",     // the root and config disks
	"virtio_console", // virtio-serial: the stdout, stderr and status ports
	"ext4",           // the root filesystem; its crc32c soft dependency comes along
	"button",         // the ACPI power button the host presses to stop the workload
	"evdev",          // /dev/input/event*, through which berth-init reads the button
	"virtio_net",     // the NIC on the node bridge (net_failover and failover come along)
}

// DefaultVolumeModules are the volume transports' drivers: virtio-fs
// (fuse comes along) and 9p over virtio. berth-init loads them only for a
// task with volumes.
var DefaultVolumeModules = []string{"virtiofs", "9p", "9pnet_virtio"}

// Module is one kernel module to load.
type Module struct {
	// Name is the module's canonical name (underscores, no suffix).
	Name string
	// Path is the module file relative to the modules directory, as depmod
	// lists it (kernel/fs/ext4/ext4.ko; possibly compressed).
	Path string
	// CPU are the CPU modalias patterns of the module's "cpu:" aliases in
	// modules.alias: a driver for a CPU feature is only for CPUs matching
	// one of them. Empty: any CPU.
	CPU []string
}

// ModuleName canonicalizes a module name or file name: the kernel treats
// '-' and '_' in module names alike and reports them with underscores.
func ModuleName(s string) string {
	s = path.Base(s)
	for _, ext := range []string{".gz", ".xz", ".zst"} {
		s = strings.TrimSuffix(s, ext)
	}
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// modIndex is what Resolve needs from depmod's output.
type modIndex struct {
	path    map[string]string   // name -> file, relative to the modules dir
	deps    map[string][]string // name -> names it needs (modules.dep)
	builtin map[string]bool     // modules.builtin
	softPre map[string][]string // name -> "pre:" soft dependencies (modules.softdep)
	aliases [][2]string         // pattern, module (modules.alias)
	cpu     map[string][]string // name -> its "cpu:" alias patterns
}

func loadIndex(modulesDir string) (*modIndex, error) {
	idx := &modIndex{
		path:    map[string]string{},
		deps:    map[string][]string{},
		builtin: map[string]bool{},
		softPre: map[string][]string{},
		cpu:     map[string][]string{},
	}
	err := scanLines(filepath.Join(modulesDir, "modules.dep"), true, func(line string) {
		file, deps, ok := strings.Cut(line, ":")
		if !ok {
			return
		}
		name := ModuleName(file)
		idx.path[name] = file
		for _, d := range strings.Fields(deps) {
			idx.deps[name] = append(idx.deps[name], ModuleName(d))
		}
	})
	if err != nil {
		return nil, err
	}
	// The other indexes are optional: a kernel without built-in modules,
	// soft dependencies or aliases has none to honour.
	if err := scanLines(filepath.Join(modulesDir, "modules.builtin"), false, func(line string) {
		idx.builtin[ModuleName(line)] = true
	}); err != nil {
		return nil, err
	}
	if err := scanLines(filepath.Join(modulesDir, "modules.softdep"), false, func(line string) {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "softdep" {
			return
		}
		name, pre := ModuleName(f[1]), false
		for _, tok := range f[2:] {
			switch tok {
			case "pre:":
				pre = true
			case "post:":
				pre = false
			default:
				if pre {
					idx.softPre[name] = append(idx.softPre[name], tok)
				}
			}
		}
	}); err != nil {
		return nil, err
	}
	if err := scanLines(filepath.Join(modulesDir, "modules.alias"), false, func(line string) {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "alias" {
			name := ModuleName(f[2])
			idx.aliases = append(idx.aliases, [2]string{f[1], name})
			if strings.HasPrefix(f[1], "cpu:") {
				idx.cpu[name] = append(idx.cpu[name], f[1])
			}
		}
	}); err != nil {
		return nil, err
	}
	return idx, nil
}

func scanLines(file string, required bool, fn func(string)) error {
	f, err := os.Open(file)
	if err != nil {
		if !required && os.IsNotExist(err) {
			return nil
		}
		return fmt.Errorf("read module index: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "#") {
			fn(line)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", file, err)
	}
	return nil
}

// providers resolves a soft dependency, which names a module or an alias
// ("crypto-crc32c"), to the modules that provide it, in modules.alias order.
func (idx *modIndex) providers(name string) []string {
	if n := ModuleName(name); idx.path[n] != "" || idx.builtin[n] {
		return []string{n}
	}
	var out []string
	for _, a := range idx.aliases {
		ok := a[0] == name
		if !ok && strings.ContainsAny(a[0], "*?[") {
			ok, _ = path.Match(a[0], name)
		}
		if ok {
			out = append(out, a[1])
		}
	}
	return out
}

// Resolve returns the modules to load for names, with everything they
// need, each after its dependencies: hard ones from modules.dep and "pre:"
// soft ones from modules.softdep, which is how ext4 asks for crc32c without
// linking to it. A soft dependency on an alias brings every provider (for
// crc32c both the generic and the SSE4.2 implementation), since the guest's
// CPU is not known here; a module for a CPU feature carries its "cpu:"
// aliases (Module.CPU), and berth-init loads it only on a CPU that has the
// feature. Built-in modules are skipped; an unknown name is an error.
func Resolve(modulesDir string, names []string) ([]Module, error) {
	idx, err := loadIndex(modulesDir)
	if err != nil {
		return nil, err
	}
	var (
		out   []Module
		state = map[string]int{} // 1: visiting, 2: done
		visit func(name string, soft bool, chain []string) error
	)
	visit = func(name string, soft bool, chain []string) error {
		switch {
		case idx.builtin[name], state[name] == 2:
			return nil
		case state[name] == 1 && soft:
			return nil // a soft dependency only orders loading; a loop in them is no error
		case state[name] == 1:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(chain, " -> "), name)
		}
		file, ok := idx.path[name]
		if !ok {
			if soft {
				return nil // as modprobe: a missing soft dependency is not fatal
			}
			return fmt.Errorf("kernel module %q not found in %s (nor built in): %w", name, modulesDir, errdefs.ErrNotFound)
		}
		state[name] = 1
		chain = append(chain, name)
		for _, s := range idx.softPre[name] {
			for _, p := range idx.providers(s) {
				if err := visit(p, true, chain); err != nil {
					return err
				}
			}
		}
		for _, d := range idx.deps[name] {
			if err := visit(d, false, chain); err != nil {
				return err
			}
		}
		state[name] = 2
		out = append(out, Module{Name: name, Path: file, CPU: idx.cpu[name]})
		return nil
	}
	for _, n := range names {
		if err := visit(ModuleName(n), false, nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// readModule returns a module file's content, uncompressed: finit_module in
// the guest loads plain ELF objects. gzip is undone here; xz and zstd would
// need decoders berth does not carry, so they fail clearly instead.
func readModule(modulesDir string, m Module) ([]byte, error) {
	data, err := os.ReadFile(filepath.Join(modulesDir, m.Path))
	if err != nil {
		return nil, fmt.Errorf("read module %s: %w", m.Name, err)
	}
	switch {
	case strings.HasSuffix(m.Path, ".ko"):
		return data, nil
	case strings.HasSuffix(m.Path, ".ko.gz"):
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("decompress module %s: %w", m.Path, err)
		}
		out, err := io.ReadAll(zr)
		if err != nil {
			return nil, fmt.Errorf("decompress module %s: %w", m.Path, err)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("module %s is compressed in a format berth cannot unpack (only .ko and .ko.gz are supported; rebuild the kernel with CONFIG_MODULE_COMPRESS_NONE or GZIP): %w",
			m.Path, errdefs.ErrNotImplemented)
	}
}
