// Package vmdriver runs berth tasks inside libvirt virtual machines: the
// task's OCI image boots as a transient domain by direct kernel boot into
// berth-init (package guest), which runs the command and reports its exit.
package vmdriver
