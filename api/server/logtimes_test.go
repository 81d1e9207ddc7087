package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/supervisor/monitor"
)

// since and timestamps over HTTP: text lines carry docker's fixed-width
// RFC 3339 prefix, NDJSON lines a time field, and the Go client sends
// both; lines before since are left out.
func TestLogsSinceAndTimestampsThroughTheAPI(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	w := e.submitSleep(c)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		cur, _, err := c.Get(context.Background(), w.ID, nil)
		if err != nil {
			t.Fatal(err)
		}
		if cur.State == api.StateRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workload is %s, not running", cur.State)
		}
	}
	path := filepath.Join(e.dir, "logs", w.ID, "stdout.log")
	if _, err := os.Stat(filepath.Dir(path)); err != nil {
		t.Fatalf("the workload's log directory: %v", err)
	}
	_ = os.Remove(path)
	base := time.Date(2026, 5, 6, 7, 8, 9, 123456789, time.UTC)
	now := base
	lw, err := monitor.NewLogWriter(path, 0, 0, func() time.Time { return now })
	if err != nil {
		t.Fatal(err)
	}
	defer lw.Close()
	for i := range 3 {
		now = base.Add(time.Duration(i) * time.Minute)
		fmt.Fprintf(lw, "line %d\n", i)
	}

	since := url.QueryEscape(base.Add(time.Minute).Format(time.RFC3339Nano))
	resp := e.do(http.MethodGet, "/v1/workloads/"+w.ID+"/logs?stream=stdout&timestamps=true&since="+since, "", nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	want := "2026-05-06T07:09:09.123456789Z line 1\n2026-05-06T07:10:09.123456789Z line 2\n"
	if resp.StatusCode != http.StatusOK || string(body) != want {
		t.Errorf("text: %d %q, want %q", resp.StatusCode, body, want)
	}

	resp = e.do(http.MethodGet, "/v1/workloads/"+w.ID+"/logs?stream=stdout&format=ndjson&timestamps=true&since="+since, "", nil)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	var got []api.LogLine
	for _, l := range strings.Split(strings.TrimSpace(string(body)), "\n") {
		var ll api.LogLine
		if err := json.Unmarshal([]byte(l), &ll); err != nil {
			t.Fatalf("ndjson line %q: %v", l, err)
		}
		got = append(got, ll)
	}
	if len(got) != 2 || got[0].Time == nil || !got[0].Time.Equal(base.Add(time.Minute)) || got[1].Line != "line 2" {
		t.Errorf("ndjson: %s", body)
	}

	// Without timestamps=true a line carries no time.
	resp = e.do(http.MethodGet, "/v1/workloads/"+w.ID+"/logs?stream=stdout&format=ndjson", "", nil)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.Contains(string(body), `"time"`) || strings.Count(string(body), "\n") != 3 {
		t.Errorf("ndjson without timestamps: %s", body)
	}

	// The client sends since and timestamps.
	var lines []string
	err = c.Logs(context.Background(), w.ID, api.LogOptions{Stream: "stdout", Tail: -1, Since: base.Add(90 * time.Second), Timestamps: true}, func(l api.LogLine) error {
		if l.Time == nil {
			t.Errorf("%q has no time", l.Line)
			return nil
		}
		lines = append(lines, l.Time.Format(time.RFC3339)+" "+l.Line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(lines, ",") != "2026-05-06T07:10:09Z line 2" {
		t.Errorf("client: %q", lines)
	}
}

// since is a duration before now or an RFC 3339 time.
func TestParseSince(t *testing.T) {
	now := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	for in, want := range map[string]time.Time{
		"10m":                            now.Add(-10 * time.Minute),
		"1h30m":                          now.Add(-90 * time.Minute),
		"0s":                             now,
		"2026-01-02T03:04:05Z":           time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		"2026-01-02T03:04:05.5+01:00":    time.Date(2026, 1, 2, 2, 4, 5, 5e8, time.UTC),
		"2026-01-02T03:04:05.000000001Z": time.Date(2026, 1, 2, 3, 4, 5, 1, time.UTC),
	} {
		got, err := api.ParseSince(in, now)
		if err != nil || !got.Equal(want) {
			t.Errorf("%q: %v %v, want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "yesterday", "-5m", "2026-01-02", "10"} {
		if _, err := api.ParseSince(in, now); err == nil {
			t.Errorf("%q parsed", in)
		}
	}
}
