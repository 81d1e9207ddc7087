package main

import (
	"strings"
	"testing"
	"time"
)

// berth logs --since takes a duration or an RFC 3339 time and refuses
// anything else before asking the agent; -t prefixes the lines the log
// timed (the fake driver's logs record no times, so none here).
func TestLogsSinceAndTimestampsFlags(t *testing.T) {
	addr, c := execAgent(t)
	w := runningWorkload(t, c, "sh", "-c", "echo one; echo two; sleep 100")
	var out string
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, err = berthCLI(t, "", "--addr", addr, "logs", "--since", "1h", "-t", w.ID)
		if err != nil || out == "one\ntwo\n" || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || out != "one\ntwo\n" {
		t.Errorf("logs --since 1h -t of an untimed log: %q %v", out, err)
	}
	if out, err := berthCLI(t, "", "--addr", addr, "logs", "--since", "2999-01-01T00:00:00Z", w.ID); err != nil || out != "" {
		t.Errorf("logs since a time to come: %q %v", out, err)
	}
	if _, err := berthCLI(t, "", "--addr", addr, "logs", "--since", "yesterday", w.ID); err == nil || !strings.Contains(err.Error(), "--since") {
		t.Errorf("logs --since yesterday: %v, want an error naming --since", err)
	}
}
