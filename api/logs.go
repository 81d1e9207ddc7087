package api

import (
	"fmt"
	"strings"
	"time"
)

// LogTimeFormat is how a log line's time is written in text: RFC 3339 in
// UTC with nanoseconds, fixed width so the lines stay aligned (docker logs
// --timestamps writes the same).
const LogTimeFormat = "2006-01-02T15:04:05.000000000Z07:00"

// ParseSince reads a logs `since`: a duration before now ("10m", "1h30m")
// or an RFC 3339 time ("2026-01-02T15:04:05Z", with or without
// fractional seconds).
func ParseSince(v string, now time.Time) (time.Time, error) {
	v = strings.TrimSpace(v)
	if d, err := time.ParseDuration(v); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("%q: a duration before now must not be negative", v)
		}
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("%q is neither a duration before now (10m, 1h30m) nor an RFC 3339 time (2006-01-02T15:04:05Z)", v)
}
