package driver

import (
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/berthd/berth/api"
)

// PluginConfig is the plugin's block in the Nomad client's configuration:
//
//	plugin "nomad-driver-berth" {
//	  config {
//	    address = "unix:///run/berth/berth.sock"
//	    token   = "..."
//	  }
//	}
type PluginConfig struct {
	// Address of the node's berth agent: unix:///PATH, HOST:PORT or a URL.
	Address string `codec:"address"`
	// Token is a berth API token (bearer); empty relies on the unix
	// socket's trust of root.
	Token string `codec:"token"`
	// AllocDirs mounts each task's allocation directories (alloc/,
	// local/, secrets/) into its workload, container or VM (default
	// true); the berth agent must list Nomad's data dir (or its alloc/)
	// in volumes.host_paths.
	AllocDirs bool `codec:"alloc_dirs"`
}

// TaskConfig is a task's config block in a job file.
type TaskConfig struct {
	Image string `codec:"image"`
	// Command replaces the image's entrypoint; Args replace its cmd.
	Command string   `codec:"command"`
	Args    []string `codec:"args"`
	Workdir string   `codec:"workdir"`
	// Env is added on top of the task's env block and Nomad's variables.
	Env    map[string]string `codec:"env"`
	Labels map[string]string `codec:"labels"`
	// Isolation is a request (auto, container or vm): the node's policy
	// may raise it, never lower it.
	Isolation  string `codec:"isolation"`
	Network    string `codec:"network"`
	Privileged bool   `codec:"privileged"`
	// Volumes are named berth volumes, NAME:/PATH[:ro].
	Volumes []string `codec:"volumes"`
	// Auth, as in Nomad's docker driver, are the registry credentials the
	// image is pulled with before the task is submitted; berth never
	// stores them.
	Auth *TaskAuth `codec:"auth"`
	// Health is berth's health check of the task (see TaskHealth).
	Health *TaskHealth `codec:"health"`
}

// TaskHealth is a task's health block: one of exec, http or tcp, probed by
// berth while the task runs, as a spec's health check is. The driver
// reports each change to Nomad (a task event, and the task's "health"
// driver attribute); it never makes berth restart the task: under Nomad,
// the job's restart and check_restart blocks decide restarts, so berth's
// restart.on_unhealthy stays off.
//
//	health {
//	  http { port = 8080  path = "/ready" }
//	  interval = "10s"
//	  timeout  = "2s"
//	  retries  = 3
//	  start_period = "30s"
//	}
type TaskHealth struct {
	Exec        []string        `codec:"exec"`
	HTTP        *TaskHealthHTTP `codec:"http"`
	TCP         *TaskHealthTCP  `codec:"tcp"`
	Interval    string          `codec:"interval"`
	Timeout     string          `codec:"timeout"`
	Retries     int             `codec:"retries"`
	StartPeriod string          `codec:"start_period"`
}

// TaskHealthHTTP probes http://ADDRESS:port/path.
type TaskHealthHTTP struct {
	Port int    `codec:"port"`
	Path string `codec:"path"`
}

// TaskHealthTCP probes ADDRESS:port.
type TaskHealthTCP struct {
	Port int `codec:"port"`
}

// check is berth's health check of a health block (nil without one). The
// durations are parsed here, so a typo fails the task's start with the
// field named; berth validates the rest at the submit (ports, one kind of
// probe, bounds) and its answer names the spec's field.
func (h *TaskHealth) check() (*api.HealthCheck, error) {
	if h == nil {
		return nil, nil
	}
	hc := &api.HealthCheck{Exec: h.Exec, Retries: h.Retries}
	if h.HTTP != nil {
		hc.HTTP = &api.HTTPCheck{Port: h.HTTP.Port, Path: h.HTTP.Path}
	}
	if h.TCP != nil {
		hc.TCP = &api.TCPCheck{Port: h.TCP.Port}
	}
	for _, d := range []struct {
		name string
		in   string
		out  *api.Duration
	}{{"interval", h.Interval, &hc.Interval}, {"timeout", h.Timeout, &hc.Timeout}, {"start_period", h.StartPeriod, &hc.StartPeriod}} {
		if d.in == "" {
			continue
		}
		v, err := time.ParseDuration(d.in)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("berth: health.%s %q: want a duration such as \"10s\"", d.name, d.in)
		}
		*d.out = api.Duration(v)
	}
	n := 0
	if len(h.Exec) > 0 {
		n++
	}
	if h.HTTP != nil {
		n++
	}
	if h.TCP != nil {
		n++
	}
	if n != 1 {
		return nil, fmt.Errorf("berth: the health block needs exactly one of exec, http or tcp (it has %d)", n)
	}
	return hc, nil
}

// TaskAuth is a task's auth block.
type TaskAuth struct {
	Username string `codec:"username"`
	Password string `codec:"password"`
}

// pullRequest is the pull a task with an auth block makes before its
// submit (nil without one), for the workload's tenant: berth keeps the
// image private to it ("": the node's namespace).
func (tc *TaskConfig) pullRequest(tenant string) *api.PullRequest {
	if tc.Auth == nil || (tc.Auth.Username == "" && tc.Auth.Password == "") {
		return nil
	}
	return &api.PullRequest{Ref: tc.Image, Tenant: tenant, Auth: &api.RegistryAuth{Username: tc.Auth.Username, Password: tc.Auth.Password}}
}

var (
	configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
		"address": hclspec.NewDefault(
			hclspec.NewAttr("address", "string", false),
			hclspec.NewLiteral(`"unix:///run/berth/berth.sock"`),
		),
		"token": hclspec.NewAttr("token", "string", false),
		"alloc_dirs": hclspec.NewDefault(
			hclspec.NewAttr("alloc_dirs", "bool", false),
			hclspec.NewLiteral("true"),
		),
	})

	taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
		"image":      hclspec.NewAttr("image", "string", true),
		"command":    hclspec.NewAttr("command", "string", false),
		"args":       hclspec.NewAttr("args", "list(string)", false),
		"workdir":    hclspec.NewAttr("workdir", "string", false),
		"env":        hclspec.NewAttr("env", "map(string)", false),
		"labels":     hclspec.NewAttr("labels", "map(string)", false),
		"isolation":  hclspec.NewDefault(hclspec.NewAttr("isolation", "string", false), hclspec.NewLiteral(`"auto"`)),
		"network":    hclspec.NewAttr("network", "string", false),
		"privileged": hclspec.NewAttr("privileged", "bool", false),
		"volumes":    hclspec.NewAttr("volumes", "list(string)", false),
		"auth": hclspec.NewBlock("auth", false, hclspec.NewObject(map[string]*hclspec.Spec{
			"username": hclspec.NewAttr("username", "string", false),
			"password": hclspec.NewAttr("password", "string", false),
		})),
		"health": hclspec.NewBlock("health", false, hclspec.NewObject(map[string]*hclspec.Spec{
			"exec": hclspec.NewAttr("exec", "list(string)", false),
			"http": hclspec.NewBlock("http", false, hclspec.NewObject(map[string]*hclspec.Spec{
				"port": hclspec.NewAttr("port", "number", true),
				"path": hclspec.NewAttr("path", "string", false),
			})),
			"tcp": hclspec.NewBlock("tcp", false, hclspec.NewObject(map[string]*hclspec.Spec{
				"port": hclspec.NewAttr("port", "number", true),
			})),
			"interval":     hclspec.NewAttr("interval", "string", false),
			"timeout":      hclspec.NewAttr("timeout", "string", false),
			"retries":      hclspec.NewAttr("retries", "number", false),
			"start_period": hclspec.NewAttr("start_period", "string", false),
		})),
	})
)

// envKeyRE is the variable names berth accepts; Nomad's NOMAD_META_*
// variables may carry dots and are left out.
var envKeyRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// nameRE is a berth workload name (a DNS label).
var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// Labels the driver puts on every workload it submits.
const (
	LabelAllocID = "nomad.alloc_id"
	LabelJob     = "nomad.job"
	LabelGroup   = "nomad.group"
	LabelTask    = "nomad.task"
	LabelTaskID  = "nomad.task_id"
)

func (c *TaskConfig) validate() error {
	if c.Image == "" {
		return fmt.Errorf("berth: task config needs an image")
	}
	switch api.Isolation(c.Isolation) {
	case "", api.IsolationAuto, api.IsolationContainer, api.IsolationVM:
	default:
		return fmt.Errorf("berth: isolation %q: want auto, container or vm", c.Isolation)
	}
	if _, err := c.Health.check(); err != nil {
		return err
	}
	return nil
}

// WorkloadName is the berth workload name of a Nomad task: unique per
// start of the task (Nomad's task ID ends in a fresh suffix on every
// start), and it carries the allocation ID so that people and tests can
// find a task's workload in berth's events.
func WorkloadName(allocID, taskID string) string {
	suffix := taskID
	if i := strings.LastIndexByte(taskID, '/'); i >= 0 {
		suffix = taskID[i+1:]
	}
	name := strings.ToLower("nomad-" + allocID + "-" + suffix)
	if len(name) > 63 || !nameRE.MatchString(name) {
		// Not a Nomad-shaped ID; let berth name the workload.
		return ""
	}
	return name
}
