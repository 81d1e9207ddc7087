// Command mkimage writes berth's demo image, a busybox image built from the
// host's busybox-static, as an archive that "berth image import" accepts.
// It needs nothing from the internet:
//
//	go run ./hack/mkimage -o bin/busybox.tar -ref berth.local/demo/busybox:latest [-format oci|docker]
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/berthd/berth/internal/ociimage"
)

func main() {
	out := flag.String("o", "bin/busybox.tar", "archive to write")
	ref := flag.String("ref", "berth.local/demo/busybox:latest", "reference the archive names the image by")
	format := flag.String("format", "oci", "archive format: oci (OCI image layout) or docker (docker save)")
	busybox := flag.String("busybox", ociimage.BusyboxPath, "static busybox binary to put in the image")
	flag.Parse()

	if err := run(*out, *ref, *format, *busybox); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(out, ref, format, busybox string) error {
	var write func(io.Writer, v1.Image, string) error
	switch format {
	case "oci":
		write = ociimage.WriteOCIArchive
	case "docker":
		write = ociimage.WriteDockerArchive
	default:
		return fmt.Errorf("unknown -format %q: use oci or docker", format)
	}
	img, err := ociimage.BusyboxFrom(busybox)
	if err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	// Write next to the target and rename, so make never sees half an archive.
	f, err := os.CreateTemp(filepath.Dir(out), filepath.Base(out)+".tmp")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	err = write(f, img, ref)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), out); err != nil {
		return err
	}
	fmt.Printf("wrote %s (%s archive of %s, manifest %s)\n", out, format, ref, digest)
	return nil
}
