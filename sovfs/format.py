"""SovFS on-disk format: the one module that defines every on-disk structure.

Theory of operation
-------------------
``docs/FORMAT.md`` is normative; this module is its executable twin and cites its sections (``§n``).
mkfs, fsck, the filesystem core and the dump tool import the structures from here and nowhere else.
Every structure is a frozen-ish dataclass with ``pack() -> bytes`` and ``unpack(buf) -> Self``; all
integers are little-endian.  ``tests/sovfs/test_format.py`` checks sizes and offsets against the
constants stated in the document.

Invariants
  * ``unpack(pack(x)) == x`` for every structure (hypothesis round trips).
  * ``unpack`` never trusts disk data: a bad magic, checksum, length or count raises
    :class:`sovfs.errors.Corrupt` naming the block or inode, never an ``AssertionError``.
  * Checksums (§3) are computed only by :func:`seal_block` / :meth:`Inode.pack` / :meth:`Superblock.pack`
    and verified only by :func:`verify_block` / :meth:`Inode.unpack` / :meth:`Superblock.unpack`.

Who may call it: anyone.  It performs no I/O and holds no state.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
from dataclasses import dataclass, field
from typing import NamedTuple, NewType

import crc32c as _crc32c

from sovfs._siphash import siphash24_fast
from sovfs.errors import Corrupt, InvalidArgument, NoSpace

BlockNo = NewType("BlockNo", int)
InodeNo = NewType("InodeNo", int)

# --------------------------------------------------------------------------------------------------
# §1 Geometry constants
# --------------------------------------------------------------------------------------------------
SECTOR_SIZE = 512
MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 65536
DEFAULT_BLOCK_SIZE = 4096
BOOT_AREA_SIZE = 1024  # bytes 0..1023 of the device are never written by SovFS
SB_OFFSET = 1024  # primary superblock byte offset
SB_SIZE = 1024
INODE_SIZE = 256
ROOT_INO = InodeNo(1)
LOST_FOUND_INO = InodeNo(2)
FIRST_FREE_INO = 3  # first inode number a fresh allocation may return
MIN_INODES = 16
MAX_INODES = 2**32 - 1
MAX_BLOCKS = 2**48  # physical block numbers are 48 bits (§5.3)
MAX_LOGICAL_BLOCKS = 2**32  # logical block numbers are 32 bits (§5.3)
MAX_NAME_LEN = 255
MAX_SYMLINK_LEN = 4095
INLINE_SYMLINK_MAX = 64  # targets up to this many bytes live in the inode (§4.3)
DEFAULT_BYTES_PER_INODE = 16384
JOURNAL_MIN_BLOCKS = 32
JOURNAL_DEFAULT_MIN_BYTES = 1 << 20
JOURNAL_DEFAULT_MAX_BYTES = 64 << 20
MIN_DATA_BLOCKS = 8

SB_MAGIC = b"SovFS\x00\r\n"
VERSION_MAJOR = 1
VERSION_MINOR = 0

# §2.3 feature flags
COMPAT_HAS_JOURNAL = 0x0001
INCOMPAT_RECOVER = 0x0001  # journal holds committed transactions not yet replayed
COMPAT_SUPPORTED = COMPAT_HAS_JOURNAL
RO_COMPAT_SUPPORTED = 0
INCOMPAT_SUPPORTED = INCOMPAT_RECOVER

# §2.4 state bits and error behaviour
STATE_CLEAN = 0x0001
STATE_ERRORS = 0x0002
ERRORS_CONTINUE = 1
ERRORS_RO = 2
ERRORS_PANIC = 3


class BlockType(enum.IntEnum):
    """§3.1 ``type`` field of the common metadata block header."""

    BLOCK_BITMAP = 1
    INODE_BITMAP = 2
    EXTENT_NODE = 3
    DIR_NODE = 4
    XATTR = 5
    JOURNAL_SUPER = 6
    JOURNAL_DESC = 7
    JOURNAL_COMMIT = 8


# --------------------------------------------------------------------------------------------------
# §3 Checksums
# --------------------------------------------------------------------------------------------------


def crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """CRC-32C (Castagnoli), continuing from ``seed`` (§3.0).

    ``crc32c(a + b) == crc32c(b, crc32c(a))``; ``crc32c(b"123456789") == 0xE3069283``.
    """
    return int(_crc32c.crc32c(data, seed))


def uuid_seed(uuid: bytes) -> int:
    """§3.0: the filesystem seed, ``crc32c(uuid)`` over the 16 UUID bytes."""
    return crc32c(uuid)


_ZERO4 = b"\0\0\0\0"

# --------------------------------------------------------------------------------------------------
# §3.1 Common metadata block header (32 bytes)
# --------------------------------------------------------------------------------------------------
BLOCK_MAGIC = 0x42564F53  # bytes "SOVB"
HEADER = struct.Struct("<IHHIIQQ")
HEADER_SIZE = 32
HDR_OFF_MAGIC = 0
HDR_OFF_TYPE = 4
HDR_OFF_FLAGS = 6
HDR_OFF_CSUM = 8
HDR_OFF_GEN = 12
HDR_OFF_BLOCKNR = 16
HDR_OFF_OWNER = 24
assert HEADER.size == HEADER_SIZE  # layout constant, not disk data


@dataclass
class BlockHeader:
    type: int
    blocknr: int
    owner: int = 0
    generation: int = 0
    flags: int = 0
    checksum: int = 0

    def pack_into(self, buf: bytearray) -> None:
        HEADER.pack_into(
            buf, 0, BLOCK_MAGIC, self.type, self.flags, self.checksum, self.generation, self.blocknr,
            self.owner,
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> BlockHeader:
        magic, btype, flags, csum, gen, blocknr, owner = HEADER.unpack_from(buf, 0)
        if magic != BLOCK_MAGIC:
            raise Corrupt(f"bad metadata block magic {magic:#010x}")
        return cls(type=btype, blocknr=blocknr, owner=owner, generation=gen, flags=flags, checksum=csum)


def block_checksum(buf: bytes | bytearray | memoryview, seed: int) -> int:
    """§3.1: crc32c of the whole block with the checksum field taken as zero, seeded with the UUID seed."""
    mv = memoryview(buf)
    c = crc32c(mv[:HDR_OFF_CSUM], seed)
    c = crc32c(_ZERO4, c)
    return crc32c(mv[HDR_OFF_CSUM + 4 :], c)


def init_block(buf: bytearray, btype: BlockType, blocknr: int, owner: int = 0, generation: int = 0) -> None:
    """Zero ``buf`` and write a fresh header (checksum filled in later by :func:`seal_block`)."""
    buf[:] = bytes(len(buf))
    BlockHeader(type=btype, blocknr=blocknr, owner=owner, generation=generation).pack_into(buf)


def seal_block(buf: bytearray, seed: int) -> None:
    """Compute and store the header checksum of a metadata block in place (§3.1)."""
    struct.pack_into("<I", buf, HDR_OFF_CSUM, block_checksum(buf, seed))


def verify_block(
    buf: bytes | bytearray | memoryview,
    seed: int,
    blocknr: int,
    btype: BlockType,
    owner: int | None = None,
    generation: int | None = None,
) -> BlockHeader:
    """Check a metadata block read from ``blocknr`` (§3.1 reader rules); raise Corrupt on any mismatch."""
    try:
        hdr = BlockHeader.unpack(buf)
    except Corrupt as e:
        raise Corrupt(f"block {blocknr}: {e}") from None
    if block_checksum(buf, seed) != hdr.checksum:
        raise Corrupt(f"block {blocknr}: checksum mismatch ({btype.name})")
    if hdr.blocknr != blocknr:
        raise Corrupt(f"block {blocknr}: misdirected, header says block {hdr.blocknr}")
    if hdr.type != btype:
        raise Corrupt(f"block {blocknr}: expected {btype.name}, found type {hdr.type}")
    if owner is not None and hdr.owner != owner:
        raise Corrupt(f"block {blocknr}: owned by inode {hdr.owner}, expected {owner}")
    if generation is not None and hdr.generation != generation:
        raise Corrupt(f"block {blocknr}: stale (generation {hdr.generation}, inode has {generation})")
    return hdr


# --------------------------------------------------------------------------------------------------
# §2 Superblock (1024 bytes at byte offset 1024; backup at the start of the last block)
# --------------------------------------------------------------------------------------------------
SUPERBLOCK = struct.Struct("<8sHHIIIII" + "Q" * 17 + "16s16s64s" + "qqqq" + "II" + "HHHH" + "Q")
SB_OFF_CSUM = 1020
LABEL_MAX = 64


@dataclass
class Superblock:
    block_size_log2: int
    block_count: int
    inode_count: int
    free_blocks: int
    free_inodes: int
    block_bitmap_start: int
    block_bitmap_blocks: int
    inode_bitmap_start: int
    inode_bitmap_blocks: int
    inode_table_start: int
    inode_table_blocks: int
    journal_start: int
    journal_blocks: int
    data_start: int
    backup_sb_block: int
    uuid: bytes
    hash_seed: bytes
    label: bytes = b""
    root_ino: int = ROOT_INO
    lost_found_ino: int = LOST_FOUND_INO
    orphan_head: int = 0
    mkfs_time_ns: int = 0
    mount_time_ns: int = 0
    write_time_ns: int = 0
    lastcheck_time_ns: int = 0
    mount_count: int = 0
    max_mount_count: int = 0
    state: int = STATE_CLEAN
    errors: int = ERRORS_RO
    copy: int = 0
    sequence: int = 0
    compat: int = COMPAT_HAS_JOURNAL
    ro_compat: int = 0
    incompat: int = 0
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR
    inode_size: int = INODE_SIZE

    @property
    def block_size(self) -> int:
        return 1 << self.block_size_log2

    def pack(self) -> bytes:
        body = SUPERBLOCK.pack(
            SB_MAGIC, self.version_major, self.version_minor, self.block_size_log2, self.inode_size,
            self.compat, self.ro_compat, self.incompat,
            self.block_count, self.inode_count, self.free_blocks, self.free_inodes,
            self.block_bitmap_start, self.block_bitmap_blocks, self.inode_bitmap_start,
            self.inode_bitmap_blocks, self.inode_table_start, self.inode_table_blocks,
            self.journal_start, self.journal_blocks, self.data_start, self.backup_sb_block,
            self.root_ino, self.lost_found_ino, self.orphan_head,
            self.uuid, self.hash_seed, self.label,
            self.mkfs_time_ns, self.mount_time_ns, self.write_time_ns, self.lastcheck_time_ns,
            self.mount_count, self.max_mount_count,
            self.state, self.errors, self.copy, 0,
            self.sequence,
        )
        raw = body + bytes(SB_OFF_CSUM - len(body))
        return raw + struct.pack("<I", crc32c(raw))

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, where: str = "superblock") -> Superblock:
        """Decode and validate a superblock (§2.2 reader rules). Raises Corrupt."""
        raw = bytes(buf[:SB_SIZE])
        if len(raw) < SB_SIZE or raw[:8] != SB_MAGIC:
            raise Corrupt(f"{where}: no SovFS magic")
        (csum,) = struct.unpack_from("<I", raw, SB_OFF_CSUM)
        if crc32c(raw[:SB_OFF_CSUM]) != csum:
            raise Corrupt(f"{where}: checksum mismatch")
        v = SUPERBLOCK.unpack_from(raw, 0)
        sb = cls(
            version_major=v[1], version_minor=v[2], block_size_log2=v[3], inode_size=v[4],
            compat=v[5], ro_compat=v[6], incompat=v[7],
            block_count=v[8], inode_count=v[9], free_blocks=v[10], free_inodes=v[11],
            block_bitmap_start=v[12], block_bitmap_blocks=v[13], inode_bitmap_start=v[14],
            inode_bitmap_blocks=v[15], inode_table_start=v[16], inode_table_blocks=v[17],
            journal_start=v[18], journal_blocks=v[19], data_start=v[20], backup_sb_block=v[21],
            root_ino=v[22], lost_found_ino=v[23], orphan_head=v[24],
            uuid=v[25], hash_seed=v[26], label=v[27].rstrip(b"\0"),
            mkfs_time_ns=v[28], mount_time_ns=v[29], write_time_ns=v[30], lastcheck_time_ns=v[31],
            mount_count=v[32], max_mount_count=v[33],
            state=v[34], errors=v[35], copy=v[36], sequence=v[38],
        )
        if sb.version_major != VERSION_MAJOR:
            raise Corrupt(f"{where}: unsupported major version {sb.version_major}")
        if not 10 <= sb.block_size_log2 <= 16:
            raise Corrupt(f"{where}: block size 2**{sb.block_size_log2} out of range")
        if sb.inode_size != INODE_SIZE:
            raise Corrupt(f"{where}: inode size {sb.inode_size} unsupported")
        sb.check_geometry(where)
        return sb

    def check_geometry(self, where: str = "superblock") -> None:
        """§2.2: the regions must be in order, inside the device, and sized for the counts."""
        try:
            g = plan_geometry(
                self.block_count * self.block_size, self.block_size, self.inode_count, self.journal_blocks,
            )
        except (InvalidArgument, NoSpace) as e:
            raise Corrupt(f"{where}: impossible geometry: {e}") from None
        mine = (
            self.block_bitmap_start, self.block_bitmap_blocks, self.inode_bitmap_start,
            self.inode_bitmap_blocks, self.inode_table_start, self.inode_table_blocks, self.journal_start,
            self.data_start, self.backup_sb_block, self.inode_count,
        )
        want = (
            g.block_bitmap_start, g.block_bitmap_blocks, g.inode_bitmap_start, g.inode_bitmap_blocks,
            g.inode_table_start, g.inode_table_blocks, g.journal_start, g.data_start, g.backup_sb_block,
            g.inode_count,
        )
        if mine != want:
            raise Corrupt(f"{where}: region layout does not follow §2.5 ({mine} != {want})")

    def features_check(self, *, writable: bool) -> str | None:
        """§2.3 mount rules. Returns None if mountable as asked, else the reason."""
        if self.incompat & ~INCOMPAT_SUPPORTED:
            return f"unknown incompatible features {self.incompat & ~INCOMPAT_SUPPORTED:#x}"
        if writable and self.ro_compat & ~RO_COMPAT_SUPPORTED:
            return f"unknown read-only-compatible features {self.ro_compat & ~RO_COMPAT_SUPPORTED:#x}"
        return None


# --------------------------------------------------------------------------------------------------
# §2.5 Layout planning (normative: fsck recomputes it and compares)
# --------------------------------------------------------------------------------------------------


def bits_per_bitmap_block(block_size: int) -> int:
    return (block_size - HEADER_SIZE) * 8


def default_journal_blocks(total_bytes: int, block_size: int) -> int:
    """§2.5: size/64 clamped to [1 MiB, 64 MiB], then to at most a quarter of the image."""
    jbytes = min(max(total_bytes // 64, JOURNAL_DEFAULT_MIN_BYTES), JOURNAL_DEFAULT_MAX_BYTES)
    jbytes = min(jbytes, total_bytes // 4)
    return max(jbytes // block_size, JOURNAL_MIN_BLOCKS)


@dataclass(frozen=True)
class Geometry:
    block_size: int
    block_count: int
    inode_count: int
    block_bitmap_start: int
    block_bitmap_blocks: int
    inode_bitmap_start: int
    inode_bitmap_blocks: int
    inode_table_start: int
    inode_table_blocks: int
    journal_start: int
    journal_blocks: int
    data_start: int
    backup_sb_block: int

    @property
    def sb_block(self) -> int:
        return SB_OFFSET // self.block_size

    @property
    def data_blocks(self) -> int:
        return self.backup_sb_block - self.data_start


def plan_geometry(total_bytes: int, block_size: int, inode_count: int, journal_blocks: int) -> Geometry:
    """Lay out the regions of §2.5 for a device of ``total_bytes``.

    Raises:
        InvalidArgument: block size not a power of two in [1024, 65536], or counts out of range.
        NoSpace: the image is too small for the requested regions plus MIN_DATA_BLOCKS data blocks.
    """
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidArgument(f"block size {block_size} is not a power of two in [1024, 65536]")
    n = total_bytes // block_size
    if n >= MAX_BLOCKS:
        raise InvalidArgument(f"{n} blocks exceed the 48-bit block number limit")
    if not MIN_INODES <= inode_count <= MAX_INODES:
        raise InvalidArgument(f"inode count {inode_count} not in [{MIN_INODES}, {MAX_INODES}]")
    if journal_blocks < JOURNAL_MIN_BLOCKS:
        raise InvalidArgument(f"journal of {journal_blocks} blocks is below the minimum {JOURNAL_MIN_BLOCKS}")
    bpb = bits_per_bitmap_block(block_size)
    per_block = block_size // INODE_SIZE
    itable = -(-inode_count // per_block)
    inode_count = min(itable * per_block, MAX_INODES)
    first = SB_OFFSET // block_size + 1
    bb_blocks = max(-(-n // bpb), 1)
    ib_blocks = -(-inode_count // bpb)
    ib_start = first + bb_blocks
    it_start = ib_start + ib_blocks
    j_start = it_start + itable
    data_start = j_start + journal_blocks
    backup = n - 1
    if backup - data_start < MIN_DATA_BLOCKS:
        need = (data_start + MIN_DATA_BLOCKS + 1) * block_size
        raise NoSpace(
            f"image too small: {total_bytes} bytes hold {n} blocks of {block_size}, need at least {need} "
            f"bytes for {inode_count} inodes and a {journal_blocks}-block journal"
        )
    return Geometry(
        block_size=block_size, block_count=n, inode_count=inode_count, block_bitmap_start=first,
        block_bitmap_blocks=bb_blocks, inode_bitmap_start=ib_start, inode_bitmap_blocks=ib_blocks,
        inode_table_start=it_start, inode_table_blocks=itable, journal_start=j_start,
        journal_blocks=journal_blocks, data_start=data_start, backup_sb_block=backup,
    )


# --------------------------------------------------------------------------------------------------
# §4 Inodes (256 bytes each, in the inode table; inode i at byte (i * 256) of the table)
# --------------------------------------------------------------------------------------------------
S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000
VALID_FORMATS = frozenset({S_IFSOCK, S_IFLNK, S_IFREG, S_IFBLK, S_IFDIR, S_IFCHR, S_IFIFO})

# §4.2 inode flags
IFLAG_INLINE_DATA = 0x0001  # the 64-byte area holds data (symlink target), not extents
IFLAG_IMMUTABLE = 0x0010
IFLAG_APPEND = 0x0020
IFLAG_NODUMP = 0x0040
IFLAG_NOATIME = 0x0080
IFLAGS_KNOWN = IFLAG_INLINE_DATA | IFLAG_IMMUTABLE | IFLAG_APPEND | IFLAG_NODUMP | IFLAG_NOATIME

INODE = struct.Struct("<HHIIIQQqqqqIIQQQHHI64s84sI")
INODE_OFF_EXTENTS = 104
INODE_AREA_SIZE = 64
INODE_OFF_XATTR = 168
INODE_XATTR_SIZE = 84
INODE_OFF_CSUM = 252
INLINE_EXTENTS = INODE_AREA_SIZE // 16
assert INODE.size == INODE_SIZE  # layout constant, not disk data


def inode_seed(seed: int, ino: int, generation: int) -> int:
    """§3.2: per-inode checksum seed = crc32c(le64(ino) || le32(generation), uuid seed)."""
    return crc32c(struct.pack("<QI", ino, generation), seed)


@dataclass(slots=True)
class Inode:
    """An on-disk inode (§4.1). ``area`` is the 64-byte extent root or inline data."""

    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    size: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    crtime_ns: int = 0
    flags: int = 0
    generation: int = 0
    rdev: int = 0
    parent: int = 0
    xattr_block: int = 0
    ext_depth: int = 0
    ext_count: int = 0
    area: bytes = bytes(INODE_AREA_SIZE)
    inline_xattr: bytes = b""

    @property
    def is_free(self) -> bool:
        return self.mode == 0

    @property
    def fmt(self) -> int:
        return self.mode & S_IFMT

    def pack(self, seed: int, ino: int) -> bytes:
        raw = INODE.pack(
            self.mode, len(self.inline_xattr), self.uid, self.gid, self.nlink, self.size, self.blocks,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.crtime_ns, self.flags, self.generation,
            self.rdev, self.parent, self.xattr_block, self.ext_depth, self.ext_count, 0,
            self.area, self.inline_xattr, 0,
        )
        csum = crc32c(raw[:INODE_OFF_CSUM], inode_seed(seed, ino, self.generation))
        return raw[:INODE_OFF_CSUM] + struct.pack("<I", csum)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, seed: int, ino: int) -> Inode:
        """Decode inode ``ino`` (§4.1 reader rules). An all-zero slot is a never-used free inode."""
        raw = bytes(buf[:INODE_SIZE])
        if raw == bytes(INODE_SIZE):
            return cls()
        v = INODE.unpack(raw)
        gen = v[12]
        if crc32c(raw[:INODE_OFF_CSUM], inode_seed(seed, ino, gen)) != v[21]:
            raise Corrupt(f"inode {ino}: checksum mismatch")
        xlen = v[1]
        if xlen > INODE_XATTR_SIZE:
            raise Corrupt(f"inode {ino}: inline xattr length {xlen} > {INODE_XATTR_SIZE}")
        ino_obj = cls(
            mode=v[0], uid=v[2], gid=v[3], nlink=v[4], size=v[5], blocks=v[6], atime_ns=v[7],
            mtime_ns=v[8], ctime_ns=v[9], crtime_ns=v[10], flags=v[11], generation=gen, rdev=v[13],
            parent=v[14], xattr_block=v[15], ext_depth=v[16], ext_count=v[17], area=v[19],
            inline_xattr=v[20][:xlen],
        )
        if ino_obj.mode and ino_obj.fmt not in VALID_FORMATS:
            raise Corrupt(f"inode {ino}: invalid file type in mode {ino_obj.mode:#o}")
        if ino_obj.ext_count > INLINE_EXTENTS:
            raise Corrupt(f"inode {ino}: {ino_obj.ext_count} inline extents > {INLINE_EXTENTS}")
        return ino_obj


def dirent_type(mode: int) -> int:
    """§6.3: the directory-entry file type is the top four mode bits (the DT_* values)."""
    return (mode & S_IFMT) >> 12


# --------------------------------------------------------------------------------------------------
# §5 Extents
# --------------------------------------------------------------------------------------------------
EXTENT = struct.Struct("<IIIHH")
EXTENT_SIZE = 16
EXT_UNWRITTEN = 0x0001
EXTENT_NODE_HDR = struct.Struct("<HHHHQ")
EXTENT_NODE_OFF = 48  # first entry of an extent tree block
MAX_EXTENT_LEN = 2**32 - 1
assert EXTENT.size == EXTENT_SIZE
assert EXTENT_NODE_HDR.size == 16


@dataclass(frozen=True)
class Extent:
    """A leaf extent: ``length`` logical blocks from ``logical`` map to physical blocks from ``physical``."""

    logical: int
    length: int
    physical: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.logical + self.length

    def pack(self) -> bytes:
        return EXTENT.pack(
            self.logical, self.length, self.physical & 0xFFFFFFFF, self.physical >> 32, self.flags,
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, off: int = 0) -> Extent:
        lg, ln, plo, phi, fl = EXTENT.unpack_from(buf, off)
        return cls(lg, ln, plo | (phi << 32), fl)


@dataclass(frozen=True)
class ExtentIndex:
    """An index entry: the subtree in block ``child`` maps logical blocks from ``logical`` on."""

    logical: int
    child: int

    def pack(self) -> bytes:
        return EXTENT.pack(self.logical, 0, self.child & 0xFFFFFFFF, self.child >> 32, 0)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, off: int = 0) -> ExtentIndex:
        lg, _, clo, chi, _ = EXTENT.unpack_from(buf, off)
        return cls(lg, clo | (chi << 32))


def extent_node_capacity(block_size: int) -> int:
    return (block_size - EXTENT_NODE_OFF) // EXTENT_SIZE


# --------------------------------------------------------------------------------------------------
# §6 Directories: a B+tree of checksummed nodes stored in the directory's own logical blocks
# --------------------------------------------------------------------------------------------------
DIR_NODE_HDR = struct.Struct("<HHIQ")  # level, count, used bytes, reserved
DIR_NODE_OFF = 48
DIRENT_HDR = struct.Struct("<QQBB")  # key, inode, file type, name length
DIRENT_HDR_SIZE = 18
DIR_INDEX = struct.Struct("<QII")  # key, child logical block, reserved
DIR_INDEX_SIZE = 16
MAX_COLLISIONS = 255  # collision index 0..254 (§6.2)
COOKIE_DOT = 1
COOKIE_DOTDOT = 2
COOKIE_FIRST = 3
assert DIRENT_HDR.size == DIRENT_HDR_SIZE
assert DIR_INDEX.size == DIR_INDEX_SIZE


class DirEntry(NamedTuple):
    """One directory entry (§6.3).  A tuple, not an object with a ``__dict__``: a loaded directory
    holds one per name and a listing reads them all (72 B each instead of 352 B; iterating a
    10,000-entry directory in process: 0.32 -> 0.18 µs per entry)."""

    key: int
    ino: int
    ftype: int
    name: bytes

    @property
    def size(self) -> int:
        return DIRENT_HDR_SIZE + len(self.name)

    @property
    def raw(self) -> bytes:
        """The packed entry.  A leaf keeps its entries' packed bytes (``DirNode.raws``), so this
        runs once per new entry, not on every repack."""
        return DIRENT_HDR.pack(self.key, self.ino, self.ftype, len(self.name)) + self.name

    def pack(self) -> bytes:
        return self.raw


@dataclass(frozen=True)
class DirIndex:
    key: int
    child: int

    @functools.cached_property
    def raw(self) -> bytes:
        return DIR_INDEX.pack(self.key, self.child, 0)

    def pack(self) -> bytes:
        return self.raw


@dataclass
class DirNode:
    """A decoded directory node: leaf (level 0, ``entries``) or interior (``index``)."""

    level: int
    entries: list[DirEntry] = field(default_factory=list)
    index: list[DirIndex] = field(default_factory=list)
    #: A leaf's packed entries (``entries[i].raw``), in order, kept beside ``entries`` by the
    #: callers that derive a new leaf from an old one (an insert or removal copies this list and
    #: inserts or deletes one item).  Packing then joins byte strings instead of visiting every
    #: entry object: ~100 entries scattered on the heap cost ~20 µs of cache misses per insert.
    #: None: derived from ``entries`` when first needed, and again if ``entries`` is replaced by
    #: another list.  A leaf's lists are never changed in place once it has been packed (nodes
    #: are shared through the buffer cache): build a new node.
    raws: list[bytes] | None = field(default=None, repr=False, compare=False)
    _raws_of: list[DirEntry] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.raws is not None:
            self._raws_of = self.entries

    def leaf_raws(self) -> list[bytes]:
        """``[e.raw for e in entries]`` of a leaf, computed once per ``entries`` list."""
        raws = self.raws
        if raws is None or self._raws_of is not self.entries or len(raws) != len(self.entries):
            raws = self.raws = [x.raw for x in self.entries]
            self._raws_of = self.entries
        return raws

    def used(self) -> int:
        if self.level == 0:
            return sum(map(len, self.leaf_raws()))
        return DIR_INDEX_SIZE * len(self.index)

    def body(self) -> bytes:
        """The packed entries (or index records), in order."""
        if self.level == 0:
            return b"".join(self.leaf_raws())
        return b"".join([x.raw for x in self.index])

    def pack_into(self, buf: bytearray, body: bytes | None = None) -> None:
        """Write the node (header must already be initialised); ``body`` if the caller has it already.
        Caller checks it fits."""
        items = self.entries if self.level == 0 else self.index
        if body is None:
            body = self.body()
        DIR_NODE_HDR.pack_into(buf, HEADER_SIZE, self.level, len(items), len(body), 0)
        end = DIR_NODE_OFF + len(body)
        buf[DIR_NODE_OFF:end] = body
        buf[end:] = bytes(len(buf) - end)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, where: str) -> DirNode:
        level, count, used, _ = DIR_NODE_HDR.unpack_from(buf, HEADER_SIZE)
        if DIR_NODE_OFF + used > len(buf):
            raise Corrupt(f"{where}: used bytes {used} overflow the block")
        node = cls(level=level)
        if level == 0:
            off, end = DIR_NODE_OFF, DIR_NODE_OFF + used
            prev = -1
            raws: list[bytes] = []
            for _ in range(count):
                if off + DIRENT_HDR_SIZE > end:
                    raise Corrupt(f"{where}: entry header overruns used area")
                key, ino, ftype, nlen = DIRENT_HDR.unpack_from(buf, off)
                raw = bytes(buf[off : off + DIRENT_HDR_SIZE + nlen])
                name = raw[DIRENT_HDR_SIZE:]
                if nlen == 0 or off + DIRENT_HDR_SIZE + nlen > end or b"/" in name or b"\0" in name:
                    raise Corrupt(f"{where}: malformed entry at offset {off}")
                if key <= prev:
                    raise Corrupt(f"{where}: keys out of order at offset {off}")
                prev = key
                node.entries.append(DirEntry(key, ino, ftype, name))
                raws.append(raw)
                off += DIRENT_HDR_SIZE + nlen
            node.raws, node._raws_of = raws, node.entries
            if off != end:
                raise Corrupt(f"{where}: used bytes {used} disagree with {count} entries")
        else:
            if used != count * DIR_INDEX_SIZE or count == 0:
                raise Corrupt(f"{where}: interior node count {count} / used {used} inconsistent")
            prev = -1
            for i in range(count):
                key, child, _ = DIR_INDEX.unpack_from(buf, DIR_NODE_OFF + i * DIR_INDEX_SIZE)
                if key <= prev and i:
                    raise Corrupt(f"{where}: index keys out of order")
                prev = key
                node.index.append(DirIndex(key, child))
        return node


def dir_node_capacity(block_size: int) -> int:
    """Bytes available for entries in one directory node."""
    return block_size - DIR_NODE_OFF


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & 0xFFFFFFFFFFFFFFFF


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 (Aumasson & Bernstein) with a 16-byte key, returning the 64-bit result (§6.2)."""
    m64 = 0xFFFFFFFFFFFFFFFF
    k0: int
    k1: int
    k0, k1 = struct.unpack("<QQ", key)
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    n = len(data)
    tail = n & ~7
    words = list(struct.unpack_from(f"<{n // 8}Q", data)) if n >= 8 else []
    last = int.from_bytes(data[tail:] + bytes(7 - (n - tail)), "little") | ((n & 0xFF) << 56)
    words.append(last)
    for m in words:
        v3 ^= m
        for _ in range(2):
            v0 = (v0 + v1) & m64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & m64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & m64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & m64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(4):
        v0 = (v0 + v1) & m64
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & m64
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & m64
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & m64
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0 ^ v1 ^ v2 ^ v3


def name_hash_base(hash_seed: bytes, name: bytes) -> int:
    """§6.2: the key of collision index 0: ``max(siphash24(seed, name) >> 9, 1) << 8``.

    Computed by the Numba twin of :func:`siphash24` (:mod:`sovfs._siphash`), which every lookup,
    create and unlink calls; :func:`siphash24` stays as the readable definition the tests compare with.
    """
    return max(siphash24_fast(hash_seed, name) >> 9, 1) << 8


# --------------------------------------------------------------------------------------------------
# §7 Extended attributes
# --------------------------------------------------------------------------------------------------
XATTR_ENTRY = struct.Struct("<BBH")  # name length, reserved, value length
XATTR_HDR = struct.Struct("<HHIQ")  # count, reserved, used bytes, reserved
XATTR_OFF = 48
XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
XATTR_SYSTEM_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


def pack_xattrs(items: dict[bytes, bytes]) -> bytes:
    """§7.1: entries sorted by name, no padding."""
    return b"".join(
        XATTR_ENTRY.pack(len(k), 0, len(items[k])) + k + items[k] for k in sorted(items)
    )


def unpack_xattrs(buf: bytes | bytearray | memoryview, where: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    off, n = 0, len(buf)
    while off < n:
        if off + 4 > n:
            raise Corrupt(f"{where}: truncated xattr entry")
        klen, _, vlen = XATTR_ENTRY.unpack_from(buf, off)
        if klen == 0 or off + 4 + klen + vlen > n:
            raise Corrupt(f"{where}: malformed xattr entry at {off}")
        k = bytes(buf[off + 4 : off + 4 + klen])
        out[k] = bytes(buf[off + 4 + klen : off + 4 + klen + vlen])
        off += 4 + klen + vlen
    return out


def xattr_block_capacity(block_size: int) -> int:
    return block_size - XATTR_OFF


# --------------------------------------------------------------------------------------------------
# §8 Journal superblock (first block of the journal region)
# --------------------------------------------------------------------------------------------------
JOURNAL_SB = struct.Struct("<IIQQQQ")  # version, flags, first, blocks, sequence, head
JOURNAL_SB_OFF = 32
JOURNAL_VERSION = 1


@dataclass
class JournalSuperblock:
    first: int
    blocks: int
    sequence: int = 1
    head: int = 0
    flags: int = 0
    version: int = JOURNAL_VERSION

    def pack_into(self, buf: bytearray) -> None:
        JOURNAL_SB.pack_into(
            buf, JOURNAL_SB_OFF, self.version, self.flags, self.first, self.blocks, self.sequence, self.head,
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> JournalSuperblock:
        ver, flags, first, blocks, seq, head = JOURNAL_SB.unpack_from(buf, JOURNAL_SB_OFF)
        return cls(first=first, blocks=blocks, sequence=seq, head=head, flags=flags, version=ver)


# §8.2 journal records (v1.1)
JOURNAL_DESC = struct.Struct("<QII")  # @32: sequence, count (home numbers in this block), total data blocks
JOURNAL_COMMIT = struct.Struct("<QIIIIQQ")  # @32: sequence, ndesc, nblocks, flags, 0, orphan_head, body_hash
JOURNAL_REC_OFF = 32
JOURNAL_DESC_ENTRIES_OFF = 48
JCOMMIT_F_ORPHAN = 1  # orphan_head is meaningful (always set by v1.1 writers)


def journal_body_hash(body: bytes | bytearray | memoryview, uuid: bytes) -> int:
    """§8.2: BLAKE2b-64 keyed with the UUID over descriptors + block images.

    Not crc32c: CRC is linear, and a block of self-checksummed inodes changed in whole slots leaves
    any crc32c over it unchanged (a codeword plus its own CRC has a constant residue) — the crash
    harness found a torn journal write that crc32c accepted.
    """
    return int.from_bytes(hashlib.blake2b(body, digest_size=8, key=uuid).digest(), "little")


def journal_desc_capacity(block_size: int) -> int:
    """§8.2: home block numbers one descriptor block holds."""
    return (block_size - JOURNAL_DESC_ENTRIES_OFF) // 8
