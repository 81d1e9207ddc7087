package monitor

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The program a container executes is a copy no one can change, readable
// by no one but a capable root: sealed against writes and resizing (the
// seals themselves too), mode 0111.
func TestSealedProgram(t *testing.T) {
	want := bytes.Repeat([]byte("berth-entry\x00"), 1000)
	path := filepath.Join(t.TempDir(), "berth-entry")
	if err := os.WriteFile(path, want, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := sealedProgram(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	if target, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); !strings.HasPrefix(target, "/memfd:berth-entry") {
		t.Errorf("the program is %q, want a memfd", target)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []int{unix.F_SEAL_SEAL, unix.F_SEAL_SHRINK, unix.F_SEAL_GROW, unix.F_SEAL_WRITE} {
		if seals&s == 0 {
			t.Errorf("seals %#x lack %#x", seals, s)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o111 {
		t.Errorf("mode %o, want 0111 (execute only)", st.Mode&0o777)
	}
	if _, err := unix.Pwrite(fd, []byte("x"), 0); err == nil {
		t.Error("a write to the sealed copy succeeded")
	}
	// Reopened writable through /proc, as a container process would try.
	if w, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(fd), os.O_WRONLY, 0); err == nil {
		_, werr := w.Write([]byte("x"))
		w.Close()
		if werr == nil {
			t.Error("a write through /proc/self/fd succeeded")
		}
	}
	got, err := io.ReadAll(io.NewSectionReader(f, 0, int64(len(want))+1))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("the copy holds %d bytes (%v), want the program's %d", len(got), err, len(want))
	}
}
