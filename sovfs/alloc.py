"""Bitmap allocators for blocks and inodes (FORMAT.md §2.6).

Theory of operation
-------------------
A :class:`BitmapAllocator` owns one bitmap region (block bitmap or inode bitmap).  Bits live only in the
cached bitmap blocks; every change is made inside a transaction and dirties the bitmap block.  Searches
run in Numba kernels over the packed bytes of a bitmap block (:mod:`sovfs._bitmap`), never a per-bit
Python loop.

Block allocation is extent-friendly: :meth:`alloc_run` looks for a free run of the wanted length starting
at a *goal* (the block after the file's previous extent), takes the first run that is long enough, and
otherwise the longest run it saw, so that large writes become few, large extents.

Invariants: ``free`` equals the number of zero bits (recounted on abort); bits past ``nbits`` are set
and never allocated; items below ``reserved_below`` are never returned; every item in
``[_known_lo, _known_hi)`` is used or pending.  That interval is what earlier searches walked over: a
search whose goal lies in it starts at its end (files created one after another ask for the same
goal, and each used to rescan every block allocated since - 33,000 bits, ~20 µs, per allocation).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sovfs import _bitmap
from sovfs.cache import Buf, BufferCache
from sovfs.errors import Corrupt, NoSpace
from sovfs.format import HEADER_SIZE, BlockType, bits_per_bitmap_block
from sovfs.journal import Transaction

__all__ = ["BitmapAllocator"]

_NO_PENDING = np.zeros(0, np.uint8)


class BitmapAllocator:
    def __init__(
        self, cache: BufferCache, start: int, nblocks: int, nbits: int, btype: BlockType, what: str,
    ) -> None:
        self.cache = cache
        self.start = start
        self.nblocks = nblocks
        self.nbits = nbits
        self.btype = btype
        self.what = what
        self.bpb = bits_per_bitmap_block(cache.bs)
        self.free = 0
        #: bumped by every release: a reader that mapped blocks before an await
        #: re-checks it afterwards (the blocks may have been freed and reused)
        self.releases = 0
        #: journaled block allocator: items freed by the running transaction stay unallocatable until it
        #: commits (a block freed in memory must not receive file data while the on-disk state still
        #: has it in use); bitmap block index -> packed mask of pending bits (the bitmap's layout)
        self.defer_frees = False
        self._pending: dict[int, np.ndarray] = {}
        self.pending_count = 0
        self._known_lo = self._known_hi = 0
        #: pending items that make :meth:`short_of_space` ask for a commit (set by the owner)
        self.pending_commit = 1 << 62
        self.recount()

    def _buf(self, k: int) -> Buf:
        return self.cache.read(self.start + k, self.btype, 0, 0)

    def _packed(self, k: int) -> np.ndarray:
        """Block ``k``'s bits as a writable view of the cached block (changes need ``tx.dirty``)."""
        return np.frombuffer(self._buf(k).data, dtype=np.uint8, offset=HEADER_SIZE)

    def frees_committed(self) -> None:
        """The running transaction is durable: the items it freed may be reused."""
        self._pending.clear()
        self.pending_count = 0
        # the known-used interval may cover pending items (searches count them as used): free now
        self._known_lo = self._known_hi = 0

    def short_of_space(self) -> bool:
        """Journal pressure hook: commit to make pending items reusable when most free items are only
        pending, or when a large delete left at least ``pending_commit`` of them (the filesystem sets
        it from ``sovfs.fs.PENDING_COMMIT_BYTES``, 64 MiB).

        The second case keeps a rewritten file in place.  New files take the first free run (first
        fit); while a deleted file's blocks are pending, a file written right after it goes past
        them, into space the image may never have used, and a sparse image file grows on the host
        by as much (deleting and rewriting a 128 MiB file four times moved it 128 MiB further each
        time; now it stays where it was).
        """
        n = self.pending_count
        return n > 0 and (n * 2 >= self.free or n >= self.pending_commit)

    def recount(self) -> None:
        self._known_lo = self._known_hi = 0  # an abort may have freed anything again
        bufs = self.cache.read_many([self.start + k for k in range(self.nblocks)], self.btype)
        used = 0
        for b in bufs:
            used += int(_bitmap.count_set(np.frombuffer(b.data, dtype=np.uint8, offset=HEADER_SIZE)))
        self.free = self.nblocks * self.bpb - used

    def is_used(self, item: int) -> bool:
        k, r = divmod(item, self.bpb)
        return bool(self._buf(k).data[HEADER_SIZE + r // 8] >> (r % 8) & 1)

    def _set(self, tx: Transaction, start: int, count: int, value: bool) -> None:
        """Set or clear bits [start, start+count); every bit must currently have the opposite value."""
        while count > 0:
            k, r = divmod(start, self.bpb)
            n = min(count, self.bpb - r)
            buf = self._buf(k)
            packed = np.frombuffer(buf.data, dtype=np.uint8, offset=HEADER_SIZE)
            if not _bitmap.set_range(packed, r, n, value):
                raise Corrupt(f"{self.what} bitmap: double {'allocation' if value else 'free'} at {start}")
            if not value and self.defer_frees:
                pend = self._pending.get(k)
                if pend is None:
                    pend = self._pending[k] = np.zeros(self.bpb // 8, np.uint8)
                _bitmap.set_range(pend, r, n, True)  # pending bits are clear: the items were in use
                self.pending_count += n
            tx.dirty(buf)
            self.free += -n if value else n
            start += n
            count -= n

    def mark_used(self, tx: Transaction, start: int, count: int = 1) -> None:
        self._set(tx, start, count, True)

    def release(self, tx: Transaction, start: int, count: int = 1) -> None:
        if start < 0 or start + count > self.nbits:
            raise Corrupt(f"{self.what} bitmap: free of [{start}, {start + count}) outside the device")
        self.releases += 1
        if self._known_lo <= start < self._known_hi:
            self._known_hi = start
        self._set(tx, start, count, False)

    def find_run(self, goal: int, want: int) -> tuple[int, int]:
        """Find a free run: the first of length ≥ ``want`` at/after ``goal`` (wrapping), else the longest.

        Runs never cross a bitmap block.  Returns (start, length) with length ≤ want.  Raises NoSpace
        if nothing is free.
        """
        goal = goal if 0 <= goal < self.nbits else 0
        lo, hi = self._known_lo, self._known_hi
        asked = goal
        if lo <= goal < hi:
            goal = hi  # [goal, hi) is used: the same run is found from hi
            if goal >= self.nbits:
                goal = asked = lo = hi = 0  # the interval reaches the end: search everything
        k0 = goal // self.bpb
        best = (0, 0)
        for k, r0 in self._search_order(k0, goal % self.bpb):
            pend = self._pending.get(k, _NO_PENDING)
            start, length = _bitmap.find_run(self._packed(k), pend, r0, self.bpb, want)
            if length >= want:
                found = k * self.bpb + start
                if want == 1 and found >= goal:
                    # every item in [asked, found) was seen used: remember (joined to what was known)
                    if lo <= asked <= hi and hi > lo:
                        self._known_lo, self._known_hi = lo, found
                    else:
                        self._known_lo, self._known_hi = asked, found
                return found, want
            if length > best[1]:
                best = (k * self.bpb + start, length)
        if best[1] == 0:
            raise NoSpace(f"no free {self.what}s")
        return best

    def _search_order(self, k0: int, r0: int) -> Iterator[tuple[int, int]]:
        """(bitmap block, first bit) to search in turn: block ``k0`` from bit ``r0``, the other blocks
        whole (wrapping), then the start of ``k0``.  Lazy: the first block usually has the run."""
        yield k0, r0
        n = self.nblocks
        for i in range(1, n):
            yield (k0 + i) % n, 0
        if r0:
            yield k0, 0

    def alloc_run(self, tx: Transaction, goal: int, want: int) -> tuple[int, int]:
        start, n = self.find_run(goal, want)
        self.mark_used(tx, start, n)
        return start, n

    def alloc_one(self, tx: Transaction, goal: int) -> int:
        return self.alloc_run(tx, goal, 1)[0]
