package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestDefaults(t *testing.T) {
	c, err := Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:7470" || c.DataDir != "/var/lib/berth" || c.WorkloadDefaults.StopTimeout != 10*time.Second {
		t.Errorf("defaults = %+v", c)
	}
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "berth.yaml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLayers(t *testing.T) {
	file := writeFile(t, "listen: 127.0.0.1:9000\ndata_dir: /srv/berth\nlog:\n  level: debug\n")
	t.Setenv("BERTH_DATA_DIR", "/env/berth")
	t.Setenv("BERTH_WORKLOAD_DEFAULTS_MEMORY_MB", "512")
	flags := pflag.NewFlagSet("agent", pflag.ContinueOnError)
	flags.String("listen", "", "")
	flags.String("data-dir", "", "")
	if err := flags.Parse([]string{"--listen", "127.0.0.1:9999"}); err != nil {
		t.Fatal(err)
	}
	c, err := Load(file, flags)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:9999" {
		t.Errorf("listen = %s, want the flag to win", c.Listen)
	}
	if c.DataDir != "/env/berth" {
		t.Errorf("data_dir = %s, want the environment over the file", c.DataDir)
	}
	if c.Log.Level != "debug" {
		t.Errorf("log.level = %s, want the file over the default", c.Log.Level)
	}
	if c.WorkloadDefaults.MemoryMB != 512 {
		t.Errorf("memory_mb = %d, want the environment", c.WorkloadDefaults.MemoryMB)
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	cases := map[string]string{
		"listen: nonsense\n":                        "listen:",
		"data_dir: relative/dir\n":                  "data_dir:",
		"log:\n  level: loud\n":                     "log.level:",
		"vm:\n  accel: warp\n":                      "vm.accel:",
		"vm:\n  boot: uefi\n":                       "vm.boot:",
		"container:\n  start_timeout: 10ms\n":       "container.start_timeout:",
		"workload_defaults:\n  stop_timeout: -1s\n": "workload_defaults.stop_timeout:",
		"lisen: 127.0.0.1:1\n":                      "lisen",
		"container:\n  runc_path: /usr/bin/runc\n":  "container.runc_path",
		"workload_defaults:\n  memory_mb: lots\n":   "memory_mb",
		"container:\n  prepared_layers: 65\n":       "container.prepared_layers:",
		"container:\n  prepared_monitors: -1\n":     "container.prepared_monitors:",
		"container:\n  prepared_monitors: 17\n":     "container.prepared_monitors:",
	}
	for content, want := range cases {
		_, err := Load(writeFile(t, content), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: error %v, want it to name %q", content, err, want)
		}
	}
}

func TestNodeLabelsAreOperatorKeys(t *testing.T) {
	c, err := Load(writeFile(t, "node:\n  labels:\n    zone: eu-1\n    certified: pci\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Node.Labels["zone"] != "eu-1" || c.Node.Labels["certified"] != "pci" {
		t.Errorf("labels = %v", c.Node.Labels)
	}
	if _, err := Load(writeFile(t, "node:\n  lables:\n    zone: eu-1\n"), nil); err == nil || !strings.Contains(err.Error(), "node.lables") {
		t.Errorf("misspelt node.labels: %v", err)
	}
}
