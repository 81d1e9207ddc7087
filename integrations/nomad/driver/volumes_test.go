package driver

import (
	"reflect"
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"

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
