package fake

import (
	"errors"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
)

func TestConformance(t *testing.T) {
	node := NewNode()
	drivertest.Run(t, drivertest.Harness{
		New:         func(t *testing.T) driver.Driver { return New("container", node) },
		Image:       driver.Image{Ref: "fake", RootfsDir: "/"},
		StopTimeout: time.Second,
		Slack:       5 * time.Second,
	})
}

func TestFailNextAndCalls(t *testing.T) {
	d := New("container", NewNode())
	boom := errors.New("boom")
	d.FailNext("Start", boom)
	cfg := &driver.TaskConfig{ID: "x", Args: []string{"true"}, LogDir: t.TempDir()}
	if _, err := d.Start(t.Context(), cfg); !errors.Is(err, boom) {
		t.Fatalf("Start = %v, want injected error", err)
	}
	if _, err := d.Start(t.Context(), cfg); err != nil {
		t.Fatalf("second Start = %v, want success", err)
	}
	defer d.Destroy(t.Context(), "x")
	calls := d.Calls()
	if len(calls) != 2 || calls[0] != (Call{"Start", "x"}) {
		t.Errorf("calls = %v", calls)
	}
}
