package ctrdriver

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
)

// BenchmarkMonitorFootprint starts 100 sleeping containers and reports
// the memory of their monitors (berth-monitor): PSS, which shares the
// binary's text and the kernel's shared pages fairly among the monitors,
// and RSS, which counts them whole in each. The targets are ≤ 1 MiB PSS
// and ≤ 4 MiB RSS per monitor. b.N is not used: the figure is a state,
// not a rate.
func BenchmarkMonitorFootprint(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root (runc)")
	}
	const n = 100
	root := b.TempDir()
	d := newDriver(&testing.T{}, root)
	rootfs := sharedRootfsB(b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ids := make([]string, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	errs := make(chan error, n)
	for i := range ids {
		ids[i] = drivertest.NewID("dt-foot")
		cfg := &driver.TaskConfig{ID: ids[i], Image: driver.Image{RootfsDir: rootfs},
			Args: []string{"sleep", "1000"}, Env: []string{"PATH=/bin"}, LogDir: b.TempDir(),
			Resources: driver.Resources{MemoryBytes: 16 << 20, Pids: 16}}
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if _, err := d.Start(ctx, cfg); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	defer func() {
		for _, id := range ids {
			_ = d.Destroy(context.Background(), id)
		}
	}()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	time.Sleep(time.Second) // let each monitor settle into its wait
	var pss, rss []float64
	for _, id := range ids {
		tk, err := d.sup.Get(id)
		if err != nil {
			b.Fatal(err)
		}
		p, r, err := smapsRollup(tk.Monitor().Pid)
		if err != nil {
			b.Fatal(err)
		}
		pss, rss = append(pss, p), append(rss, r)
	}
	b.ReportMetric(median(pss), "PSS-KiB/monitor")
	b.ReportMetric(median(rss), "RSS-KiB/monitor")
	b.ReportMetric(float64(n), "monitors")
}

func sharedRootfsB(b *testing.B) string {
	t := &testing.T{}
	dir := sharedRootfs(t)
	if t.Failed() {
		b.Fatal("build test rootfs")
	}
	return dir
}

// smapsRollup reads a process's PSS and RSS in KiB.
func smapsRollup(pid int) (pss, rss float64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		v, _ := strconv.ParseFloat(fields[1], 64)
		switch fields[0] {
		case "Pss:":
			pss = v
		case "Rss:":
			rss = v
		}
	}
	return pss, rss, sc.Err()
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
