package guest

import (
	"fmt"
	"path"
	"strings"
)

// Volume transports: how a host directory reaches the guest.
const (
	// FSVirtiofs is virtio-fs (a virtiofsd on the host, shared memory).
	FSVirtiofs = "virtiofs"
	// FS9p is 9p over virtio, QEMU's own file server: the fallback where
	// virtio-fs cannot work.
	FS9p = "9p"
)

// VolumeModuleListPath lists, as ModuleListPath does, the modules of the
// volume transports; berth-init loads them only for a config with
// volumes, so a guest without pays nothing for them.
const VolumeModuleListPath = "/berth/modules.volumes"

// Volume is a host directory the guest mounts at Path: the device whose
// mount tag is Tag, over FSType.
type Volume struct {
	Tag      string `json:"tag"`
	Path     string `json:"path"`
	FSType   string `json:"fstype"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// VolumeTag is the mount tag of a task's n-th volume (at most 36 bytes
// for virtio-fs, 31 for 9p).
func VolumeTag(n int) string { return fmt.Sprintf("berth-vol%d", n) }

func validateVolumes(vols []Volume) []string {
	var problems []string
	for i, v := range vols {
		switch {
		case v.Tag == "" || len(v.Tag) > 31 || strings.ContainsAny(v.Tag, "\x00/ ,"):
			problems = append(problems, fmt.Sprintf("volumes[%d].tag: %q is not a mount tag", i, v.Tag))
		case !path.IsAbs(v.Path) || path.Clean(v.Path) != v.Path || v.Path == "/":
			problems = append(problems, fmt.Sprintf("volumes[%d].path: %q is not a clean absolute path other than /", i, v.Path))
		case v.FSType != FSVirtiofs && v.FSType != FS9p:
			problems = append(problems, fmt.Sprintf("volumes[%d].fstype: %q is not virtiofs or 9p", i, v.FSType))
		}
	}
	return problems
}
