package agent

import (
	"context"
	"errors"
	"fmt"
	"path"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/placement"
)

// Limits of an exec request.
const (
	maxExecArgs    = 4096
	maxExecArgLen  = 128 << 10
	maxExecEnv     = 1024
	maxTermDim     = 10000
	maxExecUserLen = 256
)

// Exec starts req's process in the running workload ref and returns its
// session, which the caller relays and must Close. It is refused with
//
//   - a 400 (errdefs.ValidationError) for a bad request or a user or
//     workdir the workload does not have;
//   - errdefs.StateError (409, naming the state) when the workload does
//     not run;
//   - errdefs.ErrDenied (403) when a rule of the current policy says
//     exec: deny for the workload's recorded spec, with the rule and why;
//   - errdefs.ErrNotImplemented when its driver has no exec.
//
// Who may exec is the API's business (whoever may stop the workload);
// the audit record is written there too, with the identity.
func (a *Agent) Exec(ctx context.Context, ref string, req api.ExecRequest) (driver.ExecSession, error) {
	if err := validateExec(req); err != nil {
		return nil, err
	}
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	w := r.Workload
	if err := notRunning(&w, "exec"); err != nil {
		return nil, err
	}
	pol := a.pol.current().policy
	if d := placement.DecideExec(placementWorkload(w.Spec), pol, a.nodeFacts(ctx)); !d.Allowed {
		return nil, fmt.Errorf("%s: %w", d.Explanation, errdefs.ErrDenied)
	}
	drv, err := a.driverFor(w.Isolation)
	if err != nil {
		return nil, err
	}
	execer, ok := drv.(driver.Execer)
	if !ok {
		return nil, fmt.Errorf("the %s driver cannot exec: %w", w.Isolation, errdefs.ErrNotImplemented)
	}
	user, err := a.execUser(ctx, &w, req.User)
	if err != nil {
		return nil, err
	}
	cfg := &driver.ExecConfig{
		Args: req.Command, Env: envList(req.Env), Workdir: req.Workdir, User: user,
		Stdin: req.Stdin, TTY: req.TTY,
	}
	if req.Size != nil {
		cfg.Size = driver.TermSize{Rows: req.Size.Rows, Cols: req.Size.Cols}
	}
	release, err := a.takeExecSlot(w.ID)
	if err != nil {
		return nil, err
	}
	driver.ExecStarting(ctx)
	sess, err := execer.Exec(ctx, w.ID, cfg)
	if err != nil {
		release()
	}
	switch {
	case errors.Is(err, errdefs.ErrNotFound) || errors.Is(err, errdefs.ErrConflict):
		// The task ended (or is gone) since the record said running.
		return nil, &errdefs.StateError{State: "exited", Msg: fmt.Sprintf("workload %s is no longer running; exec needs a running workload (%v)", w.ID, err)}
	case errors.Is(err, errdefs.ErrInvalidArgument):
		return nil, errdefs.Invalid(execField(err), "%v", err)
	case err != nil:
		return nil, fmt.Errorf("exec into workload %s: %w", w.ID, err)
	}
	return &slotSession{ExecSession: sess, release: release}, nil
}

// Signal delivers sig (a name, HUP or SIGHUP, or a number) to the running
// workload's main process.
func (a *Agent) Signal(ctx context.Context, ref, sig string) (*api.Workload, error) {
	s, err := driver.ParseSignal(sig)
	if err != nil {
		return nil, errdefs.Invalid("signal", "%v", err)
	}
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	w := r.Workload
	if err := notRunning(&w, "a signal"); err != nil {
		return nil, err
	}
	drv, err := a.driverFor(w.Isolation)
	if err != nil {
		return nil, err
	}
	sg, ok := drv.(driver.Signaler)
	if !ok {
		return nil, fmt.Errorf("the %s driver cannot signal: %w", w.Isolation, errdefs.ErrNotImplemented)
	}
	if err := sg.Signal(ctx, w.ID, s); err != nil {
		if errors.Is(err, errdefs.ErrNotFound) || errors.Is(err, errdefs.ErrConflict) {
			return nil, &errdefs.StateError{State: "exited", Msg: fmt.Sprintf("workload %s is no longer running (%v)", w.ID, err)}
		}
		return nil, fmt.Errorf("signal workload %s: %w", w.ID, err)
	}
	a.log.Info("signalled workload", "workload_id", w.ID, "signal", unix.SignalName(s))
	return &w, nil
}

// notRunning is the 409 of an operation that needs a running workload.
func notRunning(w *api.Workload, what string) error {
	if w.State == api.StateRunning && !w.Deleting {
		return nil
	}
	state := string(w.State)
	msg := fmt.Sprintf("workload %s is %s; %s needs a running workload", w.ID, state, what)
	if w.Deleting {
		msg = fmt.Sprintf("workload %s is being deleted; %s needs a running workload", w.ID, what)
	}
	return &errdefs.StateError{State: state, Msg: msg}
}

// execUser resolves the exec's user against the workload's image, as the
// workload's own user is: a name through the image's /etc/passwd and
// /etc/group, read confined to the image. A whole-disk VM has no image
// files berth reads: only numeric ids go there.
func (a *Agent) execUser(ctx context.Context, w *api.Workload, user string) (string, error) {
	if user == "" {
		return "", nil
	}
	img, err := a.images.Get(w.ImageDigest)
	if err != nil {
		return "", fmt.Errorf("image of workload %s is gone from the node: %w", w.ID, err)
	}
	if img.Kind == image.KindDisk {
		if _, _, err := driver.ParseExecUser(user); err != nil {
			return "", errdefs.Invalid("user", "a whole-disk VM's users are unknown to berth: give uid[:gid], not %q", user)
		}
		return user, nil
	}
	rootfs, err := a.images.Rootfs(ctx, img)
	if err != nil {
		return "", err
	}
	uid, gid, err := driver.ResolveUser(rootfs, user)
	if err != nil {
		return "", errdefs.Invalid("user", "%v", err)
	}
	return strconv.FormatUint(uint64(uid), 10) + ":" + strconv.FormatUint(uint64(gid), 10), nil
}

// execField names the request field a driver's refusal is about.
func execField(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "workdir") || strings.Contains(msg, "chdir") || strings.Contains(msg, "cwd"):
		return "workdir"
	case strings.Contains(msg, "user"):
		return "user"
	}
	return "command"
}

func validateExec(req api.ExecRequest) error {
	v := &errdefs.ValidationError{}
	switch {
	case len(req.Command) == 0 || req.Command[0] == "":
		v.Add("command", "is required: the program to run and its arguments")
	case len(req.Command) > maxExecArgs:
		v.Add("command", "has %d arguments; at most %d", len(req.Command), maxExecArgs)
	}
	for i, arg := range req.Command {
		if len(arg) > maxExecArgLen || strings.ContainsRune(arg, 0) {
			v.Add(fmt.Sprintf("command[%d]", i), "must be at most %d bytes without NUL", maxExecArgLen)
		}
	}
	if len(req.Env) > maxExecEnv {
		v.Add("env", "has %d variables; at most %d", len(req.Env), maxExecEnv)
	}
	for k, val := range req.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(val, 0) {
			// Name the key, never the value.
			v.Add(fmt.Sprintf("env[%q]", k), "a name must be non-empty without '=' or NUL, and a value without NUL")
		}
	}
	if req.Workdir != "" && (!path.IsAbs(req.Workdir) || strings.ContainsRune(req.Workdir, 0)) {
		v.Add("workdir", "must be an absolute path, got %q", req.Workdir)
	}
	if len(req.User) > maxExecUserLen || strings.ContainsAny(req.User, "\x00\n/") {
		v.Add("user", "must be a user name or uid, optionally :group or :gid")
	}
	if s := req.Size; s != nil && (s.Rows > maxTermDim || s.Cols > maxTermDim) {
		v.Add("size", "a terminal is at most %dx%d", maxTermDim, maxTermDim)
	}
	if req.TimeoutSeconds < 0 {
		v.Add("timeout_seconds", "must not be negative")
	}
	return v.Err()
}

// envList turns a request's environment into KEY=VALUE, sorted.
func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}
