#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job on the embedded
# default: a 64 MiB storage.img in the current directory, written and read
# through the ledger.
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
