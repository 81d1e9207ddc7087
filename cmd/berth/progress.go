package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/term"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// pullProgress draws the progress of image downloads on stderr while ctx
// lasts, when stderr is a terminal: those of workload (a berth run --wait
// whose image downloads), or of ref (berth image pull). It returns a func
// that stops it and clears the line.
func pullProgress(ctx context.Context, c *client.Client, workload, ref string) (stop func()) {
	if !term.IsTerminal(int(os.Stderr.Fd())) {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	drawn := false
	go func() {
		defer close(done)
		_ = c.Events(ctx, client.EventOptions{WorkloadID: workload, Types: []string{api.EventImagePullProgress}}, func() {}, func(e api.Event) error {
			if ref != "" && !strings.HasSuffix(e.Attrs["ref"], ref) && e.Attrs["ref"] != ref {
				return nil
			}
			done, _ := strconv.ParseInt(e.Attrs["bytes_done"], 10, 64)
			total, _ := strconv.ParseInt(e.Attrs["bytes_total"], 10, 64)
			fmt.Fprintf(os.Stderr, "\r%s", progressLine(e.Attrs["ref"], done, total))
			drawn = true
			return nil
		})
	}()
	return func() {
		cancel()
		<-done
		if drawn {
			fmt.Fprint(os.Stderr, "\r\033[K")
		}
	}
}

// progressLine is "pulling REF [=====>    ] 12.3 of 45.6 MiB".
func progressLine(ref string, done, total int64) string {
	const width = 30
	frac := 0.0
	if total > 0 {
		frac = min(float64(done)/float64(total), 1)
	}
	n := int(frac * width)
	bar := strings.Repeat("=", n)
	if n < width {
		bar += ">" + strings.Repeat(" ", width-n-1)
	}
	mib := func(b int64) string { return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) }
	return fmt.Sprintf("pulling %s [%s] %s of %s MiB", ref, bar, mib(done), mib(total))
}

// waitNotPending follows the workload with blocking queries until it is
// no longer pending.
func waitNotPending(ctx context.Context, c *client.Client, id string) (*api.Workload, error) {
	var index uint64
	for {
		w, idx, err := c.Get(ctx, id, &client.QueryOptions{WaitIndex: index, WaitTime: time.Minute})
		if err != nil || w.State != api.StatePending {
			return w, err
		}
		index = idx
	}
}
