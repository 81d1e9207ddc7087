package main

import (
	"testing"

	"github.com/berthd/berth/api"
)

// berth image ls says who may run each image.
func TestImageFor(t *testing.T) {
	for _, c := range []struct {
		img  api.Image
		want string
	}{
		{api.Image{}, "all"},
		{api.Image{Private: true}, "node namespace"},
		{api.Image{Private: true, Tenants: []string{"a", "b"}}, "a,b"},
	} {
		if got := imageFor(c.img); got != c.want {
			t.Errorf("imageFor(%+v) = %q, want %q", c.img, got, c.want)
		}
	}
}
