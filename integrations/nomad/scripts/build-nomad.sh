#!/bin/sh
# Builds the pinned Nomad used by the integration test, once per cache dir.
#
# The module proxy serves Nomad but does not list its versions, and Nomad's
# go.mod replaces its api module with ./api, so the source is assembled from
# two explicit downloads: the tag itself and the api module at the tag's
# pseudo-version.
#
# usage: build-nomad.sh CACHE_DIR   (prints nothing if the binary is current)
set -eu

NOMAD_VERSION=${NOMAD_VERSION:-1.11.2}
NOMAD_API_VERSION=${NOMAD_API_VERSION:-v0.0.0-20260211190147-f876384fe3ab}
GO=${GO:-go}
cache=$1
out="$cache/bin/nomad-$NOMAD_VERSION"

if [ -x "$out" ] && "$out" version 2>/dev/null | grep -q "Nomad v$NOMAD_VERSION"; then
	exit 0
fi

mkdir -p "$cache/bin"
# go mod download outside a module: run from an empty directory so the
# caller's go.mod (and its toolchain line) do not interfere.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
nomad_dir=$(GOFLAGS=-mod=mod "$GO" mod download -json "github.com/hashicorp/nomad@v$NOMAD_VERSION" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
api_dir=$(GOFLAGS=-mod=mod "$GO" mod download -json "github.com/hashicorp/nomad/api@$NOMAD_API_VERSION" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$nomad_dir" ] && [ -d "$api_dir" ] || { echo "build-nomad: download failed" >&2; exit 1; }

src="$cache/src/nomad-$NOMAD_VERSION"
rm -rf "$src"
mkdir -p "$src"
# Only what the build needs: the UI, website and e2e trees are large.
cp -R "$nomad_dir/." "$src/"
chmod -R u+w "$src"
rm -rf "$src/api" "$src/ui" "$src/website" "$src/e2e" "$src/enos"
cp -R "$api_dir" "$src/api"
chmod -R u+w "$src/api"

cd "$src"
echo "build-nomad: building Nomad $NOMAD_VERSION into $out (several minutes on first run)" >&2
start=$(date +%s)
CGO_ENABLED=0 GOFLAGS=-mod=mod "$GO" build -trimpath -tags hashicorpmetrics -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "build-nomad: done in $(( $(date +%s) - start ))s" >&2
