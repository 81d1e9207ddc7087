// Command berth-monitor is the per-task monitor the berth agent starts for
// every container and VM (see package supervisor/monitor). It is a binary
// of its own, built without libvirt, CEL, the registry client, CNI or the
// CLI, because one runs for every workload on the node.
package main

import (
	"os"

	"github.com/berthd/berth/supervisor/monitor"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "exec" {
		os.Exit(monitor.ExecMain(os.Args[2:]))
	}
	os.Exit(monitor.Main(os.Args[1:]))
}
