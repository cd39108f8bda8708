"""Journal cost: metadata ops/s and fsync latency, journal on vs off (``SOVFS_JOURNAL=0`` path).

``python bench/journal_cost.py [--image PATH] [--files N]`` — an image file (FLUSH = fdatasync) or,
without --image, the RAM backend.  Same code, same workload; only ``FileSystem.mount(journaling=...)``
differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from ledger.backend import create_image
from sovfs.blockdev import BlockDevice, open_block_device, ram_block_device
from sovfs.fs import FileSystem
from sovfs.mkfs_core import MkfsParams, make_filesystem

SIZE = 64 << 20


def _dev(image: str | None) -> BlockDevice:
    if image is None:
        return ram_block_device(SIZE)
    if os.path.exists(image):
        os.unlink(image)
    create_image(image, SIZE)
    return open_block_device(image)


def run(image: str | None, journaling: bool, files: int) -> tuple[float, float, float]:
    dev = _dev(image)
    make_filesystem(dev, MkfsParams())
    fs = FileSystem.mount(dev, journaling=journaling)
    d = fs.mkdir(1, b"d").ino
    t0 = time.perf_counter()
    for i in range(files):  # metadata-heavy: create, setxattr, rename, link, unlink, mkdir/rmdir
        a = fs.create(d, b"f%d" % i)
        fs.setxattr(a.ino, b"user.x", b"v")
        fs.rename(d, b"f%d" % i, d, b"g%d" % i)
        fs.link(a.ino, d, b"h%d" % i)
        fs.unlink(d, b"h%d" % i)
        fs.mkdir(d, b"s%d" % i)
        fs.rmdir(d, b"s%d" % i)
    fs.sync()
    ops = 7 * files / (time.perf_counter() - t0)
    lat = []
    a = fs.create(d, b"synced")
    for i in range(50):
        fs.write(a.ino, i * 4096, b"x" * 4096)
        t = time.perf_counter()
        fs.fsync(a.ino)
        lat.append(time.perf_counter() - t)
    c = fs.create(d, b"meta")
    mlat = []
    for i in range(50):
        fs.setattr(c.ino, mode=0o600 + (i & 1))
        t = time.perf_counter()
        fs.fsync(c.ino)
        mlat.append(time.perf_counter() - t)
    fs.close()
    dev.close()
    return ops, statistics.median(lat) * 1e3, statistics.median(mlat) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image")
    ap.add_argument("--files", type=int, default=400)
    a = ap.parse_args()
    where = a.image or "RAM backend"
    for journaling in (False, True, False, True):
        ops, lat, mlat = run(a.image, journaling, a.files)
        print(f"{where}: journal {'on ' if journaling else 'off'}: {ops:8.0f} metadata ops/s, "
              f"fsync after 4 KiB append {lat:6.2f} ms, fsync after chmod {mlat:6.2f} ms")
    if a.image:
        os.unlink(a.image)


if __name__ == "__main__":
    main()
