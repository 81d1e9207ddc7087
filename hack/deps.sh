#!/bin/sh
# Installs what berth needs on a Debian 12 node, idempotently and quickly
# when nothing is missing, and starts the daemons the VM path needs where
# systemd is not PID 1. Run as root (make run and make test call it).
set -eu

# syslinux, syslinux-common, mtools and dosfstools build the bootable
# whole-disk image vmdriver's tests boot. chromium is the headless browser
# the node page's tests drive (api/server/ui_test.go). qemu-system-common
# ships virtiofsd (/usr/lib/qemu/virtiofsd), which shares volumes with VMs;
# qemu-system-data ships qboot (/usr/share/qemu/qboot.rom), the firmware
# guests boot through.
PACKAGES="runc qemu-system-x86 qemu-system-common qemu-system-data qemu-utils libvirt-daemon-system libvirt-dev pkg-config
linux-image-amd64 busybox-static e2fsprogs iptables containernetworking-plugins
syslinux syslinux-common mtools dosfstools chromium"

if [ "$(id -u)" != 0 ]; then
	echo "deps: berth needs root to install packages and run containers; run make as root" >&2
	exit 1
fi

missing=""
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done
if [ -n "$missing" ]; then
	echo "deps: installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	# An initramfs for the node's own boot is not needed to run guests,
	# and building it on every kernel install is slow.
	if ! apt-get install -y -q --no-install-recommends $missing; then
		apt-get update -q
		apt-get install -y -q --no-install-recommends $missing
	fi
fi

# Without systemd as PID 1 nobody starts libvirt's daemons for us.
if [ "$(cat /proc/1/comm 2>/dev/null)" != systemd ]; then
	pgrep -x virtlogd >/dev/null || virtlogd -d
	pgrep -x libvirtd >/dev/null || libvirtd -d
	# libvirtd creates its socket shortly after it daemonizes.
	i=0
	while [ ! -S /run/libvirt/libvirt-sock ] && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
fi
