package monitor

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/proc"
)

// Why sockets and a monitor rather than libvirt <channel type='file'>: with
// libvirt's default stdio_handler "logd", file chardevs are written by
// virtlogd, which rotates them at 2 MiB. A log the agent tails must be one
// complete, growing file, and changing qemu.conf is the operator's business.
// A virtio-serial port whose socket has no client is "closed" for the
// guest: its writes wait (they are not dropped) until a monitor connects,
// so a respawned monitor loses nothing the guest had not yet written.

const (
	// connectTimeout bounds the attempts to reach QEMU's sockets while
	// QEMU lives.
	connectTimeout = 30 * time.Second
	// portDrainTimeout bounds how long the monitor waits for a port's EOF
	// after QEMU exited.
	portDrainTimeout = 5 * time.Second
)

var errQEMUGone = errors.New("qemu exited")

// drainPorts connects to every port of the VM and appends what arrives to
// its output until QEMU ends.
func (m *mon) drainPorts() error {
	pc := m.cfg.Ports
	ports := slices.Sorted(maps.Keys(pc.Sockets))
	conns := make([]net.Conn, 0, len(ports))
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var fault bool
	ended := func(err error) error {
		st := Status{State: StateExited, FinishedAt: time.Now().UTC(), GuestFault: fault}
		if err != nil {
			st.State, st.Error = StateFailed, err.Error()
		}
		werr := m.writeStatus(st)
		signalReady(m.ready)
		return errors.Join(err, werr)
	}
	for _, port := range ports {
		c, err := dialPort(pc.Sockets[port], pc.QEMU)
		if err != nil {
			if errors.Is(err, errQEMUGone) {
				// The VM ended before we could attach; what it wrote
				// waited for nobody and is lost to nobody.
				return ended(nil)
			}
			return ended(fmt.Errorf("connect port %s: %w", port, err))
		}
		conns = append(conns, c)
	}
	outs := make([]io.WriteCloser, 0, len(ports))
	defer func() {
		for _, o := range outs {
			o.Close()
		}
	}()
	for _, port := range ports {
		var w io.WriteCloser
		var err error
		if slices.Contains(pc.Durable, port) {
			w, err = openDurable(pc.Outputs[port], pc.DurableMaxBytes)
		} else {
			w, err = openLog(pc.Outputs[port], m.cfg.LogMaxBytes, m.cfg.LogMaxFiles)
		}
		if err != nil {
			return ended(err)
		}
		outs = append(outs, w)
	}
	if err := m.writeStatus(Status{State: StateRunning, Pid: pc.QEMU.Pid, StartedAt: time.Now().UTC()}); err != nil {
		return ended(err)
	}
	signalReady(m.ready)

	var wg sync.WaitGroup
	var overflowOnce sync.Once
	var overflow error
	for i := range ports {
		wg.Go(func() {
			_, err := io.Copy(outs[i], conns[i])
			if errors.Is(err, errOverflow) {
				// The guest floods a channel whose every byte is synced
				// to the host's disk: it is misbehaving, and nothing it
				// reports can be trusted any more. End the VM.
				overflowOnce.Do(func() {
					overflow = fmt.Errorf("the guest wrote more than its status channel allows (%w); berth killed the VM", err)
					fault = true
					killQEMU(pc.QEMU)
				})
			}
		})
	}
	copied := make(chan struct{})
	go func() {
		wg.Wait()
		close(copied)
	}()
	if exited, err := proc.Watch(pc.QEMU); err == nil {
		select {
		case <-copied:
		case <-exited:
			select {
			case <-copied:
			case <-time.After(portDrainTimeout):
				for _, c := range conns {
					c.Close()
				}
				<-copied
			}
		}
	} else {
		<-copied
	}
	return ended(overflow)
}

// dialPort connects to one port's socket, retrying while QEMU lives: the
// socket is created by libvirt before QEMU starts, so refusals are brief.
func dialPort(path string, qemu proc.Ident) (net.Conn, error) {
	deadline := time.Now().Add(connectTimeout)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			return c, nil
		}
		if qemu.Pid != 0 && !qemu.Alive() {
			return nil, errQEMUGone
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// killQEMU ends the VM's QEMU process (libvirt then sees the domain end).
func killQEMU(q proc.Ident) {
	if q.Pid == 0 {
		return
	}
	fd, err := unix.PidfdOpen(q.Pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	if q.Alive() {
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	}
}
