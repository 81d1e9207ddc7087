package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

// Result is one row of the results table.
type Result struct {
	Section string   `json:"section"`
	Name    string   `json:"name"`
	Unit    string   `json:"unit"`
	Summary *Summary `json:"summary,omitempty"` // a sample
	Value   float64  `json:"value,omitempty"`   // a single figure
	// Baseline names the row of the same run this one is compared with;
	// Ratio is this row's median (or value) over the baseline's.
	Baseline string  `json:"baseline,omitempty"`
	Ratio    float64 `json:"ratio,omitempty"`
	Note     string  `json:"note,omitempty"`
}

// Target is one of the goals, as measured.
type Target struct {
	Name     string `json:"name"`
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
	By       string `json:"by"`
	Limits   string `json:"limits,omitempty"`
}

// Host describes the machine the run was on.
type Host struct {
	CPUModel string `json:"cpu_model"`
	Cores    int    `json:"cores"`
	MemoryMB int64  `json:"memory_mb"`
	Kernel   string `json:"kernel"`
	OS       string `json:"os"`
	Runc     string `json:"runc"`
	QEMU     string `json:"qemu"`
	Libvirt  string `json:"libvirt"`
	Go       string `json:"go"`
	Berth    string `json:"berth"`
}

// Report is everything a run writes.
type Report struct {
	mu       sync.Mutex
	Date     time.Time `json:"date"`
	Quick    bool      `json:"quick"`
	Duration string    `json:"duration"`
	// Load is the host's 1-minute load average at the start and the end.
	Load      string         `json:"load,omitempty"`
	Host      Host           `json:"host"`
	VMAccel   string         `json:"vm_accel"`
	AccelNote string         `json:"vm_accel_note"`
	Results   []Result       `json:"results"`
	Targets   []Target       `json:"targets"`
	Errors    []string       `json:"errors,omitempty"`
	raw       map[string]any // samples, for the JSON
	Raw       map[string]any `json:"raw"`
}

func newReport() *Report {
	return &Report{Date: time.Now().UTC(), raw: map[string]any{}}
}

func (r *Report) add(res Result) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Results = append(r.Results, res)
}

func (r *Report) target(t Target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t.Limits == "" {
		t.Limits = targetLimits[t.Name]
	}
	r.Targets = append(r.Targets, t)
}

func (r *Report) errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Errors = append(r.Errors, fmt.Sprintf(format, args...))
}

func cmdLine(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return "unavailable"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func hostInfo(berth string) Host {
	h := Host{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				h.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		fmt.Sscanf(string(b), "MemTotal: %d kB", &kb)
		h.MemoryMB = kb / 1024
	}
	h.Kernel = cmdLine("uname", "-r")
	if b, err := os.ReadFile("/etc/debian_version"); err == nil {
		h.OS = "Debian " + strings.TrimSpace(string(b))
	}
	h.Runc = cmdLine("runc", "--version")
	h.QEMU = cmdLine("qemu-system-x86_64", "--version")
	h.Libvirt = cmdLine("libvirtd", "--version")
	h.Berth = cmdLine(berth, "--version")
	return h
}

// write writes latest.json and latest.md into dir.
func (r *Report) write(dir string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Raw = r.raw
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "latest.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "latest.md"), []byte(r.markdown()), 0o644)
}

func fmtNum(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v >= 1000 || v <= -1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 100 || v <= -100:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func (r *Report) markdown() string {
	var b strings.Builder
	mode := "full"
	if r.Quick {
		mode = "quick (BENCH_QUICK=1: fewer iterations, fewer VMs)"
	}
	fmt.Fprintf(&b, "# berth benchmark results\n\n")
	fmt.Fprintf(&b, "Written by `make bench` (`bench/cmd/berth-bench`). Do not edit by hand.\n\n")
	fmt.Fprintf(&b, "| | |\n| --- | --- |\n")
	fmt.Fprintf(&b, "| date | %s |\n", r.Date.Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "| run | %s, took %s |\n", mode, r.Duration)
	if r.Load != "" {
		fmt.Fprintf(&b, "| load average (1 min, start → end; 2 cores) | %s |\n", r.Load)
	}
	fmt.Fprintf(&b, "| CPU | %s, %d cores |\n", r.Host.CPUModel, r.Host.Cores)
	fmt.Fprintf(&b, "| memory | %d MiB |\n", r.Host.MemoryMB)
	fmt.Fprintf(&b, "| VM accelerator | %s |\n", strings.ToUpper(orDash(r.VMAccel))+" — "+r.AccelNote)
	fmt.Fprintf(&b, "| kernel (host) | %s (%s) |\n", r.Host.Kernel, r.Host.OS)
	fmt.Fprintf(&b, "| runc | %s |\n", r.Host.Runc)
	fmt.Fprintf(&b, "| QEMU | %s |\n", r.Host.QEMU)
	fmt.Fprintf(&b, "| libvirt | %s |\n", r.Host.Libvirt)
	fmt.Fprintf(&b, "| berth | %s (%s) |\n\n", r.Host.Berth, r.Host.Go)
	b.WriteString("This machine is shared with other jobs and noisy: absolute times move from run to run, so every timing is " +
		"compared with a baseline measured in the same run, interleaved with berth's where the measurement allows. " +
		"Read the ratios, not the milliseconds.\n\n")

	b.WriteString("## Targets\n\n| target | goal | measured | met | by | what limits it |\n| --- | --- | --- | --- | --- | --- |\n")
	for _, t := range r.Targets {
		met := "**missed**"
		if t.Met {
			met = "met"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s |\n", t.Name, t.Goal, t.Measured, met, t.By, orDash(t.Limits))
	}
	b.WriteString("\n## Results\n")
	// Rows grouped by section, sections in the order they first appear.
	var order []string
	bySection := map[string][]Result{}
	for _, res := range r.Results {
		if _, ok := bySection[res.Section]; !ok {
			order = append(order, res.Section)
		}
		bySection[res.Section] = append(bySection[res.Section], res)
	}
	for _, section := range order {
		fmt.Fprintf(&b, "\n### %s\n\n| measurement | unit | n | median | p95 | min | max | vs baseline | note |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n", section)
		for _, res := range bySection[section] {
			n, med, p95, lo, hi := "1", fmtNum(res.Value), "", "", ""
			if s := res.Summary; s != nil {
				n, med, p95, lo, hi = fmt.Sprint(s.N), fmtNum(s.Median), fmtNum(s.P95), fmtNum(s.Min), fmtNum(s.Max)
			}
			vs := ""
			if res.Baseline != "" {
				vs = fmt.Sprintf("×%.2f of %s", res.Ratio, res.Baseline)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", res.Name, res.Unit, n, med, p95, lo, hi, vs, res.Note)
		}
	}
	if len(r.Errors) > 0 {
		b.WriteString("\n## Errors\n\n")
		for _, e := range r.Errors {
			fmt.Fprintf(&b, "- %s\n", strings.ReplaceAll(e, "\n", " "))
		}
	}
	b.WriteString("\n## How each figure is taken\n\n" + methodology)
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
