//go:build !cgo

package idmap

import "os"

// userNS makes the namespace's process by forking: without cgo there is
// no clone that shares the caller's memory.
func userNS(uid, gid, size uint32) (*os.File, error) { return forkUserNS(uid, gid, size) }
