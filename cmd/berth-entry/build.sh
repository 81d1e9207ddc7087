#!/bin/sh
# Builds berth-entry (entry.c, next to this script) into $1: a static,
# freestanding x86_64 program of a few KiB. Elsewhere it builds nothing, and
# the agent lets runc install containers' seccomp filters.
set -eu
out=$1
case $(uname -m) in
x86_64) ;;
*)
	echo "berth-entry: x86_64 only; not built for $(uname -m)" >&2
	rm -f "$out"
	exit 0
	;;
esac
exec "${CC:-cc}" -static -nostdlib -ffreestanding -fno-builtin -fno-stack-protector \
	-fno-tree-loop-distribute-patterns -fno-asynchronous-unwind-tables -fno-pie -no-pie \
	-Os -Wall -Wextra -Werror -o "$out" "$(dirname "$0")/entry.c"
