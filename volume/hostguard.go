package volume

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// What a host path is checked against once it is open: names can lie (a
// symlinked data directory, a bind mount of /proc below an allowed
// directory), the open file cannot. Its identity (device and inode) and
// those of the directories above it are compared with the data
// directory's, its filesystem's type with the kernel's pseudo
// filesystems, and, when the workload may write, its mount's flags.

// fileID is a file's identity: device and inode.
type fileID struct{ dev, ino uint64 }

func statID(st *unix.Stat_t) fileID { return fileID{uint64(st.Dev), st.Ino} }

// guard is what Open learnt about the data directory and the kernel's
// filesystems, against which every opened host path is checked.
type guard struct {
	// dataDir is the data directory, canonical (symlinks resolved).
	dataDir string
	data    fileID
	// dataFS is the data directory's path inside its filesystem (see
	// fsPath): a bind mount of a directory below it is inside it too.
	dataFS string
	// above are the data directory and every directory holding it, up to
	// /: a host path that is one of them exposes it.
	above map[fileID]string
	// devs are the devices of the filesystems at /dev (devtmpfs, whose
	// magic is tmpfs's, so only its device tells it apart), /proc and
	// /sys.
	devs map[uint64]string
}

// pseudoFS are filesystems no workload mounts whatever the allowlist
// says: the kernel's, the devices' and the security modules' views.
var pseudoFS = map[int64]string{
	unix.PROC_SUPER_MAGIC:     "procfs",
	unix.SYSFS_MAGIC:          "sysfs",
	unix.DEVPTS_SUPER_MAGIC:   "devpts",
	unix.CGROUP_SUPER_MAGIC:   "cgroup",
	unix.CGROUP2_SUPER_MAGIC:  "cgroup2",
	unix.DEBUGFS_MAGIC:        "debugfs",
	unix.TRACEFS_MAGIC:        "tracefs",
	unix.SECURITYFS_MAGIC:     "securityfs",
	unix.SELINUX_MAGIC:        "selinuxfs",
	unix.SMACK_MAGIC:          "smackfs",
	unix.BPF_FS_MAGIC:         "bpf",
	unix.PSTOREFS_MAGIC:       "pstore",
	unix.EFIVARFS_MAGIC:       "efivarfs",
	unix.BINFMTFS_MAGIC:       "binfmt_misc",
	unix.NSFS_MAGIC:           "nsfs",
	unix.AAFS_MAGIC:           "apparmorfs",
	unix.RDTGROUP_SUPER_MAGIC: "resctrl",
	unix.XENFS_SUPER_MAGIC:    "xenfs",
	unix.BINDERFS_SUPER_MAGIC: "binderfs",
	0x62656570:                "configfs",
	0x65735543:                "fusectl",
}

// newGuard canonicalises dataDir (which exists) and records the
// identities host paths are checked against.
func newGuard(dataDir string) (*guard, error) {
	g := &guard{above: map[fileID]string{}, devs: map[uint64]string{}}
	if dataDir == "" {
		return g, nil
	}
	real, err := filepath.EvalSymlinks(dataDir)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	g.dataDir = real
	for p := real; ; p = filepath.Dir(p) {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return nil, fmt.Errorf("data directory: %w", err)
		}
		if p == real {
			g.data = statID(&st)
		}
		g.above[statID(&st)] = p
		if p == "/" {
			break
		}
	}
	f, err := os.OpenFile(real, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	g.dataFS, err = fsPath(int(f.Fd()))
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	for _, p := range neverShared {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err == nil {
			g.devs[uint64(st.Dev)] = p
		}
	}
	return g, nil
}

// check says why the open directory f (reached as p) may never be
// shared, or "": it is the data directory, inside it or holding it, on
// a pseudo filesystem or on the filesystem of /dev, /proc or /sys.
func (g *guard) check(f *os.File) (string, error) {
	fd := int(f.Fd())
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return "", err
	}
	if name, ok := pseudoFS[int64(sfs.Type)]; ok {
		return "it is on " + name + ", which is never shared with a workload", nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "", err
	}
	if p, ok := g.devs[uint64(st.Dev)]; ok {
		return "it is on the filesystem of " + p + ", which is never shared with a workload", nil
	}
	if p, ok := g.above[statID(&st)]; ok {
		if p == g.dataDir {
			return "it is berth's data directory " + g.dataDir, nil
		}
		return "it holds berth's data directory " + g.dataDir, nil
	}
	if g.dataFS != "" && uint64(st.Dev) == g.data.dev {
		p, err := fsPath(fd)
		if err != nil {
			return "", err
		}
		if within(p, g.dataFS) {
			return "it is a mount of a directory inside berth's data directory " + g.dataDir, nil
		}
		if within(g.dataFS, p) {
			return "it is a mount of a directory holding berth's data directory " + g.dataDir, nil
		}
	}
	// Climb to / through "..": each directory above must not be the data
	// directory. ".." of a mount's root is the parent of where it is
	// mounted, so a bind mount of the data directory's insides is seen
	// where it is mounted, not where its files are.
	cur := fd
	defer func() {
		if cur != fd {
			unix.Close(cur)
		}
	}()
	id := statID(&st)
	for range 4096 {
		up, err := unix.Openat(cur, "..", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			return "", err
		}
		if cur != fd {
			unix.Close(cur)
		}
		cur = up
		var ust unix.Stat_t
		if err := unix.Fstat(cur, &ust); err != nil {
			return "", err
		}
		uid := statID(&ust)
		if uid == g.data {
			return "it is inside berth's data directory " + g.dataDir, nil
		}
		if uid == id {
			return "", nil // /
		}
		id = uid
	}
	return "", errors.New("more than 4096 directories deep")
}

// checkWritable says why a workload may not write the open directory f,
// or "": files it creates there are the host's, as root where its root
// wrote them, and one it makes setuid root works wherever its filesystem
// is mounted suid and exec; so the host's mount of it must be nosuid (or
// noexec). devices: the workload's side creates device nodes as root
// (a VM's virtiofsd does; a container has no CAP_MKNOD, QEMU's 9p runs
// unprivileged), which work wherever the filesystem is mounted dev; the
// mount must then be nodev too.
func checkWritable(f *os.File, p string, devices bool) (string, error) {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &sfs); err != nil {
		return "", err
	}
	var missing []string
	if sfs.Flags&(unix.ST_NOSUID|unix.ST_NOEXEC) == 0 {
		missing = append(missing, "nosuid")
	}
	if devices && sfs.Flags&unix.ST_NODEV == 0 {
		missing = append(missing, "nodev")
	}
	if len(missing) == 0 {
		return "", nil
	}
	m := strings.Join(missing, " and ")
	return fmt.Sprintf("a workload may write it, and the host's mount of it is not %s"+
		" (a setuid-root program or a device node the workload made there would work on the host):"+
		" mount it nosuid,nodev (mount --bind %s %s && mount -o remount,bind,nosuid,nodev %s, or a bind mount in fstab with those options),"+
		" or mount it read-only", m, p, p, p), nil
}

// fsPath is where the open file f lies inside its filesystem: the root
// of its mount there (mountinfo's fourth field; not / for a bind mount
// of a subdirectory) joined with its path below the mount point. Two
// files of one filesystem are inside one another when their fsPaths are,
// however they are mounted.
func fsPath(fd int) (string, error) {
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID, &stx); err != nil {
		return "", err
	}
	if stx.Mask&unix.STATX_MNT_ID == 0 {
		return "", errors.New("the kernel reports no mount id")
	}
	p, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	id := strconv.FormatUint(stx.Mnt_id, 10)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[0] != id {
			continue
		}
		root, mnt := unescapeMountinfo(f[3]), unescapeMountinfo(f[4])
		rel, err := filepath.Rel(mnt, p)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			return "", fmt.Errorf("%s is not below its mount point %s", p, mnt)
		}
		return filepath.Join(root, rel), nil
	}
	return "", fmt.Errorf("mount %s of %s is not in /proc/self/mountinfo", id, p)
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
