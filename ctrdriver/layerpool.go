package ctrdriver

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/loopfs"
	"github.com/berthd/berth/internal/proc"
)

// layerPool keeps filesystems for the writable layers of the next
// containers made and mounted ahead of their starts: a start with the
// default disk budget takes one (a rename and a mount move) instead of
// copying a template, attaching a loop device and mounting ext4 on its
// path, and the pool makes the next one in the background.
//
// The pool is bounded (want filesystems of one size, the default budget;
// other sizes are made at their start), owned by the driver, shown in node
// status, and lives in its own directory: whatever is there when a driver
// is made (an agent that crashed left its filesystems mounted, a reboot
// left their files) is released and the pool made afresh, and Close
// releases it. Its filesystems are empty, made the same way as a start
// makes one, and only root reaches them: a container gets one nobody used.
type layerPool struct {
	dir  string
	size int64
	want int
	tpl  *loopfs.Templates
	log  *slog.Logger

	mu      sync.Mutex
	ready   []string // entries ready to take, oldest first
	seq     int
	filling bool
	closed  bool
	lastErr string // why the last fill stopped short, "" once one succeeds
	taken   int    // starts served from the pool
	wg      sync.WaitGroup
}

// poolDir is the pool's directory under the driver's root.
const poolDir = "layer-pool"

// newLayerPool releases what an earlier driver left in dir and starts
// filling a pool of want filesystems of size bytes; nil (no pool) when
// want or size is 0.
func newLayerPool(dir string, size int64, want int, tpl *loopfs.Templates, log *slog.Logger) (*layerPool, error) {
	if err := releaseDir(dir); err != nil {
		return nil, fmt.Errorf("release the prepared writable layers: %w", err)
	}
	if want <= 0 || size <= 0 {
		return nil, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &layerPool{dir: dir, size: max(size, loopfs.MinBytes), want: want, tpl: tpl, log: log}
	p.fill()
	return p, nil
}

// releaseDir unmounts and removes every entry of a pool directory.
func releaseDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if e.IsDir() {
			if err := unmountAll(p); err != nil {
				return err
			}
		}
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	return nil
}

func (p *layerPool) mnt(name string) string { return filepath.Join(p.dir, name) }
func (p *layerPool) img(name string) string { return filepath.Join(p.dir, name+".img") }

// fill makes filesystems in the background until want are ready (one
// filler at a time).
func (p *layerPool) fill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.filling || p.closed || len(p.ready) >= p.want {
		return
	}
	p.filling = true
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			p.mu.Lock()
			if p.closed || len(p.ready) >= p.want {
				p.filling = false
				p.mu.Unlock()
				return
			}
			p.seq++
			name := strconv.Itoa(p.seq)
			p.mu.Unlock()
			// In the background: a layer is made while a start runs.
			err := proc.InBackground(func() error { return p.make(name) })
			p.mu.Lock()
			if err != nil {
				// The start that finds the pool empty makes its own, and
				// fails with the reason if it cannot either.
				if p.lastErr == "" {
					p.log.Warn("prepare a writable layer", "err", err)
				}
				p.lastErr = err.Error()
				p.filling = false
				p.mu.Unlock()
				return
			}
			p.lastErr = ""
			if p.closed {
				p.mu.Unlock()
				p.remove(name)
				return
			}
			p.ready = append(p.ready, name)
			p.mu.Unlock()
		}
	}()
}

// make prepares one entry: a filesystem of the pool's size mounted on its
// directory, as mountScratch makes one.
func (p *layerPool) make(name string) error {
	if err := os.Mkdir(p.mnt(name), 0o700); err != nil {
		return err
	}
	if err := p.tpl.Create(p.img(name), p.size, 0, 0); err != nil {
		p.remove(name)
		return err
	}
	if err := loopfs.Mount(p.img(name), p.mnt(name), unix.MS_NODEV|unix.MS_NOSUID); err != nil {
		p.remove(name)
		return err
	}
	if err := os.Chmod(p.mnt(name), 0o700); err != nil {
		p.remove(name)
		return err
	}
	return nil
}

// remove releases an entry: its mount (and with it the loop device), its
// file and its directory.
func (p *layerPool) remove(name string) {
	if err := unmountAll(p.mnt(name)); err != nil {
		p.log.Warn("release a prepared writable layer", "err", err)
	}
	_ = os.Remove(p.mnt(name))
	_ = os.Remove(p.img(name))
}

// take gives a task a prepared filesystem of size bytes: its file becomes
// img and its mount moves to target (an empty directory). It reports
// false, with nothing changed, when the pool has none of that size.
func (p *layerPool) take(size int64, img, target string) bool {
	if p == nil || max(size, loopfs.MinBytes) != p.size {
		return false
	}
	p.mu.Lock()
	if len(p.ready) == 0 || p.closed {
		p.mu.Unlock()
		p.fill()
		return false
	}
	name := p.ready[0]
	p.ready = p.ready[1:]
	p.mu.Unlock()
	defer p.fill()
	if err := os.Rename(p.img(name), img); err != nil {
		p.log.Warn("take a prepared writable layer", "err", err)
		p.remove(name)
		return false
	}
	if err := moveMount(p.mnt(name), target); err != nil {
		p.log.Warn("take a prepared writable layer", "err", err)
		_ = os.Rename(img, p.img(name))
		p.remove(name)
		return false
	}
	_ = os.Remove(p.mnt(name))
	p.mu.Lock()
	p.taken++
	p.mu.Unlock()
	return true
}

// moveMount moves the mount on src to target: a clone of it is attached
// on target and src is detached, which works whatever the propagation of
// the mounts above (MS_MOVE does not under a shared parent).
func moveMount(src, target string) error {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return fmt.Errorf("clone the mount on %s: %w", src, err)
	}
	defer unix.Close(fd)
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach the mount of %s on %s: %w", src, target, err)
	}
	if err := unix.Unmount(src, unix.MNT_DETACH); err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return fmt.Errorf("detach %s: %w", src, err)
	}
	return nil
}

// describe adds the pool's state to a fingerprint's details.
func (p *layerPool) describe(details map[string]string) {
	if p == nil {
		details["prepared_layers"] = "off"
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	s := fmt.Sprintf("%d of %d ready (%d MiB each), %d starts served", len(p.ready), p.want, p.size>>20, p.taken)
	if p.lastErr != "" {
		s += "; last attempt failed: " + p.lastErr
	}
	details["prepared_layers"] = s
}

// close stops filling and releases every prepared filesystem.
func (p *layerPool) close() error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	names := p.ready
	p.ready = nil
	p.mu.Unlock()
	for _, n := range names {
		p.remove(n)
	}
	return releaseDir(p.dir)
}
