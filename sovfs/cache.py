"""Block cache: verified metadata blocks in memory, written back in batches.

Theory of operation
-------------------
The cache owns every in-memory copy of a metadata block (bitmaps, inode-table blocks, extent-tree nodes,
directory nodes, xattr blocks). File data never enters it: file I/O goes straight to the device in
large batched requests.

* ``cache.read(bno, btype, owner, generation)`` returns a :class:`Buf` whose header was verified per
  FORMAT.md §3.1 when it was loaded (``btype=None`` for inode-table blocks, which carry per-inode
  checksums instead).  ``with cache.get(...) as buf:`` pins it for the duration of the block.
* ``cache.new(bno)`` returns a zeroed buffer without reading the device (a freshly allocated block).
* Buffers are modified only inside a transaction (``sovfs.journal``), which marks them dirty; dirty
  buffers are never evicted.  ``cache.write_back(bufs)`` seals headered blocks (computes their checksum)
  and writes them all in ONE ``pwritev``.
* ``cache.discard(bufs)`` forgets buffers whose in-memory contents must not survive (aborted transaction).

Invariants: at most one Buf per block number; a Buf with ``dirty`` set is in the current transaction's
set; clean buffers equal the device contents.  Single-threaded: callers serialise (the FS core is sync).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sovfs.blockdev import BlockDevice, Buffer
from sovfs.errors import Corrupt
from sovfs.format import HEADER, BlockType, seal_block, verify_block

__all__ = ["Buf", "BufferCache"]


class Buf:
    """One cached block. ``parsed`` caches a decoded view (e.g. a DirNode) owned by the layer above."""

    __slots__ = ("bno", "data", "dirty", "headered", "parsed", "pins")

    def __init__(self, bno: int, data: bytearray, headered: bool) -> None:
        self.bno = bno
        self.data = data
        self.dirty = False
        self.headered = headered
        self.pins = 0
        self.parsed: Any = None


class BufferCache:
    def __init__(self, dev: BlockDevice, block_size: int, seed: int, capacity: int = 8192) -> None:
        self.dev = dev
        self.bs = block_size
        self.seed = seed
        self.capacity = capacity
        self._bufs: OrderedDict[int, Buf] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------------------------------------
    def _insert(self, buf: Buf) -> Buf:
        self._bufs[buf.bno] = buf
        if len(self._bufs) > self.capacity:
            self._evict()
        return buf

    def _evict(self) -> None:
        excess = len(self._bufs) - self.capacity
        for bno in list(self._bufs):
            if excess <= 0:
                break
            b = self._bufs[bno]
            if not b.dirty and b.pins == 0:
                del self._bufs[bno]
                excess -= 1

    def _check(
        self, buf: Buf, btype: BlockType | None, owner: int | None, generation: int | None, fresh: bool
    ) -> None:
        if btype is None:
            return
        if fresh:
            verify_block(buf.data, self.seed, buf.bno, btype, owner, generation)
            return
        _, t, _, _, gen, _, own = HEADER.unpack_from(buf.data, 0)
        if t != btype or (owner is not None and own != owner) or (
            generation is not None and gen != generation
        ):
            raise Corrupt(f"block {buf.bno}: cached as type {t} owner {own}, wanted {btype.name} {owner}")

    def read(
        self, bno: int, btype: BlockType | None, owner: int | None = None, generation: int | None = None
    ) -> Buf:
        """Return block ``bno``, reading and verifying it if not cached. Raises Corrupt."""
        buf = self._bufs.get(bno)
        if buf is not None:
            self.hits += 1
            self._bufs.move_to_end(bno)
            self._check(buf, btype, owner, generation, fresh=False)
            return buf
        self.misses += 1
        data = bytearray(self.dev.pread(bno * self.bs, self.bs))
        buf = Buf(bno, data, btype is not None)
        self._check(buf, btype, owner, generation, fresh=True)
        return self._insert(buf)

    def read_many(self, bnos: Sequence[int], btype: BlockType | None) -> list[Buf]:
        """Read several blocks with one ``preadv`` (read-ahead, bitmaps at mount)."""
        self.prefetch(list(dict.fromkeys(bnos)), btype)
        return [self.read(b, btype) for b in bnos]

    def prefetch(self, bnos: Sequence[int], btype: BlockType | None) -> None:
        """Load the uncached blocks among ``bnos`` (distinct) with one ``preadv``, verified like
        :meth:`read`.  Unlike :meth:`read_many` it builds no result list and leaves cached blocks'
        LRU order alone: it is read-ahead, not use."""
        missing = [b for b in bnos if b not in self._bufs]
        if not missing:
            return
        datas = self.dev.preadv([(b * self.bs, self.bs) for b in missing])
        for b, d in zip(missing, datas, strict=True):
            buf = Buf(b, bytearray(d), btype is not None)
            self._check(buf, btype, None, None, fresh=True)
            self._insert(buf)
        self.misses += len(missing)

    @contextmanager
    def get(
        self, bno: int, btype: BlockType | None, owner: int | None = None, generation: int | None = None
    ) -> Iterator[Buf]:
        """``with cache.get(bno, type) as buf:`` — the buffer is pinned (not evicted) inside the block."""
        buf = self.read(bno, btype, owner, generation)
        buf.pins += 1
        try:
            yield buf
        finally:
            buf.pins -= 1

    def new(self, bno: int, headered: bool = True) -> Buf:
        """A zeroed buffer for a freshly allocated block (no device read)."""
        old = self._bufs.get(bno)
        if old is not None:
            old.data[:] = bytes(self.bs)
            old.parsed = None
            old.headered = headered
            return old
        return self._insert(Buf(bno, bytearray(self.bs), headered))

    def forget(self, bno: int) -> None:
        """Drop a clean or freed block from the cache (its block was freed)."""
        b = self._bufs.get(bno)
        if b is not None and b.pins == 0 and not b.dirty:  # a dirty one belongs to the running transaction
            del self._bufs[bno]

    def discard(self, bufs: Iterable[Buf]) -> None:
        """Forget the in-memory contents of ``bufs`` (aborted transaction); next read re-reads the disk."""
        for b in bufs:
            b.dirty = False
            self._bufs.pop(b.bno, None)

    def write_back(self, bufs: Sequence[Buf]) -> None:
        """Seal headered buffers and write them all with one ``pwritev``; they become clean."""
        reqs: list[tuple[int, Buffer]] = []
        for b in sorted(bufs, key=lambda x: x.bno):
            if b.headered:
                seal_block(b.data, self.seed)
            reqs.append((b.bno * self.bs, bytes(b.data)))
        if reqs:
            self.dev.pwritev(reqs)
        for b in bufs:
            b.dirty = False
        if len(self._bufs) > self.capacity:
            self._evict()

    def trim(self) -> None:
        """Evict clean buffers beyond capacity (after a commit made many buffers clean at once)."""
        if len(self._bufs) > self.capacity:
            self._evict()

    def drop_all(self) -> None:
        self._bufs.clear()


_U32 = struct.Struct("<I")
