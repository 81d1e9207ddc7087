// Package configs holds the configuration berth ships with, embedded into
// the binary so that an agent without any files still starts with safe
// defaults. The same files are the samples operators copy and edit.
package configs

import _ "embed"

// DefaultPolicy is the isolation policy the agent uses when its
// configuration names none (policy.yaml).
//
//go:embed policy.yaml
var DefaultPolicy []byte
