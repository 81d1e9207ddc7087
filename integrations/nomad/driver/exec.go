package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

var _ drivers.ExecTaskStreamingDriver = (*Driver)(nil)

// SignalTask implements drivers.DriverPlugin (`nomad alloc signal`): the
// signal goes to the workload's main process, in a container or (through
// berth-init) in a VM.
func (d *Driver) SignalTask(taskID, signal string) error {
	h, err := d.task(taskID)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(d.ctx, agentTimeout)
	defer cancel()
	if _, err := d.agent().Signal(ctx, h.state.WorkloadID, signal); err != nil {
		return fmt.Errorf("berth: signal %s to workload %s: %w", signal, h.state.WorkloadID, err)
	}
	return nil
}

// ExecTask implements drivers.DriverPlugin (script checks): the command
// runs to its end in the workload, through berth's simple exec.
func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	h, err := d.task(taskID)
	if err != nil {
		return nil, err
	}
	secs := int((timeout + time.Second - 1) / time.Second)
	ctx, cancel := context.WithTimeout(d.ctx, timeout+agentTimeout)
	defer cancel()
	res, err := d.agent().Exec(ctx, h.state.WorkloadID, api.ExecRequest{Command: cmd, TimeoutSeconds: secs})
	if err != nil {
		return nil, fmt.Errorf("berth: exec in workload %s: %w", h.state.WorkloadID, err)
	}
	return &drivers.ExecTaskResult{
		Stdout: []byte(res.Stdout), Stderr: []byte(res.Stderr),
		ExitResult: &drivers.ExitResult{ExitCode: res.ExitCode, Signal: res.Signal},
	}, nil
}

// ExecTaskStreaming implements drivers.ExecTaskStreamingDriver (`nomad
// alloc exec`): an interactive berth exec session, terminal included.
// When ctx ends (the user left), the session closes and berth kills the
// process.
func (d *Driver) ExecTaskStreaming(ctx context.Context, taskID string, opts *drivers.ExecOptions) (*drivers.ExitResult, error) {
	h, err := d.task(taskID)
	if err != nil {
		return nil, err
	}
	req := api.ExecRequest{Command: opts.Command, TTY: opts.Tty, Stdin: opts.Stdin != nil}
	sess, err := d.agent().ExecStream(ctx, h.state.WorkloadID, req)
	if err != nil {
		return nil, fmt.Errorf("berth: exec in workload %s: %w", h.state.WorkloadID, err)
	}
	defer sess.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			_ = sess.Close()
		case <-done:
		}
	}()
	if opts.ResizeCh != nil {
		go func() {
			for {
				select {
				case s, ok := <-opts.ResizeCh:
					if !ok {
						return
					}
					_ = sess.Resize(uint16(s.Height), uint16(s.Width))
				case <-done:
					return
				}
			}
		}()
	}
	if opts.Stdin != nil {
		go func() {
			_, _ = io.Copy(sess, opts.Stdin)
			_ = sess.CloseStdin()
		}()
	}
	stdout, stderr := io.Writer(io.Discard), io.Writer(io.Discard)
	if opts.Stdout != nil {
		stdout = opts.Stdout
	}
	if opts.Stderr != nil {
		stderr = opts.Stderr
	}
	exit, err := sess.Wait(stdout, stderr)
	if err != nil {
		if errors.Is(err, client.ErrSessionLost) && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("berth: exec session in workload %s: %w", h.state.WorkloadID, err)
	}
	res := &drivers.ExitResult{ExitCode: *exit.ExitCode}
	if exit.Signal != "" {
		res.Signal = *exit.ExitCode - 128
	}
	return res, nil
}
