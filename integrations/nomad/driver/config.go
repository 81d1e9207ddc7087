package driver

import (
	"fmt"
	"regexp"
	"strings"

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
