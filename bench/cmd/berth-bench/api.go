package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

func queryOpts(idx uint64) *client.QueryOptions {
	if idx == 0 {
		return nil
	}
	return &client.QueryOptions{WaitIndex: idx, WaitTime: 30 * time.Second}
}

// loadResult is what a closed-loop load run measured.
type loadResult struct {
	ok, failed int
	rate       float64 // successful requests per second
	lat        Summary // ms
	firstErr   error
}

// load runs conc workers that each send requests back to back for dur,
// on keep-alive connections (one per worker).
func load(ctx context.Context, conc int, dur time.Duration, newReq func() (*http.Request, error)) loadResult {
	tr := &http.Transport{MaxIdleConns: conc, MaxIdleConnsPerHost: conc, MaxConnsPerHost: conc, IdleConnTimeout: time.Minute}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	var (
		ok, failed atomic.Int64
		mu         sync.Mutex
		lats       []float64
		firstErr   error
		wg         sync.WaitGroup
	)
	ctx, cancel := context.WithTimeout(ctx, dur)
	defer cancel()
	t0 := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []float64
			for ctx.Err() == nil {
				req, err := newReq()
				if err != nil {
					return
				}
				s := time.Now()
				resp, err := hc.Do(req.WithContext(ctx))
				if err == nil {
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("%s %s: %s", req.Method, req.URL.Path, resp.Status)
					}
				}
				if ctx.Err() != nil {
					break
				}
				if err != nil {
					failed.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				ok.Add(1)
				mine = append(mine, ms(time.Since(s)))
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	el := time.Since(t0)
	return loadResult{ok: int(ok.Load()), failed: int(failed.Load()), rate: float64(ok.Load()) / el.Seconds(), lat: summarize(lats), firstErr: firstErr}
}

// httpLoad is measurements 4 (HTTP) and 5 (GET /v1/node req/s), each
// against GET /healthz at the same concurrency: the server's floor.
func httpLoad(ctx context.Context, a *agentProc, conc int, dur time.Duration, rep *Report) error {
	base := "http://" + a.addr
	spec, _ := json.Marshal(api.WorkloadSpec{
		Image: benchImage, Command: []string{"/bin/true"},
		Labels:    map[string]string{"tenant": "acme", "team": "web", "env": "prod"},
		Resources: api.Resources{CPU: 1, MemoryMB: 32},
	})
	get := func(path string) func() (*http.Request, error) {
		return func() (*http.Request, error) { return http.NewRequest(http.MethodGet, base+path, nil) }
	}
	place := func() (*http.Request, error) {
		r, err := http.NewRequest(http.MethodPost, base+"/v1/placements", bytes.NewReader(spec))
		if err == nil {
			r.Header.Set("Content-Type", "application/json")
		}
		return r, err
	}
	// Warm up connections and code paths.
	load(ctx, conc, 300*time.Millisecond, place)
	health := load(ctx, conc, dur, get("/healthz"))
	placements := load(ctx, conc, dur, place)
	node := load(ctx, conc, dur, get("/v1/node"))
	for _, r := range []loadResult{health, placements, node} {
		if r.firstErr != nil && r.failed > r.ok/100 {
			return fmt.Errorf("load: %d failed: %w", r.failed, r.firstErr)
		}
	}
	sec := fmt.Sprintf("HTTP API (Go closed-loop load generator, concurrency %d, %s each)", conc, dur)
	rep.add(Result{Section: sec, Name: "baseline: GET /healthz", Unit: "req/s", Value: health.rate,
		Note: fmt.Sprintf("latency p50 %.2f ms, p95 %.2f ms", health.lat.Median, health.lat.P95)})
	rep.add(Result{Section: sec, Name: "POST /v1/placements (dry-run, default policy)", Unit: "req/s", Value: placements.rate,
		Baseline: "GET /healthz", Ratio: ratio(placements.rate, health.rate),
		Note: fmt.Sprintf("latency p50 %.2f ms, p95 %.2f ms; %d failed", placements.lat.Median, placements.lat.P95, placements.failed)})
	rep.add(Result{Section: sec, Name: "GET /v1/node", Unit: "req/s", Value: node.rate,
		Baseline: "GET /healthz", Ratio: ratio(node.rate, health.rate),
		Note: fmt.Sprintf("latency p50 %.2f ms, p95 %.2f ms; %d failed", node.lat.Median, node.lat.P95, node.failed)})
	rep.target(Target{
		Name: "placement dry-runs over HTTP on 2 cores", Goal: "≥ 20,000 req/s",
		Measured: fmt.Sprintf("%.0f req/s (GET /healthz on the same server: %.0f req/s; load generator on the same 2 cores)", placements.rate, health.rate),
		Met:      placements.rate >= 20000, By: fmt.Sprintf("%+.0f req/s (%+.0f%%)", placements.rate-20000, (placements.rate/20000-1)*100),
	})
	return nil
}

var benchLine = regexp.MustCompile(`^BenchmarkDecide/(\S+?)(-\d+)?\s+(\d+)\s+([\d.]+) ns/op(?:\s+(\d+) B/op\s+(\d+) allocs/op)?`)

// decideBench is measurement 4 (in-process): the placement package's own
// BenchmarkDecide, run with go test and parsed.
func decideBench(ctx context.Context, repo string, benchtime string, count int, rep *Report) error {
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", "^BenchmarkDecide$", "-benchmem",
		"-benchtime", benchtime, "-count", strconv.Itoa(count), "./placement/")
	cmd.Dir = repo
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go test -bench Decide: %v: %s", err, out)
	}
	ns := map[string][]float64{}
	allocs := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		v, _ := strconv.ParseFloat(m[4], 64)
		ns[m[1]] = append(ns[m[1]], v)
		if m[5] != "" {
			allocs[m[1]] = fmt.Sprintf("%s B/op, %s allocs/op", m[5], m[6])
		}
	}
	if len(ns) == 0 {
		return fmt.Errorf("no BenchmarkDecide results in: %s", out)
	}
	names := make([]string, 0, len(ns))
	for k := range ns {
		names = append(names, k)
	}
	sort.Strings(names)
	sec := "Placement Decide (in-process, go test -bench)"
	var def float64
	for _, n := range names {
		s := summarize(ns[n])
		r := Result{Section: sec, Name: "Decide, " + n + " policy", Unit: "ns/op", Summary: &s, Note: allocs[n]}
		if n == "default" {
			def = s.Median
		} else if def > 0 {
			r.Baseline, r.Ratio = "default policy", ratio(s.Median, def)
		}
		rep.add(r)
	}
	rep.raw["decide_ns_per_op"] = ns
	return nil
}

// establishedTo counts established TCP connections whose local port is
// port (the agent's side of its clients' connections).
func establishedTo(port int) int {
	n := 0
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 4 || fs[3] != "01" {
				continue
			}
			i := strings.LastIndexByte(fs[1], ':')
			if p, err := strconv.ParseInt(fs[1][i+1:], 16, 32); err == nil && int(p) == port {
				n++
			}
		}
	}
	return n
}

// pollers measures the latency from a state change (a submit) to the
// return of k parked blocking GET /v1/node queries.
//
// With decode, each poller is the Go client, which decodes the node
// document into its struct; without, a bare HTTP GET that reads the answer
// to its last byte and keeps it as bytes. The answer the agent sends is the
// same; decoding it is the load generator's own work, and on these 2
// shared cores 10,000 JSON decodes take longer than the agent takes to
// answer (both are reported).
func pollers(ctx context.Context, a *agentProc, k int, decode bool) (Summary, []float64, error) {
	_, portStr, _ := net.SplitHostPort(a.addr)
	port, _ := strconv.Atoi(portStr)
	_, idx, err := a.c.Node(ctx, nil)
	if err != nil {
		return Summary{}, nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	baseConns := establishedTo(port)
	c, err := client.New(a.addr)
	if err != nil {
		return Summary{}, nil, err
	}
	// Each round's 10,000 connections go when it ends: the next round's
	// must fit in the file limit too.
	defer c.CloseIdleConnections()
	defer rawHTTP.CloseIdleConnections()
	rets := make([]time.Time, k)
	errs := make([]error, k)
	var wg sync.WaitGroup
	for i := 0; i < k; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if decode {
				_, _, errs[i] = c.Node(pctx, &client.QueryOptions{WaitIndex: idx, WaitTime: time.Minute})
			} else {
				errs[i] = rawPoll(pctx, a.addr, idx)
			}
			rets[i] = time.Now()
		}()
	}
	// Parked when the agent holds k more connections; then a moment more
	// for the handlers to reach their wait.
	deadline := time.Now().Add(30 * time.Second)
	for establishedTo(port)-baseConns < k && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	t0 := time.Now()
	w, err := a.c.Submit(ctx, containerSpec(idleCommand...))
	if err != nil {
		cancel()
		wg.Wait()
		return Summary{}, nil, err
	}
	wg.Wait()
	deleteAll(ctx, a, []string{w.ID}, 1)
	var lat []float64
	for i := range rets {
		if errs[i] != nil {
			return Summary{}, nil, fmt.Errorf("poller %d: %w", i, errs[i])
		}
		if rets[i].Before(t0) {
			return Summary{}, nil, errEarly
		}
		lat = append(lat, ms(rets[i].Sub(t0)))
	}
	return summarize(lat), lat, nil
}

// errEarly: a poller returned before the harness changed anything (the
// node's index moved by itself, e.g. a background health check or
// reconciliation); the round is discarded.
var errEarly = errors.New("a poller returned before the state change")

// pollRound runs pollers, retrying rounds that something else woke.
func pollRound(ctx context.Context, a *agentProc, k int, decode bool, early *int) (Summary, []float64, error) {
	for try := 0; ; try++ {
		s, lat, err := pollers(ctx, a, k, decode)
		if errors.Is(err, errEarly) && try < 3 {
			*early++
			continue
		}
		return s, lat, err
	}
}

// nodePollers is measurement 5's blocking half: 1 poller (the baseline:
// the submit itself plus one wake-up) and then k at once.
func nodePollers(ctx context.Context, a *agentProc, k, rounds int, rep *Report) error {
	var one []float64
	early := 0
	for i := 0; i < rounds; i++ {
		s, _, err := pollRound(ctx, a, 1, false, &early)
		if err != nil {
			return err
		}
		one = append(one, s.Max)
	}
	// Interleaved: bare GETs (the target's figure) and the Go client.
	var all, p50, allGo, p50Go []float64
	var last []float64
	for i := 0; i < rounds; i++ {
		s, lat, err := pollRound(ctx, a, k, false, &early)
		if err != nil {
			return err
		}
		all, p50, last = append(all, s.Max), append(p50, s.Median), lat
		if s, _, err = pollRound(ctx, a, k, true, &early); err != nil {
			return err
		}
		allGo, p50Go = append(allGo, s.Max), append(p50Go, s.Median)
	}
	sec := fmt.Sprintf("Node status blocking queries (state change = a submit; %d rounds)", rounds)
	o := summarize(one)
	m := summarize(all)
	md := summarize(p50)
	rep.add(Result{Section: sec, Name: "baseline: 1 blocking poller, change → return", Unit: "ms", Summary: &o})
	rep.add(Result{Section: sec, Name: fmt.Sprintf("%d blocking pollers, change → last returns", k), Unit: "ms", Summary: &m,
		Baseline: "1 poller", Ratio: ratio(m.Median, o.Median)})
	rep.add(Result{Section: sec, Name: fmt.Sprintf("%d blocking pollers, change → median poller returns", k), Unit: "ms", Summary: &md,
		Baseline: "1 poller", Ratio: ratio(md.Median, o.Median), Note: fmt.Sprintf("bare GETs; each answer %d bytes", nodeAnswerBytes.Load())})
	mg, mdg := summarize(allGo), summarize(p50Go)
	rep.add(Result{Section: sec, Name: fmt.Sprintf("%d blocking pollers through the Go client (each decodes the document), change → last returns", k), Unit: "ms", Summary: &mg,
		Baseline: "bare GETs", Ratio: ratio(mg.Median, m.Median), Note: fmt.Sprintf("median poller %.0f ms; the same answers, plus 10,000 JSON decodes by the load generator on the same 2 cores", mdg.Median)})
	rep.target(Target{Name: fmt.Sprintf("%d parked pollers of GET /v1/node all answered after a change (median of %d rounds)", k, rounds),
		Goal:     "≤ 250 ms (10,000 pollers)",
		Measured: fmt.Sprintf("%.0f ms until the last answer was read (median poller %.0f ms; bare GETs reading the answer's bytes; through the Go client, which decodes each, %.0f ms)", m.Median, md.Median, mg.Median),
		Met:      k >= 10000 && m.Median <= 250, By: fmt.Sprintf("%+.0f ms", m.Median-250)})
	rep.raw["pollers_last_round_ms"] = last
	if early > 0 {
		rep.errorf("node pollers: %d round(s) discarded: pollers woke before the harness changed anything (the node index moved by itself)", early)
	}
	return nil
}

// nodeAnswerBytes is the size of the last node document a bare poller read.
var nodeAnswerBytes atomic.Int64

// rawHTTP carries the bare pollers, one connection each.
var rawHTTP = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 20000}}

// rawPoll is one bare blocking GET /v1/node, read to its last byte.
func rawPoll(ctx context.Context, addr string, index uint64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/v1/node?index="+strconv.FormatUint(index, 10)+"&wait=1m", nil)
	if err != nil {
		return err
	}
	resp, err := rawHTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	nodeAnswerBytes.Store(n)
	if err == nil && (resp.StatusCode != http.StatusOK || n == 0) {
		err = fmt.Errorf("GET /v1/node: %s, %d bytes", resp.Status, n)
	}
	return err
}
