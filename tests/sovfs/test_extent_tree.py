"""The extent tree is written incrementally (InodeStore._flush_map): only the leaves whose extents
changed, split and dropped as needed, and the index above them.  Checked against the data, against
a reload from the image, and by fsck, over random allocating writes, merges and truncates."""

from __future__ import annotations

import random

import pytest

from sovfs import format as F
from sovfs.fs import FileSystem
from sovfs.fsck_core import Mode, check
from tests.sovfs.conftest import fresh

R = F.ROOT_INO


def _as_written(fs: FileSystem, ino: int) -> list[F.Extent]:
    """The extents of ``ino`` read back from its tree blocks as the running transaction has them."""
    from sovfs.inode import InodeRec

    rec = InodeRec(ino, fs.inodes.get(ino).inode)
    fs.inodes._load_extents(rec)
    return rec.extents


def _tree_blocks_dirty(fs: FileSystem, ino: int) -> int:
    rec = fs.inodes.get(ino)
    return sum(1 for b in fs.journal.running if b in set(rec.tree_blocks))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_allocating_writes_keep_tree_image_and_data_in_step(seed: int) -> None:
    dev, fs = fresh(16 << 20, block_size=1024)  # 61 extents per node: a deep tree soon
    bs = fs.bs
    a = fs.create(R, b"f").ino
    nblocks = 6000
    model = bytearray()
    rng = random.Random(seed)
    deepest = 0
    for step in range(1, 1601):
        r = rng.random()
        if r < 0.8:  # one block somewhere: usually its own extent
            b, n = rng.randrange(nblocks), 1
        elif r < 0.97:  # a short run: merges with the extents around it
            b, n = rng.randrange(nblocks - 8), rng.randrange(2, 8)
        else:  # truncate: drops whole leaves at the end
            keep = rng.randrange(len(model) // 2, len(model) + 1) // bs * bs if model else 0
            fs.truncate(a, keep)
            del model[keep:]
            assert _as_written(fs, a) == fs.inodes.get(a).extents
            continue
        data = bytes([rng.randrange(1, 256)]) * (n * bs)
        fs.write(a, b * bs, data)
        if len(model) < (b + n) * bs:
            model.extend(bytes((b + n) * bs - len(model)))
        model[b * bs : (b + n) * bs] = data
        deepest = max(deepest, fs.inodes.get(a).inode.ext_depth)
        if step % 50 == 0:
            assert _as_written(fs, a) == fs.inodes.get(a).extents
        if step % 400 == 0:
            extents = list(fs.inodes.get(a).extents)
            fs.close()
            fs = FileSystem.mount(dev)
            assert fs.inodes.get(a).extents == extents  # what was written is what is in memory
            assert fs.read(a, 0, len(model) + bs) == bytes(model)
    assert deepest >= 2  # leaves under index nodes under the root
    fs.close()
    report = check(dev, Mode.NO)
    assert not report.problems, [str(p) for p in report.problems]


def test_an_allocating_write_rewrites_one_leaf_not_the_tree() -> None:
    """A block written into a hole of a file with ~2,000 extents dirties its leaf (and at most the
    index above it), not every leaf: the cost of a write does not grow with the file's extents."""
    dev, fs = fresh(32 << 20, block_size=1024)
    bs = fs.bs
    a = fs.create(R, b"g").ino
    for i in range(0, 4000, 2):  # every other block: one extent each
        fs.write(a, i * bs, b"x" * bs)
    rec = fs.inodes.get(a)
    assert len(rec.extents) == 2000 and len(rec.leaves) > 30
    for hole in (1001, 3, 3997):  # middle, first leaf, last leaf
        fs.sync()
        fs.write(a, hole * bs, b"y" * bs)  # a new extent (its block is elsewhere)
        assert 1 <= _tree_blocks_dirty(fs, a) <= 3
    fs.close()
    fs = FileSystem.mount(dev)
    assert fs.read(a, 1000 * bs, 3 * bs) == b"x" * bs + b"y" * bs + b"x" * bs
    assert len(fs.inodes.get(a).extents) == 2003
    fs.close()
    assert not check(dev, Mode.NO).problems


def test_writes_into_unwritten_extents_convert_just_the_blocks_written() -> None:
    """SovFS never makes unwritten extents, but an image from another writer may hold them
    (FORMAT.md: they read as zeros).  A write converts exactly the blocks it wrote, splitting the
    extent around them, and the tree on disk says the same."""
    dev, fs = fresh(16 << 20, block_size=1024)
    bs = fs.bs
    a = fs.create(R, b"u").ino
    fs.write(a, 0, b"old!" * (bs // 4) * 300)  # 300 blocks, one extent
    rec = fs.inodes.get(a)
    (e,) = rec.extents
    with fs.journal.op() as tx:  # what another writer's fallocate would have left
        rec.extents = [F.Extent(e.logical, e.length, e.physical, F.EXT_UNWRITTEN)]
        fs.inodes._mark_map(tx, rec)
        fs.inodes.put(tx, rec)
    fs.close()
    fs = FileSystem.mount(dev)
    assert fs.read(a, 0, 300 * bs) == bytes(300 * bs)  # unwritten reads as zeros
    for blk in (150, 10, 299, 0):
        fs.write(a, blk * bs, bytes([blk % 250 + 1]) * bs)
    rec = fs.inodes.get(a)
    written = [(x.logical, x.length) for x in rec.extents if not x.flags & F.EXT_UNWRITTEN]
    assert written == [(0, 1), (10, 1), (150, 1), (299, 1)]
    assert sum(x.length for x in rec.extents) == 300 and len(rec.extents) == 7
    assert _as_written(fs, a) == rec.extents
    fs.close()
    fs = FileSystem.mount(dev)
    want = bytearray(300 * bs)
    for blk in (150, 10, 299, 0):
        want[blk * bs : (blk + 1) * bs] = bytes([blk % 250 + 1]) * bs
    assert fs.read(a, 0, 300 * bs) == bytes(want)
    fs.close()
    report = check(dev, Mode.NO)
    assert not report.problems, [str(p) for p in report.problems]
