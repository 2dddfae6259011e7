#!/usr/bin/env bash
# Builds a minimal Debian bookworm base image locally, for machines that cannot pull images
# (no registry): debootstrap --variant=minbase from the Debian mirror apt already uses, with
# redis-server, redis-tools and ca-certificates, then `docker import`. The one image stands in
# for rust:1-bookworm (the builder stage only copies host-built binaries), debian:bookworm-slim
# and redis:7-bookworm (see deploy/compose.local-base.yml).
#
# Usage: deploy/build-local-base.sh [IMAGE]   (default imagefleet-test-base:bookworm)
# Skips the build when IMAGE already exists. Needs root (debootstrap).
set -euo pipefail

IMAGE="${1:-${IMAGEFLEET_BASE_IMAGE:-imagefleet-test-base:bookworm}}"
SUITE=bookworm

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE already exists: skipping debootstrap"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
fi

# The mirror apt already uses (deb822 sources first, then the one-line format).
mirror=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) { print $i; exit } }' \
        | head -n1)
fi
mirror="${mirror:-http://deb.debian.org/debian}"
echo "debootstrap $SUITE (minbase) from $mirror"

rootfs=$(mktemp -d /var/tmp/imagefleet-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$rootfs"; }
trap cleanup EXIT

debootstrap --variant=minbase --include=redis-server,redis-tools,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" > "$rootfs.log" 2>&1 || {
    tail -n 40 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    echo "debootstrap failed" >&2
    exit 1
}
rm -f "$rootfs.log"

# Trim what a container never needs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/tmp/*
# The redis-server package's own service would never start in a container; nothing to undo.

echo "docker import -> $IMAGE"
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null
docker image inspect "$IMAGE" --format '{{.Id}} {{.Size}} bytes' | sed "s|^|$IMAGE: |"
