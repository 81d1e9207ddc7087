package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// lockedBuffer is a log sink the agent writes while the test reads.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// newSecretEnv is newEnv with the agent's log, at debug, in a buffer.
func newSecretEnv(t *testing.T) (*env, *lockedBuffer) {
	logs := &lockedBuffer{}
	e := newEnv(t)
	e.change = func(o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	e.restart()
	return e, logs
}

const secretValue = "s3cr3t-Value-7b1f"

// noSecret fails when what holds the secret value.
func noSecret(t *testing.T, what string, data []byte) {
	t.Helper()
	if bytes.Contains(data, []byte(secretValue)) {
		t.Errorf("%s holds the secret value:\n%s", what, data)
	}
}

func marshal(t *testing.T, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// A secret reaches the workload's environment, and nothing else: not the
// answers (submit, get, list, a dry run), the events, the agent's log or
// the state database. Its file is root's alone and goes with the
// workload.
func TestSecretEnvReachesOnlyTheWorkload(t *testing.T) {
	e, logs := newSecretEnv(t)
	ctx := context.Background()
	spec := sh(`echo "token=$TOKEN plain=$PLAIN"; exit 3`)
	spec.Image, spec.Name = testImage, "secretive"
	spec.Env = map[string]string{"PLAIN": "p"}
	spec.SecretEnv = map[string]string{"TOKEN": secretValue}
	spec.Restart = api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 1}
	w, created, err := e.agent.Submit(ctx, spec)
	if err != nil || !created {
		t.Fatalf("submit: %v %v", created, err)
	}
	if spec.SecretEnv["TOKEN"] != secretValue {
		t.Error("Submit changed the caller's secret_env")
	}
	noSecret(t, "the submit's answer", marshal(t, w))
	if w.Spec.SecretEnv["TOKEN"] != api.Redacted {
		t.Errorf("the answer's secret_env is %v, want TOKEN: %s", w.Spec.SecretEnv, api.Redacted)
	}

	// The secrets file: 0600 in a 0700 directory, before the workload
	// runs.
	dir := filepath.Join(e.dir, "secrets")
	path := filepath.Join(dir, w.ID+".json")
	for p, want := range map[string]os.FileMode{dir: 0o700 | os.ModeDir, path: 0o600} {
		if fi, err := os.Stat(p); err != nil || fi.Mode() != want {
			t.Errorf("%s: %v %v, want mode %v", p, fi.Mode(), err, want)
		}
	}

	// Both runs (a restart reads the file again) see the secret.
	w = e.waitFor(w.ID, func(w *api.Workload) bool { return terminal(w) && w.RestartCount == 1 })
	var out []string
	if err := e.agent.Logs(ctx, w.ID, api.LogOptions{Tail: -1}, func(_ string, l []byte, _ time.Time) error {
		out = append(out, string(l))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	want := "token=" + secretValue + " plain=p"
	if len(out) != 2 || out[0] != want || out[1] != want {
		t.Errorf("the workload's output %q, want %q twice", out, want)
	}

	// After an agent restart too.
	e.restart()
	w, err = e.agent.Get(ctx, w.ID)
	if err != nil {
		t.Fatal(err)
	}
	noSecret(t, "GET", marshal(t, w))
	noSecret(t, "the list", marshal(t, e.agent.List(ctx, api.ListFilter{})))
	d, err := e.agent.Place(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	noSecret(t, "the dry run", marshal(t, d))
	if d.Spec.SecretEnv["TOKEN"] != api.Redacted {
		t.Errorf("the dry run's secret_env %v, want TOKEN redacted", d.Spec.SecretEnv)
	}
	evs, _, _ := e.agent.events.after(0, func(*api.Event) bool { return true })
	noSecret(t, "the events", marshal(t, evs))
	db, err := os.ReadFile(filepath.Join(e.dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	noSecret(t, "the state database", db)
	if !bytes.Contains(db, []byte(`"secret_env":["TOKEN"]`)) {
		t.Error("the state database does not name the secret")
	}

	// Gone with the workload.
	if err := e.agent.Delete(ctx, w.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("the secrets file after delete: %v", err)
	}
	noSecret(t, "the agent's log", []byte(logs.String()))
	if !strings.Contains(logs.String(), "workload admitted") {
		t.Errorf("the agent's log was not captured:\n%s", logs)
	}
}

// A resubmit is compared whole, secret values included, and its answer
// and error say nothing of them.
func TestSecretEnvResubmit(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	spec := sh("sleep 1000")
	spec.Image, spec.Name = testImage, "job"
	spec.SecretEnv = map[string]string{"TOKEN": secretValue, "OTHER": "x"}
	w := e.submit(spec)

	again, created, err := e.agent.Submit(ctx, spec)
	if err != nil || created || again.ID != w.ID {
		t.Fatalf("same secrets: %v created=%v err=%v, want %s", again, created, err, w.ID)
	}
	spec.SecretEnv = map[string]string{"TOKEN": secretValue + "!", "OTHER": "x"}
	_, _, err = e.agent.Submit(ctx, spec)
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("another secret value: %v, want ErrAlreadyExists", err)
	} else {
		noSecret(t, "the conflict", []byte(err.Error()))
	}
	spec.SecretEnv = map[string]string{"TOKEN": secretValue}
	if _, _, err := e.agent.Submit(ctx, spec); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("a secret less: %v, want ErrAlreadyExists", err)
	}
	// The workload's echo of its redacted answer is not a secret.
	spec.SecretEnv = map[string]string{"TOKEN": api.Redacted, "OTHER": "x"}
	if _, _, err := e.agent.Submit(ctx, spec); !errors.As(err, new(*errdefs.ValidationError)) {
		t.Errorf("a redacted value resubmitted: %v, want a validation error", err)
	}
	// The same after a restart (the values come from the file).
	e.restart()
	spec.SecretEnv = map[string]string{"TOKEN": secretValue, "OTHER": "x"}
	if again, created, err := e.agent.Submit(ctx, spec); err != nil || created || again.ID != w.ID {
		t.Errorf("same secrets after a restart: %v created=%v err=%v", again, created, err)
	}
}

// secret_env is validated as env is, and no error quotes a value.
func TestSecretEnvValidation(t *testing.T) {
	e := newEnv(t)
	many := map[string]string{}
	for i := range maxSecretEnv + 1 {
		many["K"+strings.Repeat("X", i)] = secretValue
	}
	for _, c := range []struct {
		secrets map[string]string
		env     map[string]string
		field   string
	}{
		{map[string]string{"1BAD": secretValue}, nil, "secret_env.1BAD"},
		{map[string]string{"A=B": secretValue}, nil, "secret_env.A=B"},
		{map[string]string{"NUL": secretValue + "\x00"}, nil, "secret_env.NUL"},
		{map[string]string{"BOTH": secretValue}, map[string]string{"BOTH": "x"}, "secret_env.BOTH"},
		{map[string]string{"R": api.Redacted}, nil, "secret_env.R"},
		{map[string]string{"BIG": strings.Repeat(secretValue, maxSecretEnvBytes/len(secretValue)+1)}, nil, "secret_env"},
		{many, nil, "secret_env"},
	} {
		spec := sh("true")
		spec.Image, spec.SecretEnv, spec.Env = testImage, c.secrets, c.env
		_, _, err := e.agent.Submit(context.Background(), spec)
		var v *errdefs.ValidationError
		if !errors.As(err, &v) {
			t.Errorf("%s: %v, want a validation error", c.field, err)
			continue
		}
		found := false
		for _, f := range v.Fields {
			found = found || f.Field == c.field
		}
		if !found {
			t.Errorf("%s: fields %v", c.field, v.Fields)
		}
		noSecret(t, "the validation error", []byte(err.Error()))
	}
}

// What a crash leaves in the secrets directory (the file of a submit
// that died before its record, a temp file) is swept when the agent
// starts; the files of known workloads stay.
func TestSecretsSweptAtStart(t *testing.T) {
	e := newEnv(t)
	spec := sh("sleep 1000")
	spec.Image, spec.SecretEnv = testImage, map[string]string{"TOKEN": secretValue}
	w := e.submit(spec)
	dir := filepath.Join(e.dir, "secrets")
	for _, name := range []string{"00000000000000ff.json", ".00000000000000fe.json.tmp123"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(`{"version":1,"env":{"A":"b"}}`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.restart()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != w.ID+".json" {
		t.Errorf("the secrets directory holds %v, want only %s.json", entries, w.ID)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("the secrets directory after a start: %v %v, want 0700", fi.Mode(), err)
	}
}

// The secrets file of a workload is what its run reads: a run that
// finds it gone fails, saying so without a value.
func TestSecretsFileGone(t *testing.T) {
	e := newEnv(t)
	spec := sh("echo $TOKEN")
	spec.Image, spec.SecretEnv = testImage, map[string]string{"TOKEN": secretValue}
	spec.Restart = api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 1}
	e.ctr.FailNext("Start", errors.New("runc hiccup"))
	w := e.submit(spec)
	if err := os.Remove(filepath.Join(e.dir, "secrets", w.ID+".json")); err != nil {
		t.Fatal(err)
	}
	w = e.waitFor(w.ID, func(w *api.Workload) bool { return terminal(w) && w.RestartCount == 1 })
	if w.State != api.StateFailed || !strings.Contains(w.Error, "secret environment") {
		t.Errorf("a run without its secrets: %s %q, want failed saying why", w.State, w.Error)
	}
}
