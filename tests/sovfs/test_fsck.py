"""fsck: clean sweeps, checksum corruption of every metadata class, semantic corruption, modes, CLI.

Corruptions are written through ``sovfs.format`` (consistent checksums, wrong structure) or as raw bit
flips / garbage.  Every case: ``-n`` detects it and leaves the image byte-identical; ``-y`` repairs it and
a second check is clean.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mkfs import fsck as fsck_cli
from mkfs import mkfs as mkfs_cli
from sovfs import format as F
from sovfs.fs import FileSystem
from sovfs.fsck_core import CannotCheck, Mode, Report, check
from sovfs.mkfs_core import MkfsParams, make_filesystem
from tests.sovfs.ramdev import LIVE, RamLedgerDevice

R = F.ROOT_INO


def clone(img: bytes) -> RamLedgerDevice:
    dev = RamLedgerDevice(len(img))
    dev.data[:] = img
    return dev


def codes(r: Report) -> set[str]:
    return {p.code for p in r.problems if not p.hint}


def assert_clean(dev: RamLedgerDevice) -> None:
    r = check(dev, Mode.NO)
    assert not r.problems, [str(p) for p in r.problems]
    assert r.exit_code == 0


def detect_and_repair(dev: RamLedgerDevice, expect: set[str] | None = None) -> Report:
    """-n finds something and writes nothing; -y fixes; then clean."""
    before = bytes(dev.data)
    r = check(dev, Mode.NO)
    assert r.errors, "corruption not detected"
    assert r.exit_code == 4
    if expect is not None:
        assert expect <= codes(r), [str(p) for p in r.problems]
    assert bytes(dev.data) == before
    ry = check(dev, Mode.YES)
    assert ry.written and ry.exit_code == 1, [str(p) for p in ry.problems]
    assert_clean(dev)
    with FileSystem.mount(dev, read_only=True) as fs:  # the repaired image mounts and lists
        for item in fs.readdir(F.LOST_FOUND_INO):
            fs.getattr(item.ino)
    return r


# ------------------------------------------------------------------------------------------- sweep
@pytest.mark.parametrize(
    ("size", "bs", "inodes"),
    [(1 << 20, 1024, None), (4 << 20, 2048, 64), (16 << 20, 4096, None), (64 << 20, 4096, 100000),
     (33 << 20, 8192, 500), (256 << 20, 65536, None), (300 << 20, 1024, None), (2 << 20, 1024, 16)],
)
def test_mkfs_then_clean(size: int, bs: int, inodes: int | None) -> None:
    dev = RamLedgerDevice(size)
    make_filesystem(dev, MkfsParams(block_size=bs, inode_count=inodes))
    assert_clean(dev)
    r = check(dev, Mode.NO)
    sb = F.Superblock.unpack(dev.data[1024:2048])
    assert (r.files_used, r.files_total) == (3, sb.inode_count)
    assert r.blocks_used == sb.block_count - sb.free_blocks


# ------------------------------------------------------------------------------------------- image
@dataclass
class Layout:
    img: bytes
    big: int  # file with an extent tree and an xattr block
    small: int
    small2: int
    dir_a: int
    dir_b: int
    many: int  # directory with an interior root node
    tree_block: int
    xattr_block: int
    dir_leaf: int
    dir_interior: int
    itable_block: int


@pytest.fixture(scope="module")
def layout() -> Layout:
    dev = RamLedgerDevice(8 << 20)
    make_filesystem(dev, MkfsParams(block_size=1024, uuid=bytes(range(16)), hash_seed=bytes(16)))
    with FileSystem.mount(dev) as fs:
        a = fs.mkdir(R, b"a").ino
        b = fs.mkdir(a, b"b").ino
        many = fs.mkdir(R, b"many").ino
        for i in range(120):
            fs.create(many, b"entry-%03d" % i)
        big = fs.create(R, b"big").ino
        for i in range(12):
            fs.write(big, i * 2048, bytes([i + 1]) * 1024)  # holes: 12 extents -> tree
        fs.setxattr(big, b"user.long", b"v" * 200)
        small = fs.create(b, b"small").ino
        fs.write(small, 0, b"small data" * 300)
        small2 = fs.create(R, b"small2").ino
        fs.write(small2, 0, b"other data" * 300)
        fs.symlink(R, b"link", b"target" * 20)
        fs.link(small, R, b"hardlink")
        rec = fs.inodes.get(big)
        assert rec.tree_blocks and rec.inode.xattr_block
        mrec = fs.inodes.get(many)
        root_phys = fs.inodes.bmap(mrec, 0)
        assert root_phys is not None and fs.dirs.node(mrec, 0).level == 1
        leaf_phys = fs.inodes.bmap(mrec, 1)
        assert leaf_phys is not None
        lay = Layout(
            b"", big, small, small2, a, b, many, rec.tree_blocks[0], rec.inode.xattr_block, leaf_phys,
            root_phys, fs.sb.inode_table_start,
        )
    lay.img = bytes(dev.data)
    assert_clean(clone(lay.img))
    return lay


def sb_of(dev: RamLedgerDevice) -> F.Superblock:
    return F.Superblock.unpack(dev.data[1024:2048])


def block_of(dev: RamLedgerDevice, cls: str, lay: Layout) -> tuple[int, int]:
    """(byte offset, length) of one metadata structure of class ``cls``."""
    sb = sb_of(dev)
    bs = sb.block_size
    blk = {
        "block_bitmap": sb.block_bitmap_start, "inode_bitmap": sb.inode_bitmap_start,
        "inode_table": lay.itable_block, "extent": lay.tree_block, "dir_leaf": lay.dir_leaf,
        "dir_interior": lay.dir_interior, "xattr": lay.xattr_block, "journal": sb.journal_start,
        "backup_sb": sb.backup_sb_block,
    }
    if cls == "superblock":
        return 1024, 1024
    return blk[cls] * bs, bs


CLASSES = ["superblock", "backup_sb", "block_bitmap", "inode_bitmap", "inode_table", "extent", "dir_leaf",
           "dir_interior", "xattr", "journal"]


@pytest.mark.parametrize("how", ["flip", "garbage"])
@pytest.mark.parametrize("cls", CLASSES)
def test_corruption_detected_and_repaired(layout: Layout, cls: str, how: str) -> None:
    dev = clone(layout.img)
    off, n = block_of(dev, cls, layout)
    rnd = __import__("random").Random(f"{cls}-{how}")
    if how == "flip":
        for _ in range(3):
            pos = off + rnd.randrange(min(n, 600) if cls == "inode_table" else n)
            if cls == "inode_table":
                pos = off + 256 + rnd.randrange(256 * 3)  # inodes 1..3 of the first table block
            dev.data[pos] ^= 1 << rnd.randrange(8)
    else:
        dev.data[off : off + n] = rnd.randbytes(n)
    detect_and_repair(dev)


# ------------------------------------------------------------------------------------------- semantic
def _slot(dev: RamLedgerDevice, ino: int) -> tuple[int, F.Superblock]:
    sb = sb_of(dev)
    per = sb.block_size // 256
    return (sb.inode_table_start + ino // per) * sb.block_size + (ino % per) * 256, sb


def get_inode(dev: RamLedgerDevice, ino: int) -> F.Inode:
    off, sb = _slot(dev, ino)
    return F.Inode.unpack(dev.data[off : off + 256], F.uuid_seed(sb.uuid), ino)


def put_inode(dev: RamLedgerDevice, ino: int, inode: F.Inode) -> None:
    off, sb = _slot(dev, ino)
    dev.data[off : off + 256] = inode.pack(F.uuid_seed(sb.uuid), ino)


def edit_dir(dev: RamLedgerDevice, d: int, edit: object) -> None:
    """Apply ``edit(list[DirEntry]) -> list`` to the leaf holding the entries of a one-leaf directory."""
    sb = sb_of(dev)
    bs = sb.block_size
    phys = F.Extent.unpack(get_inode(dev, d).area).physical
    buf = bytearray(dev.data[phys * bs : (phys + 1) * bs])
    node = F.DirNode.unpack(buf, "test")
    assert node.level == 0
    node.entries = sorted(edit(node.entries), key=lambda e: e.key)  # type: ignore[operator]
    node.pack_into(buf)
    F.seal_block(buf, F.uuid_seed(sb.uuid))
    dev.data[phys * bs : (phys + 1) * bs] = buf


def entry(dev: RamLedgerDevice, name: bytes, ino: int, ftype: int = 8) -> F.DirEntry:
    return F.DirEntry(F.name_hash_base(sb_of(dev).hash_seed, name), ino, ftype, name)


def test_wrong_link_count(layout: Layout) -> None:
    dev = clone(layout.img)
    i = get_inode(dev, layout.small2)
    i.nlink = 5
    put_inode(dev, layout.small2, i)
    detect_and_repair(dev, {"NLINK"})
    assert get_inode(dev, layout.small2).nlink == 1


def test_dir_link_count(layout: Layout) -> None:
    dev = clone(layout.img)
    i = get_inode(dev, layout.dir_a)
    i.nlink = 2
    put_inode(dev, layout.dir_a, i)
    detect_and_repair(dev, {"NLINK"})
    assert get_inode(dev, layout.dir_a).nlink == 3


def test_bitmap_bit_cleared_for_used_block(layout: Layout) -> None:
    dev = clone(layout.img)
    sb = sb_of(dev)
    bs = sb.block_size
    used = F.Extent.unpack(get_inode(dev, layout.small2).area).physical
    off = sb.block_bitmap_start * bs
    buf = bytearray(dev.data[off : off + bs])
    buf[32 + used // 8] &= ~(1 << (used % 8))
    F.seal_block(buf, F.uuid_seed(sb.uuid))
    dev.data[off : off + bs] = buf
    r = detect_and_repair(dev, {"BLOCK_BITMAP"})
    assert f"+({used})" in next(p.message for p in r.problems if p.code == "BLOCK_BITMAP")


def test_block_claimed_by_two_files(layout: Layout) -> None:
    dev = clone(layout.img)
    a = get_inode(dev, layout.small)
    b = get_inode(dev, layout.small2)
    b.area = a.area  # small2 now maps small's blocks
    put_inode(dev, layout.small2, b)
    detect_and_repair(dev, {"BLOCK_DUP"})
    with FileSystem.mount(dev) as fs:
        assert fs.read(layout.small, 0, 3000) == b"small data" * 300
        assert fs.read(layout.small2, 0, 3000) == b"small data" * 300  # a copy, no longer shared
        pa = fs.inodes.get(layout.small).extents[0].physical
        pb = fs.inodes.get(layout.small2).extents[0].physical
        assert pa != pb


def test_entry_pointing_at_free_inode(layout: Layout) -> None:
    dev = clone(layout.img)
    edit_dir(dev, layout.dir_a, lambda es: [*es, entry(dev, b"ghost", 200)])
    detect_and_repair(dev, {"DIRENT_FREE"})
    with FileSystem.mount(dev) as fs:
        assert sorted(i.name for i in fs.readdir(layout.dir_a)) == [b".", b"..", b"b"]


def test_directory_loop(layout: Layout) -> None:
    dev = clone(layout.img)
    edit_dir(dev, R, lambda es: [e for e in es if e.name != b"a"])
    edit_dir(dev, layout.dir_b, lambda es: [*es, entry(dev, b"up", layout.dir_a, 4)])
    a = get_inode(dev, layout.dir_a)
    a.parent = layout.dir_b
    put_inode(dev, layout.dir_a, a)
    detect_and_repair(dev, {"DIR_LOOP"})
    with FileSystem.mount(dev) as fs:
        lf = {i.name: i.ino for i in fs.readdir(F.LOST_FOUND_INO)}
        moved = next(iter(v for k, v in lf.items() if k.startswith(b"#")))
        assert moved in (layout.dir_a, layout.dir_b)
        assert fs.getattr(moved).nlink == 3


def test_directory_hard_link(layout: Layout) -> None:
    dev = clone(layout.img)
    edit_dir(dev, R, lambda es: [*es, entry(dev, b"alias", layout.dir_b, 4)])
    detect_and_repair(dev, {"DIR_HARDLINK"})


def test_unreachable_inode_goes_to_lost_found(layout: Layout) -> None:
    dev = clone(layout.img)
    edit_dir(dev, R, lambda es: [e for e in es if e.name != b"small2"])
    detect_and_repair(dev, {"INODE_UNATTACHED"})
    with FileSystem.mount(dev) as fs:
        a = fs.lookup(F.LOST_FOUND_INO, b"#%d" % layout.small2)
        assert a.nlink == 1
        assert fs.read(a.ino, 0, 3000) == b"other data" * 300


def test_wrong_file_type_and_bad_key(layout: Layout) -> None:
    dev = clone(layout.img)

    def edit(es: list[F.DirEntry]) -> list[F.DirEntry]:
        out = []
        for e in es:
            if e.name == b"small2":
                e = F.DirEntry(e.key, e.ino, 4, e.name)
            if e.name == b"big":
                e = F.DirEntry(300, e.ino, e.ftype, e.name)
            out.append(e)
        return out

    edit_dir(dev, R, edit)
    detect_and_repair(dev, {"DIRENT_TYPE", "DIRENT_KEY"})
    with FileSystem.mount(dev) as fs:
        assert fs.lookup(R, b"big").ino == layout.big


def test_missing_root_recreated(layout: Layout) -> None:
    dev = clone(layout.img)
    off, _ = _slot(dev, R)
    dev.data[off : off + 256] = bytes(256)
    detect_and_repair(dev, {"ROOT_MISSING"})
    with FileSystem.mount(dev) as fs:
        lf = [i.name for i in fs.readdir(F.LOST_FOUND_INO)]
        assert b"#%d" % layout.many in lf


def test_orphan_list_processed_by_preen(layout: Layout) -> None:
    dev = clone(layout.img)
    i = get_inode(dev, layout.small2)
    i.nlink = 0
    put_inode(dev, layout.small2, i)
    edit_dir(dev, R, lambda es: [e for e in es if e.name != b"small2"])
    sb = sb_of(dev)
    sb.orphan_head = layout.small2
    dev.data[1024:2048] = sb.pack()
    r = check(dev, Mode.PREEN)
    assert "ORPHAN" in codes(r) and r.written and r.exit_code == 1
    assert_clean(dev)
    assert get_inode(dev, layout.small2).is_free


def test_preen_fixes_safe_only(layout: Layout) -> None:
    dev = clone(layout.img)
    i = get_inode(dev, layout.small2)
    i.blocks = 99
    put_inode(dev, layout.small2, i)
    r = check(dev, Mode.PREEN)
    assert codes(r) == {"INODE_BLOCKS"} and r.exit_code == 1
    assert_clean(dev)
    edit_dir(dev, layout.dir_a, lambda es: [*es, entry(dev, b"ghost", 200)])
    before = bytes(dev.data)
    r = check(dev, Mode.PREEN)
    assert r.exit_code == 4 and not r.written
    assert bytes(dev.data) == before


def test_free_counts_are_hints(layout: Layout) -> None:
    dev = clone(layout.img)
    sb = sb_of(dev)
    sb.free_blocks += 7
    dev.data[1024:2048] = sb.pack()
    r = check(dev, Mode.NO)
    assert [p.code for p in r.problems] == ["SB_FREE_COUNTS"] and r.exit_code == 0
    assert check(dev, Mode.PREEN).exit_code == 0
    assert sb_of(dev).free_blocks == sb.free_blocks - 7


def test_journal_not_empty_blocks_repair(layout: Layout) -> None:
    dev = clone(layout.img)
    sb = sb_of(dev)
    bs = sb.block_size
    off = sb.journal_start * bs
    buf = bytearray(dev.data[off : off + bs])
    struct.pack_into("<Q", buf, 64, 3)  # head
    F.seal_block(buf, F.uuid_seed(sb.uuid))
    dev.data[off : off + bs] = buf
    before = bytes(dev.data)
    r = check(dev, Mode.NO)  # -n reports the live journal and writes nothing
    assert "JOURNAL_RECOVER" in codes(r) and r.exit_code == 4 and not r.written
    assert bytes(dev.data) == before
    r = check(dev, Mode.YES)  # otherwise fsck replays it (no valid transaction at head 3: nothing to write)
    assert "JOURNAL_REPLAYED" in [p.code for p in r.problems] and r.exit_code == 0
    assert check(dev, Mode.NO).exit_code == 0


def test_foreign_and_truncated_images() -> None:
    with pytest.raises(CannotCheck, match="no SovFS superblock"):
        check(clone(os.urandom(1 << 20)), Mode.NO)
    dev = RamLedgerDevice(4 << 20)
    make_filesystem(dev)
    with pytest.raises(CannotCheck, match="truncated"):
        check(clone(bytes(dev.data[: 2 << 20])), Mode.NO)


# ------------------------------------------------------------------------------------------- hypothesis
OPS = st.lists(
    st.tuples(st.sampled_from(["mkdir", "create", "write", "truncate", "unlink", "rmdir", "rename", "link",
                               "xattr", "symlink"]),
              st.integers(0, 7), st.integers(0, 3), st.integers(0, 40000)),
    max_size=50,
)


@settings(max_examples=40)
@given(OPS)
def test_random_operations_then_fsck_clean(ops: list[tuple[str, int, int, int]]) -> None:
    dev = RamLedgerDevice(4 << 20)
    make_filesystem(dev, MkfsParams(block_size=1024))
    fs = FileSystem.mount(dev)
    dirs = [R]
    done: list[str] = []
    from sovfs.errors import SovError

    for op, x, y, n in ops:
        d = dirs[x % len(dirs)]
        name = b"n%d" % y
        try:
            if op == "mkdir":
                dirs.append(fs.mkdir(d, name).ino)
            elif op == "create":
                fs.create(d, name)
                fs.write(fs.lookup(d, name).ino, n, b"c" * (n % 3000 + 1))
            elif op == "symlink":
                fs.symlink(d, name, b"t" * (n % 200 + 1))
            elif op == "write":
                fs.write(fs.lookup(d, name).ino, n, b"w" * (n % 5000 + 1))
            elif op == "truncate":
                fs.truncate(fs.lookup(d, name).ino, n)
            elif op == "unlink":
                fs.unlink(d, name)
            elif op == "rmdir":
                ino = fs.lookup(d, name).ino
                fs.rmdir(d, name)
                dirs.remove(ino)
            elif op == "rename":
                fs.rename(d, name, dirs[y % len(dirs)], b"r%d" % x)
            elif op == "link":
                fs.link(fs.lookup(d, name).ino, dirs[y % len(dirs)], b"l%d" % n)
            elif op == "xattr":
                fs.setxattr(fs.lookup(d, name).ino, b"user.x", b"v" * (n % 500))
            done.append(op)
        except SovError:
            pass
    fs.close()
    if len(ops) > 20:
        assert done, "no operation succeeded"
    assert_clean(dev)


# ------------------------------------------------------------------------------------------- CLI
def _image(tmp_path: Path, *extra: str) -> Path:
    img = tmp_path / "storage.img"
    assert mkfs_cli.main(["-q", "-s", "8M", "-b", "1024", *extra, str(img)]) == 0
    return img


def test_cli_clean_summary_and_no_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path)
    before = img.read_bytes()
    assert fsck_cli.main(["-f", "-n", str(img)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"storage\.img: 3/\d+ files \(0\.0% non-contiguous\), \d+/8192 blocks", out), out
    assert img.read_bytes() == before
    assert fsck_cli.main([str(img)]) == 0  # clean, not forced
    assert "clean" in capsys.readouterr().out


def test_cli_populated_tree_clean(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"hello\n" * 5000)
    (src / "l").symlink_to("d/f.txt")
    os.link(src / "d" / "f.txt", src / "hard")
    with open(src / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    img = _image(tmp_path, "-d", str(src))
    assert fsck_cli.main(["-f", "-n", str(img)]) == 0


def test_cli_repair_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path)
    data = bytearray(img.read_bytes())
    sb = F.Superblock.unpack(data[1024:2048])
    off = sb.block_bitmap_start * sb.block_size + 100
    data[off] ^= 0x10
    img.write_bytes(bytes(data))
    assert fsck_cli.main(["-n", "-f", str(img)]) == 4
    assert img.read_bytes() == bytes(data)
    assert fsck_cli.main(["-p", str(img)]) == 0  # marked clean: skipped without -f, as e2fsck
    assert fsck_cli.main(["-p", "-f", str(img)]) == 1
    assert "MODIFIED" in capsys.readouterr().out
    assert fsck_cli.main(["-f", str(img)]) == 0
    capsys.readouterr()
    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(os.urandom(1 << 20))
    truncated = tmp_path / "trunc.img"
    truncated.write_bytes(img.read_bytes()[: 4 << 20])
    for path in (foreign, truncated, tmp_path / "missing.img"):
        assert fsck_cli.main(["-n", str(path)]) == 8
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert fsck_cli.main(["-n", "-y", str(img)]) == 16
    assert fsck_cli.main([]) == 16
    assert capsys.readouterr().err.count("\n") == 2


# ------------------------------------------------------------------------------------------- fuzz
def _fuzz(layout: Layout, seed: int, rounds: int) -> None:
    """Random bit flips / garbage in random metadata blocks: never a crash; after -y always clean."""
    import random

    img = layout.img
    sb = F.Superblock.unpack(img[1024:2048])
    bs = sb.block_size
    meta = [b for b in range(sb.data_start, sb.backup_sb_block) if img[b * bs : b * bs + 4] == b"SOVB"]
    cands = [*range(1, sb.inode_table_start + 3), sb.journal_start, *meta, sb.backup_sb_block]
    rnd = random.Random(seed)
    for _ in range(rounds):
        dev = clone(img)
        for _ in range(rnd.randint(1, 4)):
            b = rnd.choice(cands)
            if rnd.random() < 0.5:
                for _ in range(rnd.randint(1, 5)):
                    dev.data[b * bs + rnd.randrange(bs)] ^= 1 << rnd.randrange(8)
            else:
                dev.data[b * bs : (b + 1) * bs] = rnd.randbytes(bs)
        try:
            check(dev, Mode.YES)
        except CannotCheck:
            continue
        else:
            assert_clean(dev)
        finally:
            LIVE.remove(dev)
            dev.shutdown()  # a thousand rounds: give each round's device threads and fds back


def test_fuzz_metadata_quick(layout: Layout) -> None:
    _fuzz(layout, 0, 25)


@pytest.mark.slow
def test_fuzz_metadata_long(layout: Layout) -> None:
    _fuzz(layout, 1, 1000)
