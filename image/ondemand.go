package image

import (
	"context"
	"sync"
)

// Resolve reads ref's manifest and config from its registry, as a pull
// begins, without fetching layers or storing anything: the image it
// returns (not in the store) says what would run, so a submit can be
// validated and admitted before its layers download (PullWith with the
// returned Digest). The registry allow-lists apply as they do to a pull.
// Concurrent resolves of one reference make one request.
func (s *Store) Resolve(ctx context.Context, ref string) (*Image, error) {
	canon, err := Normalize(ref)
	if err != nil {
		return nil, err
	}
	return s.flights.do(ctx, "resolve "+canon, nil, func(ctx context.Context, _ func(int64, int64)) (*Image, error) {
		f, err := s.fetchManifest(ctx, canon, "", nil)
		if err != nil {
			return nil, err
		}
		f.g.close()
		return f.rec.Image.clone(), nil
	})
}

// PullShared is PullWith(ref, digest) shared by concurrent callers: the
// first starts the pull, later ones wait for it (each gets progress); it
// goes on while any of them waits and is called off when all have left.
func (s *Store) PullShared(ctx context.Context, ref, digest string, progress func(done, total int64)) (*Image, error) {
	canon, err := Normalize(ref)
	if err != nil {
		return nil, err
	}
	return s.flights.do(ctx, "pull "+canon+"@"+digest, progress, func(ctx context.Context, report func(int64, int64)) (*Image, error) {
		return s.PullWith(ctx, canon, PullOptions{Digest: digest, Progress: report})
	})
}

// flightGroup runs one call per key at a time for every caller that asks
// meanwhile (singleflight), on a context of its own that ends when the
// last waiting caller has left.
type flightGroup struct {
	mu      sync.Mutex
	flights map[string]*flight
}

type flight struct {
	done    chan struct{}
	img     *Image
	err     error
	waiters int
	cancel  context.CancelFunc
	nextID  int
	watch   map[int]func(done, total int64)
	last    [2]int64 // the last progress, for a caller that joins late
}

func (g *flightGroup) do(ctx context.Context, key string, progress func(done, total int64), fn func(context.Context, func(int64, int64)) (*Image, error)) (*Image, error) {
	g.mu.Lock()
	if g.flights == nil {
		g.flights = map[string]*flight{}
	}
	f := g.flights[key]
	if f == nil {
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel, watch: map[int]func(int64, int64){}}
		g.flights[key] = f
		go func() {
			img, err := fn(fctx, func(done, total int64) { g.report(f, done, total) })
			g.mu.Lock()
			f.img, f.err = img, err
			if g.flights[key] == f {
				delete(g.flights, key)
			}
			g.mu.Unlock()
			cancel()
			close(f.done)
		}()
	}
	f.waiters++
	id := f.nextID
	f.nextID++
	if progress != nil {
		f.watch[id] = progress
		if f.last[1] > 0 {
			progress(f.last[0], f.last[1])
		}
	}
	g.mu.Unlock()
	select {
	case <-f.done:
		if f.img != nil {
			return f.img.clone(), nil
		}
		return nil, f.err
	case <-ctx.Done():
		g.mu.Lock()
		delete(f.watch, id)
		if f.waiters--; f.waiters == 0 {
			// Called off: a caller that comes next starts afresh.
			f.cancel()
			if g.flights[key] == f {
				delete(g.flights, key)
			}
		}
		g.mu.Unlock()
		return nil, ctx.Err()
	}
}

// report passes progress to every caller waiting on f, under the lock,
// so a caller that left gets no more.
func (g *flightGroup) report(f *flight, done, total int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	f.last = [2]int64{done, total}
	for _, w := range f.watch {
		w(done, total)
	}
}
