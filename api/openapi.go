package api

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"sync"

	"gopkg.in/yaml.v3"
)

// openAPIYAML is the OpenAPI 3.1 document of the API, kept by hand next to
// the types it describes. The tests check every request and answer they
// make against it, so it cannot drift from what the agent does.
//
//go:embed openapi.yaml
var openAPIYAML []byte

var openAPI = sync.OnceValues(func() ([]byte, error) {
	var doc map[string]any
	if err := yaml.Unmarshal(openAPIYAML, &doc); err != nil {
		return nil, fmt.Errorf("api/openapi.yaml: %w", err)
	}
	return json.Marshal(doc)
})

// OpenAPI returns the OpenAPI document of the API as JSON (what
// GET /v1/openapi.json serves).
func OpenAPI() ([]byte, error) { return openAPI() }

// OpenAPIYAML returns the OpenAPI document as it is kept, in YAML.
func OpenAPIYAML() []byte { return openAPIYAML }
