package ctrdriver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
)

// UserNSMode says whether containers run in user namespaces.
type UserNSMode string

const (
	// UserNSAuto runs every container in a user namespace of its own where
	// the kernel can id-map the image under its overlay; Fingerprint says
	// why not elsewhere.
	UserNSAuto UserNSMode = "auto"
	// UserNSOff runs containers without a user namespace: their root is
	// the host's root, held in by capabilities, seccomp and mounts alone.
	UserNSOff UserNSMode = "off"
)

// Defaults of UserNSOptions: 16384 containers of 65536 ids each, from
// host id 2^30 on, far above the ids useradd gives users and their
// subordinate ranges (SUB_UID_MAX 600100000) and below 2^31, which some
// tools misread as negative.
const (
	DefaultUserNSBase      = 1 << 30
	DefaultUserNSSize      = 1 << 30
	DefaultUserNSRangeSize = 65536
)

// UserNSOptions configure the containers' user namespaces. Each
// container gets RangeSize host ids of its own, uids and gids alike, out
// of Size ids from Base on (or out of SubIDUser's entries in /etc/subuid
// and /etc/subgid, when set).
type UserNSOptions struct {
	Mode UserNSMode
	// SubIDUser takes the host ids from this user's entries in /etc/subuid
	// and /etc/subgid (the operator registers them there, e.g. with
	// `usermod --add-subuids`, so no other user is given them); Base and
	// Size are then unused.
	SubIDUser string
	Base      uint32
	Size      uint32
	RangeSize uint32
	// Dir holds the range directories: it and the directories above it
	// must let other users through (o+x), as the mapped ids pass there.
	// Default: <Root>/userns (the driver's root is then made 0711); the
	// agent puts it at the top of its data directory, so the driver's
	// root stays closed to everyone else.
	Dir string

	// etc is where passwd, group, subuid and subgid are read; tests set it.
	etc string
}

func (o UserNSOptions) withDefaults() UserNSOptions {
	if o.Mode == "" {
		o.Mode = UserNSAuto
	}
	if o.Base == 0 {
		o.Base = DefaultUserNSBase
	}
	if o.Size == 0 {
		o.Size = DefaultUserNSSize
	}
	if o.RangeSize == 0 {
		o.RangeSize = DefaultUserNSRangeSize
	}
	if o.etc == "" {
		o.etc = "/etc"
	}
	return o
}

// usernsRecord is the task directory's record of the ids its container
// holds: the task directory is the only truth of who holds which range,
// so whatever removes the task (Destroy, Recover of a task of an earlier
// boot, a failed Start) releases its range, and nothing else can leak one.
const usernsRecord = "userns.json"

// userns hands out the containers' id ranges. Its directory holds the
// lock that serializes allocations (of every driver on this root, in
// this process or another) and, Docker's userns-remap layout, one
// directory per range in use, owned by the range's root with mode 0710:
// the only path into a container's root filesystem, searchable by that
// container's ids and by no other unprivileged user.
type userns struct {
	opts     UserNSOptions
	root     string // the driver's root
	dir      string // UserNSOptions.Dir (0711)
	tasksDir string
	log      *slog.Logger

	once   sync.Once
	on     bool
	reason string // why user namespaces are off
	uid    uint32 // first host uid of the ranges
	gid    uint32 // first host gid of the ranges
	slots  uint32 // number of ranges

	mu   sync.Mutex // serializes this process's allocations ahead of the file lock
	next uint32     // where the next allocation starts looking
	// ranges caches the range records of the task directories by task,
	// each read from disk once: a record is written once, when its task's
	// range is given, and goes with its directory, so a start reads no
	// other task's record. A directory without one (yet) is read again.
	ranges map[string]idMap
	// pool holds the user namespaces of the ranges given next and of those
	// in use, for the id-mapped mounts (nspool.go).
	pool *nsPool
}

func newUserNS(opts UserNSOptions, root, tasksDir string, log *slog.Logger) *userns {
	opts = opts.withDefaults()
	dir := opts.Dir
	if dir == "" {
		dir = filepath.Join(root, "userns")
	}
	return &userns{opts: opts, root: root, dir: dir, tasksDir: tasksDir, log: log, pool: newNSPool(), ranges: map[string]idMap{}}
}

// enabled reports whether containers get user namespaces, and why not.
// The probe runs once per driver.
func (u *userns) enabled() (bool, string) {
	u.once.Do(func() {
		if err := u.probe(); err != nil {
			u.reason = err.Error()
			if u.opts.Mode != UserNSOff {
				u.log.Warn("containers run without user namespaces", "reason", u.reason)
			}
			return
		}
		u.on = true
	})
	return u.on, u.reason
}

// describe adds the user namespace facts to a fingerprint's details.
func (u *userns) describe(details map[string]string) {
	on, reason := u.enabled()
	if !on {
		details["userns"] = "off"
		details["userns_reason"] = reason
		return
	}
	details["userns"] = "on"
	rs := u.opts.RangeSize
	details["userns_ids"] = fmt.Sprintf("uids %d-%d, gids %d-%d: %d ranges of %d",
		u.uid, u.uid+u.slots*rs-1, u.gid, u.gid+u.slots*rs-1, u.slots, rs)
}

// probe checks everything user namespaces need, in the order an operator
// would fix them.
func (u *userns) probe() error {
	if u.opts.Mode == UserNSOff {
		return errors.New("turned off by container.userns.mode: off")
	}
	if u.opts.Mode != UserNSAuto {
		return fmt.Errorf("container.userns.mode %q is not auto or off", u.opts.Mode)
	}
	if os.Geteuid() != 0 {
		return errors.New("the agent does not run as root")
	}
	if err := u.resolveIDs(); err != nil {
		return err
	}
	if filepath.Dir(u.dir) == filepath.Clean(u.root) {
		if err := os.Chmod(u.root, 0o711); err != nil {
			return fmt.Errorf("make %s searchable: %w", u.root, err)
		}
	}
	if err := searchable(u.dir); err != nil {
		return err
	}
	if err := os.MkdirAll(u.dir, 0o711); err != nil {
		return fmt.Errorf("create %s: %w", u.dir, err)
	}
	if err := os.Chmod(u.dir, 0o711); err != nil {
		return fmt.Errorf("make %s searchable: %w", u.dir, err)
	}
	// Under the allocation lock: a probe removes what an interrupted one
	// left, never one another driver runs.
	unlock, err := fileutil.Lock(context.Background(), filepath.Join(u.dir, ".lock"))
	if err != nil {
		return err
	}
	defer unlock()
	if err := probeIDMappedOverlay(u.dir, idMap{UID: u.uid, GID: u.gid, Size: u.opts.RangeSize}); err != nil {
		return fmt.Errorf("the kernel cannot run containers on id-mapped image layers: %w", err)
	}
	return nil
}

// resolveIDs settles the host ids the ranges come from and checks that
// no host user, group or other user's subordinate ids are among them.
func (u *userns) resolveIDs() error {
	o := u.opts
	subuid, err := readSubIDs(filepath.Join(o.etc, "subuid"))
	if err != nil {
		return err
	}
	subgid, err := readSubIDs(filepath.Join(o.etc, "subgid"))
	if err != nil {
		return err
	}
	uidSize, gidSize := o.Size, o.Size
	u.uid, u.gid = o.Base, o.Base
	from := "container.userns.base and size"
	if o.SubIDUser != "" {
		from = fmt.Sprintf("the subordinate ids of %s", o.SubIDUser)
		ue, ok := subuid.of(o.SubIDUser)
		if !ok {
			return fmt.Errorf("container.userns.subid_user %q has no entry in %s", o.SubIDUser, filepath.Join(o.etc, "subuid"))
		}
		ge, ok := subgid.of(o.SubIDUser)
		if !ok {
			return fmt.Errorf("container.userns.subid_user %q has no entry in %s", o.SubIDUser, filepath.Join(o.etc, "subgid"))
		}
		u.uid, uidSize, u.gid, gidSize = ue.start, ue.count, ge.start, ge.count
	}
	if uint64(u.uid)+uint64(uidSize) > 1<<32-1 || uint64(u.gid)+uint64(gidSize) > 1<<32-1 {
		return fmt.Errorf("%s reach past the last host id 4294967294", from)
	}
	if u.uid == 0 || u.gid == 0 {
		return fmt.Errorf("%s include the host's root", from)
	}
	u.slots = min(uidSize, gidSize) / o.RangeSize
	if u.slots == 0 {
		return fmt.Errorf("%s hold fewer than container.userns.range_size (%d) ids", from, o.RangeSize)
	}
	uidEnd, gidEnd := u.uid+u.slots*o.RangeSize, u.gid+u.slots*o.RangeSize
	for _, e := range subuid {
		if e.user != o.SubIDUser && overlaps(e.start, e.count, u.uid, uidEnd-u.uid) {
			return fmt.Errorf("%s overlap %s's subordinate uids %d-%d (%s): another user's containers could own these ids", from, e.user, e.start, e.start+e.count-1, filepath.Join(o.etc, "subuid"))
		}
	}
	for _, e := range subgid {
		if e.user != o.SubIDUser && overlaps(e.start, e.count, u.gid, gidEnd-u.gid) {
			return fmt.Errorf("%s overlap %s's subordinate gids %d-%d (%s): another user's containers could own these ids", from, e.user, e.start, e.start+e.count-1, filepath.Join(o.etc, "subgid"))
		}
	}
	if name, id, ok := idInRange(filepath.Join(o.etc, "passwd"), u.uid, uidEnd); ok {
		return fmt.Errorf("%s include host user %s (uid %d)", from, name, id)
	}
	if name, id, ok := idInRange(filepath.Join(o.etc, "group"), u.gid, gidEnd); ok {
		return fmt.Errorf("%s include host group %s (gid %d)", from, name, id)
	}
	return nil
}

func overlaps(aStart, aCount, bStart, bCount uint32) bool {
	return uint64(aStart) < uint64(bStart)+uint64(bCount) && uint64(bStart) < uint64(aStart)+uint64(aCount)
}

// subIDEntry is one line of /etc/subuid or /etc/subgid: user:start:count.
type subIDEntry struct {
	user         string
	start, count uint32
}

type subIDs []subIDEntry

func (s subIDs) of(user string) (subIDEntry, bool) {
	for _, e := range s {
		if e.user == user {
			return e, true
		}
	}
	return subIDEntry{}, false
}

// readSubIDs reads a subuid-format file; a missing file has no entries.
func readSubIDs(path string) (subIDs, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out subIDs
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, ":")
		if len(fields) != 3 {
			return nil, fmt.Errorf("%s:%d: %q is not user:start:count", path, n, line)
		}
		start, err1 := strconv.ParseUint(fields[1], 10, 32)
		count, err2 := strconv.ParseUint(fields[2], 10, 32)
		if err1 != nil || err2 != nil || count == 0 {
			return nil, fmt.Errorf("%s:%d: %q is not user:start:count", path, n, line)
		}
		out = append(out, subIDEntry{user: fields[0], start: uint32(start), count: uint32(count)})
	}
	return out, sc.Err()
}

// idInRange finds an entry of a passwd- or group-format file whose id is
// in [lo, hi).
func idInRange(path string, lo, hi uint32) (name string, id uint32, ok bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Split(line, ":")
		if len(fields) < 3 {
			continue
		}
		n, err := strconv.ParseUint(fields[2], 10, 32)
		if err == nil && uint32(n) >= lo && uint32(n) < hi {
			return fields[0], uint32(n), true
		}
	}
	return "", 0, false
}

// searchable checks that every directory above dir lets other users
// through (o+x): a container's root walks the path to its root
// filesystem as its mapped, unprivileged host ids.
func searchable(dir string) error {
	for p := filepath.Dir(filepath.Clean(dir)); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("%s (mode %04o) does not let other users through: the containers' mapped ids must reach their root filesystems under %s (chmod o+x %s, as Docker's userns-remap needs)", p, fi.Mode().Perm(), dir, p)
		}
		if p == "/" {
			return nil
		}
	}
}

// probeIDMappedOverlay mounts an overlay on an id-mapped lower layer in a
// scratch directory under dir and checks the lower's root owner shows as
// the namespace's root.
func probeIDMappedOverlay(dir string, m idMap) (err error) {
	// A probe an agent crash interrupted left its mounts.
	stale, _ := filepath.Glob(filepath.Join(dir, ".probe-*"))
	for _, s := range stale {
		_ = unmountAll(filepath.Join(s, "merged"))
		_ = unmountAll(filepath.Join(s, "stage"))
		_ = os.RemoveAll(s)
	}
	scratch, err := os.MkdirTemp(dir, ".probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	lower, stage, upper, work, merged := filepath.Join(scratch, "lower"), filepath.Join(scratch, "stage"),
		filepath.Join(scratch, "upper"), filepath.Join(scratch, "work"), filepath.Join(scratch, "merged")
	for _, d := range []string{lower, stage, upper, work, merged} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(lower, "f"), nil, 0o600); err != nil {
		return err
	}
	ns, err := usernsFile(m)
	if err != nil {
		return err
	}
	defer ns.Close()
	if err := mountIDMapped(lower, stage, ns); err != nil {
		return err
	}
	defer unmountAll(stage)
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_NODEV, overlayOptions(stage, upper, work, false)); err != nil {
		return fmt.Errorf("mount overlay on an id-mapped lower layer: %w", err)
	}
	defer unmountAll(merged)
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(merged, "f"), &st); err != nil {
		return err
	}
	if st.Uid != m.UID || st.Gid != m.GID {
		return fmt.Errorf("an id-mapped lower file shows as %d:%d through overlayfs, want %d:%d", st.Uid, st.Gid, m.UID, m.GID)
	}
	return nil
}

// allocate gives the task a range of its own and records it in the task
// directory before anything uses it.
func (u *userns) allocate(ctx context.Context, taskDir string) (idMap, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	unlock, err := fileutil.Lock(ctx, filepath.Join(u.dir, ".lock"))
	if err != nil {
		return idMap{}, err
	}
	defer unlock()
	used, err := u.used()
	if err != nil {
		return idMap{}, err
	}
	for i := uint32(0); i < u.slots; i++ {
		s := (u.next + i) % u.slots
		if used[s] {
			continue
		}
		m := u.slot(s)
		// Not synced: after a crash of the agent the page cache still
		// has it, and after a power loss no container of the task runs
		// any more (a record that was lost frees a range no one uses).
		if err := fileutil.ReplaceJSON(filepath.Join(taskDir, usernsRecord), m); err != nil {
			return idMap{}, err
		}
		u.ranges[filepath.Base(taskDir)] = m
		// Rotating rather than lowest-first: a range just released is
		// the last to be given again.
		u.next = (s + 1) % u.slots
		next := make([]idMap, 0, nsAhead)
		for i := range uint32(nsAhead) {
			next = append(next, u.slot((u.next+i)%u.slots))
		}
		u.pool.prepare(next)
		return m, nil
	}
	return idMap{}, fmt.Errorf("all %d user namespace id ranges are in use (raise container.userns.size): %w", u.slots, errdefs.ErrResourceExhausted)
}

// slot is the range of slot s.
func (u *userns) slot(s uint32) idMap {
	rs := u.opts.RangeSize
	return idMap{UID: u.uid + s*rs, GID: u.gid + s*rs, Size: rs}
}

// used returns the ranges that the task directories hold. Called under mu.
func (u *userns) used() (map[uint32]bool, error) {
	entries, err := os.ReadDir(u.tasksDir)
	if err != nil {
		return nil, fmt.Errorf("list container tasks: %w", err)
	}
	used := map[uint32]bool{}
	rs := uint64(u.opts.RangeSize)
	mark := func(base, start, size uint32) {
		// Ranges of a record overlapping slots (the whole slot when the
		// configuration changed under a running task).
		lo, hi := uint64(start), uint64(start)+uint64(size)
		if hi <= uint64(base) || lo >= uint64(base)+uint64(u.slots)*rs {
			return
		}
		first := (max(lo, uint64(base)) - uint64(base)) / rs
		last := (hi - 1 - uint64(base)) / rs
		for s := first; s <= last && s < uint64(u.slots); s++ {
			used[uint32(s)] = true
		}
	}
	present := make(map[string]bool, len(entries))
	for _, e := range entries {
		present[e.Name()] = true
		m, ok := u.ranges[e.Name()]
		if !ok {
			rec, err := readIDMap(filepath.Join(u.tasksDir, e.Name()))
			if err != nil {
				u.log.Warn("unreadable user namespace record; its range may be given again", "task_id", e.Name(), "err", err)
				continue
			}
			if rec == nil {
				continue
			}
			m = *rec
			u.ranges[e.Name()] = m
		}
		mark(u.uid, m.UID, m.Size)
		mark(u.gid, m.GID, m.Size)
	}
	for name := range u.ranges {
		if !present[name] {
			delete(u.ranges, name) // the task is gone, and its range free
		}
	}
	return used, nil
}

// readIDMap reads a task's range; nil when it holds none.
func readIDMap(taskDir string) (*idMap, error) {
	var m idMap
	err := fileutil.ReadJSON(filepath.Join(taskDir, usernsRecord), &m)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if m.UID == 0 || m.GID == 0 || m.Size == 0 {
		return nil, fmt.Errorf("user namespace record of %s: %+v is not a range", taskDir, m)
	}
	return &m, nil
}

// rangeDir is the directory of the range m, Docker's uid.gid layout.
func (u *userns) rangeDir(m idMap) string {
	return filepath.Join(u.dir, fmt.Sprintf("%d.%d", m.UID, m.GID))
}

// setupUserNS puts a task holding the range ids (nil: none) into its user
// namespace: the spec's mappings and root, and what the container cannot
// do for itself in a network namespace the host's user namespace owns.
func setupUserNS(s *specs.Spec, cfg *driver.TaskConfig, dir, rootfs string, ids *idMap) error {
	if ids == nil {
		return nil
	}
	sysfs, err := prepareNetwork(cfg, dir)
	if err != nil {
		return err
	}
	return userNSSpec(s, *ids, rootfs, sysfs)
}

// unprivilegedPortStart is the sysctl that lets root in a container bind
// ports below 1024 in a network namespace of the host's user namespace,
// where its CAP_NET_BIND_SERVICE does not count.
const unprivilegedPortStart = "/proc/sys/net/ipv4/ip_unprivileged_port_start"

// prepareNetwork readies a network namespace the task joins but does not
// own (bridge: the agent's; host: the host's): a sysfs of it for the
// container's /sys (dir/sys, returned), and in the bridge's namespace,
// ports below 1024 for everyone (the namespace is the container's alone).
// A namespace runc makes (mode none) is owned by the container's user
// namespace, and needs neither.
func prepareNetwork(cfg *driver.TaskConfig, dir string) (sysfs string, err error) {
	n := cfg.Network
	if n == nil || n.Mode == driver.NetworkNone || (n.Mode == driver.NetworkBridge && n.Netns == "") {
		return "", nil
	}
	sysfs = filepath.Join(dir, "sys")
	if err := os.Mkdir(sysfs, 0o700); err != nil {
		return "", fmt.Errorf("create the sysfs mount point: %w", err)
	}
	mount := func() error {
		if err := unix.Mount("sysfs", sysfs, "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("mount sysfs for the container: %w", err)
		}
		return nil
	}
	if n.Mode == driver.NetworkHost {
		return sysfs, mount()
	}
	return sysfs, inNetns(n.Netns, func() error {
		f, err := os.OpenFile(unprivilegedPortStart, os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("let the container's root bind ports below 1024: %w", err)
		}
		_, err = f.WriteString("0")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("let the container's root bind ports below 1024: %w", err)
		}
		return mount()
	})
}

// inNetns runs fn on a thread of its own in the network namespace at
// path (sysctls under /proc/sys/net and sysfs mounts take the calling
// thread's namespace).
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Left locked when the thread cannot go home: it then ends with
		// this goroutine rather than run others in the wrong namespace.
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open the agent's network namespace: %w", err)
			return
		}
		defer home.Close()
		ns, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open the container's network namespace: %w", err)
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter the container's network namespace %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to the agent's network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
