package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/volume"
)

func volumeEnv(t *testing.T) (*env, *volume.Store, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: a workload's volumes are staged as mounts")
	}
	e := newEnv(t)
	allowed := filepath.Join(t.TempDir(), "allowed")
	if err := os.MkdirAll(filepath.Join(allowed, "share"), 0o755); err != nil {
		t.Fatal(err)
	}
	vs, err := volume.Open(volume.Options{Root: filepath.Join(e.dir, "volumes"), DataDir: e.dir, HostPaths: []string{allowed}})
	if err != nil {
		t.Fatal(err)
	}
	e.change = func(o *Options) { o.Volumes = vs }
	e.restart()
	return e, vs, allowed
}

func fields(err error) []string {
	var v *errdefs.ValidationError
	if !errors.As(err, &v) {
		return nil
	}
	var out []string
	for _, f := range v.Fields {
		out = append(out, f.Field+": "+f.Detail)
	}
	return out
}

// Bad volume specs are refused with their field paths, and nothing is
// admitted.
func TestVolumeSpecRefused(t *testing.T) {
	e, _, allowed := volumeEnv(t)
	ctx := context.Background()
	// A host path on a suid,dev mount: refused writable (a setuid-root
	// file the workload made there would work on the host).
	suid := filepath.Join(allowed, "suid")
	if err := os.Mkdir(suid, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", suid, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(suid, unix.MNT_DETACH) })
	for _, c := range []struct {
		vols  []api.VolumeMount
		field string
	}{
		{[]api.VolumeMount{{HostPath: suid, Path: "/a"}}, "volumes[0].host_path: host path " + suid + " is refused: a workload may write it, and the host's mount of it is not nosuid"},
		{[]api.VolumeMount{{HostPath: "/proc", Path: "/a", ReadOnly: true}, {HostPath: suid, Path: "/b", ReadOnly: true}}, "volumes[0].host_path"},
		{[]api.VolumeMount{{Name: "x", Path: "data"}}, "volumes[0].path"},
		{[]api.VolumeMount{{Name: "x", Path: "/"}}, "volumes[0].path"},
		{[]api.VolumeMount{{Name: "x", Path: "/a/../b"}}, "volumes[0].path"},
		{[]api.VolumeMount{{Path: "/a"}}, "volumes[0]"},
		{[]api.VolumeMount{{Name: "x", HostPath: allowed, Path: "/a"}}, "volumes[0]"},
		{[]api.VolumeMount{{Name: "Bad Name", Path: "/a"}}, "volumes[0].name"},
		{[]api.VolumeMount{{Name: "x", Path: "/a"}, {Name: "y", Path: "/a/"}}, "volumes[1].path"},
		{[]api.VolumeMount{{Name: "missing", Path: "/a"}}, "volumes[0].name"},
		{[]api.VolumeMount{{HostPath: "/etc", Path: "/a"}}, "volumes[0].host_path"},
		{[]api.VolumeMount{{HostPath: "/proc", Path: "/a"}}, "volumes[0].host_path"},
		{[]api.VolumeMount{{HostPath: e.dir, Path: "/a"}}, "volumes[0].host_path"},
	} {
		_, _, err := e.agent.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"true"}, Volumes: c.vols})
		got := fields(err)
		if len(c.vols) == 2 && c.vols[1].HostPath == suid && slices.ContainsFunc(got, func(f string) bool { return strings.HasPrefix(f, "volumes[1]") }) {
			t.Errorf("a read-only host path on a suid mount refused: %q", got)
		}
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !slices.ContainsFunc(got, func(f string) bool {
			return strings.HasPrefix(f, c.field+": ") || strings.Contains(c.field, " ") && strings.HasPrefix(f, c.field)
		}) {
			t.Errorf("%+v: %v (fields %q), want invalid naming %s", c.vols, err, got, c.field)
		}
	}
	if n := len(e.agent.List(ctx, api.ListFilter{})); n != 0 {
		t.Errorf("%d workloads admitted", n)
	}
}

// A volume in use cannot be deleted (409 naming the users); deleting
// the workload keeps the volume and releases its staged mounts; another
// tenant's volume is not there for a workload.
func TestVolumeLifetime(t *testing.T) {
	e, vs, allowed := volumeEnv(t)
	ctx := context.Background()
	if _, _, err := e.agent.CreateVolume(ctx, api.VolumeSpec{Name: "data", Labels: map[string]string{"tenant": "a"}}); err != nil {
		t.Fatal(err)
	}
	_, _, err := e.agent.Submit(ctx, api.WorkloadSpec{Image: testImage, Command: []string{"true"},
		Labels: map[string]string{"tenant": "b"}, Volumes: []api.VolumeMount{{Name: "data", Path: "/data"}}})
	if f := fields(err); len(f) != 1 || !strings.Contains(f[0], "volumes[0].name") {
		t.Errorf("tenant b mounts tenant a's volume: %v", err)
	}
	w := e.submit(api.WorkloadSpec{Command: []string{"sleep", "60"}, Labels: map[string]string{"tenant": "a"},
		Volumes: []api.VolumeMount{{Name: "data", Path: "/data"}, {HostPath: filepath.Join(allowed, "share"), Path: "/share", ReadOnly: true}}})
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	if ids, _ := vs.Staged(); !slices.Contains(ids, w.ID) {
		t.Errorf("staged %v, want %s", ids, w.ID)
	}
	err = e.agent.DeleteVolume(ctx, "a/data")
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), w.ID) {
		t.Errorf("delete of a volume in use: %v, want a conflict naming %s", err, w.ID)
	}
	// The record keeps its volumes across an agent restart.
	e.restart()
	if v, err := e.agent.GetVolume(ctx, "a/data"); err != nil || !slices.Equal(v.UsedBy, []string{w.ID}) {
		t.Errorf("volume after a restart: %+v %v, want used by %s", v, err, w.ID)
	}
	if err := e.agent.Delete(ctx, w.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.agent.GetVolume(ctx, "a/data"); err != nil {
		t.Errorf("the volume after its workload's delete: %v", err)
	}
	if ids, _ := vs.Staged(); len(ids) != 0 {
		t.Errorf("staged after the delete: %v", ids)
	}
	// A crash between a delete's steps leaves staged mounts without a
	// record: reconciliation releases them.
	if _, err := vs.Stage("gone0000", []volume.Source{{Tenant: "a", Name: "data", Target: "/d"}}); err != nil {
		t.Fatal(err)
	}
	e.agent.Reconcile(ctx)
	if ids, _ := vs.Staged(); len(ids) != 0 {
		t.Errorf("staged after reconcile: %v", ids)
	}
	if err := e.agent.DeleteVolume(ctx, "a/data"); err != nil {
		t.Errorf("delete of an unused volume: %v", err)
	}
	if _, err := e.agent.GetVolume(ctx, "a/data"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("after delete: %v", err)
	}
}

// Deleting a volume deletes its files outside writeMu: state writes do
// not wait for a volume of many files to go. The volume is gone (its
// name free) before they are deleted.
func TestDeleteVolumeFilesOutsideWriteLock(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the volume store chowns its directories")
	}
	e := newEnv(t)
	var purged int
	var vs *volume.Store
	vs, err := volume.Open(volume.Options{Root: filepath.Join(e.dir, "volumes"), DataDir: e.dir, OnPurge: func(string) {
		purged++
		if !e.agent.writeMu.TryLock() {
			t.Error("a volume's files are deleted under the agent's write lock")
			return
		}
		e.agent.writeMu.Unlock()
		if _, err := vs.Get("", "many"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("the volume while its files are deleted: %v, want not found", err)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	e.change = func(o *Options) { o.Volumes = vs }
	e.restart()
	ctx := context.Background()
	if _, _, err := e.agent.CreateVolume(ctx, api.VolumeSpec{Name: "many"}); err != nil {
		t.Fatal(err)
	}
	v, err := vs.Get("", "many")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if err := os.WriteFile(filepath.Join(vs.DataPath(v), strings.Repeat("f", i+1)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.agent.DeleteVolume(ctx, "many"); err != nil {
		t.Fatal(err)
	}
	if purged != 1 {
		t.Errorf("files deleted %d times, want 1", purged)
	}
	if _, err := os.Stat(filepath.Dir(vs.DataPath(v))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("volume directory after delete: %v", err)
	}
	if got := e.agent.ListVolumes(ctx); len(got) != 0 {
		t.Errorf("volumes after delete: %+v", got)
	}
}

// Only a VM whose volumes go over virtio-fs makes device nodes as root
// on the host (virtiofsd); a container has no CAP_MKNOD, and QEMU serves
// 9p (VMVolumeOwner set) unprivileged.
func TestVolumeDevices(t *testing.T) {
	a := &Agent{}
	if a.volumeDevices(api.IsolationContainer) || !a.volumeDevices(api.IsolationVM) {
		t.Errorf("virtio-fs: container %v vm %v, want false true", a.volumeDevices(api.IsolationContainer), a.volumeDevices(api.IsolationVM))
	}
	a.opts.VMVolumeOwner = &volume.Owner{UID: 64055, GID: 64055}
	if a.volumeDevices(api.IsolationVM) {
		t.Error("9p: a VM makes device nodes")
	}
}
