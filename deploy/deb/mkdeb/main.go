// Command mkdeb builds berth's Debian packages (make deb).
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/berthd/berth/deploy/deb"
)

func main() {
	var o deb.Options
	flag.StringVar(&o.BinDir, "bin", "bin", "directory with berth, berth-monitor, berth-init and berth-entry (make build)")
	flag.StringVar(&o.SrcDir, "src", ".", "berth's source tree")
	flag.StringVar(&o.OutDir, "out", "bin/deb", "where the packages go")
	flag.StringVar(&o.Version, "version", "dev", "release tag or git describe output")
	flag.StringVar(&o.Arch, "arch", "amd64", "Debian architecture of the binaries")
	flag.Parse()
	paths, err := deb.Build(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkdeb:", err)
		os.Exit(1)
	}
	for _, p := range paths {
		fmt.Println(p)
	}
}
