package volume

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/berthd/berth/errdefs"
)

// A deleted volume's files can be many, and deleting them slow. Detach
// takes the volume out of the store at once (its directory renamed to
// trash-<id> in the store's root, quick and atomic) and Purge deletes
// the files later, outside whatever lock the caller holds. Open deletes
// trash a crash left before Purge.

const trashPrefix = "trash-"

func isTrash(name string) bool { return strings.HasPrefix(name, trashPrefix) }

// Detach takes the volume NAME of tenant out of the store: from then on
// it is not found, and its name is free. Its files are left in the
// returned directory for Purge. The caller has made sure no workload
// holds it.
func (s *Store) Detach(tenant, name string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.vols[ref(tenant, name)]
	if !ok {
		return "", fmt.Errorf("volume %q: %w", ref(tenant, name), errdefs.ErrNotFound)
	}
	trash := filepath.Join(s.opts.Root, trashPrefix+v.ID)
	if err := os.Rename(s.dir(v), trash); err != nil {
		return "", fmt.Errorf("remove volume %s: %w", v.Ref(), err)
	}
	delete(s.vols, v.Ref())
	s.log.Info("volume removed", "volume", v.Ref(), "id", v.ID)
	return trash, nil
}

// Purge deletes what Detach left: it unmounts a sized volume's
// filesystem and removes the files.
func (s *Store) Purge(trash string) error {
	if filepath.Dir(trash) != s.opts.Root || !isTrash(filepath.Base(trash)) {
		return fmt.Errorf("purge %s: not a removed volume of this store", trash)
	}
	if s.opts.OnPurge != nil {
		s.opts.OnPurge(trash)
	}
	if err := s.removeDir(trash); err != nil {
		return fmt.Errorf("delete the files of a removed volume: %w", err)
	}
	return nil
}
