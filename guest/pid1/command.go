//go:build linux

package pid1

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/berthd/berth/guest"
)

// commandError is a failure to run the workload's command, carrying the
// exit code the shell would have reported for it.
type commandError struct {
	code int
	err  error
}

func (e *commandError) Error() string { return e.err.Error() }
func (e *commandError) Unwrap() error { return e.err }

// exitCodeOf returns the exit code to report for a failure to run the
// command: the commandError's own, or ExitCodeInitFailure for anything that
// went wrong in berth-init.
func exitCodeOf(err error) int {
	var ce *commandError
	if errors.As(err, &ce) {
		return ce.code
	}
	return guest.ExitCodeInitFailure
}

// lookPath resolves the command as execvp(3) does, in the current root
// (berth-init has already chrooted into the workload's filesystem, so image
// symlinks resolve as the workload sees them): a name with a slash is used
// as is, otherwise each PATH entry is tried in order. Missing everywhere is
// ExitCodeNotFound; found but not executable is ExitCodeCannotExec.
func lookPath(file, pathEnv, dir string) (string, error) {
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if err := checkExecutable(p); err != nil {
			return "", commandErrorFor(file, err)
		}
		return file, nil
	}
	var denied error
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "." // an empty PATH entry is the working directory, as in sh
		}
		p := filepath.Join(d, file)
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		err := checkExecutable(p)
		if err == nil {
			return p, nil
		}
		if !errors.Is(err, fs.ErrNotExist) && denied == nil {
			denied = err // keep looking, like execvp, but remember why
		}
	}
	if denied != nil {
		return "", commandErrorFor(file, denied)
	}
	return "", &commandError{guest.ExitCodeNotFound, fmt.Errorf("%s: command not found in PATH %q", file, pathEnv)}
}

func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("%s: is a directory: %w", path, fs.ErrPermission)
	}
	// Any execute bit is enough for root; for other users the kernel makes
	// the final call at exec time and its error is mapped the same way.
	if fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s: not executable: %w", path, fs.ErrPermission)
	}
	return nil
}

// commandErrorFor maps an error from finding or executing the command to
// the shell's exit code: not found is 127, anything else that stops the
// kernel from executing a file that exists is 126.
func commandErrorFor(file string, err error) error {
	code := guest.ExitCodeCannotExec
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		code = guest.ExitCodeNotFound
	}
	return &commandError{code, fmt.Errorf("exec %s: %w", file, err)}
}

// exitStatus turns a wait status into the reported exit code and the
// killing signal (0 when the command exited by itself).
func exitStatus(ws syscall.WaitStatus) (code, sig int) {
	switch {
	case ws.Exited():
		return ws.ExitStatus(), 0
	case ws.Signaled():
		s := int(ws.Signal())
		return guest.ExitCodeForSignal(s), s
	default:
		// Stopped or continued: not an end. Callers only pass terminal
		// statuses; report something that cannot be mistaken for success.
		return guest.ExitCodeInitFailure, 0
	}
}

// userSpec is the workload's identity resolved inside its root filesystem.
type userSpec struct {
	uid, gid uint32
	groups   []uint32
	home     string
}

// resolveUser turns Config.User into ids, reading the image's passwd and
// group files (paths given for tests) as runc does: the primary gid defaults
// to the passwd entry's, supplementary groups are those listing the user by
// name, and HOME is the entry's home directory, "/" for an unknown uid.
func resolveUser(user, passwdPath, groupPath string) (*userSpec, error) {
	uid, gid, hasGID, err := guest.ParseUser(user)
	if err != nil {
		return nil, fmt.Errorf("user: %w", err)
	}
	u := &userSpec{uid: uid, gid: gid, home: "/"}
	name := ""
	err = scanColonFile(passwdPath, func(f []string) bool {
		if len(f) < 6 || f[2] != strconv.FormatUint(uint64(uid), 10) {
			return true
		}
		name, u.home = f[0], f[5]
		if !hasGID {
			if g, err := strconv.ParseUint(f[3], 10, 32); err == nil {
				u.gid = uint32(g)
			}
		}
		return false
	})
	if err != nil {
		return nil, err
	}
	if name == "" {
		return u, nil
	}
	err = scanColonFile(groupPath, func(f []string) bool {
		if len(f) < 4 {
			return true
		}
		g, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil || uint32(g) == u.gid {
			return true
		}
		for _, m := range strings.Split(f[3], ",") {
			if m == name {
				u.groups = append(u.groups, uint32(g))
				break
			}
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	return u, nil
}

// scanColonFile calls fn with the fields of each line of an /etc/passwd-
// style file until fn returns false. A missing file is empty: minimal
// images have none.
func scanColonFile(path string, fn func([]string) bool) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !fn(strings.Split(line, ":")) {
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	return nil
}

// workloadEnv completes the configured environment the way runc and image
// conventions expect: a key set twice keeps its last value (in the position
// of its first), PATH defaults to guest.DefaultPath and HOME to the user's
// home directory.
func workloadEnv(env []string, home string) []string {
	out := make([]string, 0, len(env)+2)
	index := make(map[string]int, len(env))
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := index[k]; ok {
			out[i] = kv
			continue
		}
		index[k] = len(out)
		out = append(out, kv)
	}
	if _, ok := index["PATH"]; !ok {
		out = append(out, "PATH="+guest.DefaultPath)
	}
	if _, ok := index["HOME"]; !ok {
		out = append(out, "HOME="+home)
	}
	return out
}

// getenv returns key's value in an environment built by workloadEnv.
func getenv(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}
