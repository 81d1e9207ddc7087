package agent

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/berthd/berth/internal/fileutil"
)

// A workload's secret environment (spec.secret_env) lives outside the
// state database, in DataDir/secrets/<id>.json: the directory is 0700 and
// each file 0600, both root's, written durably before the submit is
// acknowledged and removed when the workload is deleted. The record keeps
// only the names; the values are read back when a run starts (task.go) and
// when a resubmit must be compared (submit.go). File names are workload
// ids, which the agent makes: nothing of a request becomes a path.
//
// A value goes from here into the task's environment only: the container's
// config.json (in a task directory only root reaches) or a VM's config
// disk (in a directory only root and QEMU's group reach). No log, event,
// audit record, error or answer carries one.

const (
	secretsDirName = "secrets"
	// secretFileVersion versions the file's own format.
	secretFileVersion = 1
)

// secretFile is what a workload's secrets file holds.
type secretFile struct {
	Version int               `json:"version"`
	Env     map[string]string `json:"env"`
}

// makeSecretsDir creates (or tightens) DataDir/secrets: root's alone.
func makeSecretsDir(dataDir string) (string, error) {
	dir := filepath.Join(dataDir, secretsDirName)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create the secrets directory: %w", err)
	}
	// Past the umask, and over a directory an older or careless hand made.
	if err := os.Chmod(dir, 0o700); err != nil {
		return "", fmt.Errorf("create the secrets directory: %w", err)
	}
	return dir, nil
}

// secretPath is where workload id's secrets are kept.
func (s *store) secretPath(id string) (string, error) {
	// Ids are the agent's own hex strings; anything else is refused
	// rather than joined into a path.
	if id == "" || strings.ContainsAny(id, `/\`) || strings.HasPrefix(id, ".") {
		return "", fmt.Errorf("workload id %q is not a file name", id)
	}
	return filepath.Join(s.secretsDir, id+".json"), nil
}

// putSecrets writes a workload's secret environment durably, 0600.
func (s *store) putSecrets(id string, env map[string]string) error {
	path, err := s.secretPath(id)
	if err != nil {
		return err
	}
	data, err := json.Marshal(secretFile{Version: secretFileVersion, Env: env})
	if err != nil {
		return fmt.Errorf("encode the secret environment of %s", id)
	}
	return fileutil.WriteFile(path, data, 0o600)
}

// secrets reads a workload's secret environment. Its errors never quote
// the file's content.
func (s *store) secrets(id string) (map[string]string, error) {
	path, err := s.secretPath(id)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f secretFile
	if err := json.Unmarshal(data, &f); err != nil {
		// A decoding error may quote what it choked on.
		return nil, fmt.Errorf("%s is not a secrets file berth can read", path)
	}
	if f.Version != secretFileVersion {
		return nil, fmt.Errorf("%s has version %d; this agent reads %d", path, f.Version, secretFileVersion)
	}
	return f.Env, nil
}

// removeSecrets removes a workload's secrets file, durably; a missing one
// is fine (a delete is retried, and most workloads have none).
func (s *store) removeSecrets(id string) error {
	path, err := s.secretPath(id)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return fileutil.SyncDir(s.secretsDir)
}

// sweepSecrets removes what a crash left in the secrets directory: files
// of workloads the database does not hold (a submit that died before its
// record was committed, a delete that died after), and half-written temp
// files.
func (s *store) sweepSecrets() error {
	entries, err := os.ReadDir(s.secretsDir)
	if err != nil {
		return fmt.Errorf("sweep the secrets directory: %w", err)
	}
	var stale []string
	err = s.db.View(func(tx *bolt.Tx) error {
		wls := tx.Bucket(bucketWorkloads)
		for _, e := range entries {
			id, ok := strings.CutSuffix(e.Name(), ".json")
			if !ok || strings.HasPrefix(e.Name(), ".") || wls.Get([]byte(id)) == nil {
				stale = append(stale, e.Name())
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, name := range stale {
		if err := os.RemoveAll(filepath.Join(s.secretsDir, name)); err != nil {
			return fmt.Errorf("sweep the secrets directory: %w", err)
		}
	}
	if len(stale) > 0 {
		return fileutil.SyncDir(s.secretsDir)
	}
	return nil
}

// secretsDigest is a digest of a secret environment: names and values,
// length-prefixed in name order, so no two environments share an
// encoding.
func secretsDigest(env map[string]string) [sha256.Size]byte {
	h := sha256.New()
	var n [8]byte
	for _, k := range slices.Sorted(maps.Keys(env)) {
		for _, s := range []string{k, env[k]} {
			binary.BigEndian.PutUint64(n[:], uint64(len(s)))
			h.Write(n[:])
			h.Write([]byte(s))
		}
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// sameSecrets compares two secret environments by their digests, in
// constant time: a resubmit learns whether its secrets match, nothing of
// how they differ.
func sameSecrets(a, b map[string]string) bool {
	da, db := secretsDigest(a), secretsDigest(b)
	return subtle.ConstantTimeCompare(da[:], db[:]) == 1
}
