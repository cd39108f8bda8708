"""Corruption found while mounted: EIO for that object, logged once, failsafe read-only — never a crash.

One image per metadata class (inode table, extent-tree node, directory leaf and interior nodes, xattr
block, block and inode bitmaps) with one bad byte; every operation is driven over it.  Bitmaps are read
at mount, so those images are refused at mount (one line, exit 32, image untouched) instead.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from sovfs import format as F
from sovfs.blockdev import open_block_device
from sovfs.fs import FileSystem
from tests.fuse.conftest import Mount, mkfs

pytestmark = pytest.mark.fuse
R = F.ROOT_INO


@dataclass
class Built:
    img: Path
    bs: int
    blocks: dict[str, int]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from tests.fuse.conftest import _WHY

    if _WHY:
        pytest.skip(_WHY)
    img = tmp_path_factory.mktemp("corrupt") / "base.img"
    mkfs(img, "8M", "-b", "1024")
    dev = open_block_device(str(img))
    try:
        with FileSystem.mount(dev) as fs:
            many = fs.mkdir(R, b"many").ino
            for i in range(120):
                fs.create(many, b"entry-%03d" % i)
            big = fs.create(R, b"big").ino
            for i in range(12):
                fs.write(big, i * 2048, bytes([i + 1]) * 1024)  # 12 extents: an extent tree
            fs.setxattr(big, b"user.long", b"v" * 200)  # an xattr block
            small = fs.create(R, b"small").ino
            fs.write(small, 0, b"small")
            rec, mrec = fs.inodes.get(big), fs.inodes.get(many)
            per = fs.bs // F.INODE_SIZE
            leaf, interior = fs.inodes.bmap(mrec, 1), fs.inodes.bmap(mrec, 0)
            assert rec.tree_blocks and rec.inode.xattr_block and leaf and interior
            blocks = {
                "inode_table": fs.sb.inode_table_start + small // per,
                "extent_node": rec.tree_blocks[0],
                "xattr": rec.inode.xattr_block,
                "dir_leaf": leaf,
                "dir_interior": interior,
                "block_bitmap": fs.sb.block_bitmap_start,
                "inode_bitmap": fs.sb.inode_bitmap_start,
            }
            small_off = (small % per) * F.INODE_SIZE
            bs = fs.bs
    finally:
        dev.close()
    blocks["_small_off"] = small_off
    return Built(img, bs, blocks)


def _corrupt(built: Built, cls: str, dst: Path) -> None:
    shutil.copyfile(built.img, dst)
    off = built.blocks[cls] * built.bs + (built.blocks["_small_off"] + 40 if cls == "inode_table" else 100)
    with open(dst, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x5A]))


def _errno(fn: object, *a: object) -> int:
    try:
        fn(*a)  # type: ignore[operator]
    except OSError as e:
        return e.errno or -1
    return 0


@pytest.mark.parametrize(
    "cls", ["inode_table", "extent_node", "xattr", "dir_leaf", "dir_interior", "block_bitmap", "inode_bitmap"]
)
def test_corruption_while_mounted(built: Built, cls: str, tmp_path: Path, mnt_factory: object) -> None:
    img = tmp_path / "bad.img"
    _corrupt(built, cls, img)
    before = img.read_bytes()
    m: Mount = mnt_factory(img)  # type: ignore[operator]
    r = m.mount(expect_ok=False)
    if cls.endswith("bitmap"):
        assert r.returncode == 32 and len(r.stderr.strip().splitlines()) == 1 and "fsck" in r.stderr
        assert img.read_bytes() == before
        return
    assert r.returncode == 0, r.stderr + m.log_text()
    m.mounted = True
    mnt = m.mnt
    results: dict[str, int] = {}
    ops = {
        "listdir_root": lambda: os.listdir(mnt),
        "listdir_many": lambda: os.listdir(mnt / "many"),
        "lookup_many": lambda: os.stat(mnt / "many" / "entry-077"),
        "stat_small": lambda: os.stat(mnt / "small"),
        "read_small": lambda: (mnt / "small").read_bytes(),
        "read_big": lambda: (mnt / "big").read_bytes(),
        "xattr_big": lambda: os.getxattr(mnt / "big", "user.long"),
        "listxattr_big": lambda: os.listxattr(mnt / "big"),
        "statfs": lambda: os.statvfs(mnt),
        "create_many": lambda: (mnt / "many" / "new").write_bytes(b"n"),
        "write_big": lambda: (mnt / "big").write_bytes(b"w"),
        "unlink_small": lambda: os.unlink(mnt / "small"),
        "mkdir_root": lambda: os.mkdir(mnt / "newdir"),
        "rename_many": lambda: os.rename(mnt / "many" / "entry-001", mnt / "moved"),
    }
    for name, op in ops.items():
        results[name] = _errno(op)
    assert errno.EIO in results.values(), results
    assert set(results.values()) <= {0, errno.EIO, errno.EROFS, errno.ENOENT}, results
    assert _errno(os.mkdir, mnt / "after") == errno.EROFS  # failsafe: read-only from the first EIO on
    assert os.statvfs(mnt).f_bsize == built.bs  # still alive
    log = m.log_text()
    assert "failsafe" in log and "Traceback" not in log
    assert sum("failsafe mode" in line for line in log.splitlines()) == 1
    m.unmount()
    sb = F.Superblock.unpack(img.read_bytes()[1024:2048])
    assert sb.state & F.STATE_ERRORS and not sb.state & F.STATE_CLEAN
    assert m.mount(expect_ok=False).returncode == 32  # refused until checked
