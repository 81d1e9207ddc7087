package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"syscall"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/berthd/berth/errdefs"
)

const (
	// MaxImportSize bounds an archive (after gzip decompression). Archives
	// are spooled to disk, so this protects the disk, not memory.
	MaxImportSize = 8 << 30
	// maxImportEntries bounds the files of an archive: image archives hold
	// a handful per layer, never millions.
	maxImportEntries = 1 << 16
	// maxMetadataSize bounds JSON documents read into memory (index.json,
	// manifest.json, manifests, configs).
	maxMetadataSize = 16 << 20
)

// Annotations that name an image in an OCI image layout.
const (
	annotationRefName       = "org.opencontainers.image.ref.name"
	annotationContainerdRef = "io.containerd.image.name"
)

// errTooLarge marks an archive over the size limit.
var errTooLarge = errors.New("archive too large")

// Import stores the images of an archive read from r: an OCI image layout
// as a tar stream ("skopeo copy ... oci-archive:", "docker save" since
// Docker 25) or a classic "docker save" archive (manifest.json); either may
// be gzip-compressed. Images are named by the archive
// (io.containerd.image.name or org.opencontainers.image.ref.name annotations,
// RepoTags). ref, when not empty, names a single-image archive instead, and
// is required when the archive names nothing. Multi-platform indexes
// contribute their linux/<host arch> image.
//
// A truncated, corrupt or oversized archive is an ErrInvalidArgument and
// leaves the store as it was. Import returns one Image per ref it stored.
func (s *Store) Import(ctx context.Context, r io.Reader, ref string) ([]*Image, error) {
	var override string
	if ref != "" {
		var err error
		if override, err = Normalize(ref); err != nil {
			return nil, err
		}
	}
	if err := s.DiskPressure(); err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	spool, err := os.MkdirTemp(s.tmpDir(), "import-")
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	defer os.RemoveAll(spool)

	a, err := readArchive(ctx, r, spool, s.maxImport, s)
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	var imgs []*archiveImage
	switch {
	case a.meta["index.json"] != nil || a.meta["oci-layout"] != nil:
		imgs, err = a.ociImages(s)
	case a.meta["manifest.json"] != nil:
		imgs, err = a.dockerImages()
	default:
		err = fmt.Errorf("%w: not an image archive: expected an OCI image layout (oci-layout, index.json, blobs/) or a docker save archive (manifest.json) at the top of the tar", errdefs.ErrInvalidArgument)
	}
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	refs, err := chooseRefs(imgs, override)
	if err != nil {
		return nil, fmt.Errorf("import: %w", err)
	}
	// Refuse images this node cannot run before storing anything.
	var all []record
	for i, img := range imgs {
		for _, canon := range refs[i] {
			rec, err := newRecord(canon, img.digest, img.mediaType, img.manifest, img.mf, img.config)
			if err != nil {
				return nil, fmt.Errorf("import %s: %w", canon, err)
			}
			all = append(all, rec)
		}
	}

	var digests []string
	for _, img := range imgs {
		digests = append(digests, blobDigests(img.digest, img.mf)...)
	}
	release := s.lease(digests...)
	ok := false
	defer func() {
		release()
		if !ok {
			_ = s.gc(digests)
		}
	}()
	for _, img := range imgs {
		if err := a.store(ctx, s, img); err != nil {
			return nil, fmt.Errorf("import: %w", err)
		}
	}
	// Unpack now, within the budgets: an image that would fill the disk is
	// refused here, not at its first workload.
	for i, img := range imgs {
		name := img.digest.String()
		if len(refs[i]) > 0 {
			name = refs[i][0]
		}
		if _, err := s.rootfs(ctx, img.digest, name); err != nil {
			return nil, fmt.Errorf("import: %w", err)
		}
	}
	if err := s.commit(all...); err != nil {
		return nil, err
	}
	ok = true
	out := make([]*Image, 0, len(all))
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rec := range all {
		if cur, ok := s.refs[rec.Ref]; ok {
			out = append(out, cur.Image.clone())
		}
	}
	return out, nil
}

// archiveImage is one image found in an archive, ready to be stored.
type archiveImage struct {
	names     []string // as the archive spells them, not yet normalized
	digest    v1.Hash
	mediaType types.MediaType
	manifest  []byte
	mf        *v1.Manifest
	config    []byte
}

// chooseRefs decides the refs of each image: override for a single-image
// archive, else the archive's own names.
func chooseRefs(imgs []*archiveImage, override string) ([][]string, error) {
	out := make([][]string, len(imgs))
	if override != "" {
		if len(imgs) != 1 {
			return nil, errdefs.Invalid("ref", "a ref can only name a single-image archive; this one holds %d images, import it without a ref", len(imgs))
		}
		out[0] = []string{override}
		return out, nil
	}
	owner := map[string]v1.Hash{}
	for i, img := range imgs {
		if len(img.names) == 0 {
			return nil, errdefs.Invalid("ref", "the archive does not name its image %s; pass a ref to tag it", img.digest)
		}
		for _, n := range img.names {
			canon, err := Normalize(n)
			if err != nil {
				return nil, fmt.Errorf("the archive names an image %q: %w", n, err)
			}
			if d, dup := owner[canon]; dup && d != img.digest {
				return nil, fmt.Errorf("%w: the archive names two different images %s", errdefs.ErrInvalidArgument, canon)
			}
			if _, dup := owner[canon]; !dup {
				owner[canon] = img.digest
				out[i] = append(out[i], canon)
			}
		}
	}
	return out, nil
}

// archive is an image archive spooled to disk: every regular file is in
// dir under a generated name (never the archive's own path), with its digest.
type archive struct {
	dir      string
	files    map[string]spooled  // by cleaned archive path
	links    map[string]string   // symlink path -> cleaned target path
	byDigest map[v1.Hash]spooled // by content digest
	meta     map[string][]byte   // top-level JSON documents
}

type spooled struct {
	path   string
	digest v1.Hash
	size   int64
}

var metadataFiles = map[string]bool{"oci-layout": true, "index.json": true, "manifest.json": true}

// readArchive spools the tar stream r into dir.
func readArchive(ctx context.Context, r io.Reader, dir string, limit int64, s *Store) (*archive, error) {
	src := &recordingReader{r: ctxReader{ctx, r}}
	br := bufio.NewReader(src)
	var in io.Reader = br
	if magic, _ := br.Peek(2); bytes.Equal(magic, []byte{0x1f, 0x8b}) {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, archiveError(src, err)
		}
		in = zr
	}
	tr := tar.NewReader(&limitReader{r: in, left: limit, limit: limit})
	a := &archive{
		dir:      dir,
		files:    map[string]spooled{},
		links:    map[string]string{},
		byDigest: map[v1.Hash]spooled{},
		meta:     map[string][]byte{},
	}
	for n := 0; ; n++ {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, archiveError(src, err)
		}
		if n >= maxImportEntries {
			return nil, fmt.Errorf("%w: the archive has more than %d entries, which no image archive needs", errdefs.ErrInvalidArgument, maxImportEntries)
		}
		entry, err := cleanArchiveName(hdr.Name)
		if err != nil {
			return nil, err
		}
		switch hdr.Typeflag {
		case tar.TypeReg:
			if metadataFiles[entry] {
				data, err := io.ReadAll(io.LimitReader(tr, maxMetadataSize+1))
				if err != nil {
					return nil, archiveError(src, err)
				}
				if len(data) > maxMetadataSize {
					return nil, fmt.Errorf("%w: %s is larger than %d MiB", errdefs.ErrInvalidArgument, entry, maxMetadataSize>>20)
				}
				a.meta[entry] = data
				continue
			}
			sp, err := spool(tr, dir, s)
			if err != nil {
				return nil, archiveError(src, err)
			}
			// OCI layouts name blobs by digest: hold them to it.
			if alg, hex, ok := strings.Cut(strings.TrimPrefix(entry, "blobs/"), "/"); ok && strings.HasPrefix(entry, "blobs/") && alg == "sha256" && hex != sp.digest.Hex {
				return nil, fmt.Errorf("%w: archive blob %s does not match its digest (content is %s); the archive is corrupt", errdefs.ErrInvalidArgument, entry, sp.digest)
			}
			a.files[entry] = sp
			a.byDigest[sp.digest] = sp
		case tar.TypeSymlink:
			// "docker save" links layers shared between images.
			if !path.IsAbs(hdr.Linkname) {
				a.links[entry] = path.Join(path.Dir(entry), hdr.Linkname)
			}
		}
	}
	// Trailing bytes after the end-of-archive marker are ignored, as tar does;
	// but a gzip stream is read to its end so its checksum is verified.
	if zr, ok := in.(*gzip.Reader); ok {
		if _, err := io.Copy(io.Discard, zr); err != nil {
			return nil, archiveError(src, err)
		}
	}
	return a, nil
}

// archiveError tells a broken archive (ErrInvalidArgument) from a failing
// source, such as a dropped connection or a cancelled context.
func archiveError(src *recordingReader, err error) error {
	if src.err != nil {
		return fmt.Errorf("read archive: %w", src.err)
	}
	if errors.Is(err, errdefs.ErrResourceExhausted) {
		return err // the free-space floor
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: the data directory is full: %w", errdefs.ErrResourceExhausted, err)
	}
	if errors.Is(err, errTooLarge) {
		return fmt.Errorf("%w: the archive is larger than the %d MiB an import may be; split it or prune its images", errdefs.ErrInvalidArgument, limitOf(err)>>20)
	}
	return fmt.Errorf("%w: not a valid image archive (truncated, corrupt or not a tar stream): %w", errdefs.ErrInvalidArgument, err)
}

func spool(r io.Reader, dir string, s *Store) (spooled, error) {
	f, err := os.CreateTemp(dir, "f-")
	if err != nil {
		return spooled{}, err
	}
	digester := sha256.New()
	n, err := io.Copy(io.MultiWriter(&floorWriter{w: f, s: s}, digester), r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return spooled{}, err
	}
	return spooled{path: f.Name(), digest: v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", digester.Sum(nil))}, size: n}, nil
}

// cleanArchiveName returns the archive path of an entry, refusing names
// that would leave the archive.
func cleanArchiveName(name string) (string, error) {
	clean := path.Clean(strings.TrimPrefix(name, "./"))
	if path.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("%w: archive entry %q points outside the archive", errdefs.ErrInvalidArgument, name)
	}
	return clean, nil
}

// lookup finds a file by archive path, following symlinks within the archive.
func (a *archive) lookup(name string) (spooled, error) {
	clean, err := cleanArchiveName(name)
	if err != nil {
		return spooled{}, err
	}
	for hops := 0; hops < 8; hops++ {
		if sp, ok := a.files[clean]; ok {
			return sp, nil
		}
		target, ok := a.links[clean]
		if !ok {
			break
		}
		clean = target
	}
	return spooled{}, fmt.Errorf("%w: the archive lists %s but does not contain it", errdefs.ErrInvalidArgument, name)
}

// readBlob returns a small blob (manifest, index, config) from the archive,
// or from the store when the archive leaves it out.
func (a *archive) readBlob(s *Store, d v1.Descriptor) ([]byte, error) {
	if d.Size > maxMetadataSize {
		return nil, fmt.Errorf("%w: %s %s is %d bytes, more than the %d MiB allowed", errdefs.ErrInvalidArgument, d.MediaType, d.Digest, d.Size, maxMetadataSize>>20)
	}
	var data []byte
	if sp, ok := a.byDigest[d.Digest]; ok {
		var err error
		if data, err = os.ReadFile(sp.path); err != nil {
			return nil, err
		}
	} else if s.hasBlob(d.Digest) {
		var err error
		if data, err = s.readBlob(d.Digest); err != nil {
			return nil, err
		}
	} else {
		return nil, fmt.Errorf("%w: the archive lacks blob %s (%s)", errdefs.ErrInvalidArgument, d.Digest, d.MediaType)
	}
	if int64(len(data)) != d.Size {
		return nil, fmt.Errorf("%w: blob %s is %d bytes, its descriptor says %d", errdefs.ErrInvalidArgument, d.Digest, len(data), d.Size)
	}
	return data, nil
}

// ociImages resolves the images an OCI image layout's index.json lists.
func (a *archive) ociImages(s *Store) ([]*archiveImage, error) {
	var layout struct {
		Version string `json:"imageLayoutVersion"`
	}
	if err := json.Unmarshal(a.meta["oci-layout"], &layout); err != nil {
		return nil, fmt.Errorf("%w: OCI image layout without a valid oci-layout file: %w", errdefs.ErrInvalidArgument, err)
	}
	if !strings.HasPrefix(layout.Version, "1.") {
		return nil, fmt.Errorf("%w: OCI image layout version %q is not supported (want 1.x)", errdefs.ErrInvalidArgument, layout.Version)
	}
	if a.meta["index.json"] == nil {
		return nil, fmt.Errorf("%w: OCI image layout without index.json", errdefs.ErrInvalidArgument)
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(a.meta["index.json"]))
	if err != nil {
		return nil, fmt.Errorf("%w: index.json: %w", errdefs.ErrInvalidArgument, err)
	}
	if len(idx.Manifests) == 0 {
		return nil, fmt.Errorf("%w: index.json lists no images", errdefs.ErrInvalidArgument)
	}
	var out []*archiveImage
	for _, desc := range idx.Manifests {
		img, err := a.resolve(s, desc, 0)
		if err != nil {
			return nil, err
		}
		img.names = annotatedNames(desc.Annotations)
		out = append(out, img)
	}
	return out, nil
}

// annotatedNames returns the full references an index entry carries.
// containerd's annotation holds one; the OCI one usually holds only a tag
// ("latest"), which names nothing on its own and is ignored then.
func annotatedNames(ann map[string]string) []string {
	if n := ann[annotationContainerdRef]; n != "" {
		return []string{n}
	}
	if n := ann[annotationRefName]; strings.ContainsAny(n, "/:@") {
		return []string{n}
	}
	return nil
}

// resolve loads the image an index entry names, picking this node's
// platform from a nested index.
func (a *archive) resolve(s *Store, desc v1.Descriptor, depth int) (*archiveImage, error) {
	switch desc.MediaType {
	case types.OCIManifestSchema1, types.DockerManifestSchema2:
		manifest, err := a.readBlob(s, desc)
		if err != nil {
			return nil, err
		}
		mf, err := v1.ParseManifest(bytes.NewReader(manifest))
		if err != nil {
			return nil, fmt.Errorf("%w: manifest %s: %w", errdefs.ErrInvalidArgument, desc.Digest, err)
		}
		config, err := a.readBlob(s, mf.Config)
		if err != nil {
			return nil, err
		}
		return &archiveImage{digest: desc.Digest, mediaType: desc.MediaType, manifest: manifest, mf: mf, config: config}, nil
	case types.OCIImageIndex, types.DockerManifestList:
		if depth > 2 {
			return nil, fmt.Errorf("%w: image indexes nested deeper than 3 levels", errdefs.ErrInvalidArgument)
		}
		raw, err := a.readBlob(s, desc)
		if err != nil {
			return nil, err
		}
		idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("%w: index %s: %w", errdefs.ErrInvalidArgument, desc.Digest, err)
		}
		for _, m := range idx.Manifests {
			if m.Platform != nil && m.Platform.OS == platform.OS && m.Platform.Architecture == platform.Architecture {
				return a.resolve(s, m, depth+1)
			}
		}
		return nil, fmt.Errorf("%w: index %s has no %s image", errdefs.ErrInvalidArgument, desc.Digest, platform)
	default:
		return nil, fmt.Errorf("%w: %s has media type %q, which is not an image", errdefs.ErrInvalidArgument, desc.Digest, desc.MediaType)
	}
}

// dockerImages turns the entries of a "docker save" manifest.json into OCI
// images. Layers are kept as they are in the archive (usually uncompressed
// tars), so nothing is recompressed.
func (a *archive) dockerImages() ([]*archiveImage, error) {
	var entries []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(a.meta["manifest.json"], &entries); err != nil {
		return nil, fmt.Errorf("%w: manifest.json: %w", errdefs.ErrInvalidArgument, err)
	}
	if len(entries) == 0 {
		return nil, fmt.Errorf("%w: manifest.json lists no images", errdefs.ErrInvalidArgument)
	}
	var out []*archiveImage
	for _, e := range entries {
		cfgFile, err := a.lookup(e.Config)
		if err != nil {
			return nil, err
		}
		if cfgFile.size > maxMetadataSize {
			return nil, fmt.Errorf("%w: config %s is larger than %d MiB", errdefs.ErrInvalidArgument, e.Config, maxMetadataSize>>20)
		}
		config, err := os.ReadFile(cfgFile.path)
		if err != nil {
			return nil, err
		}
		cf, err := v1.ParseConfigFile(bytes.NewReader(config))
		if err != nil {
			return nil, fmt.Errorf("%w: config %s: %w", errdefs.ErrInvalidArgument, e.Config, err)
		}
		if len(cf.RootFS.DiffIDs) != len(e.Layers) {
			return nil, fmt.Errorf("%w: config %s lists %d layers, manifest.json %d", errdefs.ErrInvalidArgument, e.Config, len(cf.RootFS.DiffIDs), len(e.Layers))
		}
		mf := &v1.Manifest{
			SchemaVersion: 2,
			MediaType:     types.OCIManifestSchema1,
			Config:        v1.Descriptor{MediaType: types.OCIConfigJSON, Size: cfgFile.size, Digest: cfgFile.digest},
		}
		for i, lp := range e.Layers {
			l, err := a.lookup(lp)
			if err != nil {
				return nil, err
			}
			mt, err := layerMediaType(l.path)
			if err != nil {
				return nil, err
			}
			// An uncompressed layer's digest is its diff ID: check it for free.
			if mt == types.OCIUncompressedLayer && l.digest != cf.RootFS.DiffIDs[i] {
				return nil, fmt.Errorf("%w: layer %s does not match diff ID %s in the config; the archive is corrupt", errdefs.ErrInvalidArgument, lp, cf.RootFS.DiffIDs[i])
			}
			mf.Layers = append(mf.Layers, v1.Descriptor{MediaType: mt, Size: l.size, Digest: l.digest})
		}
		manifest, err := json.Marshal(mf)
		if err != nil {
			return nil, fmt.Errorf("encode manifest: %w", err)
		}
		sum := sha256.Sum256(manifest)
		out = append(out, &archiveImage{
			names:     e.RepoTags,
			digest:    v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", sum)},
			mediaType: mf.MediaType,
			manifest:  manifest,
			mf:        mf,
			config:    config,
		})
	}
	return out, nil
}

// layerMediaType tells a gzip, zstd or plain tar layer apart by its magic.
func layerMediaType(file string) (types.MediaType, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", err
	}
	defer f.Close()
	magic := make([]byte, 4)
	n, _ := io.ReadFull(f, magic)
	magic = magic[:n]
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		return types.OCILayer, nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return types.OCILayerZStd, nil
	default:
		return types.OCIUncompressedLayer, nil
	}
}

// store moves an image's blobs into the store. s holds a lease on them.
func (a *archive) store(ctx context.Context, s *Store, img *archiveImage) error {
	for _, l := range img.mf.Layers {
		if sp, ok := a.byDigest[l.Digest]; ok {
			if sp.size != l.Size {
				return fmt.Errorf("%w: layer %s is %d bytes, its descriptor says %d", errdefs.ErrInvalidArgument, l.Digest, sp.size, l.Size)
			}
			if err := s.adoptBlob(sp.path, l.Digest); err != nil {
				return err
			}
			// Renamed away; a second image with this layer finds it stored.
			delete(a.byDigest, l.Digest)
			continue
		}
		if !s.hasBlob(l.Digest) {
			return fmt.Errorf("%w: the archive lacks layer %s", errdefs.ErrInvalidArgument, l.Digest)
		}
	}
	if err := s.writeBlob(ctx, img.mf.Config.Digest, img.mf.Config.Size, bytes.NewReader(img.config)); err != nil {
		return err
	}
	return s.writeBlob(ctx, img.digest, int64(len(img.manifest)), bytes.NewReader(img.manifest))
}

// recordingReader remembers the first error of the archive's source, so a
// failing source is not mistaken for a corrupt archive.
type recordingReader struct {
	r   io.Reader
	err error
}

func (r *recordingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && r.err == nil {
		r.err = err
	}
	return n, err
}

// limitReader fails once more than left bytes have been read.
type limitReader struct {
	r     io.Reader
	left  int64
	limit int64
}

// tooLargeError carries the limit an archive exceeded.
type tooLargeError struct{ limit int64 }

func (e tooLargeError) Error() string { return errTooLarge.Error() }
func (e tooLargeError) Unwrap() error { return errTooLarge }

func limitOf(err error) int64 {
	var e tooLargeError
	errors.As(err, &e)
	return e.limit
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.left < 0 {
		return 0, tooLargeError{l.limit}
	}
	if int64(len(p)) > l.left+1 {
		p = p[:l.left+1]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	if l.left < 0 {
		return n, tooLargeError{l.limit}
	}
	return n, err
}
