package main

import "testing"

func TestProgressLine(t *testing.T) {
	for _, tc := range []struct {
		done, total int64
		want        string
	}{
		{0, 2 << 20, "pulling r [>                             ] 0.0 of 2.0 MiB"},
		{1 << 20, 2 << 20, "pulling r [===============>              ] 1.0 of 2.0 MiB"},
		{2 << 20, 2 << 20, "pulling r [==============================] 2.0 of 2.0 MiB"},
	} {
		if got := progressLine("r", tc.done, tc.total); got != tc.want {
			t.Errorf("progressLine(%d, %d) = %q, want %q", tc.done, tc.total, got, tc.want)
		}
	}
}
