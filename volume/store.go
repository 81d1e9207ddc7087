// Package volume is berth's store of named volumes and the host side of
// every volume a workload mounts: named volumes under the data directory
// (a plain directory, or a filesystem of its own when sized), operator
// allowed host directories resolved without leaving them, and the
// per-workload staging mounts both drivers take their sources from.
//
// Everything lives under one root (<data_dir>/volumes, 0700): a
// directory per volume holding its record (volume.json), its data
// (data/) and, for a sized volume, its filesystem image (disk.ext4),
// loop-mounted on data/; and mounts/<workload>/<n>, the staged mounts of
// each workload.
package volume

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
)

// recordVersion is the version of volume.json.
const recordVersion = 1

// Volume is a named volume's record, as the store keeps it on disk.
type Volume struct {
	Version int    `json:"version"`
	ID      string `json:"id"`
	Name    string `json:"name"`
	Tenant  string `json:"tenant,omitempty"`
	// SizeBytes is zero for a plain directory.
	SizeBytes int64             `json:"size_bytes,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	CreatedAt time.Time         `json:"created_at"`
}

// Ref is TENANT/NAME, or NAME in the node's own namespace.
func (v *Volume) Ref() string { return ref(v.Tenant, v.Name) }

func ref(tenant, name string) string {
	if tenant == "" {
		return name
	}
	return tenant + "/" + name
}

// Limits of a volume.
const (
	// MinSizeBytes is the smallest sized volume: ext4's journal and
	// metadata need a few MiB before any data fits.
	MinSizeBytes = 8 << 20
	maxNameLen   = 63
	maxLabels    = 64
)

var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$`)

// Options configure a Store.
type Options struct {
	// Root is the store's directory (<data_dir>/volumes).
	Root string
	// DataDir is the agent's data directory, which no host path may
	// expose.
	DataDir string
	// HostPaths are the directories under which workloads may mount host
	// paths (volumes.host_paths).
	HostPaths []string
	// MinFreeBytes is the free space the data directory's filesystem
	// keeps: a sized volume that would go below it is refused.
	MinFreeBytes int64
	// ShareGID, when not 0, is the group (QEMU's) that may pass
	// through to staged mounts: 9p is served by QEMU itself, as its
	// unprivileged user. The store's root is then 0711 (each volume's
	// directory stays 0700) and the staging directories 0710 to it.
	// 0 (the default, and with virtio-fs, whose virtiofsd runs
	// as root): root alone.
	ShareGID int
	Logger   *slog.Logger
	// OnPurge, when set, is called before a removed volume's files are
	// deleted (tests: what the caller holds meanwhile).
	OnPurge func(dir string)
}

// Store holds the node's named volumes.
type Store struct {
	opts  Options
	guard *guard
	log   *slog.Logger
	mu    sync.Mutex
	vols  map[string]*Volume // by Ref
	// staging serializes staging and releasing of workloads' mounts.
	staging sync.Mutex
}

// Open opens (creating) the store at opts.Root, mounts every sized
// volume that is not mounted (after a reboot) and removes what a crash
// left half made.
func Open(opts Options) (*Store, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	rootMode := os.FileMode(0o700)
	if opts.ShareGID > 0 {
		rootMode = 0o711
	}
	if err := os.MkdirAll(opts.Root, rootMode); err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	if err := os.Chmod(opts.Root, rootMode); err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(opts.Root, mountsDir), 0o700); err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	if err := shareDir(filepath.Join(opts.Root, mountsDir), opts.ShareGID); err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	g, err := newGuard(opts.DataDir)
	if err != nil {
		return nil, err
	}
	if err := checkAllowlist(opts.HostPaths, g); err != nil {
		return nil, err
	}
	s := &Store{opts: opts, guard: g, log: opts.Logger, vols: map[string]*Volume{}}
	entries, err := os.ReadDir(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("volume store: %w", err)
	}
	for _, e := range entries {
		if e.Name() == mountsDir || !e.IsDir() {
			continue
		}
		dir := filepath.Join(opts.Root, e.Name())
		if isTrash(e.Name()) {
			// A removed volume whose files a crash left.
			s.log.Info("delete the files of a removed volume", "dir", dir)
			if err := s.removeDir(dir); err != nil {
				return nil, err
			}
			continue
		}
		var v Volume
		if err := fileutil.ReadJSON(filepath.Join(dir, recordFile), &v); err != nil {
			// No record: a create that did not finish. Nobody was told
			// the volume exists, so it goes.
			s.log.Warn("remove a volume whose create did not finish", "dir", dir, "err", err)
			if err := s.removeDir(dir); err != nil {
				return nil, err
			}
			continue
		}
		if v.Version != recordVersion || v.ID != e.Name() {
			return nil, fmt.Errorf("volume record %s: version %d id %q is not one this berth reads", dir, v.Version, v.ID)
		}
		if v.SizeBytes > 0 {
			if err := mountDisk(dir); err != nil {
				return nil, fmt.Errorf("volume %s: %w", v.Ref(), err)
			}
		}
		s.vols[v.Ref()] = &v
	}
	return s, nil
}

// shareDir makes dir 0710 to group gid, or 0700 root's for gid 0.
func shareDir(dir string, gid int) error {
	mode, group := os.FileMode(0o700), 0
	if gid > 0 {
		mode, group = 0o710, gid
	}
	if err := os.Chown(dir, 0, group); err != nil {
		return err
	}
	return os.Chmod(dir, mode)
}

const (
	recordFile = "volume.json"
	dataDir    = "data"
	diskFile   = "disk.ext4"
	mountsDir  = "mounts"
)

func (s *Store) dir(v *Volume) string { return filepath.Join(s.opts.Root, v.ID) }

// DataPath is the directory a volume's data is in.
func (s *Store) DataPath(v *Volume) string { return filepath.Join(s.dir(v), dataDir) }

// CheckSpec validates a volume's name, size and labels, naming the
// offending fields.
func CheckSpec(name string, size int64, labels map[string]string) error {
	verr := &errdefs.ValidationError{}
	if name == "" || len(name) > maxNameLen || !nameRE.MatchString(name) {
		verr.Add("name", "%q is not a volume name: lower-case letters, digits, '-', '_' and '.', at most %d characters, starting and ending with a letter or digit", name, maxNameLen)
	}
	if size != 0 && size < MinSizeBytes {
		verr.Add("size_bytes", "%d bytes is too small for a filesystem of its own; at least %d (8 MiB), or 0 for a plain directory", size, MinSizeBytes)
	}
	if len(labels) > maxLabels {
		verr.Add("labels", "%d labels; at most %d", len(labels), maxLabels)
	}
	return verr.Err()
}

// Create makes a volume. A volume of that name in the tenant with the same
// size and labels is returned as it is (created false): a retry. With
// another size or labels it is ErrAlreadyExists.
func (s *Store) Create(tenant, name string, size int64, labels map[string]string) (*Volume, bool, error) {
	if err := CheckSpec(name, size, labels); err != nil {
		return nil, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if v, ok := s.vols[ref(tenant, name)]; ok {
		if v.SizeBytes == size && maps.Equal(v.Labels, labels) {
			return clone(v), false, nil
		}
		return nil, false, fmt.Errorf("volume %q already exists with another size or labels: %w", ref(tenant, name), errdefs.ErrAlreadyExists)
	}
	if size > 0 {
		if err := s.checkFree(size); err != nil {
			return nil, false, err
		}
	}
	v := &Volume{Version: recordVersion, ID: newID(), Name: name, Tenant: tenant, SizeBytes: size,
		Labels: maps.Clone(labels), CreatedAt: time.Now().UTC()}
	dir := s.dir(v)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("create volume: %w", err)
	}
	err := os.Mkdir(filepath.Join(dir, dataDir), 0o755)
	if err == nil && size > 0 {
		err = makeDisk(dir, size)
	}
	if err == nil {
		// The record last: a volume without one is a create that did
		// not finish, and the next Open removes it.
		err = fileutil.WriteJSON(filepath.Join(dir, recordFile), v)
	}
	if err != nil {
		if rerr := s.removeDir(dir); rerr != nil {
			s.log.Warn("remove a volume that was not created", "dir", dir, "err", rerr)
		}
		return nil, false, fmt.Errorf("create volume %s: %w", v.Ref(), err)
	}
	s.vols[v.Ref()] = v
	s.log.Info("volume created", "volume", v.Ref(), "id", v.ID, "size_bytes", size)
	return clone(v), true, nil
}

// checkFree refuses a reservation that would take the data directory's
// filesystem below its free-space floor.
func (s *Store) checkFree(size int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(s.opts.Root, &st); err != nil {
		return fmt.Errorf("free space of %s: %w", s.opts.Root, err)
	}
	free := int64(st.Bavail) * st.Bsize
	if free-size < s.opts.MinFreeBytes {
		return fmt.Errorf("a volume of %d bytes does not fit: %d bytes free, and storage.min_free_bytes keeps %d: %w",
			size, free, s.opts.MinFreeBytes, errdefs.ErrResourceExhausted)
	}
	return nil
}

// Get returns the volume NAME of tenant.
func (s *Store) Get(tenant, name string) (*Volume, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vols[ref(tenant, name)]
	if !ok {
		return nil, fmt.Errorf("volume %q: %w", ref(tenant, name), errdefs.ErrNotFound)
	}
	return clone(v), nil
}

// List returns every volume, by tenant and name.
func (s *Store) List() []*Volume {
	s.mu.Lock()
	out := make([]*Volume, 0, len(s.vols))
	for _, v := range s.vols {
		out = append(out, clone(v))
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Ref() < out[j].Ref() })
	return out
}

// Remove deletes a volume and its data (Detach, then Purge). The caller
// has made sure no workload holds it.
func (s *Store) Remove(tenant, name string) error {
	trash, err := s.Detach(tenant, name)
	if err != nil {
		return err
	}
	return s.Purge(trash)
}

// removeDir unmounts a volume's filesystem, if any, and removes its
// directory.
func (s *Store) removeDir(dir string) error {
	if err := unmountAll(filepath.Join(dir, dataDir)); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

func clone(v *Volume) *Volume {
	c := *v
	c.Labels = maps.Clone(v.Labels)
	return &c
}

func newID() string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}
