package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
)

// blobPath returns where the blob with digest h lives. Only sha256 is
// supported: it is what every registry and tool writes.
func (s *Store) blobPath(h v1.Hash) (string, error) {
	if h.Algorithm != "sha256" || len(h.Hex) != sha256.Size*2 {
		return "", fmt.Errorf("digest %q: %w: only sha256 digests are supported", h, errdefs.ErrInvalidArgument)
	}
	if _, err := hex.DecodeString(h.Hex); err != nil {
		return "", fmt.Errorf("digest %q: %w: not hexadecimal", h, errdefs.ErrInvalidArgument)
	}
	return filepath.Join(s.blobDir(), h.Hex), nil
}

func (s *Store) hasBlob(h v1.Hash) bool {
	p, err := s.blobPath(h)
	if err != nil {
		return false
	}
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

func (s *Store) readBlob(h v1.Hash) ([]byte, error) {
	p, err := s.blobPath(h)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("blob %s is missing from the image store; remove the image and pull or import it again: %w", h, err)
	}
	if err != nil {
		return nil, fmt.Errorf("read blob %s: %w", h, err)
	}
	if got := sha256.Sum256(data); hex.EncodeToString(got[:]) != h.Hex {
		return nil, fmt.Errorf("blob %s is corrupt on disk; remove the image and pull or import it again: %w", h, errdefs.ErrInvalidArgument)
	}
	return data, nil
}

// writeBlob stores the content r yields under digest h, checking it matches
// h (and size, unless size < 0). An existing blob is kept and r not read: the
// name proves the content.
func (s *Store) writeBlob(ctx context.Context, h v1.Hash, size int64, r io.Reader) error {
	final, err := s.blobPath(h)
	if err != nil {
		return err
	}
	if s.hasBlob(h) {
		return nil
	}
	f, err := os.CreateTemp(s.tmpDir(), "blob-")
	if err != nil {
		return fmt.Errorf("store blob %s: %w", h, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // a no-op once renamed

	digester := sha256.New()
	n, err := io.Copy(io.MultiWriter(&floorWriter{w: f, s: s}, digester), ctxReader{ctx, r})
	if err == nil {
		err = checkContent(h, size, n, digester)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("store blob %s: %w", h, err)
	}
	return s.install(tmp, final)
}

// adoptBlob moves a spooled file whose digest the caller computed into the
// blob store, without copying it.
func (s *Store) adoptBlob(tmp string, h v1.Hash) error {
	final, err := s.blobPath(h)
	if err != nil {
		return err
	}
	if s.hasBlob(h) {
		return nil
	}
	f, err := os.Open(tmp)
	if err != nil {
		return fmt.Errorf("store blob %s: %w", h, err)
	}
	err = f.Sync()
	f.Close()
	if err != nil {
		return fmt.Errorf("store blob %s: %w", h, err)
	}
	return s.install(tmp, final)
}

// install makes a complete, synced temp file the blob at final.
func (s *Store) install(tmp, final string) error {
	// Read-only: nothing should ever write to a content-addressed file.
	if err := os.Chmod(tmp, 0o444); err != nil {
		return fmt.Errorf("store blob %s: %w", filepath.Base(final), err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("store blob %s: %w", filepath.Base(final), err)
	}
	if err := fileutil.SyncDir(filepath.Dir(final)); err != nil {
		return fmt.Errorf("store blob %s: %w", filepath.Base(final), err)
	}
	return nil
}

// checkContent compares what was read against the expected digest and size.
func checkContent(want v1.Hash, size, n int64, digester hash.Hash) error {
	if size >= 0 && n != size {
		return fmt.Errorf("%w: content of %s is %d bytes, its descriptor says %d", errdefs.ErrInvalidArgument, want, n, size)
	}
	if got := hex.EncodeToString(digester.Sum(nil)); got != want.Hex {
		return fmt.Errorf("%w: content does not match digest %s (got sha256:%s)", errdefs.ErrInvalidArgument, want, got)
	}
	return nil
}

// ctxReader stops a long copy as soon as ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// verifyReader checks, at EOF, that what it passed on matches a digest and
// size; a blob damaged on disk fails the read instead of unpacking garbage.
type verifyReader struct {
	r        io.ReadCloser
	want     v1.Hash
	size     int64
	n        int64
	digester hash.Hash
}

func newVerifyReader(r io.ReadCloser, want v1.Hash, size int64) *verifyReader {
	return &verifyReader{r: r, want: want, size: size, digester: sha256.New()}
}

func (v *verifyReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.n += int64(n)
	v.digester.Write(p[:n])
	if errors.Is(err, io.EOF) {
		if cerr := checkContent(v.want, v.size, v.n, v.digester); cerr != nil {
			return n, fmt.Errorf("blob %s is corrupt on disk; remove the image and pull or import it again: %w", v.want, cerr)
		}
	}
	return n, err
}

func (v *verifyReader) Close() error { return v.r.Close() }
