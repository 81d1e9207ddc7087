package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/nomad/client/lib/fifo"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// logDrainTimeout is how long an exit waits for the last log lines to
// reach Nomad's log collector before it is reported.
const logDrainTimeout = 10 * time.Second

// taskHandle follows one berth workload for Nomad: its exit, its output
// (into the task's stdout/stderr fifos) and its berth events.
type taskHandle struct {
	d     *Driver
	cfg   *drivers.TaskConfig
	state State

	ctx    context.Context
	cancel context.CancelFunc
	// done is closed once the workload has ended and exit is set.
	done     chan struct{}
	logsDone chan struct{}

	mu       sync.Mutex
	exit     *drivers.ExitResult
	finished time.Time
}

func newTaskHandle(d *Driver, cfg *drivers.TaskConfig, state State) *taskHandle {
	ctx, cancel := context.WithCancel(d.ctx)
	return &taskHandle{
		d: d, cfg: cfg, state: state,
		ctx: ctx, cancel: cancel,
		done:     make(chan struct{}),
		logsDone: make(chan struct{}),
	}
}

func (h *taskHandle) result() *drivers.ExitResult {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.exit
}

func (h *taskHandle) completedAt() time.Time {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.finished
}

func (h *taskHandle) exited() bool {
	select {
	case <-h.done:
		return true
	default:
		return false
	}
}

func (h *taskHandle) close() { h.cancel() }

// run follows the workload until it ends or the handle is closed.
func (h *taskHandle) run(recovered bool) {
	go h.streamLogs(recovered)
	go h.forwardEvents()
	w, err := h.waitExit()
	if err != nil {
		return // closed
	}
	select {
	case <-h.logsDone:
	case <-time.After(logDrainTimeout):
		h.d.logger.Warn("output still streaming after the workload ended", "task_id", h.cfg.ID, "workload_id", h.state.WorkloadID)
	}
	res := exitResult(w)
	h.mu.Lock()
	h.exit = res
	h.finished = time.Now()
	if w.FinishedAt != nil {
		h.finished = *w.FinishedAt
	}
	h.mu.Unlock()
	close(h.done)
}

// exitResult is Nomad's view of an ended workload.
func exitResult(w *api.Workload) *drivers.ExitResult {
	res := &drivers.ExitResult{ExitCode: -1, OOMKilled: w.OOMKilled}
	if w.ExitCode != nil {
		res.ExitCode = *w.ExitCode
	}
	if w.State == api.StateFailed {
		res.Err = fmt.Errorf("berth workload %s failed: %s", w.ID, w.Error)
	}
	return res
}

// waitExit waits for the workload to end, riding out agent restarts. A
// workload that disappeared (deleted behind Nomad's back) ends the task
// with an error.
func (h *taskHandle) waitExit() (*api.Workload, error) {
	delay := 500 * time.Millisecond
	for {
		w, err := h.d.agent().WaitExit(h.ctx, h.state.WorkloadID)
		if err == nil {
			return w, nil
		}
		if h.ctx.Err() != nil {
			return nil, h.ctx.Err()
		}
		if client.IsReason(err, api.ReasonNotFound) {
			return &api.Workload{ID: h.state.WorkloadID, State: api.StateFailed, Error: "the workload is gone from berth"}, nil
		}
		h.d.logger.Warn("waiting for the workload", "workload_id", h.state.WorkloadID, "error", err)
		select {
		case <-time.After(delay):
		case <-h.ctx.Done():
			return nil, h.ctx.Err()
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// streamLogs copies the workload's output into the task's fifos, where
// Nomad's log collector reads it. A broken stream is resumed by skipping
// the lines already copied. When the collector goes away (a restarted
// Nomad client restarts it, and it reopens the fifos) the fifos are
// opened again and copying resumes where it stopped. After a plugin
// restart (recovered) only output from then on is copied: lines written
// while no plugin ran stay in berth (`berth logs WORKLOAD`), not in Nomad.
func (h *taskHandle) streamLogs(recovered bool) {
	defer close(h.logsDone)
	var stdout, stderr io.WriteCloser
	closeFifos := func() {
		if stdout != nil {
			stdout.Close()
		}
		if stderr != nil {
			stderr.Close()
		}
		stdout, stderr = nil, nil
	}
	defer closeFifos()

	// seen counts the lines of each stream copied so far, or skipped: a
	// recovered handle first counts the lines already there.
	seen := map[string]int{}
	if recovered {
		var ok bool
		if seen, ok = h.countLines(); !ok {
			return
		}
	}
	delay := 500 * time.Millisecond
	for {
		if stdout == nil {
			var err error
			if stdout, err = openFifo(h.ctx, h.cfg.StdoutPath); err != nil {
				if h.ctx.Err() == nil {
					h.d.logger.Error("open stdout fifo", "task_id", h.cfg.ID, "error", err)
				}
				return
			}
			if stderr, err = openFifo(h.ctx, h.cfg.StderrPath); err != nil {
				if h.ctx.Err() == nil {
					h.d.logger.Error("open stderr fifo", "task_id", h.cfg.ID, "error", err)
				}
				return
			}
		}
		skip := map[string]int{"stdout": seen["stdout"], "stderr": seen["stderr"]}
		var writeErr error
		err := h.d.agent().Logs(h.ctx, h.state.WorkloadID, api.LogOptions{Tail: -1, Follow: true}, func(l api.LogLine) error {
			if skip[l.Stream] > 0 {
				skip[l.Stream]--
				return nil
			}
			out := stdout
			if l.Stream == "stderr" {
				out = stderr
			}
			if _, err := io.WriteString(out, l.Line+"\n"); err != nil {
				writeErr = err
				return err
			}
			seen[l.Stream]++
			return nil
		})
		if err == nil || h.ctx.Err() != nil || client.IsReason(err, api.ReasonNotFound) {
			return
		}
		if writeErr != nil {
			if !fifo.IsClosedErr(writeErr) && !errors.Is(writeErr, syscall.EPIPE) {
				h.d.logger.Error("write to the log collector", "task_id", h.cfg.ID, "error", writeErr)
				return
			}
			// The collector closed its end: wait for it to open the fifos
			// again.
			h.d.logger.Info("the log collector went away; reopening the fifos", "task_id", h.cfg.ID)
			closeFifos()
		} else {
			h.d.logger.Warn("log stream broke; resuming", "workload_id", h.state.WorkloadID, "error", err)
		}
		select {
		case <-time.After(delay):
		case <-h.ctx.Done():
			return
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// countLines counts the workload's output lines per stream, retrying
// while the agent does not answer. It returns false once the handle is
// closed or the workload is gone.
func (h *taskHandle) countLines() (map[string]int, bool) {
	delay := 500 * time.Millisecond
	for {
		n := map[string]int{}
		err := h.d.agent().Logs(h.ctx, h.state.WorkloadID, api.LogOptions{Tail: -1}, func(l api.LogLine) error {
			n[l.Stream]++
			return nil
		})
		if err == nil {
			return n, true
		}
		if h.ctx.Err() != nil || client.IsReason(err, api.ReasonNotFound) {
			return nil, false
		}
		h.d.logger.Warn("count the workload's output", "workload_id", h.state.WorkloadID, "error", err)
		select {
		case <-time.After(delay):
		case <-h.ctx.Done():
			return nil, false
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// openFifo opens a task's log fifo for writing. The open blocks until
// Nomad's log collector has the other end, which after a client restart
// can come after RecoverTask.
func openFifo(ctx context.Context, path string) (io.WriteCloser, error) {
	type result struct {
		w   io.WriteCloser
		err error
	}
	ch := make(chan result, 1)
	go func() {
		w, err := fifo.OpenWriter(path)
		ch <- result{w, err}
	}()
	select {
	case r := <-ch:
		return r.w, r.err
	case <-ctx.Done():
		// Unblock the pending open, then close what it opened.
		if r, err := fifo.OpenReader(path); err == nil {
			r.Close()
		}
		if r := <-ch; r.w != nil {
			r.w.Close()
		}
		return nil, ctx.Err()
	}
}

// forwardEvents turns berth's events about the workload into Nomad task
// events (shown by `nomad alloc status`).
func (h *taskHandle) forwardEvents() {
	err := h.d.agent().Events(h.ctx, client.EventOptions{WorkloadID: h.state.WorkloadID, Types: []string{"workload."}}, nil, func(e api.Event) error {
		switch e.Type {
		case api.EventWorkloadCreated, api.EventWorkloadPlaced:
			return nil // StartTask reported the placement
		case api.EventWorkloadHealth:
			msg, attrs := healthEvent(e)
			h.d.emit(h.cfg, msg, attrs)
			return nil
		}
		h.d.emit(h.cfg, "berth: "+e.Message, e.Attrs)
		return nil
	})
	if err != nil && !errors.Is(err, context.Canceled) && h.ctx.Err() == nil {
		h.d.logger.Debug("berth event stream ended", "workload_id", h.state.WorkloadID, "error", err)
	}
}

// healthEvent is the Nomad task event of a change of the workload's health
// (berth's workload.health event): the message says the new state (and,
// when unhealthy, what the failing probe said); the annotations carry it
// for tools (health, previous, output).
func healthEvent(e api.Event) (string, map[string]string) {
	status := e.Attrs["status"]
	msg := "berth: health check: " + status
	if out := strings.TrimSpace(e.Attrs["output"]); status == api.HealthUnhealthy && out != "" {
		if len(out) > 200 {
			out = out[:200] + "..."
		}
		msg += " (" + out + ")"
	}
	attrs := map[string]string{"health": status}
	if p := e.Attrs["previous"]; p != "" {
		attrs["previous"] = p
	}
	if o := e.Attrs["output"]; o != "" {
		attrs["output"] = o
	}
	return msg, attrs
}
