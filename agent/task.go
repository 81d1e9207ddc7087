package agent

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sort"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/image"
)

// taskConfig turns a workload into the runtime-neutral task its driver runs.
func (a *Agent) taskConfig(ctx context.Context, w *api.Workload) (*driver.TaskConfig, error) {
	img, err := a.images.Get(w.ImageDigest)
	if err != nil {
		return nil, fmt.Errorf("image %s (%s) is gone from the node: %w", w.Spec.Image, w.ImageDigest, err)
	}
	logDir := a.logDir(w.ID)
	if img.Kind == image.KindDisk {
		disk, err := a.images.DiskPath(img)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(logDir, 0o700); err != nil {
			return nil, err
		}
		return &driver.TaskConfig{
			ID: w.ID, Name: w.Name,
			Image:     driver.Image{Ref: img.Ref, Digest: img.Digest, DiskPath: disk},
			Resources: taskResources(w.Spec.Resources),
			Labels:    w.Spec.Labels,
			LogDir:    logDir,
			Logs:      taskLogs(w.Spec.Logs),
		}, nil
	}
	rootfs, err := a.images.Rootfs(ctx, img)
	if err != nil {
		return nil, fmt.Errorf("unpack image %s: %w", w.Spec.Image, err)
	}
	argv, err := resolveCommand(w.Spec, img)
	if err != nil {
		return nil, err
	}
	specEnv, err := a.runEnv(w)
	if err != nil {
		return nil, err
	}
	env := mergeEnv(img.Config.Env, specEnv)
	workdir := w.Spec.Workdir
	if workdir == "" {
		workdir = img.Config.WorkingDir
	}
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		return nil, err
	}
	mounts, err := a.stageVolumes(w)
	if err != nil {
		return nil, err
	}
	return &driver.TaskConfig{
		Mounts:    mounts,
		ID:        w.ID,
		Name:      w.Name,
		Image:     driver.Image{Ref: img.Ref, Digest: img.Digest, RootfsDir: rootfs},
		Args:      argv,
		Env:       env,
		Workdir:   workdir,
		User:      img.Config.User,
		Resources: taskResources(w.Spec.Resources),
		Labels:    w.Spec.Labels,
		LogDir:    logDir,
		Logs:      taskLogs(w.Spec.Logs),
		Stdin:     w.Spec.Stdin,
		TTY:       w.Spec.TTY,
	}, nil
}

func (a *Agent) logDir(id string) string { return filepath.Join(a.logsDir, id) }

// runEnv is the spec's environment with its secret values, read from the
// workload's secrets file: they go into the task and nowhere else. Its
// errors name variables, never values.
func (a *Agent) runEnv(w *api.Workload) (map[string]string, error) {
	if len(w.Spec.SecretEnv) == 0 {
		return w.Spec.Env, nil
	}
	secrets, err := a.store.secrets(w.ID)
	if err != nil {
		return nil, fmt.Errorf("read the secret environment of workload %s: %w", w.ID, err)
	}
	env := make(map[string]string, len(w.Spec.Env)+len(w.Spec.SecretEnv))
	maps.Copy(env, w.Spec.Env)
	for k := range w.Spec.SecretEnv {
		v, ok := secrets[k]
		if !ok {
			return nil, fmt.Errorf("the value of secret_env %s of workload %s is not on this node", k, w.ID)
		}
		env[k] = v
	}
	return env, nil
}

// mergeEnv overlays the spec's variables on the image's, keeping the
// image's order and appending new ones sorted, so the result is stable.
func mergeEnv(imageEnv []string, specEnv map[string]string) []string {
	out := make([]string, 0, len(imageEnv)+len(specEnv))
	seen := map[string]bool{}
	for _, kv := range imageEnv {
		k, _, _ := cutEnv(kv)
		if v, ok := specEnv[k]; ok {
			out = append(out, k+"="+v)
		} else {
			out = append(out, kv)
		}
		seen[k] = true
	}
	keys := make([]string, 0, len(specEnv))
	for k := range specEnv {
		if !seen[k] {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, k+"="+specEnv[k])
	}
	hasPath := false
	for _, kv := range out {
		if k, _, _ := cutEnv(kv); k == "PATH" {
			hasPath = true
		}
	}
	if !hasPath {
		out = append(out, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return out
}

func cutEnv(kv string) (string, string, bool) {
	for i := 0; i < len(kv); i++ {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}

// taskLogs are a spec's log rotation as the driver's monitor does it.
func taskLogs(l *api.LogSpec) driver.LogLimits {
	if l == nil {
		return driver.LogLimits{}
	}
	return driver.LogLimits{MaxBytes: l.MaxBytes, MaxFiles: l.MaxFiles}
}

// taskResources are a spec's resources as a driver enforces them: the
// limits (a VM's vCPUs and guest RAM), with the CPU request as a
// container's weight.
func taskResources(r api.Resources) driver.Resources {
	l := limits(r)
	return driver.Resources{
		CPU:         l.CPU,
		CPURequest:  r.CPU,
		MemoryBytes: l.MemoryMB << 20,
		Pids:        r.Pids,
		DiskBytes:   r.DiskMB << 20,
	}
}
