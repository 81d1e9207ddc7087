package guest

import "testing"

func TestProbeRequested(t *testing.T) {
	for _, c := range []struct {
		cmdline string
		want    bool
	}{
		{"console=ttyS0 panic=-1 quiet", false},
		{"console=ttyS0 panic=-1 quiet berth.probe\n", true},
		{"berth.probe=1 console=ttyS0", true},
		{"berth.probe=0", false},
		{"berth.probe=no", false},
		{"berth.probe=1 berth.probe=0", false}, // the last one wins, as the kernel's do
		{"berth.prober=1", false},
		{"xberth.probe=1", false},
		{"quiet -- berth.probe", false}, // init's arguments, not a kernel parameter
		{"", false},
	} {
		if got := ProbeRequested(c.cmdline); got != c.want {
			t.Errorf("ProbeRequested(%q) = %v, want %v", c.cmdline, got, c.want)
		}
	}
}

func TestProbeReached(t *testing.T) {
	if !ProbeReached([]byte("[    0.000000] Linux version 6.1\r\n" + ProbeMarker + " 0.81s after boot\r\n")) {
		t.Error("marker line not recognised")
	}
	if ProbeReached([]byte("[    0.000000] Linux version 6.1\r\nberth-init: started pid 7 4.90s after boot\r\n")) {
		t.Error("a console without the marker counted as reached")
	}
}
