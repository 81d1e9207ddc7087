package driver

import (
	"fmt"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"

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
