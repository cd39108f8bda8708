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


def test_leaves_stay_consistent_through_inserts_removals_and_replacements() -> None:
    """A leaf derived from another (insert, removal, rename over a name, split) carries its packed
    entries along instead of re-packing every entry; after thousands of such changes every leaf's
    cached bytes are its entries' bytes, its block parses back to the same entries, and after a
    remount every surviving name resolves to its inode and every removed one is gone."""
    import random

    from sovfs.fs import FileSystem

    rng = random.Random(3)
    dev, fs = fresh(64 << 20, inode_count=4096)
    d = fs.mkdir(F.ROOT_INO, b"d").ino
    live: dict[bytes, int] = {}
    for i in range(3000):
        name = f"n{rng.randrange(10**6):06d}-{i}".encode()
        live[name] = fs.create(d, name).ino
    for name in rng.sample(sorted(live), 1200):
        fs.unlink(d, name)
        del live[name]
    names = sorted(live)
    for old, new in zip(names[:200], names[200:400], strict=True):  # rename over an existing name
        fs.rename(d, old, d, new)
        live[new] = live.pop(old)
    rec = fs.inodes.get(d)
    leaves = 0
    for e in rec.extents:
        for lb in range(e.logical, e.end):
            node = fs.dirs.node(rec, lb)
            if node.level == 0:
                leaves += 1
                assert node.leaf_raws() == [x.raw for x in node.entries]
                buf = fs.dirs._buf(rec, lb)
                assert F.DirNode.unpack(buf.data, "test").entries == node.entries
    assert leaves > 10
    fs.close()
    fs = FileSystem.mount(dev)
    for name, ino in live.items():
        assert fs.lookup(d, name).ino == ino
    listed = {x.name for x in fs.readdir(d)} - {b".", b".."}
    assert listed == set(live)
    fs.close()
