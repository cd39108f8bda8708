#!/usr/bin/env bash
# Install everything SovFS needs on a fresh Debian machine, as root. Idempotent:
# a second run only checks. Afterwards the console scripts (ledger, mkfs.sovfs,
# fsck.sovfs, ...) are on root's PATH through /usr/local/bin.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

apt_packages=(python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev fio fuse2fs e2fsprogs rsync git)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.sovfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[dev,fuse]"
    touch "$stamp"
fi

# The filesystem's hot modules, compiled with mypyc into build/native (sovfs/_native.py); nothing to do
# when that build matches the sources. Without it SovFS runs the same code as pure Python.
.venv/bin/python scripts/build_native.py || echo "setup: no compiled core; SovFS runs as pure Python"

for tool in ledger mkfs.sovfs fsck.sovfs mount.sovfs; do
    if [ -x ".venv/bin/$tool" ]; then
        ln -sf "$root/.venv/bin/$tool" "/usr/local/bin/$tool"
    fi
done

# mount(8) runs /sbin/mount.<type> for `mount -t sovfs IMG DIR` and fstab lines (type "sovfs").
if [ -x .venv/bin/mount.sovfs ]; then
    for d in /sbin /usr/sbin; do
        if [ -d "$d" ] && [ ! -L "$d" ]; then
            ln -sf "$root/.venv/bin/mount.sovfs" "$d/mount.sovfs"
            break
        fi
    done
fi
