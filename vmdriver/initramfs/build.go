package initramfs

import (
	"bufio"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/pierrec/lz4/v4"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/fileutil"
)

// formatVersion is part of every cache key: bump it whenever the archive's
// layout changes, so old cached archives are not reused.
const formatVersion = "berth-initramfs/2"

// Options says what goes into an initramfs.
type Options struct {
	// Kernel is the kernel the initramfs is for; its modules are taken from
	// Kernel.ModulesDir.
	Kernel Kernel
	// InitPath is the berth-init binary (static), installed as /init.
	InitPath string
	// Modules are module names to include with their dependencies; nil
	// means DefaultModules.
	Modules []string
	// VolumeModules are loaded by berth-init only for a task with volumes
	// (guest.VolumeModuleListPath); nil means DefaultVolumeModules.
	VolumeModules []string
	// CacheDir holds built archives, named by the hash of their inputs.
	CacheDir string
}

// Build returns the path of a compressed newc initramfs (lz4 where the
// kernel reads it, else gzip: see archiveCompression) holding /init
// (the berth-init binary), the kernel modules it needs and /berth/modules
// (their load order). Archives are cached in CacheDir by a hash of
// everything that goes into them (init binary, module files and order,
// kernel release), so a second call with the same inputs returns the same
// file without rebuilding, and a changed input never reuses a stale one.
// Concurrent calls, in one process or several, build at most once per hash
// and never expose a partial file.
func Build(ctx context.Context, o Options) (string, error) {
	if o.Kernel.Release == "" || o.Kernel.ModulesDir == "" || o.InitPath == "" || o.CacheDir == "" {
		return "", fmt.Errorf("initramfs: kernel release and modules dir, init path and cache dir are required: %w", errdefs.ErrInvalidArgument)
	}
	names := o.Modules
	if names == nil {
		names = DefaultModules
	}
	mods, err := Resolve(o.Kernel.ModulesDir, names)
	if err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	volNames := o.VolumeModules
	if volNames == nil {
		volNames = DefaultVolumeModules
	}
	// A kernel without one of them still boots workloads without
	// volumes; a mount over the missing transport fails in the guest
	// with the kernel's "unknown filesystem type".
	var volMods []Module
	for _, name := range volNames {
		ms, err := Resolve(o.Kernel.ModulesDir, []string{name})
		if errors.Is(err, errdefs.ErrNotFound) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("initramfs: volume modules: %w", err)
		}
		volMods = append(volMods, ms...)
	}
	initBin, err := os.ReadFile(o.InitPath)
	if err != nil {
		return "", fmt.Errorf("initramfs: read init: %w", err)
	}

	// The archive's content is fully determined by these; reading the
	// module files to hash them costs milliseconds, rebuilding would not.
	files := make([]archiveFile, 0, len(mods))
	h := sha256.New()
	hashField(h, []byte(formatVersion))
	comp := archiveCompression(o.Kernel)
	hashField(h, []byte(comp))
	hashField(h, []byte(o.Kernel.Release))
	hashField(h, initBin)
	for _, m := range mods {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		data, err := readModule(o.Kernel.ModulesDir, m)
		if err != nil {
			return "", fmt.Errorf("initramfs: %w", err)
		}
		name := path.Join("/lib/modules", o.Kernel.Release, uncompressedPath(m.Path))
		hashField(h, []byte(name))
		hashField(h, []byte(strings.Join(m.CPU, " ")))
		hashField(h, data)
		files = append(files, archiveFile{name: name, data: data, cpu: m.CPU})
	}
	// The volume modules' files (those not already in), and their list.
	hashField(h, []byte(guest.VolumeModuleListPath))
	have := map[string]bool{}
	for _, f := range files {
		have[f.name] = true
	}
	var volList []string
	for _, m := range volMods {
		name := path.Join("/lib/modules", o.Kernel.Release, uncompressedPath(m.Path))
		if slices.Contains(volList, name) {
			continue
		}
		volList = append(volList, name)
		hashField(h, []byte(name))
		if have[name] {
			continue
		}
		data, err := readModule(o.Kernel.ModulesDir, m)
		if err != nil {
			return "", fmt.Errorf("initramfs: %w", err)
		}
		hashField(h, data)
		files = append(files, archiveFile{name: name, data: data, onDemand: true})
		have[name] = true
	}
	sum := hex.EncodeToString(h.Sum(nil))
	final := filepath.Join(o.CacheDir, "initramfs-"+sum[:32]+".cpio."+archiveSuffix[comp])

	if _, err := os.Stat(final); err == nil {
		return final, nil
	}
	if err := os.MkdirAll(o.CacheDir, 0o755); err != nil {
		return "", fmt.Errorf("initramfs: create cache dir: %w", err)
	}
	unlock, err := fileutil.Lock(ctx, final+".lock")
	if err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	defer unlock()
	if _, err := os.Stat(final); err == nil {
		return final, nil // built by whoever held the lock before us
	}
	if err := writeArchive(final, comp, initBin, files, volList); err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	return final, nil
}

type archiveFile struct {
	name string
	data []byte
	// onDemand: a volume module, listed in guest.VolumeModuleListPath
	// only.
	onDemand bool
	// cpu: the CPU modalias patterns the module is for (Module.CPU).
	cpu []string
}

// hashField hashes b with its length, so field boundaries cannot shift
// between two different input sets with the same concatenation.
func hashField(h hash.Hash, b []byte) {
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(b)))
	h.Write(n[:])
	h.Write(b)
}

// archiveSuffix names an archive's compression in its file name.
var archiveSuffix = map[Compression]string{CompressionGzip: "gz", CompressionLZ4: "lz4"}

// archiveCompression is how the initramfs for kernel k is compressed: lz4
// where the kernel's build configuration (config-<release> next to it, as
// Debian installs it) says it reads lz4 (CONFIG_RD_LZ4), else gzip, which
// every kernel reads. The guest unpacks the archive before init runs, on
// its boot's critical path: under TCG, inflating berth's 8 MB of init and
// modules from gzip takes about 150 ms of the guest's one vCPU, lz4 a
// fraction of it, for an archive a quarter larger.
func archiveCompression(k Kernel) Compression {
	f, err := os.Open(filepath.Join(filepath.Dir(k.Path), "config-"+k.Release))
	if err != nil {
		return CompressionGzip
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "CONFIG_RD_LZ4=y" {
			return CompressionLZ4
		}
	}
	return CompressionGzip
}

// compressor compresses an archive as comp: lz4 in the legacy frame
// format, the only one the kernel's unpacker reads (blocks of at most
// 8 MiB, no checksums), at the high-compression level (it costs only the
// host, once per archive; decompression is as fast at any level).
func compressor(comp Compression, w io.Writer) (io.WriteCloser, error) {
	if comp == CompressionLZ4 {
		zw := lz4.NewWriter(w)
		if err := zw.Apply(lz4.LegacyOption(true), lz4.CompressionLevelOption(lz4.Level9)); err != nil {
			return nil, fmt.Errorf("lz4 writer: %w", err)
		}
		return zw, nil
	}
	return gzip.NewWriterLevel(w, gzip.DefaultCompression)
}

func uncompressedPath(p string) string {
	return strings.TrimSuffix(p, ".gz")
}

// writeArchive writes the archive to a temporary file next to final and
// renames it into place once complete and synced.
func writeArchive(final string, comp Compression, initBin []byte, mods []archiveFile, volList []string) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(final), ".initramfs-*.tmp")
	if err != nil {
		return fmt.Errorf("create archive: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	bw := bufio.NewWriterSize(tmp, 1<<20)
	zw, err := compressor(comp, bw)
	if err != nil {
		return err
	}
	cw := newCPIOWriter(zw)

	// Directories first, parents before children: the kernel's unpacker
	// does not create missing parents.
	dirs := map[string]bool{"/dev": true, "/proc": true, "/sys": true, "/newroot": true, "/berth": true}
	for _, m := range mods {
		for d := path.Dir(m.name); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	sorted := make([]string, 0, len(dirs))
	for d := range dirs {
		sorted = append(sorted, d)
	}
	slices.Sort(sorted) // a parent is a prefix of its children, so it sorts first
	for _, d := range sorted {
		cw.Dir(d, 0o755)
	}
	// The kernel opens /dev/console as init's stdin, stdout and stderr
	// before devtmpfs is mounted; without the node init starts with none.
	cw.CharDev("/dev/console", 0o600, 5, 1)
	cw.File("/init", 0o755, initBin)
	var list strings.Builder
	for _, m := range mods {
		cw.File(m.name, 0o644, m.data)
		if !m.onDemand {
			list.WriteString(strings.Join(append([]string{m.name}, m.cpu...), " ") + "\n")
		}
	}
	cw.File(guest.ModuleListPath, 0o644, []byte(list.String()))
	cw.File(guest.VolumeModuleListPath, 0o644, []byte(strings.Join(volList, "\n")+"\n"))
	if err := cw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compress archive: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write archive: %w", err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("install archive: %w", err)
	}
	return nil
}
