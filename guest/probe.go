package guest

import (
	"bytes"
	"strings"
)

// ProbeParam on the guest kernel's command line puts berth-init in probe
// mode: as soon as it runs (before loading modules or looking for any
// device) it writes a line starting with ProbeMarker to the console and
// powers the guest off. The host boots such a guest, with no disks and no
// ports, to learn whether an accelerator really runs guests to user space
// (see vmdriver's KVM probe). The name has a dot, so the kernel treats it as
// a module parameter and does not pass it on to init's arguments or
// environment; berth-init reads /proc/cmdline.
const ProbeParam = "berth.probe"

// ProbeMarker starts the console line berth-init writes in probe mode; the
// rest of the line is " N.NNs after boot\n".
const ProbeMarker = "berth-init: probe: user space reached"

// ProbeRequested reports whether a kernel command line (the content of
// /proc/cmdline) asks for probe mode: ProbeParam as a whole word, alone or
// as berth.probe=1 (any value but 0, n or no).
func ProbeRequested(cmdline string) bool {
	on := false
	for _, w := range strings.Fields(cmdline) {
		if w == "--" {
			break // the rest is init's own arguments
		}
		name, val, hasVal := strings.Cut(w, "=")
		if name != ProbeParam {
			continue
		}
		switch {
		case !hasVal:
			on = true
		default:
			on = val != "0" && val != "n" && val != "no"
		}
	}
	return on
}

// ProbeReached reports whether a guest's console output shows berth-init
// reached in probe mode.
func ProbeReached(console []byte) bool {
	return bytes.Contains(console, []byte(ProbeMarker))
}
