"""Formatting a block device with a fresh SovFS (the logic behind ``mkfs.sovfs``).

Theory of operation
-------------------
:func:`make_filesystem` computes the §2.5 geometry for the device, builds every initial metadata block in
memory (superblock and its backup, both bitmaps, the first inode-table block with the root directory and
``lost+found``, their empty directory root nodes, the journal superblock), zeroes the rest of the inode
table and journal with ``write_zeroes``, writes everything with one ``pwritev`` and flushes.  It uses only
``sovfs.format``, so the image it writes is exactly what FORMAT.md describes.

:func:`probe_signatures` recognises existing filesystems and partition tables so that the command line can
refuse to overwrite them without ``-F``.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass

from sovfs.blockdev import BlockDevice, Buffer
from sovfs.errors import InvalidArgument
from sovfs.format import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_BYTES_PER_INODE,
    INODE_SIZE,
    LABEL_MAX,
    LOST_FOUND_INO,
    MIN_INODES,
    ROOT_INO,
    S_IFDIR,
    SB_MAGIC,
    SB_OFFSET,
    BlockType,
    DirEntry,
    DirNode,
    Extent,
    Geometry,
    Inode,
    JournalSuperblock,
    Superblock,
    bits_per_bitmap_block,
    default_journal_blocks,
    dirent_type,
    init_block,
    name_hash_base,
    plan_geometry,
    seal_block,
    uuid_seed,
)

__all__ = ["MkfsParams", "make_filesystem", "plan_for_device", "probe_signatures"]


@dataclass
class MkfsParams:
    block_size: int = DEFAULT_BLOCK_SIZE
    inode_count: int | None = None  # -N
    bytes_per_inode: int = DEFAULT_BYTES_PER_INODE  # -i
    label: bytes = b""
    uuid: bytes | None = None
    hash_seed: bytes | None = None
    journal_bytes: int | None = None  # -J
    now_ns: int | None = None
    root_uid: int = 0
    root_gid: int = 0


def plan_for_device(size: int, p: MkfsParams) -> Geometry:
    """Turn mkfs parameters into a §2.5 geometry. Raises InvalidArgument / NoSpace with a clear message."""
    if len(p.label) > LABEL_MAX:
        raise InvalidArgument(f"label is {len(p.label)} bytes, at most {LABEL_MAX} allowed")
    if p.uuid is not None and len(p.uuid) != 16:
        raise InvalidArgument("UUID must be 16 bytes")
    if p.inode_count is not None:
        inodes = p.inode_count
    else:
        if p.bytes_per_inode < 1024 or p.bytes_per_inode > 1 << 26:
            raise InvalidArgument(f"bytes-per-inode {p.bytes_per_inode} not in [1024, 67108864]")
        inodes = max(size // p.bytes_per_inode, MIN_INODES)
    if p.block_size & (p.block_size - 1) or not 1024 <= p.block_size <= 65536:
        raise InvalidArgument(f"block size {p.block_size} is not a power of two in [1024, 65536]")
    if p.journal_bytes is None:
        jblocks = default_journal_blocks(size, p.block_size)
    else:
        jblocks = p.journal_bytes // p.block_size
    return plan_geometry(size, p.block_size, inodes, jblocks)


def set_bit_range(bits: bytearray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of a little-endian bit array (bit i is bit i%8 of byte i//8)."""
    if hi <= lo:
        return
    while lo < hi and lo % 8:
        bits[lo // 8] |= 1 << (lo % 8)
        lo += 1
    full = (hi - lo) // 8
    bits[lo // 8 : lo // 8 + full] = b"\xff" * full
    lo += full * 8
    while lo < hi:
        bits[lo // 8] |= 1 << (lo % 8)
        lo += 1


def _bitmap_blocks(
    start: int, nblocks: int, nbits: int, used: list[tuple[int, int]], btype: BlockType, bs: int, seed: int
) -> list[tuple[int, Buffer]]:
    """Bitmap blocks with the ``used`` ranges set and the padding bits past ``nbits`` set (§2.6)."""
    bpb = bits_per_bitmap_block(bs)
    out: list[tuple[int, Buffer]] = []
    for i in range(nblocks):
        buf = bytearray(bs)
        init_block(buf, btype, start + i)
        lo = i * bpb
        bits = bytearray(bpb // 8)
        for a, b in [*used, (nbits, nblocks * bpb)]:
            set_bit_range(bits, max(a - lo, 0), min(b - lo, bpb))
        buf[32:] = bits
        seal_block(buf, seed)
        out.append((start + i, buf))
    return out


def make_filesystem(dev: BlockDevice, params: MkfsParams | None = None) -> Superblock:
    """Write a fresh, empty SovFS to ``dev`` and flush it.

    Raises:
        InvalidArgument: bad parameters (block size, label, UUID, counts).
        NoSpace: the device is too small for the requested layout.
        ReadOnly: (from the device) if it is read-only.
    """
    p = params or MkfsParams()
    g = plan_for_device(dev.size, p)
    bs = g.block_size
    uuid = p.uuid if p.uuid is not None else os.urandom(16)
    hseed = p.hash_seed if p.hash_seed is not None else os.urandom(16)
    seed = uuid_seed(uuid)
    now = p.now_ns if p.now_ns is not None else time.time_ns()
    root_blk, lf_blk = g.data_start, g.data_start + 1

    # Block bitmap: everything before data_start, the two directory blocks, the backup superblock.
    writes = _bitmap_blocks(
        g.block_bitmap_start, g.block_bitmap_blocks, g.block_count,
        [(0, g.data_start + 2), (g.backup_sb_block, g.backup_sb_block + 1)], BlockType.BLOCK_BITMAP, bs, seed,
    )
    writes += _bitmap_blocks(
        g.inode_bitmap_start, g.inode_bitmap_blocks, g.inode_count, [(0, LOST_FOUND_INO + 1)],
        BlockType.INODE_BITMAP, bs, seed,
    )

    # Directories: root holds "lost+found"; both have one leaf root node at logical block 0.
    def dir_block(bno: int, ino: int, entries: list[DirEntry]) -> bytearray:
        buf = bytearray(bs)
        init_block(buf, BlockType.DIR_NODE, bno, owner=ino, generation=1)
        DirNode(level=0, entries=entries).pack_into(buf)
        seal_block(buf, seed)
        return buf

    lf_name = b"lost+found"
    writes.append((root_blk, dir_block(root_blk, ROOT_INO, [
        DirEntry(name_hash_base(hseed, lf_name), LOST_FOUND_INO, dirent_type(S_IFDIR), lf_name),
    ])))
    writes.append((lf_blk, dir_block(lf_blk, LOST_FOUND_INO, [])))

    def dir_inode(mode: int, nlink: int, parent: int, blk: int) -> Inode:
        area = Extent(0, 1, blk).pack() + bytes(48)
        return Inode(
            mode=S_IFDIR | mode, uid=p.root_uid, gid=p.root_gid, nlink=nlink, size=bs, blocks=1,
            atime_ns=now, mtime_ns=now, ctime_ns=now, crtime_ns=now, generation=1, parent=parent,
            ext_depth=0, ext_count=1, area=area,
        )

    itab = bytearray(bs)
    for ino, inode in (
        (ROOT_INO, dir_inode(0o755, 3, ROOT_INO, root_blk)),
        (LOST_FOUND_INO, dir_inode(0o700, 2, ROOT_INO, lf_blk)),
    ):
        off = ino * INODE_SIZE
        itab[off : off + INODE_SIZE] = inode.pack(seed, ino)
    writes.append((g.inode_table_start, itab))

    jbuf = bytearray(bs)
    init_block(jbuf, BlockType.JOURNAL_SUPER, g.journal_start)
    JournalSuperblock(first=g.journal_start, blocks=g.journal_blocks).pack_into(jbuf)
    seal_block(jbuf, seed)
    writes.append((g.journal_start, jbuf))

    sb = Superblock(
        block_size_log2=bs.bit_length() - 1, block_count=g.block_count, inode_count=g.inode_count,
        free_blocks=g.block_count - g.data_start - 3, free_inodes=g.inode_count - 3,
        block_bitmap_start=g.block_bitmap_start, block_bitmap_blocks=g.block_bitmap_blocks,
        inode_bitmap_start=g.inode_bitmap_start, inode_bitmap_blocks=g.inode_bitmap_blocks,
        inode_table_start=g.inode_table_start, inode_table_blocks=g.inode_table_blocks,
        journal_start=g.journal_start, journal_blocks=g.journal_blocks, data_start=g.data_start,
        backup_sb_block=g.backup_sb_block, uuid=uuid, hash_seed=hseed, label=p.label,
        mkfs_time_ns=now, write_time_ns=now, lastcheck_time_ns=now,
    )
    primary = sb.pack()
    sb.copy = 1
    backup = sb.pack()
    sb.copy = 0
    # Block 0 (or block 1 at 1 KiB blocks) holds the primary superblock after the untouched boot area.
    sb_tail = bytes(max(bs - 2 * SB_OFFSET, 0)) if bs > SB_OFFSET else b""
    zero_ranges = [
        (g.inode_table_start + 1, g.inode_table_blocks - 1),
        (g.journal_start + 1, g.journal_blocks - 1),
    ]
    for start, count in zero_ranges:
        if count > 0:
            dev.write_zeroes(start * bs, count * bs)
    reqs: list[tuple[int, Buffer]] = [(SB_OFFSET, primary + sb_tail)]
    reqs += [(bno * bs, data) for bno, data in writes]
    reqs.append((g.backup_sb_block * bs, backup + bytes(bs - len(backup))))
    dev.pwritev(reqs)
    dev.flush()
    return sb


# --------------------------------------------------------------------------------------------------
# Signature probing
# --------------------------------------------------------------------------------------------------

_PROBES: list[tuple[int, bytes, str]] = [
    (SB_OFFSET, SB_MAGIC, "SovFS"),
    (1080, struct.pack("<H", 0xEF53), "ext2/ext3/ext4"),
    (0, b"XFSB", "XFS"),
    (65536 + 64, b"_BHRfS_M", "btrfs"),
    (512, b"EFI PART", "GPT partition table"),
    (4096 - 10, b"SWAPSPACE2", "Linux swap"),
    (4096 - 10, b"SWAP-SPACE", "Linux swap"),
    (32769, b"CD001", "ISO 9660"),
    (3, b"NTFS    ", "NTFS"),
    (54, b"FAT12   ", "FAT12"),
    (54, b"FAT16   ", "FAT16"),
    (82, b"FAT32   ", "FAT32"),
    (0, b"hsqs", "squashfs"),
    (1024, b"\x10\x20\xf5\xf2", "f2fs"),
]


def probe_signatures(dev: BlockDevice) -> list[str]:
    """Names of the filesystems / partition tables whose signatures appear on ``dev`` (may be empty)."""
    length = min(dev.size, 65536 + 4096) // 512 * 512
    if length == 0:
        return []
    head = dev.pread(0, length)
    found: list[str] = []
    for off, magic, name in _PROBES:
        if head[off : off + len(magic)] == magic and name not in found:
            found.append(name)
    if head[510:512] == b"\x55\xaa" and not any(n.startswith(("FAT", "NTFS", "GPT")) for n in found):
        found.append("DOS/MBR boot sector")
    return found
