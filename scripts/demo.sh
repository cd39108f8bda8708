#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job on the embedded
# default: a 64 MiB storage.img in the current directory, written and read
# through the ledger: make the filesystem, mount it, copy a tree in, list it,
# unmount, fsck.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh"
export PATH="$here/.venv/bin:$PATH"
img=${SOVFS_DEMO_IMAGE:-storage.img}
set -x
ledger create "$img" --size 64M --force
ledger dd write 0 "hello ledger" --image "$img"
ledger dd read 0 --image "$img"
ledger info --image "$img"
mkfs.sovfs -F -q "$img"
mnt=$(mktemp -d /tmp/sovfs-demo.XXXXXX)
trap 'fusermount3 -u -z "$mnt" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true' EXIT
mount.sovfs "$img" "$mnt"
cp -a "$here/sovfs" "$here/docs" "$mnt/"
ls -l "$mnt" "$mnt/docs"
df -h "$mnt"
umount "$mnt"
while ! flock -n "$img" true; do sleep 0.1; done   # the daemon releases the image lock when it is done
fsck.sovfs -n -f "$img"
