package agent

import (
	"time"

	"github.com/berthd/berth/api"
)

// diskInterval is how often the data directory's free space is checked
// against the floor (storage.min_free_bytes): it changes without any
// event berth could wait for.
const diskInterval = 10 * time.Second

// diskPressure is the last verdict of the free-space check; "" means the
// data directory has room.
func (a *Agent) diskPressure() string {
	a.diskMu.Lock()
	defer a.diskMu.Unlock()
	return a.diskErr
}

// checkDisk reads the free space now and moves the state index when the
// verdict flips, so node-status pollers see DiskPressure at once.
func (a *Agent) checkDisk() {
	if a.images == nil {
		return // an agent without an image store (policy tools) stores nothing
	}
	msg := ""
	if err := a.images.DiskPressure(); err != nil {
		msg = err.Error()
	}
	a.diskMu.Lock()
	changed := (msg == "") != (a.diskErr == "")
	a.diskErr = msg
	a.diskMu.Unlock()
	if !changed {
		return
	}
	a.bumpIndex()
	if msg != "" {
		a.log.Warn("disk pressure: submits and pulls are refused", "reason", msg)
		a.events.publish(api.Event{Type: api.EventNodeDiskPressure, Message: msg})
	} else {
		a.log.Info("disk pressure is over")
		a.events.publish(api.Event{Type: api.EventNodeDiskPressure, Message: "the data directory has room again", Attrs: map[string]string{"status": "false"}})
	}
}

// diskLoop checks the free space every diskInterval until the agent closes.
func (a *Agent) diskLoop() {
	defer a.wg.Done()
	t := time.NewTicker(a.diskInterval())
	defer t.Stop()
	for {
		select {
		case <-t.C:
			a.checkDisk()
			a.collectImages()
		case <-a.ctx.Done():
			return
		}
	}
}

func (a *Agent) diskInterval() time.Duration {
	if a.opts.DiskInterval > 0 {
		return a.opts.DiskInterval
	}
	return diskInterval
}

// diskCondition is the DiskPressure node condition.
func (a *Agent) diskCondition() api.Condition {
	c := api.Condition{Type: api.ConditionDiskPressure, Reason: "DiskAvailable", Message: "the data directory has more free space than the floor"}
	if msg := a.diskPressure(); msg != "" {
		c.Status, c.Reason, c.Message = true, "FreeSpaceBelowFloor", msg
	}
	return c
}
