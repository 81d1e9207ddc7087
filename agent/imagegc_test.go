package agent

import (
	"context"
	"io"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
)

// A prune removes the images no workload uses, says so in events, and
// keeps the one a workload (even one that ended) still holds.
func TestPruneKeepsImagesInUse(t *testing.T) {
	e := newEnv(t)
	// A store that asks the agent what is in use, as the daemon wires it.
	imgs, err := image.New(filepath.Join(e.dir, "gc-images"), image.WithInUse(func(d string) bool { return e.agent.UsesImage(d) }))
	if err != nil {
		t.Fatal(err)
	}
	base, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	bpr, bpw := io.Pipe()
	go func() { bpw.CloseWithError(ociimage.WriteOCIArchive(bpw, base, testImage)) }()
	if _, err := imgs.Import(context.Background(), bpr, ""); err != nil {
		t.Fatal(err)
	}
	e.imgs = imgs
	e.change = func(o *Options) { o.Images = imgs }
	e.restart()
	layer, _ := ociimage.Layer(ociimage.File{Name: "other", Body: "x"})
	other, err := ociimage.Image(v1.Config{Cmd: []string{"true"}}, layer)
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(ociimage.WriteOCIArchive(pw, other, "berth.test/other:1")) }()
	if _, err := e.imgs.Import(context.Background(), pr, ""); err != nil {
		t.Fatal(err)
	}
	w := e.submit(sh("true"))
	e.waitFor(w.ID, terminal)
	from := e.agent.events.lastID()
	removed, err := e.agent.PruneImages(context.Background(), true)
	if err != nil || len(removed) != 1 || removed[0].Ref != "berth.test/other:1" {
		t.Fatalf("prune: %+v %v; want berth.test/other:1 alone", removed, err)
	}
	if _, err := e.imgs.Get(testImage); err != nil {
		t.Errorf("the image of a workload is gone: %v", err)
	}
	evs, _, _ := e.agent.events.after(from, func(ev *api.Event) bool { return ev.Type == api.EventImageRemoved })
	if len(evs) != 1 || evs[0].Attrs["ref"] != "berth.test/other:1" || evs[0].Attrs["reason"] == "" {
		t.Errorf("events: %+v", evs)
	}
}
