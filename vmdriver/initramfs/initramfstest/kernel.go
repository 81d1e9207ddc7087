// Package initramfstest makes small fake guest kernels for tests: an x86
// ELF with or without the PVH entry note, wrapped in a bzImage, and a
// modules tree in which berth's default modules are built in.
package initramfstest

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
)

// PVHEntry is the PVH entry point of ELF's kernels.
const PVHEntry = 0x1000850

// ELF builds a small x86-64 ELF kernel: a PT_LOAD segment of code-like
// bytes (CALLs and JMPs, so the x86 BCJ filter has work) and a PT_NOTE
// segment with Xen notes, the PVH entry (PVHEntry) among them when pvh is
// set. seed varies the code.
func ELF(pvh bool, seed uint64) []byte {
	le := binary.LittleEndian
	note := func(name string, typ uint32, desc []byte) []byte {
		var b []byte
		b = le.AppendUint32(b, uint32(len(name)+1))
		b = le.AppendUint32(b, uint32(len(desc)))
		b = le.AppendUint32(b, typ)
		b = append(b, name...)
		b = append(b, 0)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		b = append(b, desc...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	var notes []byte
	notes = append(notes, note("GNU", 3, bytes.Repeat([]byte{0xab}, 20))...)
	notes = append(notes, note("Xen", 6, []byte("linux\x00"))...)
	if pvh {
		notes = append(notes, note("Xen", 18, le.AppendUint64(nil, PVHEntry))...) // XEN_ELFNOTE_PHYS32_ENTRY
	}
	notes = append(notes, note("Xen", 9, []byte("yes\x00"))...)

	// Code-like bytes: CALL/JMP rel32 with small positive and negative
	// displacements among filler from a small alphabet.
	r := rand.New(rand.NewPCG(seed, 1))
	var body []byte
	for len(body) < 40<<10 {
		switch r.IntN(4) {
		case 0:
			body = append(body, 0xe8)
			body = le.AppendUint32(body, uint32(int32(r.IntN(1<<16)-1<<15)))
		case 1:
			body = append(body, 0xe9)
			body = le.AppendUint32(body, uint32(r.IntN(1<<20)))
		default:
			body = append(body, []byte{0x48, 0x89, 0xe5, 0x55, 0xc3, 0x90, 0x0f, 0x1f}[r.IntN(8)])
		}
	}
	// The segment ends with zeros, as the kernel's ends with its bss.
	body = append(body, make([]byte, 8<<10)...)
	const codeOff = 0x1000
	noteOff := codeOff + len(body)
	b := make([]byte, 64+2*56)
	copy(b, "\x7fELF\x02\x01\x01")
	le.PutUint16(b[16:], 2)  // ET_EXEC
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[24:], 0x1000000)
	le.PutUint64(b[32:], 64) // e_phoff
	le.PutUint16(b[52:], 64)
	le.PutUint16(b[54:], 56)
	le.PutUint16(b[56:], 2)
	le.PutUint16(b[58:], 64)
	ph := func(i int, typ, flags uint32, off, size, align uint64) {
		p := b[64+56*i:]
		le.PutUint32(p, typ)
		le.PutUint32(p[4:], flags)
		le.PutUint64(p[8:], off)
		le.PutUint64(p[16:], 0xffffffff81000000+off)
		le.PutUint64(p[24:], 0x1000000+off)
		le.PutUint64(p[32:], size)
		le.PutUint64(p[40:], size)
		le.PutUint64(p[48:], align)
	}
	ph(0, 1, 5, codeOff, uint64(len(body)), 0x1000) // PT_LOAD, R+X
	ph(1, 4, 4, uint64(noteOff), uint64(len(notes)), 4)
	b = append(b, make([]byte, codeOff-len(b))...)
	b = append(b, body...)
	return append(b, notes...)
}

// BzImage wraps a compressed payload in a bzImage: a setup header of boot
// protocol 2.15 giving the payload's place, one setup sector, and the
// payload after some protected-mode bytes. sizeTrailer appends the
// uncompressed size as the kernel build does for every format but gzip.
func BzImage(payload []byte, size int, sizeTrailer bool) []byte {
	if sizeTrailer {
		payload = binary.LittleEndian.AppendUint32(append([]byte(nil), payload...), uint32(size))
	}
	const sects, pmOff = 1, 0x200
	b := make([]byte, (sects+1)*512+pmOff)
	b[0x1f1] = sects
	copy(b[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(b[0x206:], 0x020f)
	binary.LittleEndian.PutUint32(b[0x248:], pmOff)
	binary.LittleEndian.PutUint32(b[0x24c:], uint32(len(payload)))
	b = append(b, payload...)
	return append(b, make([]byte, 100)...) // the image's tail (e.g. its signature)
}

// GzipBzImage is a bzImage of ELF(pvh, seed), gzip-compressed.
func GzipBzImage(pvh bool, seed uint64) []byte {
	e := ELF(pvh, seed)
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(e)
	zw.Close()
	return BzImage(buf.Bytes(), len(e), false)
}

// Loaded is what a loader puts in memory for the ELF e: each PT_LOAD
// segment's file bytes and zeros up to its memory size, by physical
// address. Two kernels that load the same are the same kernel.
func Loaded(e []byte) (map[uint64][]byte, error) {
	f, err := elf.NewFile(bytes.NewReader(e))
	if err != nil {
		return nil, err
	}
	m := map[uint64][]byte{}
	for _, p := range f.Progs {
		if p.Type != elf.PT_LOAD {
			continue
		}
		b := make([]byte, p.Memsz)
		if _, err := p.ReadAt(b[:p.Filesz], 0); err != nil && p.Filesz > 0 {
			return nil, err
		}
		m[p.Paddr] = b
	}
	return m, nil
}

// Node writes a fake node kernel: bootDir/vmlinuz-release holding image,
// and modulesDir/release whose modules.builtin lists every module named
// (so that an initramfs for it needs no module files).
func Node(bootDir, modulesDir, release string, image []byte, builtin []string) error {
	mods := filepath.Join(modulesDir, release)
	if err := os.MkdirAll(mods, 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(bootDir, 0o755); err != nil {
		return err
	}
	var list strings.Builder
	for _, m := range builtin {
		list.WriteString("kernel/" + m + ".ko\n")
	}
	for name, content := range map[string]string{"modules.dep": "", "modules.builtin": list.String()} {
		if err := os.WriteFile(filepath.Join(mods, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	// Written to a new file and renamed, as a package upgrade replaces it.
	p := filepath.Join(bootDir, "vmlinuz-"+release)
	if err := os.WriteFile(p+".new", image, 0o644); err != nil {
		return err
	}
	return os.Rename(p+".new", p)
}
