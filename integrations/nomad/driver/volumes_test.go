package driver

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
)

func TestAddVolumes(t *testing.T) {
	cfg := &drivers.TaskConfig{Name: "web", AllocDir: "/nomad/alloc/a1",
		Mounts: []*drivers.MountConfig{{TaskPath: "/shared", HostPath: "/srv/shared", Readonly: true}}}
	tc := &TaskConfig{Volumes: []string{"cache:/cache", "db:/db:ro"}}
	var spec api.WorkloadSpec
	if err := addVolumes(&spec, cfg, tc, true); err != nil {
		t.Fatal(err)
	}
	want := []api.VolumeMount{
		{HostPath: "/nomad/alloc/a1/alloc", Path: "/alloc"},
		{HostPath: "/nomad/alloc/a1/web/local", Path: "/local"},
		{HostPath: "/nomad/alloc/a1/web/secrets", Path: "/secrets"},
		{HostPath: "/srv/shared", Path: "/shared", ReadOnly: true},
		{Name: "cache", Path: "/cache"},
		{Name: "db", Path: "/db", ReadOnly: true},
	}
	if !reflect.DeepEqual(spec.Volumes, want) {
		t.Errorf("volumes\n%+v\nwant\n%+v", spec.Volumes, want)
	}
	spec = api.WorkloadSpec{}
	if err := addVolumes(&spec, cfg, &TaskConfig{}, false); err != nil || len(spec.Volumes) != 1 {
		t.Errorf("without alloc dirs: %+v %v, want the host volume alone", spec.Volumes, err)
	}
	for _, bad := range []string{"cache", "/srv:/x", "c:rel", "c:/x:rx"} {
		if err := addVolumes(&api.WorkloadSpec{}, &drivers.TaskConfig{}, &TaskConfig{Volumes: []string{bad}}, false); err == nil {
			t.Errorf("volumes %q accepted", bad)
		}
	}
}

// Nomad's secrets tmpfs is mounted noexec only; the driver makes it
// nosuid,nodev too (a VM over virtio-fs may not write a dev mount),
// keeping noexec, and leaves a directory that is no mount alone.
func TestHardenMount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a tmpfs")
	}
	dir := t.TempDir()
	secrets := filepath.Join(dir, "secrets")
	if err := os.Mkdir(secrets, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", secrets, "tmpfs", unix.MS_NOEXEC, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(secrets, unix.MNT_DETACH) })
	if err := hardenMount(secrets); err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(secrets, &st); err != nil {
		t.Fatal(err)
	}
	if want := uint64(unix.ST_NOSUID | unix.ST_NODEV | unix.ST_NOEXEC); uint64(st.Flags)&want != want {
		t.Errorf("flags %#x, want nosuid,nodev,noexec", st.Flags)
	}
	var before, after unix.Statfs_t
	if err := unix.Statfs(dir, &before); err != nil {
		t.Fatal(err)
	}
	if err := hardenMount(dir); err != nil {
		t.Errorf("a directory that is no mount: %v", err)
	}
	if err := unix.Statfs(dir, &after); err != nil || after.Flags != before.Flags {
		t.Errorf("a directory that is no mount: flags %#x, were %#x (%v)", after.Flags, before.Flags, err)
	}
	if err := hardenMount(filepath.Join(dir, "missing")); err != nil {
		t.Errorf("a missing directory: %v", err)
	}
}
