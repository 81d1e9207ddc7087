package driver

import (
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
)

// Where a task finds its allocation's directories, as Nomad's drivers
// with image isolation put them (and Nomad's NOMAD_*_DIR variables say).
const (
	AllocDirPath   = "/alloc"
	LocalDirPath   = "/local"
	SecretsDirPath = "/secrets"
)

// addVolumes gives a task's workload its volumes, whichever isolation
// berth picks: the allocation's directories (alloc/, local/, secrets/,
// as host paths, when allocDirs: the berth agent must allow Nomad's
// alloc dir in volumes.host_paths), Nomad's host volumes (volume_mount,
// as host paths) and the named berth volumes of the task config
// (volumes = ["NAME:/PATH[:ro]"]).
func addVolumes(spec *api.WorkloadSpec, cfg *drivers.TaskConfig, tc *TaskConfig, allocDirs bool) error {
	if allocDirs && cfg.AllocDir != "" {
		td := cfg.TaskDir()
		if err := hardenMount(td.SecretsDir); err != nil {
			return fmt.Errorf("berth: secrets dir %s: %w", td.SecretsDir, err)
		}
		spec.Volumes = append(spec.Volumes,
			api.VolumeMount{HostPath: td.SharedAllocDir, Path: AllocDirPath},
			api.VolumeMount{HostPath: td.LocalDir, Path: LocalDirPath},
			api.VolumeMount{HostPath: td.SecretsDir, Path: SecretsDirPath},
		)
	}
	for _, m := range cfg.Mounts {
		if m == nil {
			continue
		}
		spec.Volumes = append(spec.Volumes, api.VolumeMount{HostPath: m.HostPath, Path: m.TaskPath, ReadOnly: m.Readonly})
	}
	for _, v := range tc.Volumes {
		m, err := parseVolume(v)
		if err != nil {
			return err
		}
		spec.Volumes = append(spec.Volumes, m)
	}
	return nil
}

// hardenMount makes dir, when it is a mount of its own, nosuid and nodev
// too, keeping its other flags. Nomad mounts each task's secrets tmpfs
// noexec only, and berth refuses to let a workload that makes device
// nodes (a VM over virtio-fs) write a host path on a dev mount. A
// directory that is no mount of its own is left as it is (berth checks
// the mount it is on).
func hardenMount(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); errors.Is(err, unix.ENOENT) {
		return nil // berth says it does not exist
	} else if err != nil {
		return err
	}
	if st.Flags&(unix.ST_NOSUID|unix.ST_NODEV) == unix.ST_NOSUID|unix.ST_NODEV {
		return nil
	}
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NOSUID | unix.MS_NODEV)
	for _, f := range []struct{ st, ms uintptr }{
		{unix.ST_RDONLY, unix.MS_RDONLY}, {unix.ST_NOEXEC, unix.MS_NOEXEC}, {unix.ST_NOATIME, unix.MS_NOATIME},
		{unix.ST_NODIRATIME, unix.MS_NODIRATIME}, {unix.ST_RELATIME, unix.MS_RELATIME},
	} {
		if uintptr(st.Flags)&f.st != 0 {
			flags |= f.ms
		}
	}
	err := unix.Mount("", dir, "", flags, "")
	if errors.Is(err, unix.EINVAL) {
		return nil // not a mount point
	}
	return err
}

// parseVolume reads NAME:/PATH[:ro|rw], a named berth volume.
func parseVolume(s string) (api.VolumeMount, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || strings.HasPrefix(parts[0], "/") || !strings.HasPrefix(parts[1], "/") {
		return api.VolumeMount{}, fmt.Errorf("berth: volumes: %q: want NAME:/PATH[:ro] (a berth volume; host directories are Nomad host volumes and volume_mount)", s)
	}
	m := api.VolumeMount{Name: parts[0], Path: parts[1]}
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
			m.ReadOnly = true
		case "rw":
		default:
			return api.VolumeMount{}, fmt.Errorf("berth: volumes: %q: the mode is ro or rw", s)
		}
	}
	return m, nil
}
