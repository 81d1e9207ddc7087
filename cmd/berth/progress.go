package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
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
	return drawPullProgress(ctx, c, workload, ref, os.Stderr)
}

// drawPullProgress is pullProgress onto out. A download another submit
// started may be under way already, and its progress events published
// before this subscribed: the bar starts from where it is, read from the
// workload (its pull status) for a workload, and for berth image pull
// from the progress the agent publishes as the pull joins the download
// (and again every second while it waits). Progress never goes back on
// the bar: an older reading that arrives late is not drawn.
func drawPullProgress(ctx context.Context, c *client.Client, workload, ref string, out io.Writer) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var mu sync.Mutex
	drawn := false
	var shown [2]int64
	draw := func(ref string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if total <= 0 || (total == shown[1] && done < shown[0]) {
			return
		}
		shown = [2]int64{done, total}
		fmt.Fprintf(out, "\r%s", progressLine(ref, done, total))
		drawn = true
	}
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		_ = c.Events(ctx, client.EventOptions{WorkloadID: workload, Types: []string{api.EventImagePullProgress}}, func() {}, func(e api.Event) error {
			if ref != "" && !strings.HasSuffix(e.Attrs["ref"], ref) && e.Attrs["ref"] != ref {
				return nil
			}
			done, _ := strconv.ParseInt(e.Attrs["bytes_done"], 10, 64)
			total, _ := strconv.ParseInt(e.Attrs["bytes_total"], 10, 64)
			draw(e.Attrs["ref"], done, total)
			return nil
		})
	}()
	if workload != "" {
		if w, _, err := c.Get(ctx, workload, nil); err == nil && w.Pull != nil {
			draw(w.Pull.Ref, w.Pull.BytesDone, w.Pull.BytesTotal)
		}
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			<-finished
			mu.Lock()
			defer mu.Unlock()
			if drawn {
				fmt.Fprint(out, "\r\033[K")
			}
		})
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
