package vmdriver

import (
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/guest"
)

// A task's volumes become one filesystem device each, in slots of their
// own, with shared memory for virtio-fs; berth-init is told the tags.
func TestVolumeDevices(t *testing.T) {
	mounts := []driver.Mount{{Source: "/s/0", Target: "/data"}, {Source: "/s/1", Target: "/ro", ReadOnly: true}}
	for _, tc := range []struct {
		transport VolumeTransport
		want      []string
		never     []string
	}{
		{VolumeVirtiofs, []string{`<memoryBacking>`, `<source type="memfd"`, `<access mode="shared"`, `<driver type="virtiofs" queue="1024"`, `<binary path="/bin/true"`, `<source dir="/s/1"`, `<target dir="berth-vol1"`}, []string{"<readonly"}},
		{Volume9p, []string{`<driver type="path"`, `<readonly>`, `<target dir="berth-vol0"`}, []string{"memoryBacking", "virtiofs"}},
	} {
		d := &Driver{opts: Options{VolumeTransport: tc.transport, VirtiofsdPath: "/bin/true"}}
		spec := domainSpec{Name: "berth-x", Accel: AccelTCG, VCPUs: 1, MemoryKi: 1024,
			Interfaces: []libvirtxml.DomainInterface{bridgeInterface("br0", "52:54:00:00:00:01")}}
		var gc guest.Config
		if err := d.addVolumes(mounts, &spec, &gc); err != nil {
			t.Fatal(err)
		}
		x, err := domainXML(spec)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range tc.want {
			if !strings.Contains(x, w) {
				t.Errorf("%s: no %s in\n%s", tc.transport, w, x)
			}
		}
		for _, n := range tc.never {
			if strings.Contains(x, n) {
				t.Errorf("%s: %s in\n%s", tc.transport, n, x)
			}
		}
		if len(gc.Volumes) != 2 || gc.Volumes[1] != (guest.Volume{Tag: "berth-vol1", Path: "/ro", FSType: string(tc.transport), ReadOnly: true}) {
			t.Errorf("%s: guest volumes %+v", tc.transport, gc.Volumes)
		}
		if err := (&guest.Config{Version: guest.ConfigVersion, Args: []string{"x"}, Volumes: gc.Volumes}).Validate(); err != nil {
			t.Errorf("%s: %v", tc.transport, err)
		}
	}
	d := &Driver{opts: Options{VolumeTransport: VolumeVirtiofs, VirtiofsdPath: "/bin/true"}}
	many := make([]driver.Mount, maxVMVolumes+1)
	if err := d.addVolumes(many, &domainSpec{}, &guest.Config{}); err == nil {
		t.Errorf("%d volumes accepted", len(many))
	}
}
