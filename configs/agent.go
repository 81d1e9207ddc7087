package configs

import _ "embed"

// DefaultAgentConfig is the agent's built-in configuration, the lowest layer
// under the config file, BERTH_* environment variables and flags.
//
//go:embed berth.yaml
var DefaultAgentConfig []byte
