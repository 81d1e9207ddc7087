package daemon

import (
	"os/user"
	"strconv"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/vmdriver"
	"github.com/berthd/berth/volume"
)

// qemuUser is the user QEMU runs as under libvirt (qemu.conf "user",
// Debian's default).
const qemuUser = "libvirt-qemu"

// nineP says how volumes reach VMs served over 9p: QEMU serves them as
// its own unprivileged user, so its group may pass through to the staged
// mounts (the gid for volume.Options.ShareGID) and it sees each volume as
// its root's (the owner for agent.Options.VMVolumeOwner). With virtio-fs
// (virtiofsd runs as root), or without VMs: 0 and nil.
func (d *Daemon) nineP(drivers []driver.Driver) (int, *volume.Owner) {
	for _, dr := range drivers {
		vd, ok := dr.(*vmdriver.Driver)
		if !ok || vd.VolumeTransport() != vmdriver.Volume9p {
			continue
		}
		u, err := user.Lookup(qemuUser)
		if err != nil {
			d.log.Warn("volumes over 9p: QEMU's user is unknown; VMs cannot reach their volumes", "user", qemuUser, "err", err)
			return 0, nil
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if g, err := user.LookupGroup(qemuGroup(d.cfg)); err == nil {
			gid, _ = strconv.Atoi(g.Gid)
		}
		return gid, &volume.Owner{UID: uint32(uid), GID: uint32(gid)}
	}
	return 0, nil
}
