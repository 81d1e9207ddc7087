//go:build linux

package pid1

import (
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/guest"
)

// loadVolumeModules loads the volume transports' modules (virtiofs, 9p)
// when the config has volumes; a guest without them loads none.
func (in *initProc) loadVolumeModules(cfg *guest.Config) error {
	if len(cfg.Volumes) == 0 {
		return nil
	}
	return loadModules(guest.VolumeModuleListPath, cpuModaliasPath, finitModule, func(msg string) { in.logf("%s", msg) })
}

// volumeMountTimeout bounds the wait for a volume's device: its driver
// binds to it once its module is loaded.
const volumeMountTimeout = 10 * time.Second

// mountVolumes mounts the config's volumes in the workload's root (init
// is chrooted into it already), nosuid and nodev, read-only when asked
// (the host shares a read-only mount as well). They are unmounted before
// power-off, so what the workload wrote has reached the host.
func (in *initProc) mountVolumes(cfg *guest.Config) error {
	for _, v := range cfg.Volumes {
		if err := os.MkdirAll(v.Path, 0o755); err != nil {
			return fmt.Errorf("volume %s: create mount point: %w", v.Path, err)
		}
		flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
		if v.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		data := ""
		if v.FSType == guest.FS9p {
			data = "trans=virtio,version=9p2000.L,msize=524288,access=client,cache=mmap"
		}
		deadline := time.Now().Add(volumeMountTimeout)
		for {
			err := unix.Mount(v.Tag, v.Path, v.FSType, flags, data)
			if err == nil {
				break
			}
			// The device may still be binding to its driver.
			if (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV)) && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
				continue
			}
			return fmt.Errorf("volume %s: mount %s (%s): %w", v.Path, v.Tag, v.FSType, err)
		}
		in.mounts = append(in.mounts, v.Path)
	}
	return nil
}
