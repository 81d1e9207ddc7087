//go:build linux

// Command berth-init is the init process of berth's workload VMs. It is
// built statically (CGO_ENABLED=0) and placed at /init in the initramfs
// that vmdriver/initramfs builds; see package guest for its contract with
// the host and package guest/pid1 for what it does.
package main

import (
	"fmt"
	"os"

	"github.com/berthd/berth/guest/pid1"
)

func main() {
	// berth-init mounts, kills every other process and powers the machine
	// off: started by mistake on a host it would do exactly that.
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "berth-init: must run as PID 1 inside a berth VM; refusing to start")
		os.Exit(2)
	}
	pid1.Main()
}
