package main

import (
	"encoding/json"
	"os"
)

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printJSONLine(v any) error { return json.NewEncoder(os.Stdout).Encode(v) }
