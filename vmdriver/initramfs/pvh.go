package initramfs

import (
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY: the note, named
// "Xen", whose value is the kernel's 32-bit PVH entry point. QEMU boots an
// ELF kernel given with -kernel through this entry (x86, QEMU 4.0 on);
// Linux emits it when built with CONFIG_PVH.
const xenElfnotePhys32Entry = 18

// maxNotes bounds how much of an ELF's note segments is read.
const maxNotes = 1 << 20

// PVHEntry returns the PVH entry point of the x86 ELF kernel r, read from
// its PT_NOTE segments as QEMU reads it. A file that is no such ELF, or
// has no PVH note, is an ErrNoPVH error.
func PVHEntry(r io.ReaderAt) (uint64, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return 0, fmt.Errorf("not an ELF: %v: %w", err, ErrNoPVH)
	}
	if f.Machine != elf.EM_X86_64 && f.Machine != elf.EM_386 {
		return 0, fmt.Errorf("an ELF for %s, not x86: %w", f.Machine, ErrNoPVH)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		if p.Filesz > maxNotes {
			return 0, fmt.Errorf("a note segment of %d bytes: %w", p.Filesz, ErrNoPVH)
		}
		data := make([]byte, p.Filesz)
		if _, err := p.ReadAt(data, 0); err != nil {
			return 0, fmt.Errorf("read notes: %v: %w", err, ErrNoPVH)
		}
		entry, ok, err := findPVHNote(data, f.ByteOrder)
		if err != nil {
			return 0, err
		}
		if ok {
			return entry, nil
		}
	}
	return 0, fmt.Errorf("its ELF has no PVH entry note (Xen, XEN_ELFNOTE_PHYS32_ENTRY): the kernel was built without CONFIG_PVH: %w", ErrNoPVH)
}

// findPVHNote walks the notes of one segment: each is namesz, descsz and
// type (4 bytes each), then the name and the descriptor, each padded to 4
// bytes.
func findPVHNote(data []byte, bo binary.ByteOrder) (uint64, bool, error) {
	bad := errors.New("malformed note segment")
	align := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for len(data) > 0 {
		if len(data) < 12 {
			return 0, false, fmt.Errorf("%v: %w", bad, ErrNoPVH)
		}
		namesz, descsz, typ := uint64(bo.Uint32(data)), uint64(bo.Uint32(data[4:])), bo.Uint32(data[8:])
		data = data[12:]
		// The last descriptor's padding may be cut off.
		if align(namesz)+descsz > uint64(len(data)) {
			return 0, false, fmt.Errorf("%v: %w", bad, ErrNoPVH)
		}
		name := data[:namesz]
		desc := data[align(namesz) : align(namesz)+descsz]
		data = data[min(uint64(len(data)), align(namesz)+align(descsz)):]
		if typ != xenElfnotePhys32Entry || string(name) != "Xen\x00" {
			continue
		}
		var entry uint64
		switch descsz {
		case 4:
			entry = uint64(bo.Uint32(desc))
		case 8:
			entry = bo.Uint64(desc)
		default:
			return 0, false, fmt.Errorf("a PVH entry note of %d bytes: %w", descsz, ErrNoPVH)
		}
		if entry == 0 || entry >= 1<<32 {
			return 0, false, fmt.Errorf("PVH entry point %#x is not a 32-bit address: %w", entry, ErrNoPVH)
		}
		return entry, true, nil
	}
	return 0, false, nil
}
