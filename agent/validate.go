package agent

import (
	"math"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
)

// Limits on what a spec may carry. They keep one request from costing the
// node more than a request should, and give clients a clear answer.
const (
	maxArgs       = 1024
	maxArgBytes   = 128 << 10 // all of command and args together
	maxEnv        = 1024
	maxEnvBytes   = 128 << 10
	maxLabels     = 64
	maxLabelKey   = 253
	maxLabelValue = 1024
	maxPathLen    = 4096
	maxCPU        = 1024
	maxMemoryMB   = 4 << 20 // 4 TiB
	minMemoryMB   = 8       // below this no runtime can even start a process
	maxPids       = 1 << 22
	maxDiskMB     = 16 << 20 // 16 TiB
	minDiskMB     = 16       // an empty filesystem's own metadata takes some
	maxMaxRetries = 10000
	maxNameLen    = 63
	// A secret environment is a few keys and certificates, not a file
	// system: its own, smaller budget.
	maxSecretEnv      = 128
	maxSecretEnvBytes = 64 << 10
	maxTenantLen      = 63
)

var (
	nameRE     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	envKeyRE   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	labelKeyRE = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$`)
	// tenantRE is a tenant name as the tokens file spells it
	// (internal/auth): no '/', so TENANT/NAME is unambiguous.
	tenantRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$`)
)

// Defaults fill what a spec leaves out.
type Defaults struct {
	// CPU and MemoryMB are the requests of a spec that names neither a
	// request nor a limit; CPULimit and MemoryLimitMB its limits (0, or
	// below the request, means the request).
	CPU           float64
	MemoryMB      int64
	CPULimit      float64
	MemoryLimitMB int64
	Pids          int64
	// DiskMB is the ephemeral storage of a spec that names none; 0: none
	// of its own (bounded by the node's disk alone).
	DiskMB int64
	// Logs are the log rotation of a spec that names none, and the most
	// a spec may ask for.
	Logs LogDefaults
	// Network is the mode of a spec that names none: bridge where the node
	// has a network, none where it has not.
	Network string
}

// normalize validates spec and returns it with defaults applied and the
// image reference normalized, or an *errdefs.ValidationError naming every
// offending field. What it returns holds no secret: each secret_env value
// is api.Redacted (Submit keeps the values it was given), so nothing
// derived from a normalized spec (a record, a dry-run's answer, an event)
// can carry one. Its errors name secret variables, never their values.
func normalize(spec api.WorkloadSpec, def Defaults) (api.WorkloadSpec, error) {
	v := &errdefs.ValidationError{}
	if spec.Name != "" && (len(spec.Name) > maxNameLen || !nameRE.MatchString(spec.Name)) {
		v.Add("name", "%q is not a DNS label: lower-case letters, digits and '-', at most %d characters, starting and ending with a letter or digit", spec.Name, maxNameLen)
	}
	switch {
	case spec.Image == "":
		v.Add("image", "required: an OCI image reference such as busybox:latest")
	default:
		ref, err := image.Normalize(spec.Image)
		if err != nil {
			v.Add("image", "%q is not a valid image reference", spec.Image)
		} else {
			spec.Image = ref
		}
	}
	checkStrings(v, "command", spec.Command)
	checkStrings(v, "args", spec.Args)
	if n := len(spec.Command) + len(spec.Args); n > maxArgs {
		v.Add("command", "%d arguments; at most %d", n, maxArgs)
	}
	if n := totalLen(spec.Command) + totalLen(spec.Args); n > maxArgBytes {
		v.Add("command", "%d bytes of command and args; at most %d", n, maxArgBytes)
	}
	if len(spec.Env) > maxEnv {
		v.Add("env", "%d variables; at most %d", len(spec.Env), maxEnv)
	}
	envBytes := 0
	for k, val := range spec.Env {
		envBytes += len(k) + len(val) + 1
		if !envKeyRE.MatchString(k) {
			v.Add("env."+k, "not a valid variable name: letters, digits and '_', not starting with a digit")
		}
		if strings.ContainsRune(val, 0) {
			v.Add("env."+k, "contains a NUL byte")
		}
	}
	if envBytes > maxEnvBytes {
		v.Add("env", "%d bytes; at most %d", envBytes, maxEnvBytes)
	}
	spec.SecretEnv = checkSecretEnv(v, spec.SecretEnv, spec.Env)
	if tenant, ok := spec.Labels[api.TenantLabel]; ok && tenant != "" && (len(tenant) > maxTenantLen || !tenantRE.MatchString(tenant)) {
		v.Add("labels."+api.TenantLabel, "%q is not a tenant name: lower-case letters, digits, '-', '_' and '.', at most %d characters, starting and ending with a letter or digit", tenant, maxTenantLen)
	}
	if spec.Workdir != "" {
		switch {
		case !path.IsAbs(spec.Workdir):
			v.Add("workdir", "%q must be an absolute path inside the image", spec.Workdir)
		case len(spec.Workdir) > maxPathLen || strings.ContainsRune(spec.Workdir, 0):
			v.Add("workdir", "not a usable path")
		default:
			spec.Workdir = path.Clean(spec.Workdir)
		}
	}
	if len(spec.Labels) > maxLabels {
		v.Add("labels", "%d labels; at most %d", len(spec.Labels), maxLabels)
	}
	for k, val := range spec.Labels {
		if len(k) > maxLabelKey || !labelKeyRE.MatchString(k) {
			v.Add("labels."+k, "not a valid label key: letters, digits, '-', '_', '.', '/', at most %d characters", maxLabelKey)
		}
		if len(val) > maxLabelValue || !utf8.ValidString(val) || strings.ContainsFunc(val, isControl) {
			v.Add("labels."+k, "label values are printable UTF-8 of at most %d bytes", maxLabelValue)
		}
	}
	switch spec.Isolation {
	case "":
		spec.Isolation = api.IsolationAuto
	case api.IsolationAuto, api.IsolationContainer, api.IsolationVM:
	default:
		v.Add("isolation", "%q is not one of auto, container, vm", spec.Isolation)
	}
	normalizeResources(v, &spec.Resources, def)
	r := &spec.Resources
	switch {
	case r.Pids < 0 || r.Pids > maxPids:
		v.Add("resources.pids", "must be between 1 and %d", maxPids)
	case r.Pids == 0:
		r.Pids = def.Pids
	}
	switch {
	case r.DiskMB < 0 || r.DiskMB > maxDiskMB:
		v.Add("resources.disk_mb", "must be between %d and %d", minDiskMB, maxDiskMB)
	case r.DiskMB == 0:
		r.DiskMB = def.DiskMB
	case r.DiskMB < minDiskMB:
		v.Add("resources.disk_mb", "%d MiB is too little for a filesystem; at least %d", r.DiskMB, minDiskMB)
	}
	spec.Logs = normalizeLogs(v, spec.Logs, def.Logs)
	normalizeHealth(v, &spec)
	switch spec.ImagePull {
	case "":
		spec.ImagePull = api.PullIfNotPresent
	case api.PullIfNotPresent, api.PullAlways, api.PullNever:
	default:
		v.Add("image_pull", "%q is not one of if-not-present, always, never", spec.ImagePull)
	}
	switch spec.Restart.Policy {
	case "":
		spec.Restart.Policy = api.RestartNever
	case api.RestartNever, api.RestartOnFailure, api.RestartAlways:
	default:
		v.Add("restart.policy", "%q is not one of never, on-failure, always", spec.Restart.Policy)
	}
	if spec.Restart.MaxRetries < 0 || spec.Restart.MaxRetries > maxMaxRetries {
		v.Add("restart.max_retries", "must be between 0 and %d", maxMaxRetries)
	}
	if spec.Restart.Policy == api.RestartNever && spec.Restart.MaxRetries != 0 {
		v.Add("restart.max_retries", "is meaningless with restart policy never")
	}
	validateNetwork(&spec, def.Network, v)
	validateVolumes(&spec, v)
	if err := v.Err(); err != nil {
		return api.WorkloadSpec{}, err
	}
	return spec, nil
}

// checkSecretEnv validates a secret environment as env is validated, and
// returns it redacted (nil when empty). Its messages name variables only.
func checkSecretEnv(v *errdefs.ValidationError, secrets, env map[string]string) map[string]string {
	if len(secrets) == 0 {
		return nil
	}
	if len(secrets) > maxSecretEnv {
		v.Add("secret_env", "%d variables; at most %d", len(secrets), maxSecretEnv)
	}
	size := 0
	redacted := make(map[string]string, len(secrets))
	for k, val := range secrets {
		size += len(k) + len(val) + 1
		redacted[k] = api.Redacted
		switch {
		case !envKeyRE.MatchString(k):
			v.Add("secret_env."+k, "not a valid variable name: letters, digits and '_', not starting with a digit")
		case strings.ContainsRune(val, 0):
			v.Add("secret_env."+k, "contains a NUL byte")
		case val == api.Redacted:
			v.Add("secret_env."+k, "%s is what berth shows in place of a secret value; send the value itself", api.Redacted)
		}
		if _, dup := env[k]; dup {
			v.Add("secret_env."+k, "also set in env; a variable is either env or secret_env")
		}
	}
	if size > maxSecretEnvBytes {
		v.Add("secret_env", "%d bytes; at most %d", size, maxSecretEnvBytes)
	}
	return redacted
}

func checkStrings(v *errdefs.ValidationError, field string, list []string) {
	for i, s := range list {
		if strings.ContainsRune(s, 0) {
			v.Add(field+"["+strconv.Itoa(i)+"]", "contains a NUL byte")
		}
	}
	if field == "command" && len(list) > 0 && list[0] == "" {
		v.Add("command[0]", "the program to run is empty")
	}
}

func totalLen(list []string) int {
	n := 0
	for _, s := range list {
		n += len(s) + 1
	}
	return n
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// maxPorts bounds the ports one workload publishes.
const maxPorts = 64

// validateNetwork checks the network mode and published ports.
func validateNetwork(spec *api.WorkloadSpec, def string, v *errdefs.ValidationError) {
	if spec.Network == "" {
		spec.Network = def
		if def == "" {
			spec.Network = api.NetworkBridge
		}
	}
	switch spec.Network {
	case api.NetworkBridge, api.NetworkNone:
	case api.NetworkHost:
		if spec.Isolation == api.IsolationVM {
			v.Add("network", "host is for containers only; a vm has its own network stack")
		}
	default:
		v.Add("network", "%q is not one of bridge, none, host", spec.Network)
	}
	if len(spec.Ports) > 0 && spec.Network != api.NetworkBridge {
		v.Add("ports", "ports are published from the bridge network; network %s has none to publish", spec.Network)
	}
	if len(spec.Ports) > maxPorts {
		v.Add("ports", "%d ports; at most %d", len(spec.Ports), maxPorts)
		return
	}
	seen := map[string]int{}
	for i := range spec.Ports {
		p := &spec.Ports[i]
		field := "ports[" + strconv.Itoa(i) + "]"
		if p.Protocol == "" {
			p.Protocol = "tcp"
		}
		if p.Protocol != "tcp" && p.Protocol != "udp" {
			v.Add(field+".protocol", "%q is not tcp or udp", p.Protocol)
		}
		if p.HostPort < 1 || p.HostPort > 65535 {
			v.Add(field+".host_port", "must be between 1 and 65535")
		}
		if p.ContainerPort < 1 || p.ContainerPort > 65535 {
			v.Add(field+".container_port", "must be between 1 and 65535")
		}
		key := strconv.Itoa(p.HostPort) + "/" + p.Protocol
		if j, dup := seen[key]; dup {
			v.Add(field+".host_port", "host port %s is already published by ports[%d]", key, j)
		}
		seen[key] = i
	}
}

// normalizeResources checks requests and limits and fills what is missing:
// a request alone is also the limit, a limit alone also the request, and
// neither gets the defaults. The result always has Limits.
func normalizeResources(v *errdefs.ValidationError, r *api.Resources, def Defaults) {
	lim := api.ResourceLimits{}
	if r.Limits != nil {
		lim = *r.Limits
	}
	checkCPU := func(field string, c float64) bool {
		switch {
		case math.IsNaN(c) || math.IsInf(c, 0) || c < 0 || c > maxCPU:
			v.Add(field, "must be between 0 and %d cores", maxCPU)
		case c > 0 && c < 0.01:
			v.Add(field, "%g cores is below the smallest share, 0.01", c)
		default:
			return true
		}
		return false
	}
	checkMem := func(field string, m int64) bool {
		switch {
		case m < 0 || m > maxMemoryMB:
			v.Add(field, "must be between %d and %d", minMemoryMB, maxMemoryMB)
		case m > 0 && m < minMemoryMB:
			v.Add(field, "%d MiB is too little to start a process; at least %d", m, minMemoryMB)
		default:
			return true
		}
		return false
	}
	if checkCPU("resources.cpu", r.CPU) && checkCPU("resources.limits.cpu", lim.CPU) && !fillRequestLimit(&r.CPU, &lim.CPU, def.CPU, def.CPULimit) {
		v.Add("resources.limits.cpu", "%g cores is below the request, %g", lim.CPU, r.CPU)
	}
	if checkMem("resources.memory_mb", r.MemoryMB) && checkMem("resources.limits.memory_mb", lim.MemoryMB) && !fillRequestLimit(&r.MemoryMB, &lim.MemoryMB, def.MemoryMB, def.MemoryLimitMB) {
		v.Add("resources.limits.memory_mb", "%d MiB is below the request, %d MiB", lim.MemoryMB, r.MemoryMB)
	}
	r.Limits = &lim
}

// fillRequestLimit fills a request and its limit: neither given, the
// defaults (a default limit below the default request is the request);
// one given, it is the other too. It reports false for a limit below its
// request.
func fillRequestLimit[T int64 | float64](req, lim *T, defReq, defLim T) bool {
	switch {
	case *req == 0 && *lim == 0:
		*req, *lim = defReq, max(defLim, defReq)
	case *req == 0:
		*req = *lim
	case *lim == 0:
		*lim = *req
	case *lim < *req:
		return false
	}
	return true
}

// limits are a normalized spec's limits (a record of an agent before
// limits has none: its requests were its limits).
func limits(r api.Resources) api.ResourceLimits {
	if r.Limits == nil {
		return api.ResourceLimits{CPU: r.CPU, MemoryMB: r.MemoryMB}
	}
	return *r.Limits
}

// LogDefaults are the node's log rotation: MaxBytes and MaxFiles for a
// spec that names none, MaxBytesLimit and MaxFilesLimit the most one may
// ask for (0: no maximum).
type LogDefaults struct {
	MaxBytes, MaxBytesLimit int64
	MaxFiles, MaxFilesLimit int
}

// minLogBytes keeps a rotation from happening at every line.
const minLogBytes = 4 << 10

// normalizeLogs checks a spec's log rotation against the operator's
// maxima and fills it in; nil when the node has no defaults (tests).
func normalizeLogs(v *errdefs.ValidationError, l *api.LogSpec, def LogDefaults) *api.LogSpec {
	out := api.LogSpec{}
	if l != nil {
		out = *l
	}
	switch {
	case out.MaxBytes < 0:
		v.Add("logs.max_bytes", "must not be negative")
	case out.MaxBytes > 0 && out.MaxBytes < minLogBytes:
		v.Add("logs.max_bytes", "%d bytes; at least %d", out.MaxBytes, minLogBytes)
	case def.MaxBytesLimit > 0 && out.MaxBytes > def.MaxBytesLimit:
		v.Add("logs.max_bytes", "%d bytes is above this node's maximum, %d", out.MaxBytes, def.MaxBytesLimit)
	case out.MaxBytes == 0:
		out.MaxBytes = def.MaxBytes
	}
	switch {
	case out.MaxFiles < 0:
		v.Add("logs.max_files", "must not be negative")
	case def.MaxFilesLimit > 0 && out.MaxFiles > def.MaxFilesLimit:
		v.Add("logs.max_files", "%d files is above this node's maximum, %d", out.MaxFiles, def.MaxFilesLimit)
	case out.MaxFiles == 0:
		out.MaxFiles = def.MaxFiles
	}
	if out == (api.LogSpec{}) {
		return nil
	}
	return &out
}

// Health check bounds.
const (
	minHealthInterval  = 100 * time.Millisecond
	maxHealthInterval  = time.Hour
	defHealthInterval  = 30 * time.Second
	defHealthTimeout   = 5 * time.Second
	defHealthRetries   = 3
	maxHealthRetries   = 100
	maxHealthStartWait = time.Hour
)

// normalizeHealth checks a health check and fills its defaults.
func normalizeHealth(v *errdefs.ValidationError, spec *api.WorkloadSpec) {
	if spec.Health == nil {
		if spec.Restart.OnUnhealthy {
			v.Add("restart.on_unhealthy", "needs a health check (health)")
		}
		return
	}
	// A copy: the caller's spec is not changed.
	h := &api.HealthCheck{}
	*h = *spec.Health
	h.HTTP = clonePtr(h.HTTP)
	spec.Health = h
	kinds := 0
	if len(h.Exec) > 0 {
		kinds++
		checkStrings(v, "health.exec", h.Exec)
		if h.Exec[0] == "" {
			v.Add("health.exec[0]", "the program to run is empty")
		}
	}
	if h.HTTP != nil {
		kinds++
		if h.HTTP.Port < 1 || h.HTTP.Port > 65535 {
			v.Add("health.http.port", "must be between 1 and 65535")
		}
		switch {
		case h.HTTP.Path == "":
			h.HTTP.Path = "/"
		case !strings.HasPrefix(h.HTTP.Path, "/") || strings.ContainsFunc(h.HTTP.Path, isControl) || len(h.HTTP.Path) > maxPathLen:
			v.Add("health.http.path", "must be an absolute URL path such as /healthz")
		}
	}
	if h.TCP != nil {
		kinds++
		if h.TCP.Port < 1 || h.TCP.Port > 65535 {
			v.Add("health.tcp.port", "must be between 1 and 65535")
		}
	}
	if kinds != 1 {
		v.Add("health", "give exactly one of exec, http, tcp")
	}
	dur := func(field string, d *api.Duration, def, lo, hi time.Duration) {
		switch {
		case *d == 0:
			*d = api.Duration(def)
		case time.Duration(*d) < lo || time.Duration(*d) > hi:
			v.Add(field, "must be between %s and %s", lo, hi)
		}
	}
	dur("health.interval", &h.Interval, defHealthInterval, minHealthInterval, maxHealthInterval)
	dur("health.timeout", &h.Timeout, min(defHealthTimeout, time.Duration(h.Interval)), minHealthInterval, maxHealthInterval)
	if h.StartPeriod < 0 || time.Duration(h.StartPeriod) > maxHealthStartWait {
		v.Add("health.start_period", "must be between 0s and %s", maxHealthStartWait)
	}
	switch {
	case h.Retries == 0:
		h.Retries = defHealthRetries
	case h.Retries < 0 || h.Retries > maxHealthRetries:
		v.Add("health.retries", "must be between 1 and %d", maxHealthRetries)
	}
}
