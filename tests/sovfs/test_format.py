"""sovfs.format: sizes and offsets against docs/FORMAT.md, and round trips of every structure."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sovfs import format as F
from sovfs.errors import Corrupt, InvalidArgument, NoSpace

DOC = (Path(__file__).parents[2] / "docs" / "FORMAT.md").read_text()

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
b48 = st.integers(0, 2**48 - 1)
SEED = F.uuid_seed(bytes(range(16)))


def doc_table_offsets(section: str) -> dict[str, int]:
    """Parse `| off | size | field |` rows of the table under a FORMAT.md heading."""
    start = DOC.index(section)
    body = DOC[start : DOC.index("\n### ", start + 1) if "\n### " in DOC[start + 1 :] else None]
    out = {}
    for m in re.finditer(r"^\| (\d+) \| [^|]+ \| `(\w+)` \|", body, re.M):
        out[m.group(2)] = int(m.group(1))
    return out


def test_constants_match_doc() -> None:
    assert F.SUPERBLOCK.size == 320
    assert F.INODE.size == F.INODE_SIZE == 256
    assert F.HEADER.size == 32
    assert F.EXTENT.size == 16
    assert F.DIRENT_HDR.size == 18
    assert F.DIR_INDEX.size == 16
    assert F.SB_OFFSET == 1024
    assert F.SB_OFF_CSUM == 1020
    assert "`53 6F 76 46 53 00 0D 0A`" in DOC
    assert bytes.fromhex("536F76465300 0D0A".replace(" ", "")) == F.SB_MAGIC
    assert "`0x42564F53`" in DOC
    assert struct.pack("<I", F.BLOCK_MAGIC) == b"SOVB"
    assert F.crc32c(b"123456789") == 0xE3069283


def test_superblock_offsets_match_doc() -> None:
    offs = doc_table_offsets("### §2.2 Fields")
    sb = F.Superblock(
        block_size_log2=12, block_count=0, inode_count=0, free_blocks=0, free_inodes=0,
        block_bitmap_start=0, block_bitmap_blocks=0, inode_bitmap_start=0, inode_bitmap_blocks=0,
        inode_table_start=0,
        inode_table_blocks=0, journal_start=0, journal_blocks=0, data_start=0, backup_sb_block=0,
        uuid=bytes(16), hash_seed=bytes(16),
    )
    # Give every u64 field a distinct marker and find it at the documented offset.
    names = [n for n, o in offs.items() if n not in {"magic", "uuid", "hash_seed", "label", "checksum"}]
    assert len(names) >= 30
    for i, name in enumerate(names):
        setattr(sb, name, 0x100 + i)
    raw = sb.pack()
    for i, name in enumerate(names):
        off = offs[name]
        assert raw[off : off + 2] == struct.pack("<H", 0x100 + i), name
    assert offs["checksum"] == F.SB_OFF_CSUM


def test_inode_offsets_match_doc() -> None:
    offs = doc_table_offsets("### §4.1 Fields")
    names = [n for n in offs if n not in {"area", "inline_xattr", "checksum", "mode", "inline_xattr_len"}]
    ino = F.Inode()
    for i, name in enumerate(names):
        setattr(ino, name, 0x100 + i)
    raw = ino.pack(SEED, 7)
    for i, name in enumerate(names):
        assert raw[offs[name] : offs[name] + 2] == struct.pack("<H", 0x100 + i), name
    assert offs["area"] == F.INODE_OFF_EXTENTS
    assert offs["inline_xattr"] == F.INODE_OFF_XATTR
    assert offs["checksum"] == F.INODE_OFF_CSUM


def test_header_offsets_match_doc() -> None:
    offs = doc_table_offsets("### §3.1 Common")
    assert offs == {
        "magic": 0, "type": 4, "flags": 6, "checksum": 8, "generation": 12, "blocknr": 16, "owner": 24,
    }


@given(
    bs=st.integers(10, 16), n=u64, ic=u64, fb=u64, uuid=st.binary(min_size=16, max_size=16),
    label=st.binary(max_size=64).map(lambda b: b.rstrip(b"\0")), t=i64, mc=u32, st_=u16, seq=u64,
)
def test_superblock_round_trip(
    bs: int, n: int, ic: int, fb: int, uuid: bytes, label: bytes, t: int, mc: int, st_: int, seq: int
) -> None:
    sb = F.Superblock(
        block_size_log2=bs, block_count=n, inode_count=ic, free_blocks=fb, free_inodes=fb,
        block_bitmap_start=n, block_bitmap_blocks=ic, inode_bitmap_start=1, inode_bitmap_blocks=2,
        inode_table_start=3,
        inode_table_blocks=4, journal_start=5, journal_blocks=6, data_start=7, backup_sb_block=8,
        uuid=uuid,
        hash_seed=uuid[::-1], label=label, mkfs_time_ns=t, mount_time_ns=-t if t > -(2**63) else 0,
        mount_count=mc, state=st_, sequence=seq,
    )
    raw = sb.pack()
    assert len(raw) == F.SB_SIZE
    # Geometry is checked separately; bypass it for the pure round trip.
    v = F.SUPERBLOCK.unpack_from(raw)
    assert v[8] == n
    assert v[25] == uuid
    assert v[27].rstrip(b"\0") == label
    assert v[38] == seq


def test_superblock_unpack_validates() -> None:
    g = F.plan_geometry(8 << 20, 4096, 2048, 256)
    sb = F.Superblock(
        block_size_log2=12, block_count=g.block_count, inode_count=g.inode_count, free_blocks=0,
        free_inodes=0,
        block_bitmap_start=g.block_bitmap_start, block_bitmap_blocks=g.block_bitmap_blocks,
        inode_bitmap_start=g.inode_bitmap_start, inode_bitmap_blocks=g.inode_bitmap_blocks,
        inode_table_start=g.inode_table_start, inode_table_blocks=g.inode_table_blocks,
        journal_start=g.journal_start, journal_blocks=g.journal_blocks, data_start=g.data_start,
        backup_sb_block=g.backup_sb_block, uuid=bytes(16), hash_seed=bytes(16), label=b"x",
    )
    raw = bytearray(sb.pack())
    assert F.Superblock.unpack(raw) == sb
    raw[100] ^= 1
    with pytest.raises(Corrupt, match="checksum"):
        F.Superblock.unpack(raw)
    sb.data_start += 1
    with pytest.raises(Corrupt, match="layout"):
        F.Superblock.unpack(sb.pack())


inodes = st.builds(
    F.Inode, mode=st.sampled_from(sorted(F.VALID_FORMATS)).map(lambda m: m | 0o644), uid=u32, gid=u32,
    nlink=u32, size=u64, blocks=u64, atime_ns=i64, mtime_ns=i64, ctime_ns=i64, crtime_ns=i64, flags=u32,
    generation=u32, rdev=u64, parent=u64, xattr_block=u64, ext_depth=u16, ext_count=st.integers(0, 4),
    area=st.binary(min_size=64, max_size=64), inline_xattr=st.binary(max_size=84),
)


@given(inode=inodes, ino=st.integers(1, 2**32))
def test_inode_round_trip(inode: F.Inode, ino: int) -> None:
    raw = inode.pack(SEED, ino)
    assert len(raw) == 256
    assert F.Inode.unpack(raw, SEED, ino) == inode
    with pytest.raises(Corrupt):
        F.Inode.unpack(raw, SEED, ino + 1)  # misplaced inode: seed includes the number
    bad = bytearray(raw)
    bad[17] ^= 0x40
    with pytest.raises(Corrupt):
        F.Inode.unpack(bad, SEED, ino)


def test_zero_inode_is_free() -> None:
    assert F.Inode.unpack(bytes(256), SEED, 5).is_free


@given(lg=u32, ln=u32, ph=b48, fl=u16)
def test_extent_round_trip(lg: int, ln: int, ph: int, fl: int) -> None:
    e = F.Extent(lg, ln, ph, fl)
    assert F.Extent.unpack(e.pack()) == e
    ix = F.ExtentIndex(lg, ph)
    assert F.ExtentIndex.unpack(ix.pack()) == ix


names = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(
    ents=st.lists(st.tuples(st.integers(256, 2**63 - 2), u64, st.integers(0, 15), names), max_size=12),
    bno=b48, owner=u64, gen=u32,
)
def test_dir_leaf_round_trip(ents: list[tuple[int, int, int, bytes]], bno: int, owner: int, gen: int) -> None:
    uniq = sorted({k: (k, i, t, n) for k, i, t, n in ents}.values())
    node = F.DirNode(level=0, entries=[F.DirEntry(*e) for e in uniq])
    if node.used() > F.dir_node_capacity(4096):
        return
    buf = bytearray(4096)
    F.init_block(buf, F.BlockType.DIR_NODE, bno, owner, gen)
    node.pack_into(buf)
    F.seal_block(buf, SEED)
    F.verify_block(buf, SEED, bno, F.BlockType.DIR_NODE, owner, gen)
    assert F.DirNode.unpack(buf, "t") == node
    with pytest.raises(Corrupt, match="misdirected"):
        F.verify_block(buf, SEED, bno + 1, F.BlockType.DIR_NODE)
    with pytest.raises(Corrupt, match="stale"):
        F.verify_block(buf, SEED, bno, F.BlockType.DIR_NODE, owner, gen + 1)
    buf[100] ^= 1
    with pytest.raises(Corrupt, match="checksum"):
        F.verify_block(buf, SEED, bno, F.BlockType.DIR_NODE)


@given(idx=st.lists(st.tuples(u64, u32), min_size=1, max_size=50, unique_by=lambda t: t[0]))
def test_dir_interior_round_trip(idx: list[tuple[int, int]]) -> None:
    node = F.DirNode(level=2, index=[F.DirIndex(k, c) for k, c in sorted(idx)])
    buf = bytearray(1024)
    F.init_block(buf, F.BlockType.DIR_NODE, 9)
    node.pack_into(buf)
    assert F.DirNode.unpack(buf, "t") == node


@given(items=st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=300), max_size=8))
def test_xattr_round_trip(items: dict[bytes, bytes]) -> None:
    assert F.unpack_xattrs(F.pack_xattrs(items), "t") == items


def test_journal_superblock_round_trip() -> None:
    buf = bytearray(4096)
    j = F.JournalSuperblock(first=10, blocks=256, sequence=7, head=3, flags=1)
    F.init_block(buf, F.BlockType.JOURNAL_SUPER, 10)
    j.pack_into(buf)
    assert F.JournalSuperblock.unpack(buf) == j


def test_siphash_reference_vector() -> None:
    assert F.siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5
    assert F.siphash24(bytes(range(16)), b"") == 0x726FDB47DD0E0E31


@given(st.binary(min_size=16, max_size=16), st.binary(max_size=300))
def test_siphash_kernel_matches_reference(key: bytes, data: bytes) -> None:
    from sovfs._siphash import siphash24_fast

    assert siphash24_fast(key, data) == F.siphash24(key, data)


@given(name=names, seed=st.binary(min_size=16, max_size=16))
def test_name_hash_range(name: bytes, seed: bytes) -> None:
    k = F.name_hash_base(seed, name)
    assert 256 <= k <= 2**63 - 256
    assert k % 256 == 0


def test_plan_geometry_rules() -> None:
    g = F.plan_geometry(64 << 20, 4096, 4096, 256)
    assert g.block_bitmap_start == 1
    assert g.data_start == g.journal_start + 256
    g1 = F.plan_geometry(1 << 20, 1024, 16, 32)
    assert g1.block_bitmap_start == 2
    assert g1.sb_block == 1
    with pytest.raises(InvalidArgument):
        F.plan_geometry(1 << 20, 3000, 16, 32)
    with pytest.raises(NoSpace, match="too small"):
        F.plan_geometry(64 << 10, 4096, 16, 32)
