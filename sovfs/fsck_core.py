"""Checking and repairing a SovFS image (the logic behind ``fsck.sovfs``).

Theory of operation
-------------------
:func:`check` reads the image, builds an in-memory model of what the filesystem *should* be, records
every difference as a :class:`Problem`, and (mode permitting) writes the repaired model back.  The
passes follow e2fsck:

* **0  superblock** – primary (falling back to the backup), feature masks, the device size, the backup
  copy; then :meth:`Checker.check_journal` (journal superblock, non-empty journal, ``RECOVER``).
* **1  inodes** – the whole inode table with batched ``preadv``: checksums, types, flags, sizes; the
  orphan list (§4.5); extent trees (read level by level across all inodes, one request batch per level),
  xattr blocks; ``blocks`` counts; the block ownership map (a numpy count per block) and, in **1B**,
  blocks claimed twice (later claimants get copies, as e2fsck's pass 1B–1D).
* **2  directories** – every mapped directory block verified, the B+tree walked (levels, key ranges,
  loops, unreachable or missing nodes), entries checked (inode in use, type, name, key = hash + collision
  index, duplicate names, directories with more than one name); damaged directories are rebuilt from the
  entries that survive (the §6.5 simple-reader listing salvages leaves below a bad interior node).
* **3  connectivity** – root and ``lost+found`` exist; every directory reachable from the root, loops
  broken; unattached inodes reconnected to ``lost+found`` as ``#ino``; ``parent`` (our "..") fixed.
* **4  link counts** – files: number of names; directories: 2 + subdirectories.
* **5  bitmaps and counts** – block and inode bitmaps recomputed from the model (metadata region, backup
  superblock and padding bits set) and compared with the disk; superblock free-count hints.

Repairs: the passes always compute the repaired model (so later passes reason about the repaired
filesystem, as e2fsck does after answering "yes").  What is written depends on the mode:

* ``Mode.NO`` (``-n``) writes nothing (the device may be opened read-only).
* ``Mode.PREEN`` (``-p``) writes only if every problem found is *safe* (counts, bitmaps, orphans,
  ``blocks``/``size`` fields, the backup superblock); otherwise it writes nothing and reports the problems
  as uncorrected (e2fsck's "UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY").
* ``Mode.YES`` (``-y``) writes everything.

Nothing is written while the journal holds unreplayed records (replay is the journaling issue's hook:
:meth:`Checker.check_journal`).  All repaired metadata is produced by ``sovfs.format`` packers
(``Inode.pack``, ``DirNode.pack_into``, ``seal_block``), so every checksum is right; copies of shared
data blocks are written before the metadata that points at them.

Superblock free counts are hints (FORMAT.md §2.2): a stale count is reported as a *hint* problem that is
fixed when writing but never changes the exit code.

Who may call it: tools (``mkfs/fsck.py``, tests).  Never on a mounted filesystem.
"""

from __future__ import annotations

import enum
import itertools
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from sovfs.blockdev import BlockDevice, Buffer
from sovfs.errors import Corrupt, SovError
from sovfs.format import (
    DIR_INDEX_SIZE,
    EXT_UNWRITTEN,
    EXTENT_NODE_HDR,
    EXTENT_NODE_OFF,
    EXTENT_SIZE,
    HEADER_SIZE,
    IFLAG_INLINE_DATA,
    IFLAGS_KNOWN,
    INCOMPAT_RECOVER,
    INCOMPAT_SUPPORTED,
    INLINE_EXTENTS,
    INLINE_SYMLINK_MAX,
    INODE_AREA_SIZE,
    INODE_SIZE,
    LOST_FOUND_INO,
    MAX_COLLISIONS,
    MAX_LOGICAL_BLOCKS,
    MAX_SYMLINK_LEN,
    RO_COMPAT_SUPPORTED,
    ROOT_INO,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    SB_OFFSET,
    SB_SIZE,
    STATE_CLEAN,
    STATE_ERRORS,
    XATTR_HDR,
    XATTR_OFF,
    BlockType,
    DirEntry,
    DirIndex,
    DirNode,
    Extent,
    ExtentIndex,
    Inode,
    JournalSuperblock,
    Superblock,
    bits_per_bitmap_block,
    dir_node_capacity,
    dirent_type,
    extent_node_capacity,
    init_block,
    name_hash_base,
    pack_xattrs,
    seal_block,
    unpack_xattrs,
    uuid_seed,
    verify_block,
    xattr_block_capacity,
)

__all__ = [
    "EXIT_CORRECTED",
    "EXIT_OK",
    "EXIT_OPERATIONAL",
    "EXIT_UNCORRECTED",
    "EXIT_USAGE",
    "CannotCheck",
    "Checker",
    "Mode",
    "Problem",
    "Progress",
    "Report",
    "check",
]

EXIT_OK, EXIT_CORRECTED, EXIT_UNCORRECTED, EXIT_OPERATIONAL, EXIT_USAGE = 0, 1, 4, 8, 16
BATCH_BYTES = 32 << 20  # bytes per preadv call
MAX_TREE_DEPTH = 8  # an extent tree this deep maps far more than 2^32 blocks even at B = 1024
MAX_DIR_LEVELS = 64

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class Mode(enum.Enum):
    NO = "n"  # report only, never write
    PREEN = "p"  # fix only safe problems
    YES = "y"  # fix everything


class CannotCheck(SovError):
    """An operational error: no usable superblock, truncated image, unsupported features, I/O."""


@dataclass
class Problem:
    """One inconsistency. ``safe``: ``-p`` may repair it; ``hint``: a hint field, never an error."""

    code: str
    message: str
    safe: bool = False
    fixable: bool = True
    hint: bool = False
    fixed: bool = False
    action: str = ""  # the repair, in words ("removed", "moved to lost+found")

    def __str__(self) -> str:
        state = "FIXED" if self.fixed else ("NOT FIXED" if self.fixable else "CANNOT FIX")
        act = f" (repair: {self.action})" if self.action else ""
        return f"{self.code}: {self.message}{act} [{state}]"


@dataclass
class Report:
    """The result of :func:`check`."""

    mode: Mode
    problems: list[Problem] = field(default_factory=list)
    written: bool = False
    skipped: bool = False  # clean and not forced: only the superblock and journal were checked
    files_used: int = 0
    files_total: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    noncontiguous: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.hint]

    @property
    def exit_code(self) -> int:
        """fsck(8): 0 clean, 1 errors corrected, 4 errors left uncorrected."""
        errs = self.errors
        if any(not p.fixed for p in errs):
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if errs else EXIT_OK

    def summary(self, name: str) -> str:
        """The e2fsck-style last line: ``img: 11/16384 files (0.0% non-contiguous), 1234/16384 blocks``."""
        pct = 100.0 * self.noncontiguous / max(self.files_used, 1)
        head = f"{name}: clean, " if self.skipped else f"{name}: "
        return (
            f"{head}{self.files_used}/{self.files_total} files ({pct:.1f}% non-contiguous), "
            f"{self.blocks_used}/{self.blocks_total} blocks"
        )


def check(
    dev: BlockDevice, mode: Mode = Mode.NO, *, force: bool = True, progress: Progress | None = None
) -> Report:
    """Check (and in modes ``YES``/``PREEN`` repair) the SovFS on ``dev``.

    Args:
        dev: the image. With ``Mode.NO`` it may be read-only; it is never written then.
        mode: what may be repaired (module docstring).
        force: check even if the superblock says the filesystem is clean (``-f``).
        progress: called as ``progress(phase, done, total)`` while scanning.

    Raises:
        CannotCheck: no valid superblock, truncated image, unsupported features.
        SovError / OSError: from the device.
    """
    return Checker(dev, mode, progress).run(force=force)


# ---------------------------------------------------------------------------------------------------
def _runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted block numbers -> (start, length) runs.  ``_runs([1, 2, 3, 7]) == [(1, 3), (7, 1)]``."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def _fmt_runs(idx: np.ndarray, limit: int = 8) -> str:
    """``[3,4,5,9]`` -> ``"3--5 9"`` (e2fsck's bitmap-difference notation), at most ``limit`` runs."""
    runs = _runs(int(x) for x in idx[: 4096])
    parts = [f"{a}" if n == 1 else f"{a}--{a + n - 1}" for a, n in runs[:limit]]
    more = len(idx) - sum(n for _, n in runs[:limit])
    return " ".join(parts) + (f" (and {more} more)" if more > 0 else "")


@dataclass
class _Tnode:
    """A decoded extent-tree node (or the reason it is unusable)."""

    depth: int = 0
    leaves: list[Extent] = field(default_factory=list)
    index: list[ExtentIndex] = field(default_factory=list)
    error: str = ""


class Checker:
    """One fsck run over one device (see the module docstring for the passes)."""

    def __init__(self, dev: BlockDevice, mode: Mode, progress: Progress | None = None) -> None:
        self.dev = dev
        self.mode = mode
        self.progress = progress
        self.problems: list[Problem] = []
        # model, filled by the passes
        self.inodes: dict[int, Inode] = {}
        self.extents: dict[int, list[Extent]] = {}
        self.tree: dict[int, list[int]] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}  # items of inodes with an xattr block
        self.rewrite: set[int] = set()  # inode slots to write
        self.free_gen: dict[int, int] = {}  # cleared slots -> generation to keep
        self.remap: set[int] = set()  # extent tree to rebuild
        self.no_reuse: set[int] = set()  # blocks a rebuild must not reuse (claimed by another inode)
        self.rebuild: set[int] = set()  # directories to rebuild from self.entries
        self.move_xattr: set[int] = set()
        self.clone: dict[int, list[int]] = {}  # ino -> indexes of extents to copy elsewhere
        self.bitmap_disk: dict[int, bytes] = {}
        self.entries: dict[int, list[DirEntry]] = {}
        self.found_in: dict[int, int] = {}  # directory -> the directory holding its name
        self.noncontig = 0
        self.sb_dirty = False
        self.backup_dirty = False
        self.primary_dirty = False
        self.journal_fix: JournalSuperblock | None = None
        self.block_fix = False
        self.inode_fix = False
        self.block_bits_disk: np.ndarray = np.zeros(0, dtype=np.uint8)
        self.inode_bits_disk: np.ndarray = np.zeros(0, dtype=np.uint8)

    # ------------------------------------------------------------------------------------ helpers
    def add(self, code: str, message: str, *, safe: bool = False, fixable: bool = True,
            hint: bool = False) -> Problem:
        action = ""
        if "; " in message and fixable:
            message, action = message.rsplit("; ", 1)
        p = Problem(code, message, safe=safe, fixable=fixable, hint=hint, action=action)
        self.problems.append(p)
        return p

    def _tick(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    def read_blocks(self, bnos: Sequence[int]) -> dict[int, bytes]:
        """Read blocks with few large ``preadv`` calls (contiguous blocks coalesced)."""
        bs = self.bs
        out: dict[int, bytes] = {}
        runs = _runs(sorted(set(bnos)))
        per_call = max(BATCH_BYTES // bs, 1)
        i = 0
        while i < len(runs):
            batch: list[tuple[int, int]] = []
            total = 0
            while i < len(runs) and (not batch or total + runs[i][1] <= per_call):
                a, n = runs[i]
                n = min(n, per_call)
                batch.append((a, n))
                total += n
                if n < runs[i][1]:
                    runs[i] = (a + n, runs[i][1] - n)
                    break
                i += 1
            datas = self.dev.preadv([(a * bs, n * bs) for a, n in batch])
            for (a, n), d in zip(batch, datas, strict=True):
                for k in range(n):
                    out[a + k] = d[k * bs : (k + 1) * bs]
        return out

    def _iter_range(self, start: int, count: int) -> Iterator[tuple[int, bytes]]:
        """(first block, data) chunks of a contiguous region, BATCH_BYTES at a time."""
        per = max(BATCH_BYTES // self.bs, 1)
        for a in range(start, start + count, per):
            n = min(per, start + count - a)
            yield a, self.dev.pread(a * self.bs, n * self.bs)

    # ------------------------------------------------------------------------------------ driver
    def run(self, *, force: bool) -> Report:
        self.load_superblock()
        sb = self.sb
        report = Report(self.mode, self.problems, files_total=sb.inode_count, blocks_total=sb.block_count)
        self.check_journal()
        unforced_ok = (
            sb.state & STATE_CLEAN and not sb.state & STATE_ERRORS and not sb.incompat & INCOMPAT_RECOVER
            and not (sb.max_mount_count and sb.mount_count >= sb.max_mount_count)
        )
        if not force and unforced_ok and not self.problems:
            report.skipped = True
            report.files_used = sb.inode_count - sb.free_inodes
            report.blocks_used = sb.block_count - sb.free_blocks
            return report
        self.pass1()
        self.pass2()
        self.pass3()
        self.pass4()
        self.pass5()
        report.noncontiguous = self.noncontig
        report.files_used = int(self.inode_used.sum()) - self.pad_inodes
        report.blocks_used = int(self.block_used.sum()) - self.pad_blocks
        if self.should_write():
            self.write_out()
            report.written = True
            for p in self.problems:
                p.fixed = p.fixable
            report.blocks_used = int(self.block_used.sum()) - self.pad_blocks
        return report

    def should_write(self) -> bool:
        if self.mode is Mode.NO or self.dev.read_only:
            return False
        if any(not p.fixable for p in self.problems):
            return False
        if self.mode is Mode.PREEN:
            return all(p.safe or p.hint for p in self.problems)
        return True

    # ------------------------------------------------------------------------------------ pass 0
    def load_superblock(self) -> None:
        dev = self.dev
        if dev.size < SB_OFFSET + SB_SIZE:
            raise CannotCheck(f"device of {dev.size} bytes is too small to hold a SovFS")
        raw = dev.pread(SB_OFFSET, SB_SIZE)
        primary: Superblock | None = None
        try:
            primary = Superblock.unpack(raw, "primary superblock")
            if primary.block_count * primary.block_size > dev.size:
                raise CannotCheck(
                    f"image truncated: the superblock says {primary.block_count} blocks of "
                    f"{primary.block_size} B, the device holds {dev.size // primary.block_size}"
                )
        except Corrupt as e:
            backup = self._find_backup()
            if backup is None:
                if raw[:5] == b"SovFS":
                    raise CannotCheck(f"{e}, and no valid backup superblock was found") from None
                raise CannotCheck("no SovFS superblock found (not a SovFS image, or truncated)") from None
            self.add("SB_PRIMARY", f"{e}; using the backup superblock in block {backup.backup_sb_block}")
            primary = backup
            primary.copy = 0
            self.primary_dirty = True
        self.sb = sb = primary
        self.bs = sb.block_size
        self.seed = uuid_seed(sb.uuid)
        if sb.incompat & ~INCOMPAT_SUPPORTED:
            raise CannotCheck(f"unsupported incompatible features {sb.incompat & ~INCOMPAT_SUPPORTED:#x}")
        if sb.ro_compat & ~RO_COMPAT_SUPPORTED and self.mode is not Mode.NO:
            raise CannotCheck(
                f"unsupported read-only-compatible features {sb.ro_compat & ~RO_COMPAT_SUPPORTED:#x}; "
                "only -n is possible"
            )
        if sb.root_ino != ROOT_INO or sb.lost_found_ino != LOST_FOUND_INO:
            self.add("SB_FIELDS", f"superblock root/lost+found inodes are {sb.root_ino}/{sb.lost_found_ino}")
            sb.root_ino, sb.lost_found_ino = ROOT_INO, LOST_FOUND_INO
            self.primary_dirty = self.backup_dirty = True
        if not self.primary_dirty:
            self._check_backup()

    def _find_backup(self) -> Superblock | None:
        for bs in (4096, 1024, 2048, 8192, 16384, 32768, 65536):
            n = self.dev.size // bs
            if n < 2:
                continue
            try:
                cand = Superblock.unpack(self.dev.pread((n - 1) * bs, SB_SIZE), "backup superblock")
            except Corrupt:
                continue
            if cand.block_size == bs and cand.block_count == n:
                return cand
        return None

    def _static(self, sb: Superblock) -> tuple[object, ...]:
        return (sb.block_size_log2, sb.block_count, sb.inode_count, sb.journal_blocks, sb.uuid, sb.hash_seed,
                sb.label, sb.compat, sb.ro_compat, sb.root_ino, sb.lost_found_ino, sb.mkfs_time_ns,
                sb.version_major, sb.errors)

    def _check_backup(self) -> None:
        sb = self.sb
        blk = self.dev.pread(sb.backup_sb_block * self.bs, self.bs)
        where = f"backup superblock (block {sb.backup_sb_block})"
        try:
            b = Superblock.unpack(blk, where)
            if b.copy != 1:
                raise Corrupt(f"{where}: copy field is {b.copy}, expected 1")
            if self._static(b) != self._static(sb):
                raise Corrupt(f"{where}: differs from the primary")
            if any(blk[SB_SIZE:]):
                raise Corrupt(f"{where}: rest of the block is not zero")
        except Corrupt as e:
            self.add("SB_BACKUP", str(e), safe=True)
            self.backup_dirty = True

    def check_journal(self) -> None:
        """§8: validate the journal superblock; report a journal that needs replay.

        Hook for the journaling issue: replay belongs here (before pass 1), clearing ``head`` and
        ``INCOMPAT_RECOVER``.  Until then a non-empty journal is reported as an error fsck cannot fix,
        and nothing is written.
        """
        sb = self.sb
        data = self.dev.pread(sb.journal_start * self.bs, self.bs)
        try:
            verify_block(data, self.seed, sb.journal_start, BlockType.JOURNAL_SUPER, 0, 0)
            j = JournalSuperblock.unpack(data)
            if j.version != 1 or j.first != sb.journal_start or j.blocks != sb.journal_blocks:
                raise Corrupt(
                    f"journal superblock (block {sb.journal_start}): version {j.version}, region "
                    f"{j.first}+{j.blocks}, expected 1, {sb.journal_start}+{sb.journal_blocks}"
                )
            if j.sequence == 0 or j.head >= sb.journal_blocks:
                raise Corrupt(f"journal superblock (block {sb.journal_start}): sequence {j.sequence}, "
                              f"head {j.head}")
        except Corrupt as e:
            if sb.incompat & INCOMPAT_RECOVER:
                self.add("JOURNAL_BAD", f"{e}; the journal needs recovery and cannot be read", fixable=False)
                return
            self.add("JOURNAL_SB", str(e))
            self.journal_fix = JournalSuperblock(first=sb.journal_start, blocks=sb.journal_blocks)
            return
        if (j.head != 0 or sb.incompat & INCOMPAT_RECOVER) and self.mode is not Mode.NO:
            from sovfs.journal import recover  # the journaling layer owns replay (§8.3)

            rep = recover(self.dev, sb)
            self.add("JOURNAL_REPLAYED", f"journal replayed: {rep.transactions} transaction(s), "
                     f"{rep.blocks} block(s) written home", hint=True).fixed = True
            return
        if j.head != 0 or sb.incompat & INCOMPAT_RECOVER:
            self.add(
                "JOURNAL_RECOVER",
                f"the journal holds unreplayed transactions (head {j.head}, RECOVER "
                f"{'set' if sb.incompat & INCOMPAT_RECOVER else 'clear'}); -n does not replay it, "
                "so the metadata below may be stale",
                fixable=False,
            )

    # ------------------------------------------------------------------------------------ pass 1
    def _clear(self, ino: int, gen: int) -> None:
        """Forget inode ``ino``: it becomes a free slot keeping ``gen``."""
        self.inodes.pop(ino, None)
        self.extents.pop(ino, None)
        self.tree.pop(ino, None)
        self.xattrs.pop(ino, None)
        self.remap.discard(ino)
        self.free_gen[ino] = gen
        self.rewrite.add(ino)

    def pass1(self) -> None:
        sb = self.sb
        per = self.bs // INODE_SIZE
        total = sb.inode_table_blocks
        for first, data in self._iter_range(sb.inode_table_start, total):
            self._tick("inodes", first - sb.inode_table_start, total)
            arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, INODE_SIZE)
            base = (first - sb.inode_table_start) * per
            for k in np.flatnonzero(arr.any(axis=1)):
                ino = base + int(k)
                raw = data[int(k) * INODE_SIZE : (int(k) + 1) * INODE_SIZE]
                if ino == 0:
                    self.add("INODE_ZERO", "inode 0 (never used) is not zero", safe=True)
                    self.free_gen[0] = -1
                    self.rewrite.add(0)
                    continue
                gen = struct.unpack_from("<I", raw, 68)[0]
                try:
                    inode = Inode.unpack(raw, self.seed, ino)
                except Corrupt as e:
                    self.add("INODE_CORRUPT", f"{e}; clearing it")
                    self._clear(ino, gen)
                    continue
                if inode.is_free:
                    if inode != Inode(generation=inode.generation):
                        self.add("INODE_FREE_DIRTY", f"free inode {ino} has non-zero fields", safe=True)
                        self._clear(ino, inode.generation)
                    continue
                self.inodes[ino] = inode
        self._tick("inodes", total, total)
        self._orphans()
        self._scan_extents()
        self._scan_xattrs()
        for ino in sorted(self.inodes):
            self._check_inode(ino)
        self._ownership()

    def _orphans(self) -> None:
        """§4.5: free the inodes on the orphan list (nlink 0, chained through ``parent``)."""
        sb = self.sb
        ino, seen = sb.orphan_head, set()
        while ino:
            inode = self.inodes.get(ino)
            if not 0 < ino < sb.inode_count or ino in seen or inode is None or inode.nlink:
                self.add("ORPHAN_LIST", f"orphan list broken at inode {ino}; list cleared", safe=True)
                break
            seen.add(ino)
            self.add("ORPHAN", f"orphan inode {ino} (nlink 0); freed", safe=True)
            nxt = inode.parent
            self._clear(ino, inode.generation)
            ino = nxt
        if sb.orphan_head:
            sb.orphan_head = 0
            self.primary_dirty = self.backup_dirty = True

    def _root_entries(self, inode: Inode) -> tuple[list[Extent], list[ExtentIndex]]:
        if inode.flags & IFLAG_INLINE_DATA or inode.ext_count == 0:
            return [], []
        area = inode.area
        if inode.ext_depth == 0:
            return [Extent.unpack(area, i * EXTENT_SIZE) for i in range(inode.ext_count)], []
        return [], [ExtentIndex.unpack(area, i * EXTENT_SIZE) for i in range(inode.ext_count)]

    def _scan_extents(self) -> None:
        """Read every extent-tree node, one level at a time across all inodes (batched reads)."""
        sb = self.sb
        nodes: dict[tuple[int, int], _Tnode] = {}
        pending: list[tuple[int, int, int]] = []  # (ino, block, expected depth)
        for ino, inode in self.inodes.items():
            if inode.flags & IFLAG_INLINE_DATA or not inode.ext_depth or not inode.ext_count:
                continue
            if inode.ext_depth > MAX_TREE_DEPTH:
                continue
            _, idx = self._root_entries(inode)
            pending += [(ino, ix.child, inode.ext_depth - 1) for ix in idx]
        cap = extent_node_capacity(self.bs)
        while pending:
            todo = [(i, b, d) for i, b, d in pending
                    if (i, b) not in nodes and sb.data_start <= b < sb.backup_sb_block]
            datas = self.read_blocks([b for _, b, _ in todo])
            pending = []
            for ino, bno, depth in todo:
                if (ino, bno) in nodes:
                    continue
                node = nodes[(ino, bno)] = _Tnode(depth)
                data = datas[bno]
                try:
                    verify_block(data, self.seed, bno, BlockType.EXTENT_NODE, ino,
                                 self.inodes[ino].generation)
                except Corrupt as e:
                    node.error = str(e)
                    continue
                d, count, _mx, _, _ = EXTENT_NODE_HDR.unpack_from(data, HEADER_SIZE)
                if d != depth or count == 0 or count > cap:
                    node.error = f"block {bno}: extent node depth {d} count {count} (expected depth {depth})"
                    continue
                for i in range(count):
                    off = EXTENT_NODE_OFF + i * EXTENT_SIZE
                    if depth == 0:
                        node.leaves.append(Extent.unpack(data, off))
                    else:
                        ix = ExtentIndex.unpack(data, off)
                        node.index.append(ix)
                        pending.append((ino, ix.child, depth - 1))
        self._tnodes = nodes

    def _assemble(self, ino: int, inode: Inode) -> tuple[list[Extent], list[int], str]:
        """The inode's extents in tree order, its tree blocks, and the first error ('' if none)."""
        sb = self.sb
        err = ""
        if inode.flags & IFLAG_INLINE_DATA:
            return [], [], ""
        if inode.ext_depth > MAX_TREE_DEPTH:
            return [], [], f"inode {ino}: extent tree depth {inode.ext_depth} impossible"
        leaves, idx = self._root_entries(inode)
        raw: list[Extent] = []
        tree: list[int] = []
        if inode.ext_depth == 0:
            raw = leaves
        else:
            work: list[tuple[ExtentIndex, int, int] | Extent] = []

            def expand(ixs: list[ExtentIndex], lo: int, hi: int) -> list[tuple[ExtentIndex, int, int]]:
                nonlocal err
                out = []
                for j, ix in enumerate(ixs):
                    nxt = ixs[j + 1].logical if j + 1 < len(ixs) else hi
                    if ix.logical < lo or nxt <= ix.logical or nxt > hi:
                        err = err or f"inode {ino}: extent index entries out of order at logical {ix.logical}"
                    out.append((ix, max(ix.logical, lo), min(max(nxt, ix.logical), hi)))
                return out

            work += reversed(expand(idx, 0, MAX_LOGICAL_BLOCKS))
            seen: set[int] = set()
            while work:
                item = work.pop()
                if isinstance(item, Extent):
                    raw.append(item)
                    continue
                ix, lo, hi = item
                node = self._tnodes.get((ino, ix.child))
                if node is None:
                    err = err or f"inode {ino}: extent tree block {ix.child} outside the data region"
                    continue
                if node.error:
                    err = err or f"inode {ino}: {node.error}"
                    continue
                if ix.child in seen:
                    err = err or f"inode {ino}: extent tree block {ix.child} referenced twice"
                    continue
                seen.add(ix.child)
                tree.append(ix.child)
                if node.depth == 0:
                    if any(not lo <= e.logical < hi or e.end > hi for e in node.leaves):
                        err = err or f"inode {ino}: extent block {ix.child} maps blocks outside its range"
                    work += reversed(node.leaves)
                else:
                    work += reversed(expand(node.index, lo, hi))
        kept: list[Extent] = []
        prev_end = 0
        for e in raw:
            if e.length == 0 or e.end > MAX_LOGICAL_BLOCKS or e.flags & ~EXT_UNWRITTEN:
                err = err or f"inode {ino}: malformed extent at logical {e.logical}"
            elif e.logical < prev_end:
                err = err or f"inode {ino}: extents overlap or are out of order at logical {e.logical}"
            elif not sb.data_start <= e.physical or e.physical + e.length > sb.backup_sb_block:
                err = err or (f"inode {ino}: extent at logical {e.logical} points outside the data region "
                              f"(blocks {e.physical}+{e.length})")
            else:
                kept.append(e)
                prev_end = e.end
        return kept, tree, err

    def _scan_xattrs(self) -> None:
        sb = self.sb
        want = {ino: i.xattr_block for ino, i in self.inodes.items()
                if i.xattr_block and sb.data_start <= i.xattr_block < sb.backup_sb_block}
        datas = self.read_blocks(list(want.values()))
        self._xattr_err: dict[int, str] = {}
        for ino, i in self.inodes.items():
            if not i.xattr_block:
                continue
            if ino not in want:
                self._xattr_err[ino] = f"xattr block {i.xattr_block} outside the data region"
                continue
            data = datas[i.xattr_block]
            try:
                verify_block(data, self.seed, i.xattr_block, BlockType.XATTR, ino, i.generation)
                count, _, used, _ = XATTR_HDR.unpack_from(data, HEADER_SIZE)
                if XATTR_OFF + used > self.bs:
                    raise Corrupt(f"xattr block {i.xattr_block}: used {used} overflows the block")
                items = unpack_xattrs(data[XATTR_OFF : XATTR_OFF + used], f"xattr block {i.xattr_block}")
                if len(items) != count:
                    raise Corrupt(f"xattr block {i.xattr_block}: count {count}, {len(items)} entries")
                self.xattrs[ino] = items
            except Corrupt as e:
                self._xattr_err[ino] = str(e)

    def _check_inode(self, ino: int) -> None:
        inode = self.inodes[ino]
        fmt = inode.fmt
        bs = self.bs
        dirty = False
        if inode.flags & ~IFLAGS_KNOWN:
            self.add("INODE_FLAGS", f"inode {ino}: unknown flags {inode.flags & ~IFLAGS_KNOWN:#x}; cleared")
            inode.flags &= IFLAGS_KNOWN
            dirty = True
        if inode.flags & IFLAG_INLINE_DATA:
            ok = (fmt == S_IFLNK and 0 < inode.size <= INLINE_SYMLINK_MAX and inode.ext_count == 0
                  and inode.ext_depth == 0 and not any(inode.area[inode.size :]))
            if not ok:
                self.add("INODE_CORRUPT", f"inode {ino}: bad inline data (type {fmt:#o}, size {inode.size}); "
                         "clearing it")
                self._clear(ino, inode.generation)
                return
        if fmt == S_IFLNK and not 0 < inode.size <= MAX_SYMLINK_LEN:
            self.add("INODE_CORRUPT", f"inode {ino}: symlink of length {inode.size}; clearing it")
            self._clear(ino, inode.generation)
            return
        exts, tree, err = self._assemble(ino, inode)
        if err:
            self.add("EXTENT_BAD", f"{err}; keeping the {len(exts)} valid extents")
            self.remap.add(ino)
        if fmt not in (S_IFREG, S_IFDIR, S_IFLNK) and (exts or inode.size or inode.ext_count):
            self.add("INODE_SPECIAL", f"inode {ino}: device/FIFO/socket with size {inode.size} or extents; "
                     "cleared them")
            exts = []
            inode.size = 0
            self.remap.add(ino)
        if fmt not in (S_IFCHR, S_IFBLK) and inode.rdev:
            self.add("INODE_RDEV", f"inode {ino}: rdev {inode.rdev:#x} on a non-device; cleared", safe=True)
            inode.rdev = 0
            dirty = True
        if fmt != S_IFDIR and inode.parent:
            self.add("INODE_PARENT", f"inode {ino}: non-directory with parent {inode.parent}; cleared",
                     safe=True)
            inode.parent = 0
            dirty = True
        self.extents[ino] = exts
        self.tree[ino] = tree
        try:
            unpack_xattrs(inode.inline_xattr, f"inode {ino} inline xattrs")
        except Corrupt as e:
            self.add("XATTR_INLINE", f"{e}; dropped")
            inode.inline_xattr = b""
            dirty = True
        if ino in self._xattr_err:
            self.add("XATTR_BLOCK", f"inode {ino}: {self._xattr_err[ino]}; xattrs dropped")
            inode.xattr_block = 0
            dirty = True
        elif inode.xattr_block and inode.inline_xattr:
            self.add("XATTR_INLINE", f"inode {ino}: inline xattrs beside an xattr block; inline ones dropped")
            inode.inline_xattr = b""
            dirty = True
        last = max((e.end for e in exts), default=0)
        if fmt in (S_IFREG, S_IFLNK) and -(-inode.size // bs) < last:
            self.add("INODE_SIZE", f"inode {ino}: size {inode.size} but block {last - 1} is mapped; "
                     f"size set to {last * bs}", safe=True)
            inode.size = last * bs
            dirty = True
        if len(exts) > 1 and any(a.physical + a.length != b.physical for a, b in itertools.pairwise(exts)):
            self.noncontig += 1
        if dirty:
            self.rewrite.add(ino)

    def _owned(self, ino: int) -> list[tuple[int, int]]:
        """(start, count) block ranges inode ``ino`` owns in the model."""
        out = [(e.physical, e.length) for e in self.extents.get(ino, [])]
        out += [(b, 1) for b in self.tree.get(ino, [])]
        xb = self.inodes[ino].xattr_block
        if xb:
            out.append((xb, 1))
        return out

    def _ownership(self) -> None:
        """Count claims per block; resolve blocks claimed twice (pass 1B); fix ``blocks`` counts."""
        sb = self.sb
        refs = np.zeros(sb.block_count, dtype=np.uint16)
        for ino in self.inodes:
            for a, n in self._owned(ino):
                seg = refs[a : a + n]
                seg += seg < 65535
        dup = refs > 1
        if dup.any():
            taken = np.zeros(sb.block_count, dtype=bool)
            who: list[int] = []
            for ino in sorted(self.inodes):
                shared = False
                for a, n in self._owned(ino):
                    if dup[a : a + n].any():
                        shared = True
                        if taken[a : a + n][dup[a : a + n]].any():
                            self._unshare(ino, a, n, taken, dup)
                        else:
                            taken[a : a + n] |= dup[a : a + n]
                if shared:
                    who.append(ino)
            idx = np.flatnonzero(dup)
            self.add("BLOCK_DUP", f"blocks {_fmt_runs(idx)} are claimed by more than one inode "
                     f"(inodes {', '.join(map(str, who))}); later claimants get copies")
        for ino, inode in self.inodes.items():
            if ino in self.rebuild or ino in self.remap:
                continue  # recounted when rebuilt
            want = sum(n for _, n in self._owned(ino))
            if inode.blocks != want:
                self.add("INODE_BLOCKS", f"inode {ino}: blocks is {inode.blocks}, should be {want}",
                         safe=True)
                inode.blocks = want
                self.rewrite.add(ino)

    def _unshare(self, ino: int, a: int, n: int, taken: np.ndarray, dup: np.ndarray) -> None:
        """Inode ``ino`` loses the race for blocks [a, a+n): copy, move or drop its use of them."""
        inode = self.inodes[ino]
        if inode.xattr_block == a and n == 1 and a not in self.tree.get(ino, []):
            self.move_xattr.add(ino)
            self.rewrite.add(ino)
            return
        if a in self.tree.get(ino, []):
            self.tree[ino] = [b for b in self.tree[ino] if b != a]
            self.remap.add(ino)
            self.no_reuse.add(a)
            return
        if inode.fmt == S_IFDIR:
            self.rebuild.add(ino)  # a rebuilt directory gets fresh blocks
            self.no_reuse.update(range(a, a + n))
            return
        for k, e in enumerate(self.extents[ino]):
            if e.physical == a and e.length == n:
                self.clone.setdefault(ino, []).append(k)
                self.remap.add(ino)
        self.no_reuse.update(int(x) + a for x in np.flatnonzero(dup[a : a + n]))

    # ------------------------------------------------------------------------------------ pass 2
    def _ensure_special_dirs(self) -> None:
        """Root (1) and lost+found (2) must be directories; recreate them empty otherwise."""
        now = time.time_ns()
        for ino, mode, parent in ((ROOT_INO, 0o755, ROOT_INO), (LOST_FOUND_INO, 0o700, ROOT_INO)):
            cur = self.inodes.get(ino)
            if cur is not None and cur.fmt == S_IFDIR:
                continue
            name = "root directory" if ino == ROOT_INO else "lost+found"
            self.add("ROOT_MISSING" if ino == ROOT_INO else "LF_MISSING",
                     f"{name} (inode {ino}) is {'missing' if cur is None else 'not a directory'}; recreated")
            gen = cur.generation if cur is not None else self.free_gen.get(ino, 0)
            if cur is not None:
                self._clear(ino, gen)
            self.free_gen.pop(ino, None)
            self.inodes[ino] = Inode(mode=S_IFDIR | mode, nlink=2, parent=parent, atime_ns=now, mtime_ns=now,
                                     ctime_ns=now, crtime_ns=now, generation=(gen + 1) & 0xFFFFFFFF)
            self.extents[ino] = []
            self.tree[ino] = []
            self.entries[ino] = []
            self.rebuild.add(ino)
            self.rewrite.add(ino)

    def pass2(self) -> None:
        self._ensure_special_dirs()
        dirs = sorted(i for i, n in self.inodes.items() if n.fmt == S_IFDIR and i not in self.entries)
        batch: list[int] = []
        nblk = 0
        limit = max(BATCH_BYTES // self.bs, 1)
        for k, d in enumerate(dirs):
            batch.append(d)
            nblk += sum(e.length for e in self.extents[d])
            if nblk >= limit or k == len(dirs) - 1:
                self._tick("directories", k, len(dirs))
                want = [e.physical + i for d2 in batch for e in self.extents[d2] for i in range(e.length)]
                datas = self.read_blocks(want)
                for d2 in batch:
                    self._check_dir(d2, datas)
                batch, nblk = [], 0
        self._check_entries()

    def _check_dir(self, d: int, datas: dict[int, bytes]) -> None:
        inode = self.inodes[d]
        nodes: dict[int, DirNode] = {}
        bad: list[str] = []
        for e in self.extents[d]:
            for i in range(e.length):
                lg, phys = e.logical + i, e.physical + i
                where = f"directory {d} block {phys} (logical {lg})"
                try:
                    if e.flags & EXT_UNWRITTEN:
                        raise Corrupt(f"{where}: unwritten extent in a directory")
                    verify_block(datas[phys], self.seed, phys, BlockType.DIR_NODE, d, inode.generation)
                    nodes[lg] = DirNode.unpack(datas[phys], where)
                except Corrupt as err:
                    bad.append(str(err))
        for msg in bad:
            self.add("DIR_BLOCK", f"{msg}; directory will be rebuilt")
        tree_err = self._walk_dir(d, nodes)
        if tree_err:
            self.add("DIR_TREE", f"directory {d}: {tree_err}; directory will be rebuilt")
        if bad or tree_err:
            self.rebuild.add(d)
        ents: dict[tuple[int, bytes], DirEntry] = {}
        for lg in sorted(nodes):
            if nodes[lg].level == 0:
                for x in nodes[lg].entries:
                    ents.setdefault((x.key, x.name), x)
        self.entries[d] = sorted(ents.values(), key=lambda x: x.key)
        last = max((e.end for e in self.extents[d]), default=0)
        if d not in self.rebuild and inode.size != last * self.bs:
            self.add("DIR_SIZE", f"directory {d}: size {inode.size}, should be {last * self.bs}", safe=True)
            inode.size = last * self.bs
            self.rewrite.add(d)

    def _walk_dir(self, d: int, nodes: dict[int, DirNode]) -> str:
        """Check the B+tree shape of directory ``d``; return the first problem ('' if none)."""
        if 0 not in nodes:
            return "no valid root node at logical block 0"
        seen: set[int] = set()
        stack: list[tuple[int, int | None, int, int]] = [(0, None, 0, 2**64)]
        while stack:
            lg, level, lo, hi = stack.pop()
            node = nodes.get(lg)
            if node is None:
                return f"index entry points at logical block {lg}, which holds no valid node"
            if lg in seen:
                return f"node at logical block {lg} is referenced twice (tree loop)"
            seen.add(lg)
            if (level is not None and node.level != level) or node.level > MAX_DIR_LEVELS:
                return f"node at logical block {lg} has level {node.level}, expected {level}"
            if node.level == 0:
                if not node.entries and lg != 0:
                    return f"empty non-root leaf at logical block {lg}"
                for e in node.entries:
                    if not lo <= e.key < hi:
                        return f"key {e.key:#x} at logical block {lg} outside its range"
                continue
            for j, ix in enumerate(node.index):
                nlo = ix.key if j else lo
                nhi = node.index[j + 1].key if j + 1 < len(node.index) else hi
                if j and not lo <= ix.key < hi:
                    return f"index key {ix.key:#x} at logical block {lg} outside its range"
                stack.append((ix.child, node.level - 1, nlo, nhi))
        extra = sorted(set(nodes) - seen)
        if extra:
            return f"node(s) at logical block(s) {', '.join(map(str, extra[:8]))} not in the tree"
        return ""

    def _check_entries(self) -> None:
        """Per-entry checks, duplicate names, directories with several names; fills ``found_in``."""
        sb = self.sb
        dir_names: dict[int, list[tuple[int, DirEntry]]] = {}
        for d in sorted(self.entries):
            keep: list[DirEntry] = []
            names: set[bytes] = set()
            used_keys: set[int] = set()
            changed = False
            for e in self.entries[d]:
                target = self.inodes.get(e.ino)
                what = f"directory {d} entry {e.name!r}"
                if e.name in (b".", b".."):
                    self.add("DIRENT_NAME", f"{what}: reserved name stored; removed")
                elif not 0 < e.ino < sb.inode_count or e.ino == ROOT_INO:
                    self.add("DIRENT_INO", f"{what}: invalid inode {e.ino}; removed")
                elif target is None:
                    self.add("DIRENT_FREE", f"{what}: points at free or cleared inode {e.ino}; removed")
                elif e.name in names:
                    self.add("DIRENT_DUP", f"{what}: duplicate name; removed (inode {e.ino})")
                if target is None or e.name in (b".", b"..") or e.name in names or e.ino == ROOT_INO:
                    changed = True
                    continue
                base = name_hash_base(sb.hash_seed, e.name)
                if not base <= e.key < base + MAX_COLLISIONS or e.key in used_keys:
                    self.add("DIRENT_KEY", f"{what}: key {e.key:#x} does not match the name hash; rekeyed")
                    e = DirEntry(self._free_key(base, used_keys, keep), e.ino, e.ftype, e.name)
                    changed = True
                if e.ftype != dirent_type(target.mode):
                    self.add("DIRENT_TYPE", f"{what}: file type {e.ftype}, inode {e.ino} has "
                             f"{dirent_type(target.mode)}; fixed")
                    e = DirEntry(e.key, e.ino, dirent_type(target.mode), e.name)
                    changed = True
                names.add(e.name)
                used_keys.add(e.key)
                keep.append(e)
                if target.fmt == S_IFDIR:
                    dir_names.setdefault(e.ino, []).append((d, e))
            if changed:
                self.entries[d] = sorted(keep, key=lambda x: x.key)
                self.rebuild.add(d)
        for tdir, where in sorted(dir_names.items()):
            if tdir == LOST_FOUND_INO and any(d == ROOT_INO for d, _ in where):
                keep_d: int = ROOT_INO
            else:
                parent = self.inodes[tdir].parent
                keep_d = parent if any(d == parent for d, _ in where) else where[0][0]
            keep_i = next(i for i, (dd, _) in enumerate(where) if dd == keep_d)
            self.found_in[tdir] = keep_d
            for i, (d, e) in enumerate(where):
                if i == keep_i:
                    continue
                self.add("DIR_HARDLINK", f"directory {tdir} has another name {e.name!r} in directory {d}; "
                         "removed")
                self.entries[d] = [x for x in self.entries[d] if x.key != e.key]
                self.rebuild.add(d)

    @staticmethod
    def _free_key(base: int, used: set[int], keep: list[DirEntry]) -> int:
        taken = used | {x.key for x in keep}
        for c in range(MAX_COLLISIONS):
            if base + c not in taken:
                return base + c
        return base  # 255 names with one hash: cannot happen with a keyed hash

    # ------------------------------------------------------------------------------------ pass 3
    def pass3(self) -> None:
        root = self.inodes[ROOT_INO]
        if root.parent != ROOT_INO:
            self.add("DIR_PARENT", f"root directory parent is {root.parent}, should be 1")
            root.parent = ROOT_INO
            self.rewrite.add(ROOT_INO)
        if self.found_in.get(LOST_FOUND_INO) != ROOT_INO:
            self.add("LF_UNLINKED", "lost+found is not linked from the root directory; linked")
            self._link(ROOT_INO, LOST_FOUND_INO, b"lost+found")
        reach = self._reachable()
        dirs = sorted(i for i, n in self.inodes.items() if n.fmt == S_IFDIR)
        for d in dirs:
            if d in reach:
                continue
            x, path = d, [d]
            while x in self.found_in and self.found_in[x] not in reach and self.found_in[x] not in path:
                x = self.found_in[x]
                path.append(x)
            top = x
            holder = self.found_in.get(top)
            if holder is not None and holder in path:
                self.add("DIR_LOOP", f"directories {' -> '.join(map(str, path))} form a loop unreachable "
                         f"from the root; directory {top} moved to lost+found")
            else:
                self.add("DIR_UNREACHABLE", f"directory {top} is not reachable from the root; moved to "
                         "lost+found")
            self._link(LOST_FOUND_INO, top, b"#%d" % top)
            reach = self._reachable()
        for d in dirs:
            want = self.found_in.get(d, ROOT_INO)
            if d != ROOT_INO and self.inodes[d].parent != want:
                self.add("DIR_PARENT", f"directory {d}: parent ('..') is {self.inodes[d].parent}, "
                         f"should be {want}")
                self.inodes[d].parent = want
                self.rewrite.add(d)
        refs = self._refcounts()
        for ino in sorted(self.inodes):
            if self.inodes[ino].fmt != S_IFDIR and not refs.get(ino):
                self.add("INODE_UNATTACHED", f"inode {ino} has no name; moved to lost+found as #{ino}")
                self._link(LOST_FOUND_INO, ino, b"#%d" % ino)

    def _link(self, d: int, ino: int, name: bytes) -> None:
        ents = self.entries[d]
        names = {e.name for e in ents}
        n, k = name, 0
        while n in names:
            k += 1
            n = name + b"~%d" % k
        base = name_hash_base(self.sb.hash_seed, n)
        key = self._free_key(base, set(), ents)
        target = self.inodes[ino]
        ents.append(DirEntry(key, ino, dirent_type(target.mode), n))
        ents.sort(key=lambda x: x.key)
        self.rebuild.add(d)
        if target.fmt == S_IFDIR:
            old = self.found_in.get(ino)
            if old is not None and old != d:
                self.entries[old] = [x for x in self.entries[old] if x.ino != ino]
                self.rebuild.add(old)
            self.found_in[ino] = d
            if target.parent != d:
                target.parent = d
                self.rewrite.add(ino)

    def _reachable(self) -> set[int]:
        seen: set[int] = {ROOT_INO}
        stack: list[int] = [ROOT_INO]
        while stack:
            d = stack.pop()
            for e in self.entries.get(d, []):
                t = self.inodes.get(e.ino)
                if t is not None and t.fmt == S_IFDIR and e.ino not in seen and self.found_in.get(e.ino) == d:
                    seen.add(e.ino)
                    stack.append(e.ino)
        return seen

    def _refcounts(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for ents in self.entries.values():
            for e in ents:
                refs[e.ino] = refs.get(e.ino, 0) + 1
        return refs

    # ------------------------------------------------------------------------------------ pass 4
    def pass4(self) -> None:
        refs = self._refcounts()
        subdirs: dict[int, int] = {}
        for d, holder in self.found_in.items():
            if d in self.inodes:
                subdirs[holder] = subdirs.get(holder, 0) + 1
        for ino in sorted(self.inodes):
            inode = self.inodes[ino]
            want = 2 + subdirs.get(ino, 0) if inode.fmt == S_IFDIR else refs.get(ino, 0)
            if inode.nlink != want:
                self.add("NLINK", f"inode {ino}: link count {inode.nlink}, should be {want}", safe=True)
                inode.nlink = want
                self.rewrite.add(ino)

    # ------------------------------------------------------------------------------------ pass 5
    def _expected_bits(self) -> None:
        sb = self.sb
        bpb = bits_per_bitmap_block(self.bs)
        bu = np.zeros(sb.block_bitmap_blocks * bpb, dtype=bool)
        bu[: sb.data_start] = True
        bu[sb.backup_sb_block :] = True  # the backup superblock and the padding bits
        for ino in self.inodes:
            for a, n in self._owned(ino):
                bu[a : a + n] = True
        self.pad_blocks = len(bu) - sb.block_count
        iu = np.zeros(sb.inode_bitmap_blocks * bpb, dtype=bool)
        iu[: LOST_FOUND_INO + 1] = True
        iu[sb.inode_count :] = True
        iu[list(self.inodes)] = True
        self.pad_inodes = len(iu) - sb.inode_count
        self.block_used, self.inode_used = bu, iu

    def _disk_bits(self, start: int, count: int, btype: BlockType, what: str) -> tuple[np.ndarray, bool]:
        datas = self.read_blocks(range(start, start + count))
        self.bitmap_disk.update(datas)
        parts = []
        bad = False
        for k in range(count):
            data = datas[start + k]
            try:
                verify_block(data, self.seed, start + k, btype, 0, 0)
            except Corrupt as e:
                self.add("BITMAP_BLOCK", f"{what} bitmap: {e}; rewritten", safe=True)
                bad = True
            parts.append(np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=HEADER_SIZE),
                                       bitorder="little").astype(bool))
        return np.concatenate(parts), bad

    def pass5(self) -> None:
        sb = self.sb
        self._expected_bits()
        for what, start, count, btype, want in (
            ("block", sb.block_bitmap_start, sb.block_bitmap_blocks, BlockType.BLOCK_BITMAP, self.block_used),
            ("inode", sb.inode_bitmap_start, sb.inode_bitmap_blocks, BlockType.INODE_BITMAP, self.inode_used),
        ):
            disk, bad = self._disk_bits(start, count, btype, what)
            plus = np.flatnonzero(want & ~disk)
            minus = np.flatnonzero(disk & ~want)
            if len(plus) or len(minus):
                msg = f"{what} bitmap differences:"
                if len(minus):
                    msg += f" -({_fmt_runs(minus)})"
                if len(plus):
                    msg += f" +({_fmt_runs(plus)})"
                self.add("BLOCK_BITMAP" if what == "block" else "INODE_BITMAP", msg + "; fixed", safe=True)
            if what == "block":
                self.block_fix = bad or bool(len(plus) or len(minus))
            else:
                self.inode_fix = bad or bool(len(plus) or len(minus))
        free_b = int((~self.block_used).sum())
        free_i = int((~self.inode_used).sum())
        if (sb.free_blocks, sb.free_inodes) != (free_b, free_i):
            self.add("SB_FREE_COUNTS", f"superblock free counts {sb.free_blocks} blocks / {sb.free_inodes} "
                     f"inodes, actual {free_b} / {free_i}", safe=True, hint=True)

    # ------------------------------------------------------------------------------------ write-out
    def _alloc(self, n: int, prefer: Sequence[int] = ()) -> list[int]:
        """``n`` free blocks of the final model (``prefer`` first); marks them used. Raises Corrupt."""
        bu = self.block_used
        out = [b for b in dict.fromkeys(prefer) if not bu[b] and b not in self.no_reuse][:n]
        bu[out] = True
        if len(out) < n:
            free = np.flatnonzero(~bu[: self.sb.backup_sb_block])
            if len(free) < n - len(out):
                raise CannotCheck("no free blocks left for the repair")
            more = [int(x) for x in free[: n - len(out)]]
            bu[more] = True
            out += more
        return out

    def write_out(self) -> None:
        sb = self.sb
        bs = self.bs
        writes: dict[int, bytes | bytearray] = {}
        # 1. copies of shared data blocks (data before the metadata that points at it)
        for ino, ks in sorted(self.clone.items()):
            exts = self.extents[ino]
            for k in sorted(set(ks), reverse=True):  # from the end: earlier indexes stay valid
                e = exts[k]
                new = self._alloc(e.length)
                src = self.read_blocks(range(e.physical, e.physical + e.length))
                reqs: list[tuple[int, Buffer]] = [(b * bs, src[e.physical + i]) for i, b in enumerate(new)]
                self.dev.pwritev(reqs)
                pieces: list[Extent] = []
                pos = e.logical
                for p, n in _runs(new):
                    pieces.append(Extent(pos, n, p, e.flags))
                    pos += n
                exts[k : k + 1] = pieces
        # 2. directories rebuilt from their entries
        for d in sorted(self.rebuild):
            writes.update(self._build_dir(d))
        # 3. xattr blocks that must move
        for ino in sorted(self.move_xattr):
            inode = self.inodes[ino]
            items = self.xattrs.get(ino, {})
            (xblk,) = self._alloc(1)
            inode.xattr_block = xblk
            writes[xblk] = self._xattr_block(ino, xblk, items)
        # 4. extent trees
        for ino in sorted(self.remap):
            if ino in self.inodes:
                writes.update(self._build_tree(ino))
        for ino in self.remap | self.rebuild | self.move_xattr:
            if ino in self.inodes:
                self.inodes[ino].blocks = sum(n for _, n in self._owned(ino))
                self.rewrite.add(ino)
        # 5. inode table
        per = bs // INODE_SIZE
        tblocks = sorted({sb.inode_table_start + ino // per for ino in self.rewrite})
        tdata = {b: bytearray(d) for b, d in self.read_blocks(tblocks).items()}
        for ino in self.rewrite:
            blk = tdata[sb.inode_table_start + ino // per]
            off = (ino % per) * INODE_SIZE
            if ino in self.inodes:
                slot = self.inodes[ino].pack(self.seed, ino)
            elif self.free_gen.get(ino, -1) < 0:
                slot = bytes(INODE_SIZE)
            else:
                slot = Inode(generation=self.free_gen[ino]).pack(self.seed, ino)
            blk[off : off + INODE_SIZE] = slot
        writes.update(tdata)
        # 6. bitmaps, journal superblock
        self._expected_bits_final()
        writes.update(self._bitmap_blocks())
        if self.journal_fix is not None:
            jb = bytearray(bs)
            init_block(jb, BlockType.JOURNAL_SUPER, sb.journal_start)
            self.journal_fix.pack_into(jb)
            seal_block(jb, self.seed)
            writes[sb.journal_start] = jb
        self.dev.pwritev(sorted((b * bs, d) for b, d in writes.items()))
        # 7. superblocks last
        sb.free_blocks = int((~self.block_used).sum())
        sb.free_inodes = int((~self.inode_used).sum())
        sb.state = (sb.state | STATE_CLEAN) & ~STATE_ERRORS
        sb.lastcheck_time_ns = time.time_ns()
        sb.mount_count = 0
        sb.sequence += 1
        sb.copy = 0
        primary = sb.pack()
        sb.copy = 1
        backup = sb.pack() + bytes(bs - SB_SIZE)
        sb.copy = 0
        self.dev.pwritev([(SB_OFFSET, primary), (sb.backup_sb_block * bs, backup)])
        self.dev.flush()

    def _expected_bits_final(self) -> None:
        """Recompute the bitmaps from the final model (after rebuilds allocated blocks)."""
        self._expected_bits()

    def _bitmap_blocks(self) -> dict[int, bytearray]:
        sb = self.sb
        bpb = bits_per_bitmap_block(self.bs)
        out: dict[int, bytearray] = {}
        for start, count, btype, bits in (
            (sb.block_bitmap_start, sb.block_bitmap_blocks, BlockType.BLOCK_BITMAP, self.block_used),
            (sb.inode_bitmap_start, sb.inode_bitmap_blocks, BlockType.INODE_BITMAP, self.inode_used),
        ):
            for k in range(count):
                buf = bytearray(self.bs)
                init_block(buf, btype, start + k)
                buf[HEADER_SIZE:] = np.packbits(bits[k * bpb : (k + 1) * bpb], bitorder="little").tobytes()
                seal_block(buf, self.seed)
                if self.bitmap_disk.get(start + k) != bytes(buf):
                    out[start + k] = buf
        return out

    def _xattr_block(self, ino: int, blk: int, items: dict[bytes, bytes]) -> bytearray:
        packed = pack_xattrs(items)[: xattr_block_capacity(self.bs)]
        buf = bytearray(self.bs)
        init_block(buf, BlockType.XATTR, blk, ino, self.inodes[ino].generation)
        XATTR_HDR.pack_into(buf, HEADER_SIZE, len(items), 0, len(packed), 0)
        buf[XATTR_OFF : XATTR_OFF + len(packed)] = packed
        seal_block(buf, self.seed)
        return buf

    def _build_dir(self, d: int) -> dict[int, bytearray]:
        """Bulk-load a fresh B+tree for directory ``d`` from ``self.entries[d]`` (keys sorted)."""
        inode = self.inodes[d]
        cap = dir_node_capacity(self.bs)
        fan = cap // DIR_INDEX_SIZE
        ents = sorted(self.entries.get(d, []), key=lambda x: x.key)
        leaves: list[DirNode] = [DirNode(0)]
        used = 0
        for e in ents:
            if used + e.size > cap and leaves[-1].entries:
                leaves.append(DirNode(0))
                used = 0
            leaves[-1].entries.append(e)
            used += e.size
        placed: list[tuple[int, DirNode]] = []
        next_lg = 1
        # (first key, node) of the current level
        level = [(lf.entries[0].key if lf.entries else 0, lf) for lf in leaves]
        height = 0
        while True:
            if len(level) == 1:
                placed.append((0, level[0][1]))
                break
            up: list[tuple[int, DirNode]] = []
            height += 1
            for i in range(0, len(level), fan):
                chunk = level[i : i + fan]
                node = DirNode(height)
                for j, (key, child) in enumerate(chunk):
                    placed.append((next_lg, child))
                    node.index.append(DirIndex(key if j else 0, next_lg))
                    next_lg += 1
                up.append((chunk[0][0], node))
            level = up
        old_blocks = [e.physical + i for e in self.extents.get(d, []) for i in range(e.length)]
        old_blocks = [b for b in old_blocks if b not in self.no_reuse]
        for b in old_blocks:
            self.block_used[b] = False
        phys = self._alloc(len(placed), prefer=old_blocks)
        out: dict[int, bytearray] = {}
        by_lg = sorted(placed, key=lambda x: x[0])
        for (lg, node), p in zip(by_lg, phys, strict=True):
            buf = bytearray(self.bs)
            init_block(buf, BlockType.DIR_NODE, p, d, inode.generation)
            node.pack_into(buf)
            seal_block(buf, self.seed)
            out[p] = buf
            del lg
        exts: list[Extent] = []
        for lg, p in enumerate(phys):
            if exts and exts[-1].physical + exts[-1].length == p:
                last = exts[-1]
                exts[-1] = Extent(last.logical, last.length + 1, last.physical)
            else:
                exts.append(Extent(lg, 1, p))
        self.extents[d] = exts
        self.remap.add(d)
        inode.size = len(placed) * self.bs
        inode.flags &= ~IFLAG_INLINE_DATA
        self.rewrite.add(d)
        return out

    def _build_tree(self, ino: int) -> dict[int, bytearray]:
        """Write the extent tree of ``ino`` for ``self.extents[ino]`` (§5.2), reusing its old nodes."""
        inode = self.inodes[ino]
        exts = self.extents[ino]
        cap = extent_node_capacity(self.bs)
        old = [b for b in self.tree.get(ino, []) if b not in self.no_reuse]
        for b in old:
            self.block_used[b] = False
        out: dict[int, bytearray] = {}
        new_blocks: list[int] = []
        entries: list[tuple[int, bytes]] = [(e.logical, e.pack()) for e in exts]
        depth = 0
        while len(entries) > INLINE_EXTENTS:
            nxt: list[tuple[int, bytes]] = []
            for i in range(0, len(entries), cap):
                chunk = entries[i : i + cap]
                (bno,) = self._alloc(1, prefer=old)
                old = [b for b in old if b != bno]
                new_blocks.append(bno)
                buf = bytearray(self.bs)
                init_block(buf, BlockType.EXTENT_NODE, bno, ino, inode.generation)
                EXTENT_NODE_HDR.pack_into(buf, HEADER_SIZE, depth, len(chunk), cap, 0, 0)
                body = b"".join(c[1] for c in chunk)
                buf[EXTENT_NODE_OFF : EXTENT_NODE_OFF + len(body)] = body
                seal_block(buf, self.seed)
                out[bno] = buf
                nxt.append((chunk[0][0], ExtentIndex(chunk[0][0], bno).pack()))
            entries = nxt
            depth += 1
        self.tree[ino] = new_blocks
        inode.ext_depth = depth
        inode.ext_count = len(entries)
        if not inode.flags & IFLAG_INLINE_DATA:
            inode.area = b"".join(e[1] for e in entries).ljust(INODE_AREA_SIZE, b"\0")
        self.rewrite.add(ino)
        return out
