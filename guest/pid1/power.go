//go:build linux

package pid1

import (
	"encoding/binary"
	"io"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PowerButtonName is the input device the ACPI button driver registers for
// the power button the host presses to stop the workload gracefully.
const PowerButtonName = "Power Button"

// keyPower is KEY_POWER from linux/input-event-codes.h.
const keyPower = 116

// inputEventSize is sizeof(struct input_event): a struct timeval followed
// by __u16 type, __u16 code and __s32 value, in native byte order.
var inputEventSize = int(unsafe.Sizeof(unix.Timeval{})) + 8

// powerPresses counts the KEY_POWER presses (value 1; releases are 0 and
// autorepeats 2) among the whole input events in buf.
func powerPresses(buf []byte) int {
	n := 0
	for off := 0; off+inputEventSize <= len(buf); off += inputEventSize {
		ev := buf[off+inputEventSize-8 : off+inputEventSize]
		typ := binary.NativeEndian.Uint16(ev[0:2])
		code := binary.NativeEndian.Uint16(ev[2:4])
		value := int32(binary.NativeEndian.Uint32(ev[4:8]))
		if typ == unix.EV_KEY && code == keyPower && value == 1 {
			n++
		}
	}
	return n
}

// watchPowerButton calls press for every power-button press read from an
// evdev device until the device fails. evdev returns whole events per read.
func watchPowerButton(r io.Reader, press func()) {
	buf := make([]byte, inputEventSize*64)
	for {
		n, err := r.Read(buf)
		for range powerPresses(buf[:n]) {
			press()
		}
		if err != nil {
			return
		}
	}
}
