package main

import (
	"reflect"
	"testing"

	"github.com/berthd/berth/api"
)

func TestParseVolumes(t *testing.T) {
	got, err := parseVolumes([]string{"data:/data", "/srv/shared:/shared:ro", "cache:/c:rw"})
	want := []api.VolumeMount{{Name: "data", Path: "/data"}, {HostPath: "/srv/shared", Path: "/shared", ReadOnly: true}, {Name: "cache", Path: "/c"}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v %v, want %+v", got, err, want)
	}
	for _, bad := range []string{"data", ":/x", "data:", "a:/b:rx", "a:/b:ro:x"} {
		if _, err := parseVolumes([]string{bad}); err == nil {
			t.Errorf("-v %q accepted", bad)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512M": 512 << 20, "10G": 10 << 30, "1.5GiB": 3 << 29, "4096": 4096, "64k": 64 << 10} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("%s: %d %v, want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1G", "G", "ten"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
