package monitor

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// releaseWait bounds how long releaseStopped waits for a cgroup to empty:
// the container's other processes, killed by the kernel when its init
// ended, may still be exiting.
const releaseWait = time.Second

// releaseStopped does what `runc delete` does for a container whose init
// has exited and been reaped, without starting a runc process (a whole Go
// program's start-up, and CPU a busy node spends on every workload): it
// removes the cgroups runc made for it, as runc recorded them in its
// state, and then runc's state directory. Anything it does not expect (a
// state it cannot read, a file besides the state, a cgroup that stays
// busy) is an error, and the caller falls back to runc delete.
//
// berth's containers always have a PID namespace of their own: when the
// init ends the kernel kills every other process in it, so no process of
// the container outlives the init for long.
func releaseStopped(runcRoot, id string) error {
	dir := filepath.Join(runcRoot, id)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil // nothing left
	}
	if err != nil {
		return err
	}
	if len(entries) != 1 || entries[0].Name() != "state.json" {
		names := make([]string, 0, len(entries))
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return fmt.Errorf("runc state of %s holds %s, not only state.json", id, strings.Join(names, ", "))
	}
	data, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		return err
	}
	var st struct {
		ID          string            `json:"id"`
		CgroupPaths map[string]string `json:"cgroup_paths"`
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("runc state of %s: %w", id, err)
	}
	if st.ID != id {
		return fmt.Errorf("runc state of %s names container %q", id, st.ID)
	}
	for _, p := range st.CgroupPaths {
		if !strings.HasPrefix(p, "/sys/fs/cgroup/") {
			return fmt.Errorf("runc state of %s: cgroup %q is not under /sys/fs/cgroup", id, p)
		}
	}
	deadline := time.Now().Add(releaseWait)
	for _, p := range st.CgroupPaths {
		if err := removeCgroupDir(p, deadline); err != nil {
			return err
		}
	}
	return os.RemoveAll(dir)
}

// removeCgroupDir removes an (empty) cgroup directory, retrying while it
// still has processes until deadline.
func removeCgroupDir(path string, deadline time.Time) error {
	wait := time.Millisecond
	for {
		err := unix.Rmdir(path)
		switch {
		case err == nil, errors.Is(err, unix.ENOENT):
			return nil
		case !errors.Is(err, unix.EBUSY) || time.Now().After(deadline):
			return fmt.Errorf("remove cgroup %s: %w", path, err)
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}
