package monitor

import (
	"io"
	"path/filepath"
	"testing"
)

// BenchmarkOutputPath is what a container's output costs the monitor per
// write since attach: the log alone (the baseline, as before) against the
// log and the attach fan-out with its replay ring and no client, and with
// one client attached that reads everything. Writes of 4 KiB, a typical
// pipe read.
func BenchmarkOutputPath(b *testing.B) {
	chunk := make([]byte, 4<<10)
	for _, c := range []struct {
		name    string
		clients int
		hub     bool
	}{{"log-only", 0, false}, {"log+hub", 0, true}, {"log+hub+client", 1, true}} {
		b.Run(c.name, func(b *testing.B) {
			log, err := openLog(filepath.Join(b.TempDir(), "stdout.log"), 0, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer log.Close()
			h := newHub(false, nil, nil)
			var w io.Writer = log
			if c.hub {
				w = tee{out: h.out, log: log}
			}
			done := make(chan struct{})
			for range c.clients {
				sub := h.out.Subscribe(false)
				go func() { _, _ = io.Copy(io.Discard, sub); close(done) }()
			}
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for range b.N {
				_, _ = w.Write(chunk)
			}
			b.StopTimer()
			h.end()
			if c.clients > 0 {
				<-done
			}
		})
	}
}
