package image

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
)

// Image is a stored image.
type Image struct {
	Ref       string    `json:"ref"`        // normalized reference, see Normalize
	Digest    string    `json:"digest"`     // manifest digest, "sha256:<hex>"
	Size      int64     `json:"size"`       // bytes stored: manifest, config and compressed layers
	CreatedAt time.Time `json:"created_at"` // when this node stored this digest under Ref
	Config    Config    `json:"config"`
	// Kind is empty for an OCI image, KindDisk for a whole-disk VM image.
	Kind string `json:"kind,omitempty"`
	// Owners are the tenants an image pulled with credentials of its own
	// is private to ("" the node's namespace); nil: the node's, seen by
	// everyone (owners.go).
	Owners []string `json:"owners,omitempty"`
}

// Config is the part of an image's config that decides how its workloads run.
type Config struct {
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Env        []string `json:"env,omitempty"`
	WorkingDir string   `json:"working_dir,omitempty"`
	User       string   `json:"user,omitempty"`
}

func (img *Image) clone() *Image {
	c := *img
	c.Config.Entrypoint = slices.Clone(img.Config.Entrypoint)
	c.Config.Cmd = slices.Clone(img.Config.Cmd)
	c.Config.Env = slices.Clone(img.Config.Env)
	c.Owners = slices.Clone(img.Owners)
	return &c
}

// record is one entry of refs.json. It lists the blobs the manifest refers to
// so that garbage collection never has to parse manifests.
type record struct {
	Image
	MediaType string   `json:"media_type"` // of the manifest
	Blobs     []string `json:"blobs"`      // config digest, then layer digests
}

// indexFile is the content of refs.json.
type indexFile struct {
	Version int      `json:"version"`
	Images  []record `json:"images"`
}

const indexVersion = 1

// Store is a node-local, content-addressed image store. See the package
// documentation for its on-disk layout. It is safe for concurrent use; one
// root must be used by one Store (one agent) at a time.
type Store struct {
	root string
	log  *slog.Logger

	mu     sync.Mutex
	refs   map[string]record // by normalized ref; replaced, never mutated, so readers may keep a copy
	leases map[string]int    // digest -> number of in-flight operations that need it

	// inUse reports whether workloads still run from an image (by manifest
	// digest); garbage collection keeps such images' content. Nil: none do.
	inUse func(digest string) bool

	// keychain gives pulls their credentials (WithAuthFile); nil: the
	// docker config of the user running berth.
	keychain authn.Keychain
	// gcPolicy and usage drive image garbage collection (gc.go); lastUsed
	// is when a workload was last admitted with each image (by digest).
	gcPolicy GCPolicy
	usage    func(path string) (used, total int64, err error)
	lastUsed map[string]time.Time
	// flights share concurrent resolves and pulls of one image.
	flights flightGroup

	unpackLocks keyedMutex
	unpacks     atomic.Int64 // rootfs extractions started; tests prove "unpacked once" with it

	// retry is how remote operations back off; tests shorten it.
	retry remote.Backoff
	// maxImport bounds an import archive; tests lower it.
	maxImport int64

	limits     Limits
	registries Registries
	policy     *registryPolicy
	// diskGroup may read whole-disk images (QEMU's group); -1: root only.
	diskGroup     int
	diskGroupName string
	// statfs reports the free bytes of a filesystem; nil: statfs(2).
	statfs func(path string) (int64, error)
}

// Option configures a Store.
type Option func(*Store)

// WithLogger sets where the store logs (failed pulls with what the
// registry said, cleanup trouble).
func WithLogger(l *slog.Logger) Option {
	return func(s *Store) { s.log = l.With("component", "image") }
}

// WithInUse tells the store which images workloads still run from, by
// manifest digest. Their content (blobs and rootfs) is kept even when no ref
// names them any more (the tag moved, or the agent restarted), and Remove
// refuses to drop their last ref. fn is called with the store's lock held:
// it must be quick and must not call back into the Store.
func WithInUse(fn func(digest string) bool) Option {
	return func(s *Store) { s.inUse = fn }
}

// New opens (creating if needed) the image store at root, loads its index,
// and removes what an earlier crash left behind.
func New(root string, opts ...Option) (*Store, error) {
	if root == "" {
		return nil, errdefs.Invalid("root", "the image store needs a directory")
	}
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("image store root %q: %w", root, err)
	}
	s := &Store{
		root:       root,
		log:        slog.Default().With("component", "image"),
		refs:       map[string]record{},
		leases:     map[string]int{},
		retry:      remote.Backoff{Duration: time.Second, Factor: 3, Jitter: 0.1, Steps: 3},
		maxImport:  MaxImportSize,
		limits:     DefaultLimits,
		registries: DefaultRegistries,
		diskGroup:  -1,
	}
	for _, opt := range opts {
		opt(s)
	}
	if s.policy, err = newRegistryPolicy(s.registries); err != nil {
		return nil, err
	}
	if err := s.resolveDiskGroup(); err != nil {
		return nil, err
	}
	// Leftovers of a crash: half-written blobs, unpacks and imports. Nothing
	// else uses tmp/, so it can go wholesale.
	if err := os.RemoveAll(s.tmpDir()); err != nil {
		return nil, fmt.Errorf("clean %s: %w", s.tmpDir(), err)
	}
	if err := s.secureDirs(); err != nil {
		return nil, err
	}
	if err := s.load(); err != nil {
		return nil, err
	}
	if err := s.gc(nil); err != nil {
		// Stray content costs disk space, not correctness.
		s.log.Warn("image store: could not remove unreferenced content", "err", err)
	}
	return s, nil
}

// Root returns the directory the store keeps its content in.
func (s *Store) Root() string { return s.root }

func (s *Store) indexPath() string { return filepath.Join(s.root, "refs.json") }
func (s *Store) blobDir() string   { return filepath.Join(s.root, "blobs", "sha256") }
func (s *Store) rootfsDir() string { return filepath.Join(s.root, "rootfs") }
func (s *Store) tmpDir() string    { return filepath.Join(s.root, "tmp") }

func (s *Store) load() error {
	// Stale temp files of a crash mid-save; refs.json itself is intact.
	// refs.json.tmp* are those of agents from before fileutil.WriteFile.
	_ = fileutil.RemoveTemps(s.indexPath())
	legacy, _ := filepath.Glob(filepath.Join(s.root, "refs.json.tmp*"))
	for _, f := range legacy {
		_ = os.Remove(f)
	}
	data, err := os.ReadFile(s.indexPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read image index: %w", err)
	}
	var idx indexFile
	if err := json.Unmarshal(data, &idx); err != nil {
		// Never start over silently: an empty index would garbage-collect
		// every image on the node.
		return fmt.Errorf("image index %s is corrupt (%w); move it away to start with an empty store", s.indexPath(), err)
	}
	if idx.Version != indexVersion {
		return fmt.Errorf("image index %s has version %d, this berth understands %d; use a matching berth version", s.indexPath(), idx.Version, indexVersion)
	}
	for _, rec := range idx.Images {
		s.refs[rec.Ref] = rec
	}
	return nil
}

// saveLocked writes refs atomically. s.mu must be held so that saves happen
// in the order of the changes they record.
func (s *Store) saveLocked(refs map[string]record) error {
	idx := indexFile{Version: indexVersion, Images: make([]record, 0, len(refs))}
	for _, rec := range refs {
		idx.Images = append(idx.Images, rec)
	}
	slices.SortFunc(idx.Images, func(a, b record) int { return strings.Compare(a.Ref, b.Ref) })
	data, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return fmt.Errorf("encode image index: %w", err)
	}
	if err := fileutil.WriteFile(s.indexPath(), data, 0o600); err != nil {
		return fmt.Errorf("save image index: %w", err)
	}
	return nil
}

// commit adds or replaces records in the index and persists it. When a ref
// moved to another image, the content only the old image used goes.
func (s *Store) commit(recs ...record) error {
	s.mu.Lock()
	next := make(map[string]record, len(s.refs)+len(recs))
	for k, v := range s.refs {
		next[k] = v
	}
	var moved []string
	for _, rec := range recs {
		if old, ok := s.refs[rec.Ref]; ok {
			if old.Digest == rec.Digest {
				rec.CreatedAt = old.CreatedAt // re-pulling an unchanged image keeps its history
				rec.Owners = mergeOwners(old.Owners, rec.Owners)
			} else {
				moved = append(moved, old.Digest)
				moved = append(moved, old.Blobs...)
			}
		}
		next[rec.Ref] = rec
	}
	if err := s.saveLocked(next); err != nil {
		s.mu.Unlock()
		return err
	}
	s.refs = next
	s.mu.Unlock()
	if len(moved) > 0 {
		if err := s.gc(moved); err != nil {
			s.log.Warn("could not delete the content of a re-tagged image yet", "err", err)
		}
	}
	return nil
}

// List returns every stored image, ordered by ref.
func (s *Store) List() []*Image { return s.ListAs(NodeViewer) }

// ListAs returns the stored images v sees, ordered by ref.
func (s *Store) ListAs(v Viewer) []*Image {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Image, 0, len(s.refs))
	for _, rec := range s.refs {
		if v.Sees(rec.Owners) {
			out = append(out, rec.Image.clone())
		}
	}
	slices.SortFunc(out, func(a, b *Image) int { return strings.Compare(a.Ref, b.Ref) })
	return out
}

// Get returns the image stored under ref. ref may be any reference that
// normalizes to a stored one ("busybox" finds docker.io/library/busybox:latest),
// a digest reference to a stored repository, or a bare manifest digest
// "sha256:<hex>".
func (s *Store) Get(ref string) (*Image, error) { return s.GetAs(NodeViewer, ref) }

// GetAs is Get of the images v sees: another tenant's private image is
// ErrNotFound, as a missing one is.
func (s *Store) GetAs(v Viewer, ref string) (*Image, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	recs, err := s.findLocked(v, ref)
	if err != nil {
		return nil, err
	}
	return recs[0].Image.clone(), nil
}

// findLocked resolves ref to the records v sees that it names, ordered by
// ref: one for a reference, all refs of the image for a digest.
func (s *Store) findLocked(v Viewer, ref string) ([]record, error) {
	var match func(record) bool
	if strings.HasPrefix(ref, "sha256:") {
		h, err := v1.NewHash(ref)
		if err != nil {
			return nil, errdefs.Invalid("ref", "%q is not a valid digest: %v", ref, err)
		}
		match = func(r record) bool { return r.Digest == h.String() }
	} else {
		r, err := parse(ref)
		if err != nil {
			return nil, err
		}
		canon := canonical(r)
		if rec, ok := s.refs[canon]; ok && v.Sees(rec.Owners) {
			return []record{rec}, nil
		}
		// repo@digest also finds the image pulled by tag from that repository.
		repo, digest, isDigest := strings.Cut(canon, "@")
		match = func(r record) bool {
			return isDigest && r.Digest == digest && refRepository(r.Ref) == repo
		}
	}
	var out []record
	for _, rec := range s.refs {
		if match(rec) && v.Sees(rec.Owners) {
			out = append(out, rec)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("image %q: %w; pull or import it first (list images with \"berth image ls\")", ref, errdefs.ErrNotFound)
	}
	slices.SortFunc(out, func(a, b record) int { return strings.Compare(a.Ref, b.Ref) })
	return out, nil
}

// refRepository strips the tag or digest from a canonical reference.
func refRepository(canon string) string {
	if repo, _, ok := strings.Cut(canon, "@"); ok {
		return repo
	}
	// The tag follows the last colon after the last slash (a registry port
	// comes before a slash).
	slash := strings.LastIndexByte(canon, '/')
	if colon := strings.LastIndexByte(canon, ':'); colon > slash {
		return canon[:colon]
	}
	return canon
}

// Remove drops ref (any form Get accepts; a bare digest drops every ref of
// that image) and deletes the blobs and unpacked rootfs that no remaining
// image needs. Dropping the last ref of an image that workloads use (see
// WithInUse) is an ErrFailedPrecondition: its rootfs is under them.
func (s *Store) Remove(ref string) error { return s.RemoveAs(NodeViewer, ref) }

// RemoveAs is Remove of the images v sees (a bare digest drops only those
// refs); another tenant's private image is ErrNotFound.
func (s *Store) RemoveAs(v Viewer, ref string) error {
	s.mu.Lock()
	recs, err := s.findLocked(v, ref)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	next := make(map[string]record, len(s.refs))
	for k, v := range s.refs {
		next[k] = v
	}
	for _, rec := range recs {
		delete(next, rec.Ref)
	}
	for _, rec := range recs {
		if s.used(rec.Digest) && !hasDigest(next, rec.Digest) {
			s.mu.Unlock()
			return fmt.Errorf("image %s (%s) is used by workloads: %w; delete them first", rec.Ref, rec.Digest, errdefs.ErrFailedPrecondition)
		}
	}
	if err := s.saveLocked(next); err != nil {
		s.mu.Unlock()
		return err
	}
	s.refs = next
	s.mu.Unlock()

	var candidates []string
	for _, rec := range recs {
		candidates = append(candidates, rec.Digest)
		candidates = append(candidates, rec.Blobs...)
	}
	if err := s.gc(candidates); err != nil {
		// The ref is gone, which is what the caller asked for; the space comes
		// back at the next removal or restart.
		s.log.Warn("image removed but its content could not be deleted yet", "ref", ref, "err", err)
	}
	return nil
}

// lease marks digests as needed by an in-flight operation so that a
// concurrent garbage collection keeps them even before any ref points at
// them. The returned func releases the lease.
func (s *Store) lease(digests ...string) (release func()) {
	s.mu.Lock()
	for _, d := range digests {
		s.leases[d]++
	}
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			for _, d := range digests {
				if s.leases[d]--; s.leases[d] <= 0 {
					delete(s.leases, d)
				}
			}
			s.mu.Unlock()
		})
	}
}

// Prune deletes every blob and rootfs that no ref, in-flight operation or
// in-use image needs. Removals and re-tags collect what they free already;
// Prune is for after workloads that kept an untagged image alive are gone.
func (s *Store) Prune() error { return s.gc(nil) }

// used reports whether workloads run from the image with this digest.
func (s *Store) used(digest string) bool { return s.inUse != nil && s.inUse(digest) }

func hasDigest(refs map[string]record, digest string) bool {
	for _, rec := range refs {
		if rec.Digest == digest {
			return true
		}
	}
	return false
}

// gc deletes blobs and rootfs directories that no ref, lease or in-use image
// needs. With candidates it only looks at those digests (after a removal or a
// failed pull); with nil it scans the whole store.
func (s *Store) gc(candidates []string) error {
	s.mu.Lock()
	var blobs, trees []string // hex digests
	if candidates == nil {
		var err error
		if blobs, err = dirNames(s.blobDir()); err != nil {
			s.mu.Unlock()
			return err
		}
		if trees, err = dirNames(s.rootfsDir()); err != nil {
			s.mu.Unlock()
			return err
		}
	} else {
		for _, d := range candidates {
			if h, err := v1.NewHash(d); err == nil && h.Algorithm == "sha256" {
				blobs = append(blobs, h.Hex)
				trees = append(trees, h.Hex)
			}
		}
	}

	live := map[string]bool{}
	for d := range s.leases {
		live[d] = true
	}
	for _, rec := range s.refs {
		live[rec.Digest] = true
		for _, b := range rec.Blobs {
			live[b] = true
		}
	}
	// An image workloads run from keeps its content even without a ref; its
	// manifest says which blobs that is.
	for _, hex := range slices.Concat(blobs, trees) {
		d := "sha256:" + hex
		if live[d] || !s.used(d) {
			continue
		}
		live[d] = true
		if h, err := v1.NewHash(d); err == nil {
			if manifest, err := s.readBlob(h); err == nil {
				if mf, err := v1.ParseManifest(bytes.NewReader(manifest)); err == nil {
					for _, b := range blobDigests(h, mf) {
						live[b] = true
					}
				}
			}
		}
	}

	var errs []error
	// Whole-disk images live in disks/, live by their digest alone.
	disks, _ := dirNames(s.diskDir())
	for _, hex := range disks {
		if candidates != nil && !slices.Contains(candidates, "sha256:"+hex) {
			continue
		}
		if live["sha256:"+hex] || s.used("sha256:"+hex) {
			continue
		}
		if err := os.Remove(filepath.Join(s.diskDir(), hex)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, hex := range blobs {
		if live["sha256:"+hex] {
			continue
		}
		if err := os.Remove(filepath.Join(s.blobDir(), hex)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	// Deleting a tree can take a while: move it into tmp/ under the lock
	// (atomic, so Rootfs never sees half a tree), delete it after.
	var trash []string
	for _, hex := range trees {
		if live["sha256:"+hex] {
			continue
		}
		dir := filepath.Join(s.rootfsDir(), hex)
		if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		dst, err := os.MkdirTemp(s.tmpDir(), "gc-")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.Rename(dir, filepath.Join(dst, hex)); err != nil {
			errs = append(errs, err)
		}
		trash = append(trash, dst)
	}
	s.mu.Unlock()

	for _, dir := range trash {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func dirNames(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", dir, err)
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names, nil
}
