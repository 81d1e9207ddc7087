package vmdriver

import (
	"context"
	"sync"

	"libvirt.org/go/libvirt"
)

// call runs fn through hv.do and hands its value back only when the call
// answered in time. A call abandoned on ctx may still finish later (its
// thread is blocked in libvirt), so fn must not write into the caller's
// variables: it returns what it found, and call keeps it only while the
// caller is still there to read it.
func call[T any](ctx context.Context, hv *hypervisor, fn func(c *libvirt.Connect) (T, error)) (T, error) {
	var (
		mu        sync.Mutex
		out       T
		abandoned bool
	)
	err := hv.do(ctx, func(c *libvirt.Connect) error {
		v, err := fn(c)
		mu.Lock()
		if !abandoned {
			out = v
		}
		mu.Unlock()
		return err
	})
	mu.Lock()
	defer mu.Unlock()
	abandoned = true
	return out, err
}
