"""Inodes, extent maps and file data I/O (FORMAT.md §4, §5).

Theory of operation
-------------------
:class:`InodeStore` owns the in-memory copies of inodes (``InodeRec``: the decoded :class:`Inode`, its
sorted extent list and the extent-tree blocks it occupies).  Changes are made to the record and written
back by :meth:`InodeStore.put` inside a transaction; the extent tree of a record whose map changed is
written once per operation, just before it ends (``tx.before_commit``), and only where it changed: each
map change names the logical range of the extents it touched, and only the leaves holding that range
are rewritten (split at 3/4 when full, dropped when empty), with the index levels above them when a
leaf's first extent or the set of leaves changed.  A write into a hole of a file with thousands of
extents costs one leaf, not the whole tree.

File I/O: :meth:`read` maps the byte range to extents and issues ONE ``preadv`` for all mapped runs;
:meth:`write` allocates holes as large contiguous runs near the previous extent (goal-directed), reads at
most the partial head and tail blocks (one ``preadv``), and writes the data with ONE ``pwritev`` before the
metadata commits (ordered data).  Holes read as zeros and store nothing.

Invariants: extents sorted, non-overlapping, lengths ≥ 1, logical end ≤ 2^32; ``inode.blocks`` equals
data blocks + tree blocks + xattr block; ``leaves`` partitions the extents by key and matches the tree
blocks of the running transaction (once the operation's flush ran); a record dirtied in an aborted
transaction is dropped (and re-read, leaves included, from the restored blocks).
"""

from __future__ import annotations

import bisect
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sovfs.alloc import BitmapAllocator
from sovfs.blockdev import Buffer
from sovfs.cache import BufferCache
from sovfs.errors import Corrupt, FileTooBig, NoSpace
from sovfs.format import (
    EXT_UNWRITTEN,
    EXTENT,
    EXTENT_NODE_HDR,
    EXTENT_NODE_OFF,
    EXTENT_SIZE,
    INLINE_EXTENTS,
    INODE_AREA_SIZE,
    INODE_SIZE,
    MAX_EXTENT_LEN,
    MAX_LOGICAL_BLOCKS,
    BlockType,
    Extent,
    ExtentIndex,
    Inode,
    Superblock,
    extent_node_capacity,
    init_block,
)
from sovfs.journal import Journal, Transaction

__all__ = ["InodeRec", "InodeStore"]

_LOGICAL = operator.attrgetter("logical")


@dataclass
class ReadPlan:
    """A file read mapped to device requests: ``requests`` are (device offset, length).

    Made atomically by the synchronous core; the caller may then do the I/O
    asynchronously with other work in between, and must check ``releases``
    against the block allocator afterwards: if any block was freed meanwhile,
    the mapped blocks may belong to someone else by now and the read is redone.
    """

    requests: list[tuple[int, int]]
    where: list[int]  # offset of each request's data in the block-aligned span
    span: int  # bytes of the block-aligned span
    skip: int  # offset of the first wanted byte in the span
    size: int  # bytes wanted
    releases: int  # block allocator's release counter when the plan was made

    def assemble_buffer(self, datas: Sequence[bytes | bytearray]) -> bytes | bytearray | memoryview:
        """:meth:`assemble` without the final copies: a view when the read is not block-aligned.

        For callers that only hand the bytes on (the FUSE reply copies them once more anyway).
        """
        if self.size == 0:
            return b""
        if len(datas) == 1 and self.where[0] == 0 and len(datas[0]) == self.span:
            whole: bytes | bytearray = datas[0]
            if self.skip == 0 and self.size == len(whole):
                return whole
            return memoryview(whole)[self.skip : self.skip + self.size]
        out = bytearray(self.span)
        for pos, data in zip(self.where, datas, strict=True):
            out[pos : pos + len(data)] = data
        return memoryview(out)[self.skip : self.skip + self.size]

    def assemble(self, datas: Sequence[bytes | bytearray]) -> bytes:
        """The file bytes from the request results (holes and unwritten extents read as zeros)."""
        # bytes() of a bytes object is that object: no copy for a block-aligned single run
        return bytes(self.assemble_buffer(datas))

@dataclass(slots=True)
class InodeRec:
    ino: int
    inode: Inode
    extents: list[Extent] = field(default_factory=list)
    tree_blocks: list[int] = field(default_factory=list)
    map_dirty: bool = False
    #: The extent tree's leaves as they are on disk (or in the running transaction), in order:
    #: ``[key, block, first]``, where leaf *j* holds the extents whose ``logical`` lies in
    #: ``[key_j, key_j+1)`` (``key_0`` is 0) and ``first`` is its first extent's ``logical`` (its
    #: index entry).  Empty while the extents are inline in the inode.
    leaves: list[list[int]] = field(default_factory=list)
    #: The tree's index node blocks (every level above the leaves), and the (first, block) of
    #: every leaf they were written for: unchanged leaves need no index rewrite.
    index_blocks: list[int] = field(default_factory=list)
    index_of: list[tuple[int, int]] = field(default_factory=list)
    #: The logical range ``[lo, hi)`` holding every extent changed since the tree was last written
    #: (``lo > hi``: unknown - the next flush rebuilds the whole tree).
    dirty_lo: int = 0
    dirty_hi: int = -1
    #: Bumped with every change to the file's data, block map or size: read-ahead chunks of this
    #: file are current while it is unchanged (an abort drops the records, so a new one starts over).
    data_version: int = 0
    #: The FileSystem's attributes of this inode, as last reported (an ``Attr``); None once the inode
    #: may have changed.  Every change to an inode's attributes ends in :meth:`InodeStore.put` (it
    #: must, to reach the disk), which clears it.
    attr: Any = None


class InodeStore:
    def __init__(
        self, sb: Superblock, cache: BufferCache, journal: Journal, blocks: BitmapAllocator,
        inodes: BitmapAllocator,
    ) -> None:
        self.sb = sb
        self.cache = cache
        self.journal = journal
        self.dev = cache.dev
        self.bs = sb.block_size
        self.blocks = blocks
        self.inodes = inodes
        self.per_block = self.bs // INODE_SIZE
        self._recs: dict[int, InodeRec] = {}
        #: The record of an inode if it is loaded, else None (no load, no checks: hot paths that
        #: only want a cached value, e.g. ``InodeRec.attr``).
        self.loaded = self._recs.get
        #: inodes put by the current operation, packed into their slots when it ends (``put``); empty
        #: outside an operation
        self._pending: dict[int, InodeRec] = {}
        self._ino_goal = 3
        journal.abort_hooks += [self._recs.clear, self._pending.clear]

    # --------------------------------------------------------------------------------- inodes
    def _slot(self, ino: int) -> tuple[int, int]:
        if not 0 < ino < self.sb.inode_count:
            raise Corrupt(f"inode number {ino} out of range")
        blk, idx = divmod(ino, self.per_block)
        return self.sb.inode_table_start + blk, idx * INODE_SIZE

    def get(self, ino: int) -> InodeRec:
        """The record of inode ``ino`` (loaded and verified on first use). Raises Corrupt."""
        rec = self._recs.get(ino)
        if rec is not None:
            return rec
        bno, off = self._slot(ino)
        buf = self.cache.read(bno, None)
        inode = Inode.unpack(buf.data[off : off + INODE_SIZE], self.cache.seed, ino)
        rec = InodeRec(ino, inode)
        if not inode.is_free:
            self._load_extents(rec)
        self._recs[ino] = rec
        return rec

    def prefetch(self, inos: Iterable[int]) -> None:
        """Bring the inode-table blocks of the not yet loaded inodes among ``inos`` into the cache with
        ONE ``preadv`` (readdirplus visits a leaf's inodes in hash order, i.e. scattered over the table:
        block by block that was one device request per inode on a cold cache).  Numbers out of range
        are skipped; :meth:`get` reports them."""
        recs, per, first, count = self._recs, self.per_block, self.sb.inode_table_start, self.sb.inode_count
        bnos = {first + ino // per for ino in inos if ino not in recs and 0 < ino < count}
        if bnos:
            self.cache.prefetch(sorted(bnos), None)

    def put(self, tx: Transaction, rec: InodeRec) -> None:
        """Store the record's inode into its inode-table block when the operation ends (and schedule a
        tree rebuild if needed).

        Deferred rather than packed at once: an operation puts the same inode several times (a create
        allocates, then fills in and puts the new inode; a write rebuilds the extent root and puts the
        new size), and each pack costs a struct pack, a CRC and a slot copy.  The slot is written once,
        by :meth:`_write_pending` (a ``before_commit`` hook), before the operation's blocks join the
        running transaction — so the on-disk and journaled images are exactly what an immediate write
        would have produced.  Nothing reads an inode slot of a loaded record inside an operation (the
        record is the authority while it is in ``_recs``).
        """
        rec.attr = None
        if rec.map_dirty:
            tx.before_commit(lambda: self._flush_map(tx, rec))
        self._write_slot(tx, rec)

    def _write_slot(self, tx: Transaction, rec: InodeRec) -> None:
        """Schedule ``rec`` for :meth:`_write_pending` (the first one in an operation registers it)."""
        pending = self._pending
        if not pending:
            tx.before_commit(lambda: self._write_pending(tx))
        pending[rec.ino] = rec

    def _write_pending(self, tx: Transaction) -> None:
        """Pack every inode put during the operation into its slot, once each, and dirty the blocks."""
        for rec in self._pending.values():
            self._store_slot(tx, rec)
        self._pending.clear()

    def _store_slot(self, tx: Transaction, rec: InodeRec) -> None:
        bno, off = self._slot(rec.ino)
        buf = self.cache.read(bno, None)
        buf.data[off : off + INODE_SIZE] = rec.inode.pack(self.cache.seed, rec.ino)
        tx.dirty(buf)

    def allocate(self, tx: Transaction, inode: Inode) -> InodeRec:
        """Allocate an inode number, set ``inode.generation`` to the slot's previous one + 1, store it."""
        ino = self.inodes.alloc_one(tx, self._ino_goal)
        self._ino_goal = ino + 1
        self._recs.pop(ino, None)
        try:
            old = self.get(ino).inode
            if not old.is_free:
                raise Corrupt(f"inode {ino} is free in the bitmap but in use in the table")
            gen = (old.generation + 1) & 0xFFFFFFFF
        except Corrupt as e:
            if "in use" in str(e):
                raise
            gen = int.from_bytes(os.urandom(4), "little")
        inode.generation = gen
        rec = InodeRec(ino, inode)
        self._recs[ino] = rec
        self.put(tx, rec)
        return rec

    def free(self, tx: Transaction, rec: InodeRec) -> None:
        """Release all blocks of ``rec`` and mark the inode free (keeping its generation)."""
        rec.data_version += 1
        self.punch(tx, rec, 0, MAX_LOGICAL_BLOCKS)
        for b in rec.tree_blocks:
            self.blocks.release(tx, b)
            self.cache.forget(b)
        rec.tree_blocks = []
        if rec.inode.xattr_block:
            self.blocks.release(tx, rec.inode.xattr_block)
            self.cache.forget(rec.inode.xattr_block)
        rec.inode = Inode(generation=rec.inode.generation)
        rec.map_dirty = False
        # Written now, not deferred: the number may be allocated again before the operation ends, and
        # ``allocate`` reads the slot for the previous generation.
        self._pending.pop(rec.ino, None)
        self._store_slot(tx, rec)
        self.inodes.release(tx, rec.ino)
        self._recs.pop(rec.ino, None)

    # --------------------------------------------------------------------------------- extents
    def _load_extents(self, rec: InodeRec) -> None:
        ino = rec.inode
        if ino.flags & 1 or ino.ext_count == 0:  # INLINE_DATA or nothing mapped
            return
        area = ino.area
        if ino.ext_depth == 0:
            rec.extents = [Extent.unpack(area, i * EXTENT_SIZE) for i in range(ino.ext_count)]
        else:
            for i in range(ino.ext_count):
                ix = ExtentIndex.unpack(area, i * EXTENT_SIZE)
                self._load_node(rec, ix.child, ino.ext_depth - 1)
            if rec.leaves:
                rec.leaves[0][0] = 0
                rec.index_of = [(first, bno) for _, bno, first in rec.leaves]
        prev_end = 0
        for e in rec.extents:
            if e.length == 0 or e.logical < prev_end or e.end > MAX_LOGICAL_BLOCKS:
                raise Corrupt(f"inode {rec.ino}: extents overlap or are malformed at logical {e.logical}")
            if not self.sb.data_start <= e.physical or e.physical + e.length > self.sb.backup_sb_block:
                raise Corrupt(f"inode {rec.ino}: extent points outside the data region ({e.physical})")
            prev_end = e.end

    def _load_node(self, rec: InodeRec, bno: int, depth: int) -> None:
        if not self.sb.data_start <= bno < self.sb.backup_sb_block:
            raise Corrupt(f"inode {rec.ino}: extent tree block {bno} outside the data region")
        buf = self.cache.read(bno, BlockType.EXTENT_NODE, rec.ino, rec.inode.generation)
        d, count, _mx, _, _ = EXTENT_NODE_HDR.unpack_from(buf.data, 32)
        if d != depth or count > extent_node_capacity(self.bs) or count == 0:
            raise Corrupt(f"block {bno}: extent node depth {d} count {count} (expected depth {depth})")
        rec.tree_blocks.append(bno)
        if depth == 0:
            first = EXTENT.unpack_from(buf.data, EXTENT_NODE_OFF)[0]
            rec.leaves.append([first, bno, first])
        else:
            rec.index_blocks.append(bno)
        for i in range(count):
            off = EXTENT_NODE_OFF + i * EXTENT_SIZE
            if depth == 0:
                rec.extents.append(Extent.unpack(buf.data, off))
            else:
                self._load_node(rec, ExtentIndex.unpack(buf.data, off).child, depth - 1)

    def _flush_map(self, tx: Transaction, rec: InodeRec) -> None:
        """Write the extent tree of ``rec`` from its extent list (FORMAT.md §5.2).

        Only what changed is written: the leaves whose key range holds the changed extents
        (``dirty_lo``/``dirty_hi``), split when one overflows, dropped when one empties, and the
        index levels above them (a few blocks: one index entry per leaf).  Rewriting every leaf
        instead made each allocating write cost time in proportion to the file's extent count:
        random 4 KiB writes into a sparse file took 2.4 ms each by 8,000 extents.  The whole tree
        is packed from scratch when the leaves are unknown (the extents were inline, or a change
        did not say where it was).
        """
        if not rec.map_dirty or self._recs.get(rec.ino) is not rec:
            return
        rec.map_dirty = False
        lo, hi = rec.dirty_lo, rec.dirty_hi
        rec.dirty_lo, rec.dirty_hi = 0, -1
        ino = rec.inode
        exts = rec.extents
        if len(exts) <= INLINE_EXTENTS:
            for b in rec.tree_blocks:
                self._free_tree_block(tx, rec, b)
            rec.tree_blocks, rec.leaves, rec.index_blocks, rec.index_of = [], [], [], []
            self._set_root(ino, 0, [e.pack() for e in exts])
            self._write_slot(tx, rec)
            return
        if rec.leaves and lo <= hi:
            self._update_leaves(tx, rec, lo, hi)
        else:
            self._pack_leaves(tx, rec)
        self._write_index(tx, rec)
        rec.tree_blocks = [b for _, b, _ in rec.leaves] + rec.index_blocks
        self._write_slot(tx, rec)

    def _free_tree_block(self, tx: Transaction, rec: InodeRec, bno: int) -> None:
        self.blocks.release(tx, bno)
        self.cache.forget(bno)
        rec.inode.blocks -= 1

    def _new_tree_block(self, tx: Transaction, rec: InodeRec, goal: int) -> int:
        bno = self.blocks.alloc_one(tx, goal)
        rec.inode.blocks += 1
        return bno

    def _write_leaf(self, tx: Transaction, rec: InodeRec, bno: int, exts: Sequence[Extent]) -> None:
        self._write_node(tx, rec, bno, 0, [e.pack() for e in exts])

    def _write_node(
        self, tx: Transaction, rec: InodeRec, bno: int, depth: int, entries: Sequence[bytes]
    ) -> None:
        """Tree block ``bno`` from scratch: a node at ``depth`` holding ``entries`` (packed)."""
        buf = self.cache.new(bno)
        init_block(buf.data, BlockType.EXTENT_NODE, bno, rec.ino, rec.inode.generation)
        EXTENT_NODE_HDR.pack_into(buf.data, 32, depth, len(entries), extent_node_capacity(self.bs), 0, 0)
        buf.data[EXTENT_NODE_OFF : EXTENT_NODE_OFF + EXTENT_SIZE * len(entries)] = b"".join(entries)
        tx.dirty(buf)

    def _pack_leaves(self, tx: Transaction, rec: InodeRec) -> None:
        """Every extent into full leaves, reusing the record's old leaf blocks."""
        exts = rec.extents
        cap = extent_node_capacity(self.bs)
        spare = [b for _, b, _ in rec.leaves] if rec.leaves else list(rec.tree_blocks)
        if rec.leaves:
            spare += rec.index_blocks
        leaves: list[list[int]] = []
        for i in range(0, len(exts), cap):
            chunk = exts[i : i + cap]
            if spare:
                bno = spare.pop(0)
            else:
                bno = self._new_tree_block(tx, rec, leaves[-1][1] + 1 if leaves else exts[0].physical)
            self._write_leaf(tx, rec, bno, chunk)
            leaves.append([chunk[0].logical if leaves else 0, bno, chunk[0].logical])
        rec.leaves = leaves
        # what is left over of the old blocks serves the index levels first (_write_index)
        rec.index_blocks = spare
        rec.index_of = []

    def _update_leaves(self, tx: Transaction, rec: InodeRec, lo: int, hi: int) -> None:
        """Rewrite the leaves holding extents with ``logical`` in ``[lo, hi)`` (see _flush_map)."""
        exts = rec.extents
        leaves = rec.leaves
        cap = extent_node_capacity(self.bs)
        keys = [k for k, _, _ in leaves]
        first = max(bisect.bisect_right(keys, lo) - 1, 0)
        last = max(bisect.bisect_right(keys, hi - 1) - 1, first)
        for j in range(last, first - 1, -1):  # from the right: splits and drops shift only later leaves
            key, bno, _ = leaves[j]
            s = bisect.bisect_left(exts, key, key=_LOGICAL) if j else 0
            e = bisect.bisect_left(exts, leaves[j + 1][0], key=_LOGICAL) if j + 1 < len(leaves) else len(exts)
            if s == e:
                self._free_tree_block(tx, rec, bno)
                del leaves[j]
                if j == 0 and leaves:
                    leaves[0][0] = 0
                continue
            if e - s <= cap:
                if not self._splice_leaf(tx, rec, bno, exts, s, e, lo, hi):
                    self._write_leaf(tx, rec, bno, exts[s:e])
                leaves[j][2] = exts[s].logical
                continue
            # Overflow: split into pieces filled to at most 3/4, so that the next inserts fit.
            pieces = -(-(e - s) // (cap * 3 // 4))
            step = -(-(e - s) // pieces)
            new: list[list[int]] = []
            for k, p in enumerate(range(s, e, step)):
                chunk = exts[p : min(p + step, e)]
                b = bno if k == 0 else self._new_tree_block(tx, rec, new[-1][1] + 1)
                self._write_leaf(tx, rec, b, chunk)
                new.append([key if k == 0 else chunk[0].logical, b, chunk[0].logical])
            leaves[j : j + 1] = new

    def _splice_leaf(
        self, tx: Transaction, rec: InodeRec, bno: int, exts: list[Extent], s: int, e: int, lo: int, hi: int
    ) -> bool:
        """Rewrite in place only the entries of leaf ``bno`` with ``logical`` in ``[lo, hi)``: its
        new extents are ``exts[s:e]``, and those outside the range are the ones it holds already
        (the bytes before the range stay, the ones after move).  False: the block is not what the
        record expects; the caller writes it whole."""
        buf = self.cache.read(bno, BlockType.EXTENT_NODE, rec.ino, rec.inode.generation)
        data = buf.data
        old = EXTENT_NODE_HDR.unpack_from(data, 32)[1]
        logicals = np.frombuffer(data, dtype="<u4", count=old * 4, offset=EXTENT_NODE_OFF)[::4]
        p = int(np.searchsorted(logicals, lo))
        q = int(np.searchsorted(logicals, hi))
        p_new = bisect.bisect_left(exts, lo, s, e, key=_LOGICAL) - s
        q_new = bisect.bisect_left(exts, hi, s, e, key=_LOGICAL) - s
        if p != p_new or old - q != (e - s) - q_new:
            return False
        at = EXTENT_NODE_OFF + EXTENT_SIZE * p
        tail = bytes(data[EXTENT_NODE_OFF + EXTENT_SIZE * q : EXTENT_NODE_OFF + EXTENT_SIZE * old])
        body = b"".join(x.pack() for x in exts[s + p : s + q_new]) + tail
        data[at : at + len(body)] = body
        end = EXTENT_NODE_OFF + EXTENT_SIZE * (e - s)
        if e - s < old:
            data[end : EXTENT_NODE_OFF + EXTENT_SIZE * old] = bytes(EXTENT_SIZE * (old - (e - s)))
        EXTENT_NODE_HDR.pack_into(data, 32, 0, e - s, extent_node_capacity(self.bs), 0, 0)
        tx.dirty(buf)
        return True

    def _write_index(self, tx: Transaction, rec: InodeRec) -> None:
        """The index levels above ``rec.leaves`` and the root in the inode."""
        ino = rec.inode
        cap = extent_node_capacity(self.bs)
        index_of = [(first, bno) for _, bno, first in rec.leaves]
        if index_of == rec.index_of:
            return  # the same leaves with the same first extents: index nodes and root stand
        rec.index_of = index_of
        spare = rec.index_blocks
        used: list[int] = []
        # the index entry carries the leaf's first extent (fsck checks the ranges against it)
        entries = [(first, ExtentIndex(first, bno).pack()) for first, bno in index_of]
        depth = 1
        while len(entries) > INLINE_EXTENTS:
            nxt: list[tuple[int, bytes]] = []
            for i in range(0, len(entries), cap):
                chunk = entries[i : i + cap]
                if spare:
                    bno = spare.pop(0)
                else:
                    goal = used[-1] + 1 if used else rec.leaves[-1][1] + 1
                    bno = self._new_tree_block(tx, rec, goal)
                used.append(bno)
                self._write_node(tx, rec, bno, depth, [c[1] for c in chunk])
                nxt.append((chunk[0][0], ExtentIndex(chunk[0][0], bno).pack()))
            entries = nxt
            depth += 1
        for b in spare:
            self._free_tree_block(tx, rec, b)
        rec.index_blocks = used
        self._set_root(ino, depth, [e[1] for e in entries])

    @staticmethod
    def _set_root(ino: Inode, depth: int, entries: Sequence[bytes]) -> None:
        """The tree's root in the inode: ``entries`` (packed) of a node at ``depth``."""
        ino.ext_depth = depth
        ino.ext_count = len(entries)
        ino.flags &= ~1
        ino.area = b"".join(entries).ljust(INODE_AREA_SIZE, b"\0")

    def _mark_map(self, tx: Transaction, rec: InodeRec, lo: int = 0, hi: int = -1) -> None:
        """The map changed; every changed extent (as it was and as it is) lies in ``[lo, hi)``.
        Without a range the next flush rewrites the whole tree."""
        if lo > hi:
            rec.dirty_lo, rec.dirty_hi = 1, 0  # unknown from here until the flush
        elif rec.dirty_lo <= rec.dirty_hi or not rec.map_dirty:
            if rec.map_dirty:
                lo, hi = min(lo, rec.dirty_lo), max(hi, rec.dirty_hi)
            rec.dirty_lo, rec.dirty_hi = lo, hi
        if not rec.map_dirty:
            rec.map_dirty = True
            tx.before_commit(lambda: self._flush_map(tx, rec))

    def map_range(self, rec: InodeRec, first: int, count: int) -> list[tuple[int, int, int | None, bool]]:
        """Segments ``(logical, length, physical or None for a hole, unwritten)`` covering the range."""
        out: list[tuple[int, int, int | None, bool]] = []
        exts = rec.extents
        i = max(bisect.bisect_right(rec.extents, first, key=_LOGICAL) - 1, 0)
        pos, end = first, first + count
        while pos < end:
            if i < len(exts) and exts[i].end <= pos:
                i += 1
                continue
            if i < len(exts) and exts[i].logical <= pos:
                e = exts[i]
                n = min(e.end, end) - pos
                out.append((pos, n, e.physical + (pos - e.logical), bool(e.flags & EXT_UNWRITTEN)))
                pos += n
                i += 1
            else:
                nxt = exts[i].logical if i < len(exts) else end
                n = min(nxt, end) - pos
                out.append((pos, n, None, False))
                pos += n
        return out

    def bmap(self, rec: InodeRec, lblock: int) -> int | None:
        """Physical block of ``lblock`` (None for a hole; an unwritten extent still maps).

        Every directory node visit calls this, so it bisects the extent list directly instead of
        building ``map_range`` segments and a list of extent starts per call.
        """
        exts = rec.extents
        i = bisect.bisect_right(exts, lblock, key=_LOGICAL) - 1
        if i >= 0:
            e = exts[i]
            if lblock < e.logical + e.length:
                return e.physical + (lblock - e.logical)
        return None

    def _insert_extent(self, rec: InodeRec, new: Extent) -> Extent:
        """Insert ``new``, merged with the extents it continues; returns the extent as inserted."""
        exts = rec.extents
        i = bisect.bisect_left(rec.extents, new.logical, key=_LOGICAL)
        if i > 0:
            p = exts[i - 1]
            if (p.end == new.logical and p.physical + p.length == new.physical and p.flags == new.flags
                    and p.length + new.length <= MAX_EXTENT_LEN):
                new = Extent(p.logical, p.length + new.length, p.physical, p.flags)
                i -= 1
                del exts[i]
        if i < len(exts):
            n = exts[i]
            if (new.end == n.logical and new.physical + new.length == n.physical and n.flags == new.flags
                    and n.length + new.length <= MAX_EXTENT_LEN):
                new = Extent(new.logical, new.length + n.length, new.physical, new.flags)
                del exts[i]
        exts.insert(i, new)
        return new

    def allocate_range(
        self, tx: Transaction, rec: InodeRec, first: int, count: int
    ) -> list[tuple[int, int, int]]:
        """Map every hole in [first, first+count) to new blocks; returns the new (logical, phys, n)."""
        rec.data_version += 1
        if first + count > MAX_LOGICAL_BLOCKS:
            raise FileTooBig(f"logical block {first + count} beyond the 2^32 limit")
        new: list[tuple[int, int, int]] = []
        goal = 0
        lo, hi = MAX_LOGICAL_BLOCKS, 0  # the extents inserted (merged with their neighbours)
        for lg, n, phys, _unw in self.map_range(rec, first, count):
            if phys is not None:
                goal = phys + n
                continue
            if not goal:
                prev = self.map_range(rec, lg - 1, 1)[0] if lg else None
                goal = prev[2] + 1 if prev and prev[2] is not None else self.sb.data_start
            while n:
                start, got = self.blocks.alloc_run(tx, goal, n)
                put = self._insert_extent(rec, Extent(lg, got, start))
                lo, hi = min(lo, put.logical), max(hi, put.end)
                rec.inode.blocks += got
                new.append((lg, start, got))
                lg += got
                n -= got
                goal = start + got
        if new:
            self._mark_map(tx, rec, lo, hi)
        return new

    def punch(self, tx: Transaction, rec: InodeRec, first: int, end: int) -> int:
        """Unmap and free logical blocks [first, end). Returns the number of blocks freed."""
        rec.data_version += 1
        kept: list[Extent] = []
        freed = 0
        span_lo, span_hi = MAX_LOGICAL_BLOCKS, 0  # the extents cut or removed
        for e in rec.extents:
            if e.end <= first or e.logical >= end:
                kept.append(e)
                continue
            span_lo, span_hi = min(span_lo, e.logical), max(span_hi, e.end)
            if e.logical < first:
                kept.append(Extent(e.logical, first - e.logical, e.physical, e.flags))
            lo, hi = max(e.logical, first), min(e.end, end)
            self.blocks.release(tx, e.physical + (lo - e.logical), hi - lo)
            freed += hi - lo
            if e.end > end:
                kept.append(Extent(end, e.end - end, e.physical + (end - e.logical), e.flags))
        if freed:
            rec.extents = kept
            rec.inode.blocks -= freed
            self._mark_map(tx, rec, span_lo, span_hi)
        return freed

    # --------------------------------------------------------------------------------- data I/O
    def read(self, rec: InodeRec, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` (short at EOF). One ``preadv`` for all mapped runs."""
        plan = self.read_plan(rec, offset, size)
        return plan.assemble(self.dev.preadv(plan.requests) if plan.requests else [])

    def read_plan(self, rec: InodeRec, offset: int, size: int) -> ReadPlan:
        """Map a read to device requests without doing them (see :class:`ReadPlan`)."""
        size = max(min(size, rec.inode.size - offset), 0)
        bs = self.bs
        if size == 0:
            return ReadPlan([], [], 0, 0, 0, self.blocks.releases)
        first, last = offset // bs, (offset + size - 1) // bs
        reqs: list[tuple[int, int]] = []
        where: list[int] = []
        for lg, n, phys, unw in self.map_range(rec, first, last - first + 1):
            if phys is not None and not unw:
                reqs.append((phys * bs, n * bs))
                where.append((lg - first) * bs)
        return ReadPlan(reqs, where, (last - first + 1) * bs, offset - first * bs, size, self.blocks.releases)

    def write(self, tx: Transaction, rec: InodeRec, offset: int, data: Buffer) -> int:
        """Write ``data`` at ``offset``: allocate holes, RMW partial edge blocks, one ``pwritev``."""
        rec.data_version += 1
        mv = memoryview(data).cast("B")
        size = len(mv)
        if size == 0:
            return 0
        bs = self.bs
        if offset + size > MAX_LOGICAL_BLOCKS * bs:
            raise FileTooBig(f"write end {offset + size} beyond the maximum file size")
        first, last = offset // bs, (offset + size - 1) // bs
        nblk = last - first + 1
        head, tail = offset - first * bs, (last + 1) * bs - (offset + size)
        segs = self.map_range(rec, first, nblk)
        # Partial edge blocks that hold data now (not holes, not unwritten) are read back and merged.
        edge_reads: list[tuple[int, int]] = []  # (block index in the write, physical block)
        lg, _n, phys, unw = segs[0]
        if head and phys is not None and not unw:
            edge_reads.append((0, phys))
        lg, _n, phys, unw = segs[-1]
        if tail and phys is not None and not unw and (last != first or not head):
            edge_reads.append((nblk - 1, phys + last - lg))
        if not all(phys is not None and not unw for _, _, phys, unw in segs):
            # Holes to allocate (or unwritten blocks to convert).  An overwrite of written blocks -
            # random writes, rewrites - skips this: the map is already what it will be.
            self.allocate_range(tx, rec, first, nblk)
            segs = self.map_range(rec, first, nblk)
        if head or tail:
            buf = bytearray(nblk * bs)
            if edge_reads:
                got = self.dev.preadv([(p * bs, bs) for _, p in edge_reads])
                for (i, _), d in zip(edge_reads, got, strict=True):
                    buf[i * bs : (i + 1) * bs] = d
            buf[head : head + size] = mv
            src: memoryview = memoryview(buf)
        else:
            src = mv
        reqs: list[tuple[int, Buffer]] = []
        convert = False
        for lg, n, phys, unw in segs:
            if phys is None:
                raise Corrupt(f"inode {rec.ino}: block {lg} unmapped after allocation")
            convert |= unw
            reqs.append((phys * bs, src[(lg - first) * bs : (lg - first + n) * bs]))
        self.dev.pwritev(reqs)  # ordered data: before the metadata commit
        if convert:
            self._clear_unwritten(tx, rec, first, nblk)
        if offset + size > rec.inode.size:
            rec.inode.size = offset + size
        return size

    def _clear_unwritten(self, tx: Transaction, rec: InodeRec, first: int, count: int) -> None:
        """Blocks [first, first+count) were written: their unwritten extents become written ones
        (split where the range ends inside one).  Only the extents that overlap the range are
        looked at, so a write costs the same in a file of many extents."""
        exts = rec.extents
        i0 = max(bisect.bisect_right(exts, first, key=_LOGICAL) - 1, 0)
        i1 = bisect.bisect_left(exts, first + count, key=_LOGICAL)
        out: list[Extent] = []
        span_lo, span_hi = MAX_LOGICAL_BLOCKS, 0  # the extents split
        for e in exts[i0:i1]:
            if e.flags & EXT_UNWRITTEN and e.logical < first + count and e.end > first:
                span_lo, span_hi = min(span_lo, e.logical), max(span_hi, e.end)
                lo, hi = max(e.logical, first), min(e.end, first + count)
                if e.logical < lo:
                    out.append(Extent(e.logical, lo - e.logical, e.physical, e.flags))
                out.append(Extent(lo, hi - lo, e.physical + lo - e.logical, 0))
                if hi < e.end:
                    out.append(Extent(hi, e.end - hi, e.physical + hi - e.logical, e.flags))
            else:
                out.append(e)
        exts[i0:i1] = out
        if span_lo < span_hi:
            self._mark_map(tx, rec, span_lo, span_hi)

    def truncate(self, tx: Transaction, rec: InodeRec, size: int) -> None:
        """Set the size; shrinking frees whole blocks past the end and zeroes the tail of the last block."""
        rec.data_version += 1
        bs = self.bs
        if size > MAX_LOGICAL_BLOCKS * bs:
            raise FileTooBig(f"size {size} beyond the maximum file size")
        if size < rec.inode.size:
            keep = -(-size // bs)
            self.punch(tx, rec, keep, MAX_LOGICAL_BLOCKS)
            if size % bs:
                phys = self.bmap(rec, size // bs)
                if phys is not None:
                    blk = bytearray(self.dev.pread(phys * bs, bs))
                    blk[size % bs :] = bytes(bs - size % bs)
                    self.dev.pwrite(phys * bs, blk)
        rec.inode.size = size

    def check_space(self, nblocks: int) -> None:
        if nblocks > self.blocks.free:
            raise NoSpace(f"need {nblocks} blocks, {self.blocks.free} free")
