"""Large directories: lookup reads O(height) blocks, not O(size)."""

from __future__ import annotations

import pytest

from sovfs import format as F
from tests.sovfs.conftest import fresh


def lookup_cost(n: int) -> tuple[int, int]:
    dev, fs = fresh(256 << 20, inode_count=8192)
    d = fs.mkdir(F.ROOT_INO, b"big").ino
    target = fs.create(d, b"target").ino
    for i in range(n):
        fs.link(target, d, f"entry-{i:07d}".encode())
    fs.close()
    from sovfs.fs import FileSystem

    fs = FileSystem.mount(dev)
    dev.reset_counters()
    assert fs.lookup(d, f"entry-{n // 2:07d}".encode()).ino == target
    assert fs.lookup(d, b"entry-0000000").ino == target
    reads = dev.reads
    blocks = fs.getattr(d).size // fs.bs
    listed = sum(1 for _ in fs.readdir(d)) - 2
    assert listed == n + 1
    assert len(fs.dirs.all_blocks_listing(fs.inodes.get(d))) == n + 1
    fs.close()
    return reads, blocks


def test_lookup_10k_is_logarithmic() -> None:
    reads, blocks = lookup_cost(10_000)
    assert blocks > 50
    assert reads <= 2 + 3 * 2 + 2  # inode table, extent-free dir map, ≤3 levels per lookup


@pytest.mark.slow
def test_lookup_100k_is_logarithmic() -> None:
    r_small, _ = lookup_cost(1_000)
    r_big, blocks = lookup_cost(100_000)
    assert blocks > 500
    assert r_big <= r_small + 4
