package network

import "fmt"

// SimulateReboot leaves id's attachment as a host reboot does: what is on
// disk stays (the record, the namespace file, the leases, CNI's cache),
// what lived in the kernel goes (the namespace's bind mount, and with the
// namespace its veth pair; the workload's iptables rules). Tests use it to
// prove that Detach and Attach cope; the agent never calls it.
func (m *Manager) SimulateReboot(id string) error {
	defer m.ids.lock(id)()
	a, err := m.load(id)
	if err != nil {
		return fmt.Errorf("simulate reboot of %s: %w", id, err)
	}
	if a.Netns != "" {
		if err := unpinNetns(a.Netns); err != nil {
			return fmt.Errorf("simulate reboot of %s: %w", id, err)
		}
	}
	if err := deleteLink(a.HostVeth, a.Bridge); err != nil {
		return fmt.Errorf("simulate reboot of %s: %w", id, err)
	}
	list, err := m.list(a)
	if err != nil {
		return err
	}
	if err := m.sweepRules(a.Network, id, m.addressesOf(a, list)); err != nil {
		return fmt.Errorf("simulate reboot of %s: %w", id, err)
	}
	return nil
}
