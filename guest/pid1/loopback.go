//go:build linux

package pid1

import "github.com/berthd/berth/internal/netlinkutil"

// bringUpLoopback sets lo up, which makes the kernel give it 127.0.0.1 and
// ::1. A container gets a working loopback from runc in its network
// namespace; a workload must find the same in a VM, network or not.
func bringUpLoopback() error {
	return netlinkutil.LoopbackUp()
}
