package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/qcow2"
)

// Whole-disk VM images. A workload may boot a bootable qcow2 disk instead
// of an OCI image; such disks are stored next to OCI content, by the
// digest of their bytes, under disks/. QEMU runs as libvirt's
// unprivileged user and reads them as the backing file of each workload's
// copy-on-write overlay: with a disk group (WithDiskGroup) the store's
// root and disks/ are searchable by that group alone and the files
// read-only to it; otherwise root only (see perms.go).

const (
	// KindDisk marks a whole-disk image.
	KindDisk = "disk"
	// MediaTypeDisk is the index's media type of a whole-disk image.
	MediaTypeDisk = "application/vnd.berth.disk.qcow2"
)

// IsDiskImage reports whether the stream starting with head is a qcow2
// disk rather than an image archive.
func IsDiskImage(head []byte) bool { return qcow2.Is(head) }

func (s *Store) diskDir() string { return filepath.Join(s.root, "disks") }

// DiskPath returns the stored file of a whole-disk image.
func (s *Store) DiskPath(img *Image) (string, error) {
	if img.Kind != KindDisk {
		return "", fmt.Errorf("image %s is not a whole-disk image: %w", img.Ref, errdefs.ErrInvalidArgument)
	}
	h := img.Digest[len("sha256:"):]
	return filepath.Join(s.diskDir(), h), nil
}

// ImportDisk stores a qcow2 whole-disk image read from r under ref. The
// disk is checked with qemu-img before it is kept: it must be qcow2 with
// no backing file and no external data file (either would let a disk read
// files of the host).
func (s *Store) ImportDisk(ctx context.Context, r io.Reader, ref string) (*Image, error) {
	if ref == "" {
		return nil, errdefs.Invalid("ref", "a disk image names nothing itself: give it a reference")
	}
	canon, err := Normalize(ref)
	if err != nil {
		return nil, err
	}
	if err := s.DiskPressure(); err != nil {
		return nil, fmt.Errorf("import disk: %w", err)
	}
	tmp, err := os.CreateTemp(s.tmpDir(), "disk-")
	if err != nil {
		return nil, fmt.Errorf("import disk: %w", err)
	}
	defer os.Remove(tmp.Name())
	hash := sha256.New()
	n, err := io.Copy(io.MultiWriter(&floorWriter{w: tmp, s: s}, hash), io.LimitReader(bufio.NewReader(r), s.maxImport+1))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("import disk: %w", err)
	}
	if n > s.maxImport {
		return nil, fmt.Errorf("import disk: larger than %d bytes: %w", s.maxImport, errdefs.ErrInvalidArgument)
	}
	if err := checkQcow2(ctx, tmp.Name()); err != nil {
		return nil, err
	}
	digest := "sha256:" + hex.EncodeToString(hash.Sum(nil))
	release := s.lease(digest)
	defer release()
	if err := s.secureDisk(tmp.Name()); err != nil {
		return nil, fmt.Errorf("import disk: %w", err)
	}
	if err := os.Rename(tmp.Name(), filepath.Join(s.diskDir(), digest[len("sha256:"):])); err != nil {
		return nil, fmt.Errorf("import disk: %w", err)
	}
	rec := record{
		Image:     Image{Ref: canon, Digest: digest, Size: n, CreatedAt: time.Now().UTC(), Kind: KindDisk},
		MediaType: MediaTypeDisk,
	}
	if err := s.commit(rec); err != nil {
		return nil, err
	}
	img := rec.Image
	return &img, nil
}

// checkQcow2 refuses anything but a self-contained qcow2 image.
func checkQcow2(ctx context.Context, path string) error {
	out, err := exec.CommandContext(ctx, "qemu-img", "info", "--output=json", "-f", "qcow2", path).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("import disk: not a usable qcow2 image: %s: %w", bytes.TrimSpace(ee.Stderr), errdefs.ErrInvalidArgument)
		}
		return fmt.Errorf("import disk: qemu-img: %w", err)
	}
	var info struct {
		Format          string `json:"format"`
		BackingFilename string `json:"backing-filename"`
		FormatSpecific  struct {
			Data struct {
				DataFile string `json:"data-file"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("import disk: qemu-img info: %w", err)
	}
	switch {
	case info.Format != "qcow2":
		return fmt.Errorf("import disk: format %q, want qcow2: %w", info.Format, errdefs.ErrInvalidArgument)
	case info.BackingFilename != "":
		return fmt.Errorf("import disk: the image has a backing file (%s); flatten it first (qemu-img convert): %w", info.BackingFilename, errdefs.ErrInvalidArgument)
	case info.FormatSpecific.Data.DataFile != "":
		return fmt.Errorf("import disk: the image has an external data file; flatten it first (qemu-img convert): %w", errdefs.ErrInvalidArgument)
	}
	return nil
}
