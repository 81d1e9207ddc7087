package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestEveryCommandHasExamples: `berth CMD --help` shows at least one
// example for every command, each a berth command line.
func TestEveryCommandHasExamples(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			walk(sub)
		}
		if c.Hidden || c.Name() == "help" || c.Name() == "completion" || c.HasParent() && c.Parent().Name() == "completion" {
			return
		}
		if strings.TrimSpace(c.Example) == "" {
			t.Errorf("%s has no example (add one in examples.go)", c.CommandPath())
			return
		}
		for _, line := range strings.Split(c.Example, "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			if !strings.HasPrefix(line, "berth ") && !strings.Contains(line, " berth ") {
				t.Errorf("%s: example line %q does not run berth", c.CommandPath(), line)
			}
		}
	}
	root := newRootCmd()
	root.InitDefaultCompletionCmd()
	walk(root)
	// No example is kept for a command that is gone.
	for path := range examples {
		c, _, err := root.Find(strings.Fields(path)[1:])
		if err != nil || c.CommandPath() != path {
			t.Errorf("examples has %q, which is no command", path)
		}
	}
}
