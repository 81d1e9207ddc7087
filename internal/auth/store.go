package auth

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/berthd/berth/internal/filewatch"
)

// Store holds the tokens file's entries and keeps them in step with the
// file. A lookup takes the active entries with one atomic load; a reload
// parses the whole file before it swaps them in, so an edit that does not
// parse leaves the previous entries in force (and is logged).
type Store struct {
	file   string
	log    *slog.Logger
	active atomic.Pointer[Tokens]

	mu      sync.Mutex // serializes reloads
	last    []byte
	lastErr error

	watcher *filewatch.Watcher
}

// Open reads the tokens file and starts watching it. A file that is
// missing or invalid is an error: the agent must not start with fewer
// (or other) credentials than the operator wrote.
func Open(file string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.Default()
	}
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, fmt.Errorf("tokens file %s: %w", file, err)
	}
	s := &Store{file: abs, log: log}
	data, err := readFile(abs)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("tokens file %s is invalid:\n%w", abs, err)
	}
	s.active.Store(t)
	s.last = data
	// Reload also runs once at the start of the watch: a change between
	// the read and the watch would go unseen otherwise.
	w, err := filewatch.Watch(abs, s.Reload, func(err error) {
		s.log.Warn("tokens file watcher", "file", s.file, "error", err)
	})
	if err != nil {
		return nil, fmt.Errorf("watch tokens file: %w", err)
	}
	s.watcher = w
	return s, nil
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, MaxFileSize+1))
}

// File is the tokens file's absolute path.
func (s *Store) File() string { return s.file }

// Tokens are the entries in force.
func (s *Store) Tokens() *Tokens { return s.active.Load() }

// Lookup returns the identity of a bearer token.
func (s *Store) Lookup(token string) (*Identity, bool) { return s.Tokens().Lookup(token) }

// LookupCert returns the identity of a verified client certificate.
func (s *Store) LookupCert(c *x509.Certificate) (*Identity, bool) { return s.Tokens().LookupCert(c) }

// LastError is why the last reload was rejected, or nil.
func (s *Store) LastError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// Reload reads the file now; the watcher calls it after every change.
func (s *Store) Reload() {
	s.mu.Lock()
	defer s.mu.Unlock()
	data, err := readFile(s.file)
	if err == nil && bytes.Equal(data, s.last) {
		return
	}
	var t *Tokens
	if err == nil {
		t, err = Parse(data)
	}
	if err != nil {
		// Never log the content: it is hashes, but still the file.
		s.lastErr = err
		s.log.Error("tokens file change rejected; the previous entries stay in force", "file", s.file, "error", err)
		return
	}
	s.last, s.lastErr = data, nil
	s.active.Store(t)
	s.log.Info("tokens file reloaded", "file", s.file, "entries", len(t.entries))
}

// Close stops watching; lookups keep working on the last entries.
func (s *Store) Close() error {
	if s.watcher == nil {
		return nil
	}
	return s.watcher.Close()
}
