// Package driver is berth's Nomad task driver: Nomad places a task on a
// node, the driver hands it to that node's berth agent, and the agent's
// isolation policy runs it as a container or in a VM.
package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	cstructs "github.com/hashicorp/nomad/client/structs"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/drivers/fsisolation"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// Name is the driver's name in job files (driver = "berth").
const Name = "berth"

// Version is the plugin's version, reported to Nomad.
var Version = "0.1.0"

// handleVersion is the version of the DriverState this driver writes.
const handleVersion = 1

// State is what the task handle carries so that RecoverTask can re-attach
// to the workload after the Nomad client restarts.
type State struct {
	WorkloadID string
	Isolation  string
	StartedAt  time.Time
}

// agentTimeout bounds ordinary calls to the agent.
const agentTimeout = 30 * time.Second

// pullTimeout bounds the pull a task's auth block makes before its submit.
const pullTimeout = 30 * time.Minute

var capabilities = &drivers.Capabilities{
	SendSignals: true,
	Exec:        true,
	// The workload's root file system is its image; the allocation's
	// directories are mounted into it at /alloc, /local and /secrets
	// (alloc_dirs, volumes.go).
	FSIsolation:       fsisolation.Image,
	NetIsolationModes: []drivers.NetIsolationMode{drivers.NetIsolationModeHost},
	// Host volumes (volume_mount) become berth host-path volumes.
	MountConfigs: drivers.MountConfigSupportAll,
}

// Driver implements drivers.DriverPlugin.
type Driver struct {
	ctx     context.Context
	cancel  context.CancelFunc
	logger  hclog.Logger
	eventer *eventer.Eventer

	mu      sync.Mutex
	config  PluginConfig
	client  *client.Client
	compute cpustats.Compute
	tasks   map[string]*taskHandle
}

var _ drivers.DriverPlugin = (*Driver)(nil)

// New returns the driver; Nomad configures it with SetConfig.
func New(logger hclog.Logger) *Driver {
	ctx, cancel := context.WithCancel(context.Background())
	return &Driver{
		ctx:     ctx,
		cancel:  cancel,
		logger:  logger.Named(Name),
		eventer: eventer.NewEventer(ctx, logger),
		tasks:   map[string]*taskHandle{},
	}
}

// PluginInfo implements base.BasePlugin.
func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) {
	return &base.PluginInfoResponse{
		Type:              base.PluginTypeDriver,
		PluginApiVersions: []string{drivers.ApiVersion010},
		PluginVersion:     Version,
		Name:              Name,
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema() (*hclspec.Spec, error) { return configSpec, nil }

// SetConfig implements base.BasePlugin.
func (d *Driver) SetConfig(cfg *base.Config) error {
	pc := PluginConfig{AllocDirs: true}
	if len(cfg.PluginConfig) != 0 {
		if err := base.MsgPackDecode(cfg.PluginConfig, &pc); err != nil {
			return fmt.Errorf("berth plugin config: %w", err)
		}
	}
	c, err := newClient(pc.Address, pc.Token)
	if err != nil {
		return fmt.Errorf("berth plugin config: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.config, d.client = pc, c
	if cfg.AgentConfig != nil {
		d.compute = cfg.AgentConfig.Compute()
	}
	return nil
}

func (d *Driver) agent() *client.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.client
}

// TaskConfigSchema implements drivers.DriverPlugin.
func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error) { return taskConfigSpec, nil }

// Capabilities implements drivers.DriverPlugin.
func (d *Driver) Capabilities() (*drivers.Capabilities, error) { return capabilities, nil }

// Spec builds the berth workload spec of a Nomad task.
func Spec(cfg *drivers.TaskConfig, tc *TaskConfig, compute cpustats.Compute) api.WorkloadSpec {
	spec := api.WorkloadSpec{
		Name:       WorkloadName(cfg.AllocID, cfg.ID),
		Image:      tc.Image,
		Args:       tc.Args,
		Workdir:    tc.Workdir,
		Isolation:  api.Isolation(tc.Isolation),
		Privileged: tc.Privileged,
		Network:    tc.Network,
		Resources:  Resources(cfg.Resources, compute),
		// Nomad's restart block decides restarts, not berth.
		Restart: api.RestartSpec{Policy: api.RestartNever},
		Env:     map[string]string{},
		Labels: map[string]string{
			LabelAllocID: cfg.AllocID,
			LabelJob:     cfg.JobName,
			LabelGroup:   cfg.TaskGroupName,
			LabelTask:    cfg.Name,
		},
	}
	if spec.Isolation == "" {
		spec.Isolation = api.IsolationAuto
	}
	if tc.Command != "" {
		spec.Command = []string{tc.Command}
	}
	// Checked by validate; restart.on_unhealthy stays off (see TaskHealth).
	spec.Health, _ = tc.Health.check()
	for k, v := range cfg.Env {
		if envKeyRE.MatchString(k) {
			spec.Env[k] = v
		}
	}
	maps.Copy(spec.Env, tc.Env)
	maps.Copy(spec.Labels, tc.Labels)
	for k, v := range spec.Labels {
		if v == "" {
			delete(spec.Labels, k)
		}
	}
	return spec
}

// StartTask implements drivers.DriverPlugin.
func (d *Driver) StartTask(cfg *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	d.mu.Lock()
	_, exists := d.tasks[cfg.ID]
	compute := d.compute
	d.mu.Unlock()
	if exists {
		return nil, nil, fmt.Errorf("berth: task %s already started", cfg.ID)
	}
	var tc TaskConfig
	if err := cfg.DecodeDriverConfig(&tc); err != nil {
		return nil, nil, fmt.Errorf("berth: decode task config: %w", err)
	}
	if err := tc.validate(); err != nil {
		return nil, nil, err
	}
	c := d.agent()
	if c == nil {
		return nil, nil, errors.New("berth: the plugin is not configured")
	}
	ctx, cancel := context.WithTimeout(d.ctx, agentTimeout)
	defer cancel()
	spec := Spec(cfg, &tc, compute)
	d.mu.Lock()
	allocDirs := d.config.AllocDirs
	d.mu.Unlock()
	if err := addVolumes(&spec, cfg, &tc, allocDirs); err != nil {
		return nil, nil, err
	}
	if req := tc.pullRequest(spec.Labels[api.TenantLabel]); req != nil {
		// The job's own credentials: the image is pulled with them first
		// (berth keeps the image, never the credentials); the submit then
		// finds it on the node. The image is private to the workload's
		// tenant (its tenant label; none: the node's namespace), so a
		// workload of another tenant cannot run it without credentials.
		pctx, pcancel := context.WithTimeout(d.ctx, pullTimeout)
		_, err := c.PullImageWith(pctx, *req)
		pcancel()
		if err != nil {
			return nil, nil, fmt.Errorf("berth: pull %s with the task's auth block: %w", tc.Image, err)
		}
	}
	w, err := c.Submit(ctx, spec)
	if err != nil {
		return nil, nil, fmt.Errorf("berth: submit: %w", err)
	}
	state := State{WorkloadID: w.ID, Isolation: string(w.Isolation), StartedAt: time.Now()}
	h := drivers.NewTaskHandle(handleVersion)
	h.Config = cfg
	if err := h.SetDriverState(&state); err != nil {
		_ = c.Delete(ctx, w.ID, true)
		return nil, nil, fmt.Errorf("berth: task handle: %w", err)
	}
	d.track(cfg, state, false)
	d.emit(cfg, placementMessage(w), map[string]string{"workload_id": w.ID, "isolation": string(w.Isolation)})
	d.logger.Info("started task", "task_id", cfg.ID, "workload_id", w.ID, "isolation", w.Isolation)
	return h, nil, nil
}

func placementMessage(w *api.Workload) string {
	msg := fmt.Sprintf("berth runs the task as a %s (workload %s)", w.Isolation, w.ID)
	if p := w.Placement; p != nil {
		if p.DecidingRule != "" {
			msg += fmt.Sprintf(", rule %s", p.DecidingRule)
		}
		msg += fmt.Sprintf(", policy %s", p.PolicyVersion)
	}
	return msg
}

// track registers a task and starts following its workload.
func (d *Driver) track(cfg *drivers.TaskConfig, state State, recovered bool) *taskHandle {
	h := newTaskHandle(d, cfg, state)
	d.mu.Lock()
	d.tasks[cfg.ID] = h
	d.mu.Unlock()
	go h.run(recovered)
	return h
}

// RecoverTask implements drivers.DriverPlugin: re-attach to the workload
// named in the handle after the Nomad client (and this plugin) restarted.
func (d *Driver) RecoverTask(handle *drivers.TaskHandle) error {
	if handle == nil || handle.Config == nil {
		return errors.New("berth: recover: no task handle")
	}
	d.mu.Lock()
	_, ok := d.tasks[handle.Config.ID]
	d.mu.Unlock()
	if ok {
		return nil
	}
	if handle.Version != handleVersion {
		return fmt.Errorf("berth: recover: task handle version %d, want %d", handle.Version, handleVersion)
	}
	var state State
	if err := handle.GetDriverState(&state); err != nil {
		return fmt.Errorf("berth: recover: task handle: %w", err)
	}
	if state.WorkloadID == "" {
		return errors.New("berth: recover: the task handle names no workload")
	}
	c := d.agent()
	if c == nil {
		return errors.New("berth: the plugin is not configured")
	}
	ctx, cancel := context.WithTimeout(d.ctx, agentTimeout)
	defer cancel()
	if _, _, err := c.Get(ctx, state.WorkloadID, nil); err != nil {
		if client.IsReason(err, api.ReasonNotFound) {
			// Nomad starts the task afresh.
			return fmt.Errorf("berth: recover workload %s: %w", state.WorkloadID, err)
		}
		// The agent does not answer right now (it may be restarting):
		// follow the workload anyway, the handle waits for the agent. A
		// failed recovery would make Nomad start a second workload and
		// leave this one running.
		d.logger.Warn("recovering task while the berth agent does not answer", "task_id", handle.Config.ID, "workload_id", state.WorkloadID, "error", err)
	}
	d.track(handle.Config, state, true)
	d.logger.Info("recovered task", "task_id", handle.Config.ID, "workload_id", state.WorkloadID)
	return nil
}

func (d *Driver) task(id string) (*taskHandle, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	h, ok := d.tasks[id]
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h, nil
}

// WaitTask implements drivers.DriverPlugin.
func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, err := d.task(taskID)
	if err != nil {
		return nil, err
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		select {
		case <-h.done:
			ch <- h.result()
		case <-ctx.Done():
		case <-d.ctx.Done():
		}
	}()
	return ch, nil
}

// StopTask implements drivers.DriverPlugin: berth sends SIGTERM and, after
// timeout (the task's kill_timeout), SIGKILL. berth takes no signal name,
// so the task's kill_signal is not honoured.
func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, err := d.task(taskID)
	if err != nil {
		return err
	}
	if signal != "" && signal != "SIGTERM" {
		d.logger.Warn("berth stops workloads with SIGTERM; kill_signal is ignored", "task_id", taskID, "signal", signal)
	}
	ctx, cancel := context.WithTimeout(d.ctx, timeout+agentTimeout)
	defer cancel()
	if _, err := d.agent().Stop(ctx, h.state.WorkloadID, timeout); err != nil && !client.IsReason(err, api.ReasonNotFound) {
		return fmt.Errorf("berth: stop workload %s: %w", h.state.WorkloadID, err)
	}
	return nil
}

// DestroyTask implements drivers.DriverPlugin: the workload and its logs
// are deleted from berth.
func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, err := d.task(taskID)
	if err != nil {
		return err
	}
	if !force && !h.exited() {
		return fmt.Errorf("berth: task %s is still running; stop it first or destroy with force", taskID)
	}
	ctx, cancel := context.WithTimeout(d.ctx, 2*agentTimeout)
	defer cancel()
	if err := d.agent().Delete(ctx, h.state.WorkloadID, true); err != nil && !client.IsReason(err, api.ReasonNotFound) {
		return fmt.Errorf("berth: delete workload %s: %w", h.state.WorkloadID, err)
	}
	h.close()
	d.mu.Lock()
	delete(d.tasks, taskID)
	d.mu.Unlock()
	return nil
}

// InspectTask implements drivers.DriverPlugin.
func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, err := d.task(taskID)
	if err != nil {
		return nil, err
	}
	st := &drivers.TaskStatus{
		ID:        taskID,
		Name:      h.cfg.Name,
		State:     drivers.TaskStateRunning,
		StartedAt: h.state.StartedAt,
		DriverAttributes: map[string]string{
			"workload_id": h.state.WorkloadID,
			"isolation":   h.state.Isolation,
		},
	}
	ctx, cancel := context.WithTimeout(d.ctx, agentTimeout)
	defer cancel()
	if w, _, err := d.agent().Get(ctx, h.state.WorkloadID, nil); err == nil {
		if w.StartedAt != nil {
			st.StartedAt = *w.StartedAt
		}
		if w.Placement != nil {
			st.DriverAttributes["policy_version"] = w.Placement.PolicyVersion
			st.DriverAttributes["rule"] = w.Placement.DecidingRule
		}
		st.DriverAttributes["state"] = string(w.State)
		maps.Copy(st.DriverAttributes, healthAttributes(w))
	}
	if h.exited() {
		st.State = drivers.TaskStateExited
		st.ExitResult = h.result()
		st.CompletedAt = h.completedAt()
	}
	return st, nil
}

// healthAttributes are the task's driver attributes for the workload's
// health check: health (starting, healthy or unhealthy), its failing
// streak and the last probe's output. None without a check.
func healthAttributes(w *api.Workload) map[string]string {
	if w.Health == nil {
		return nil
	}
	attrs := map[string]string{
		"health":                w.Health.Status,
		"health_failing_streak": strconv.Itoa(w.Health.FailingStreak),
	}
	if n := len(w.Health.Log); n > 0 {
		attrs["health_output"] = w.Health.Log[n-1].Output
	}
	return attrs
}

// TaskStats implements drivers.DriverPlugin with berth's readings.
func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *cstructs.TaskResourceUsage, error) {
	h, err := d.task(taskID)
	if err != nil {
		return nil, err
	}
	ch := make(chan *cstructs.TaskResourceUsage)
	go d.stats(ctx, h, interval, ch)
	return ch, nil
}

// TaskEvents implements drivers.DriverPlugin.
func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

func (d *Driver) emit(cfg *drivers.TaskConfig, msg string, annotations map[string]string) {
	err := d.eventer.EmitEvent(&drivers.TaskEvent{
		TaskID:      cfg.ID,
		TaskName:    cfg.Name,
		AllocID:     cfg.AllocID,
		Timestamp:   time.Now(),
		Message:     msg,
		Annotations: annotations,
	})
	if err != nil {
		d.logger.Debug("task event not sent", "task_id", cfg.ID, "error", err)
	}
}

// Shutdown stops the driver's background work (Nomad kills the plugin
// process; tests call it).
func (d *Driver) Shutdown() { d.cancel() }
