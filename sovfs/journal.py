"""Transactions: every metadata change is begin → dirty blocks → commit.

Theory of operation
-------------------
``with journal.op() as tx:`` opens a transaction (nested ``op()`` calls join the outermost one, so a
FileSystem operation built from smaller ones commits once).  Inside it, layers modify cached metadata
buffers and call ``tx.dirty(buf)``.  When the outermost block exits normally, :meth:`Journal.commit`
receives the complete set of dirtied blocks in one call.  File data is written by the inode layer
*before* commit ("ordered data"), so committed metadata never points at unwritten data.

v1 commit writes the blocks in place with one ``pwritev`` (no log yet).  The journaling issue replaces
:meth:`Journal.commit` with: write descriptor + blocks + commit record to the journal region in one
``pwritev``, flush, then checkpoint in place — nothing above this module changes.

On an exception the transaction aborts: its dirty buffers are discarded from the cache (so the next read
sees the committed on-disk state) and the abort hooks registered by the layers above run (they drop
derived in-memory state: cached inodes, allocator counters).  The exception then propagates.

Invariant: outside ``op()`` no cached buffer is dirty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sovfs.cache import Buf, BufferCache

__all__ = ["Journal", "Transaction"]


class Transaction:
    __slots__ = ("_abort_hooks", "_commit_hooks", "blocks")

    def __init__(self) -> None:
        self.blocks: dict[int, Buf] = {}
        self._abort_hooks: list[Callable[[], None]] = []
        self._commit_hooks: list[Callable[[], None]] = []

    def dirty(self, buf: Buf) -> None:
        """Add ``buf`` to the transaction (idempotent)."""
        buf.dirty = True
        self.blocks[buf.bno] = buf

    def on_abort(self, hook: Callable[[], None]) -> None:
        self._abort_hooks.append(hook)

    def before_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` just before commit (layers flush deferred state such as extent trees)."""
        self._commit_hooks.append(hook)


class Journal:
    def __init__(self, cache: BufferCache) -> None:
        self.cache = cache
        self._tx: Transaction | None = None
        self.commits = 0
        self.abort_hooks: list[Callable[[], None]] = []  # permanent hooks run on every abort

    @property
    def active(self) -> Transaction | None:
        return self._tx

    @contextmanager
    def op(self) -> Iterator[Transaction]:
        if self._tx is not None:
            yield self._tx
            return
        tx = self._tx = Transaction()
        try:
            yield tx
            for hook in tx._commit_hooks:
                hook()
        except BaseException:
            self._tx = None
            self.cache.discard(tx.blocks.values())
            for hook in [*tx._abort_hooks, *self.abort_hooks]:
                hook()
            raise
        self._tx = None
        self.commit(list(tx.blocks.values()))

    def commit(self, blocks: list[Buf]) -> None:
        """Make ``blocks`` (the full set dirtied by one transaction) durable-ordered on the device."""
        self.commits += 1
        self.cache.write_back(blocks)
