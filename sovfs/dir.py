"""Directories: a B+tree of checksummed nodes keyed by SipHash of the name (FORMAT.md §6).

Theory of operation
-------------------
A directory's logical block 0 is the root node; other nodes live in any logical block of the directory
file, allocated at the lowest hole.  Leaves hold entries sorted by key (``base + collision index``),
interior nodes hold ``(key, child logical block)``.  Lookup descends one node per level: O(log n) block
reads.  Insert splits a full node in half by bytes (a root split moves the root's halves into two new
blocks and grows the tree by one level).  Remove deletes the entry and frees a non-root node once it is
empty; an empty interior root turns back into an empty leaf.  Nodes are never merged (a deliberate
simplification: lookups stay O(height); space is reclaimed only when nodes empty).

readdir cookies are keys + 1 (§6.4): they never change while an entry exists, so offsets stay valid
across inserts and removals.

Decoded nodes are cached on the cache buffer (``Buf.parsed``) and re-serialised only when modified.
Invariants: keys strictly increase within a node and across the tree in order; every non-root node is
reachable from exactly one interior entry; a leaf's serialised size fits ``B − 48``.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterator
from dataclasses import dataclass

from sovfs.cache import Buf
from sovfs.errors import Corrupt, Exists, NoSpace, NotFound
from sovfs.format import (
    DIR_INDEX_SIZE,
    MAX_COLLISIONS,
    BlockType,
    DirEntry,
    DirIndex,
    DirNode,
    dir_node_capacity,
    init_block,
    name_hash_base,
)
from sovfs.inode import InodeRec, InodeStore
from sovfs.journal import Transaction

__all__ = ["Directories", "Found"]

_KEY = operator.attrgetter("key")


@dataclass(frozen=True)
class Found:
    entry: DirEntry
    leaf: int  # logical block of the leaf holding it


class Directories:
    def __init__(self, store: InodeStore, hash_seed: bytes) -> None:
        self.store = store
        self.cache = store.cache
        self.bs = store.bs
        self.seed = hash_seed
        self.cap = dir_node_capacity(self.bs)
        self.node_reads = 0  # nodes visited (for tests of lookup cost)
        #: name -> hash base, for the names hashed recently: one create hashes its name three times
        #: (the kernel's negative LOOKUP, the existence check, the insert) and an unlink as often,
        #: and each SipHash call costs a Numba dispatch.  Pure function of (seed, name); bounded.
        self._bases: dict[bytes, int] = {}

    def _base(self, name: bytes) -> int:
        """``name_hash_base(seed, name)``, memoised for recently used names."""
        b = self._bases.get(name)
        if b is None:
            if len(self._bases) >= 4096:
                self._bases.clear()
            b = self._bases[name] = name_hash_base(self.seed, name)
        return b

    # ------------------------------------------------------------------------------ node access
    def _buf(self, d: InodeRec, lblock: int) -> Buf:
        phys = self.store.bmap(d, lblock)
        if phys is None:
            raise Corrupt(f"directory {d.ino}: node at logical block {lblock} is a hole")
        return self.cache.read(phys, BlockType.DIR_NODE, d.ino, d.inode.generation)

    def node(self, d: InodeRec, lblock: int) -> DirNode:
        self.node_reads += 1
        buf = self._buf(d, lblock)
        if buf.parsed is None:
            buf.parsed = DirNode.unpack(buf.data, f"directory {d.ino} block {buf.bno}")
        node: DirNode = buf.parsed
        return node

    def _store(
        self, tx: Transaction, d: InodeRec, lblock: int, node: DirNode, body: bytes | None = None
    ) -> None:
        buf = self._buf(d, lblock)
        node.pack_into(buf.data, body)
        buf.parsed = node
        tx.dirty(buf)

    def _new_node(self, tx: Transaction, d: InodeRec, node: DirNode) -> int:
        """Place ``node`` at the lowest unmapped logical block of the directory; return that block."""
        lblock = 0
        for e in d.extents:
            if e.logical > lblock:
                break
            lblock = e.end
        self.store.allocate_range(tx, d, lblock, 1)
        phys = self.store.bmap(d, lblock)
        if phys is None:
            raise Corrupt(f"directory {d.ino}: allocation of block {lblock} failed")
        buf = self.cache.new(phys)
        init_block(buf.data, BlockType.DIR_NODE, phys, d.ino, d.inode.generation)
        node.pack_into(buf.data)
        buf.parsed = node
        tx.dirty(buf)
        d.inode.size = max(d.inode.size, (lblock + 1) * self.bs)
        return lblock

    def _free_node(self, tx: Transaction, d: InodeRec, lblock: int) -> None:
        phys = self.store.bmap(d, lblock)
        self.store.punch(tx, d, lblock, lblock + 1)
        if phys is not None:
            self.cache.forget(phys)
        end = max((e.end for e in d.extents), default=1)
        d.inode.size = end * self.bs

    def init_dir(self, tx: Transaction, d: InodeRec) -> None:
        """Give a new directory its empty root leaf at logical block 0."""
        self._new_node(tx, d, DirNode(level=0))

    # ------------------------------------------------------------------------------ descent
    def _descend(self, d: InodeRec, key: int) -> tuple[list[tuple[int, DirNode, int]], int | None]:
        """Path [(lblock, node, child index)] from the root to the leaf for ``key``, and the key that
        starts the next leaf (None if the leaf is the last)."""
        path: list[tuple[int, DirNode, int]] = []
        lblock, upper = 0, None
        for _ in range(64):
            node = self.node(d, lblock)
            if node.level == 0:
                path.append((lblock, node, -1))
                return path, upper
            idx = node.index
            i = max(bisect.bisect_right(idx, key, key=_KEY) - 1, 0)  # last entry with key <= target
            if i + 1 < len(idx):
                upper = idx[i + 1].key
            path.append((lblock, node, i))
            lblock = idx[i].child
        raise Corrupt(f"directory {d.ino}: tree deeper than 64 levels (loop?)")

    def leaves(self, d: InodeRec, start_key: int = 0) -> Iterator[list[DirEntry]]:
        """The entries with key ≥ ``start_key``, one list per leaf, in key order.

        A fresh descent per leaf (the caller may change the directory between leaves; keys are
        stable, so resuming from the next leaf's first key stays correct).  Each list is a copy, found
        by bisection: a readdir resuming mid-leaf (every FUSE readdir request after the first) must not
        walk the leaf from its start.
        """
        key: int | None = start_key
        while key is not None:
            path, upper = self._descend(d, key)
            ents = path[-1][1].entries
            yield ents[bisect.bisect_left(ents, key, key=_KEY) :]
            key = upper

    def iterate(self, d: InodeRec, start_key: int = 0) -> Iterator[DirEntry]:
        """Entries with key ≥ ``start_key`` in key order (a fresh descent per leaf)."""
        for ents in self.leaves(d, start_key):
            yield from ents

    def lookup(self, d: InodeRec, name: bytes) -> DirEntry | None:
        """The entry called ``name``, or None: one descent and a bisection into the leaf.

        Its collision range ``[base, base + MAX_COLLISIONS)`` almost always lies in one leaf; only when
        the range runs past the leaf's last entry does the search go on into the next leaf(s).
        """
        return self._find(d, name)[0]

    def _find(
        self, d: InodeRec, name: bytes
    ) -> tuple[DirEntry | None, list[tuple[int, DirNode, int]]]:
        """:meth:`lookup`, plus the descent path to the leaf holding the entry (or, when absent, to
        the last leaf searched): remove and replace modify that leaf without descending again."""
        base = self._base(name)
        limit = base + MAX_COLLISIONS
        key: int | None = base
        path: list[tuple[int, DirNode, int]] = []
        while key is not None:
            path, upper = self._descend(d, key)
            ents = path[-1][1].entries
            for i in range(bisect.bisect_left(ents, key, key=_KEY), len(ents)):
                e = ents[i]
                if e.key >= limit:
                    return None, path
                if e.name == name:
                    return e, path
            key = upper if upper is not None and upper < limit else None
        return None, path

    def is_empty(self, d: InodeRec) -> bool:
        root = self.node(d, 0)
        return root.level == 0 and not root.entries

    # ------------------------------------------------------------------------------ insert
    def add(self, tx: Transaction, d: InodeRec, name: bytes, ino: int, ftype: int) -> DirEntry:
        """Insert a new entry. Raises Exists, NoSpace (255 same-hash names, or the disk is full)."""
        base = self._base(name)
        limit = base + MAX_COLLISIONS
        path, upper = self._descend(d, base)
        ents = path[-1][1].entries
        i = bisect.bisect_left(ents, base, key=_KEY)
        if (ents[i].key >= limit) if i < len(ents) else (upper is None or upper >= limit):
            # The common case: no key of the collision range in the tree (the leaf covers
            # [its lower bound, upper) and its first key ≥ base is past the range), and the leaf the
            # descent found is where base itself goes — no set of used indices, no second descent.
            entry = DirEntry(base, ino, ftype, name)
        else:
            used = set()
            for e in self.iterate(d, base):
                if e.key >= limit:
                    break
                if e.name == name:
                    raise Exists(f"{name!r} exists")
                used.add(e.key - base)
            c = next((i for i in range(MAX_COLLISIONS) if i not in used), None)
            if c is None:
                raise NoSpace(f"directory {d.ino}: too many names with the same hash as {name!r}")
            entry = DirEntry(base + c, ino, ftype, name)
            path, _ = self._descend(d, entry.key)
        _lblock, leaf, _ = path[-1]
        lo = bisect.bisect_left(leaf.entries, entry.key, key=_KEY)
        ents = list(leaf.entries)
        raws = list(leaf.leaf_raws())
        ents.insert(lo, entry)
        raws.insert(lo, entry.raw)
        new = DirNode(level=0, entries=ents, raws=raws)
        self._place(tx, d, path, len(path) - 1, new)
        return entry

    def _place(self, tx: Transaction, d: InodeRec, path: list[tuple[int, DirNode, int]], depth: int,
               node: DirNode) -> None:
        """Store ``node`` at path[depth], splitting upward as needed."""
        lblock = path[depth][0]
        body = node.body()
        if len(body) <= self.cap:
            self._store(tx, d, lblock, node, body)
            return
        left, right, sep = self._split(node)
        if depth == 0:  # root split: halves move out, root grows a level
            lb = self._new_node(tx, d, left)
            rb = self._new_node(tx, d, right)
            self._store(tx, d, 0, DirNode(level=node.level + 1, index=[DirIndex(0, lb), DirIndex(sep, rb)]))
            return
        self._store(tx, d, lblock, left)
        rb = self._new_node(tx, d, right)
        _, parent, ci = path[depth - 1]
        idx = list(parent.index)
        idx.insert(ci + 1, DirIndex(sep, rb))
        self._place(tx, d, path, depth - 1, DirNode(level=parent.level, index=idx))

    @staticmethod
    def _split(node: DirNode) -> tuple[DirNode, DirNode, int]:
        if node.level == 0:
            half, acc, cut = node.used() // 2, 0, 0
            for cut, e in enumerate(node.entries):  # noqa: B007
                acc += e.size
                if acc >= half:
                    break
            cut = min(max(cut + 1, 1), len(node.entries) - 1)
            r = node.entries[cut:]
            raws = node.leaf_raws()
            left = DirNode(0, entries=node.entries[:cut], raws=raws[:cut])
            return left, DirNode(0, entries=r, raws=raws[cut:]), r[0].key
        m = len(node.index) // 2
        r_idx = node.index[m:]
        return DirNode(node.level, index=node.index[:m]), DirNode(node.level, index=r_idx), r_idx[0].key

    # ------------------------------------------------------------------------------ remove
    def remove(self, tx: Transaction, d: InodeRec, name: bytes) -> DirEntry:
        """Remove ``name``; returns its entry. Raises NotFound."""
        e, path = self._find(d, name)
        if e is None:
            raise NotFound(f"{name!r} not found")
        leaf = path[-1][1]
        i = bisect.bisect_left(leaf.entries, e.key, key=_KEY)  # keys are unique in a directory
        if i >= len(leaf.entries) or leaf.entries[i] is not e:
            raise Corrupt(f"directory {d.ino}: entry {name!r} left its leaf during removal")
        raws = leaf.leaf_raws()
        ents = leaf.entries[:i] + leaf.entries[i + 1 :]
        new = DirNode(level=0, entries=ents, raws=raws[:i] + raws[i + 1 :])
        self._shrink(tx, d, path, len(path) - 1, new)
        return e

    def replace(self, tx: Transaction, d: InodeRec, name: bytes, ino: int, ftype: int) -> DirEntry:
        """Point existing entry ``name`` at another inode (rename over an existing name)."""
        e, path = self._find(d, name)
        if e is None:
            raise NotFound(f"{name!r} not found")
        lblock, leaf, _ = path[-1]
        ne = DirEntry(e.key, ino, ftype, name)
        i = bisect.bisect_left(leaf.entries, e.key, key=_KEY)
        if i >= len(leaf.entries) or leaf.entries[i] is not e:
            raise Corrupt(f"directory {d.ino}: entry {name!r} left its leaf during replacement")
        ents, raws = list(leaf.entries), list(leaf.leaf_raws())
        ents[i], raws[i] = ne, ne.raw
        self._store(tx, d, lblock, DirNode(0, entries=ents, raws=raws))
        return ne

    def _shrink(self, tx: Transaction, d: InodeRec, path: list[tuple[int, DirNode, int]], depth: int,
                node: DirNode) -> None:
        lblock = path[depth][0]
        empty = not (node.entries if node.level == 0 else node.index)
        if not empty or depth == 0:
            if depth == 0 and empty:
                node = DirNode(level=0)
            self._store(tx, d, lblock, node)
            return
        self._free_node(tx, d, lblock)
        _, parent, ci = path[depth - 1]
        idx = [x for i, x in enumerate(parent.index) if i != ci]
        self._shrink(tx, d, path, depth - 1, DirNode(level=parent.level, index=idx))

    def all_blocks_listing(self, d: InodeRec) -> list[DirEntry]:
        """§6.5 simple reader: list by scanning every mapped block for leaves (used by tests/fsck)."""
        out: list[DirEntry] = []
        for e in d.extents:
            for lb in range(e.logical, e.end):
                node = self.node(d, lb)
                if node.level == 0:
                    out.extend(node.entries)
        return out


_ = DIR_INDEX_SIZE
