"""Transactions and the write-ahead journal (FORMAT.md §8).

Theory of operation
-------------------
``with journal.op() as tx:`` opens an *operation* (nested ``op()`` calls join the outermost one).
Inside it, layers modify cached metadata buffers and call ``tx.dirty(buf)``.  When the outermost block
exits normally its blocks join the **running transaction**, a compound transaction in memory (jbd2's
model): many operations, one commit.  Nothing is written for metadata until :meth:`Journal.commit`,
which runs when someone needs durability (fsync, sync, unmount), when the running transaction holds
half the journal, or when the block allocator runs short of reusable space.

Commit protocol (two flushes, no FUA; DESIGN.md "Journal"):

1. FLUSH — file data written by the operations (ordered data: the inode layer writes it straight to
   the device during the operation) and the previous checkpoint are durable;
2. ONE write of descriptor block(s) + block images + commit record at journal offset 1;
3. FLUSH — the transaction is durable (the commit record's CRC covers every block of it);
4. checkpoint: ONE ``pwritev`` of the block images to their homes, then the superblock (orphan head);
   these become durable at the next commit's step 1, which is why the journal never needs more than
   the one transaction it holds and every commit restarts at offset 1.

Replay (:func:`recover`, used by ``FileSystem.mount`` and ``fsck.sovfs``) writes the valid
transactions found from the journal superblock's ``head`` home again — idempotent, since they are
images, not deltas.

Aborts: an operation that raises must leave memory equal to "running transaction without it".  At
the end of every successful operation the images of its blocks are remembered (``_snap``); an abort
restores those images into the cache, discards buffers the running transaction never had, puts the
orphan head back to what it was when the operation began, and runs the abort hooks (the layers
above re-derive inode records, allocator counters and the in-memory orphan set).

With ``enabled=False`` (debug switch, and the fallback when no journal region is given) every
operation is written in place at its end with one ``pwritev``, as SovFS v1.0 did.

Invariant: outside ``op()`` every dirty buffer belongs to the running transaction.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from sovfs.blockdev import BlockDevice
from sovfs.cache import Buf, BufferCache
from sovfs.errors import Corrupt
from sovfs.format import (
    HEADER,
    INCOMPAT_RECOVER,
    JCOMMIT_F_ORPHAN,
    JOURNAL_COMMIT,
    JOURNAL_DESC,
    JOURNAL_DESC_ENTRIES_OFF,
    JOURNAL_REC_OFF,
    SB_OFFSET,
    SB_SIZE,
    BlockType,
    JournalSuperblock,
    Superblock,
    init_block,
    journal_body_hash,
    journal_desc_capacity,
    seal_block,
    uuid_seed,
    verify_block,
)

__all__ = ["Journal", "Recovery", "Transaction", "recover", "journal_state"]

_U64 = struct.Struct("<Q")


class Transaction:
    """One operation's set of dirtied blocks (joins the running transaction when it ends)."""

    __slots__ = ("_abort_hooks", "_commit_hooks", "blocks", "orphan")

    def __init__(self, orphan: tuple[int, bool] = (0, False)) -> None:
        self.blocks: dict[int, Buf] = {}
        #: the journal's (orphan_head, orphan_dirty) when the operation began: restored on abort
        self.orphan = orphan
        self._abort_hooks: list[Callable[[], None]] = []
        self._commit_hooks: list[Callable[[], None]] = []

    def dirty(self, buf: Buf) -> None:
        """Add ``buf`` to the transaction (idempotent)."""
        buf.dirty = True
        self.blocks[buf.bno] = buf

    def on_abort(self, hook: Callable[[], None]) -> None:
        self._abort_hooks.append(hook)

    def before_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the operation ends (layers flush deferred state such as extent trees)."""
        self._commit_hooks.append(hook)


class Journal:
    """Operations, the running transaction, commit, checkpoint.

    Args:
        cache: the buffer cache (its device is the journal's device).
        start, blocks: the journal region (§8); ``blocks = 0`` or ``enabled=False``: write in place.
        sequence: the next transaction's sequence number (from the journal superblock).
    """

    def __init__(
        self, cache: BufferCache, *, start: int = 0, blocks: int = 0, sequence: int = 1, enabled: bool = True,
    ) -> None:
        self.cache = cache
        self.dev: BlockDevice = cache.dev
        self.bs = cache.bs
        self.start = start
        self.blocks = blocks
        self.uuid = b""  # set by the FileSystem (keys the commit record's hash)
        self.enabled = enabled and blocks >= 3
        self.sequence = sequence
        self._tx: Transaction | None = None
        self.running: dict[int, Buf] = {}
        self._snap: dict[int, bytes] = {}
        self.orphan_head = 0
        self._orphan_dirty = False
        self.abort_hooks: list[Callable[[], None]] = []  # permanent hooks run on every abort
        self.after_commit: list[Callable[[], None]] = []  # after the transaction is durable + checkpointed
        self.pressure: list[Callable[[], bool]] = []  # "commit before the next operation, please"
        self.per_desc = journal_desc_capacity(self.bs)
        # largest transaction (data blocks) the region holds: blocks - jsb - descriptors - commit
        n = max(blocks - 2, 0)
        while n > 0 and 1 + -(-n // self.per_desc) + n + 1 > blocks:
            n -= 1
        self.capacity = n
        # statistics
        self.commits = 0  # operations ended (the mount's writeback timer watches it)
        self.tx_commits = 0  # transactions committed
        self.flushes = 0
        self.oversize = 0  # transactions too large for the region, written in place (not atomic)
        self.committed_ops = 0  # value of ``commits`` covered by the last durable commit

    @property
    def active(self) -> Transaction | None:
        return self._tx

    @property
    def dirty(self) -> bool:
        """True if the running transaction holds anything not yet committed."""
        return bool(self.running) or self._orphan_dirty

    def set_orphan_head(self, ino: int) -> None:
        """Logical record: the superblock's ``orphan_head`` as of this transaction (§8.2)."""
        if ino != self.orphan_head:
            self.orphan_head = ino
            self._orphan_dirty = True

    # --------------------------------------------------------------------------------- operations
    def _should_commit(self) -> bool:
        if not self.enabled:
            return False
        if len(self.running) * 2 >= self.capacity:
            return True
        return any(h() for h in self.pressure)

    def op(self) -> _Op:
        """``with journal.op() as tx:`` — one operation (see the module docstring)."""
        return _Op(self)

    def _begin(self) -> Transaction:
        if self.running and self._should_commit():
            self.commit()
        tx = self._tx = Transaction((self.orphan_head, self._orphan_dirty))
        return tx

    def _end(self, tx: Transaction) -> None:
        """The outermost operation body returned: run its hooks, then join the running transaction."""
        try:
            # by index: a hook may register further hooks (an inode put by an extent-tree rebuild)
            hooks = tx._commit_hooks
            i = 0
            while i < len(hooks):
                hooks[i]()
                i += 1
        except BaseException:
            self._tx = None
            self._abort(tx)
            raise
        self._tx = None
        self.commits += 1
        if not self.enabled:
            self.cache.write_back(list(tx.blocks.values()))
            return
        running, snap = self.running, self._snap
        for bno, buf in tx.blocks.items():
            running[bno] = buf
            snap[bno] = bytes(buf.data)

    def _abort(self, tx: Transaction) -> None:
        gone = []
        for bno, buf in tx.blocks.items():
            img = self._snap.get(bno)
            if img is None:
                gone.append(buf)
            else:
                buf.data[:] = img
                buf.parsed = None
                buf.dirty = True
        self.cache.discard(gone)
        self.orphan_head, self._orphan_dirty = tx.orphan  # a logical record: restored like the blocks
        for hook in [*tx._abort_hooks, *self.abort_hooks]:
            hook()

    # --------------------------------------------------------------------------------- commit
    def flush(self) -> None:
        self.flushes += 1
        self.dev.flush()

    def _records(self, seq: int, homes: list[int], images: list[bytes]) -> bytes:
        """Descriptor block(s) + images + commit block for a transaction at journal offset 1 (§8.2)."""
        bs, seed = self.bs, self.cache.seed
        n = len(homes)
        ndesc = max(1, -(-n // self.per_desc))
        pos = self.start + 1
        descs = []
        for d in range(ndesc):
            chunk = homes[d * self.per_desc : (d + 1) * self.per_desc]
            b = bytearray(bs)
            init_block(b, BlockType.JOURNAL_DESC, pos + d)
            JOURNAL_DESC.pack_into(b, JOURNAL_REC_OFF, seq, len(chunk), n)
            b[JOURNAL_DESC_ENTRIES_OFF : JOURNAL_DESC_ENTRIES_OFF + 8 * len(chunk)] = struct.pack(
                f"<{len(chunk)}Q", *chunk
            )
            seal_block(b, seed)
            descs.append(bytes(b))
        body = b"".join([*descs, *images])
        c = bytearray(bs)
        init_block(c, BlockType.JOURNAL_COMMIT, pos + ndesc + n)
        JOURNAL_COMMIT.pack_into(
            c, JOURNAL_REC_OFF, seq, ndesc, n, JCOMMIT_F_ORPHAN, 0, self.orphan_head,
            journal_body_hash(body, self.uuid),
        )
        seal_block(c, seed)
        return body + bytes(c)

    def commit(self) -> bool:
        """Commit the running transaction (see the module docstring); returns False if there was none.

        When it returns, every operation that ended before the call is durable.
        """
        if not self.enabled:
            return False
        if not self.dirty:
            return False
        bufs = sorted(self.running.values(), key=lambda b: b.bno)
        for b in bufs:
            if b.headered:
                seal_block(b.data, self.cache.seed)
        homes = [b.bno for b in bufs]
        images = [bytes(b.data) for b in bufs]
        seq = self.sequence
        self.flush()  # 1. ordered data and the previous checkpoint are durable
        if len(bufs) > self.capacity:
            self.oversize += 1  # cannot be atomic: write in place (documented limitation)
        else:
            self.dev.pwrite((self.start + 1) * self.bs, self._records(seq, homes, images))  # 2.
            self.flush()  # 3. durable
        self.dev.pwritev([(h * self.bs, img) for h, img in zip(homes, images, strict=True)])  # 4.
        for b in bufs:
            b.dirty = False
        self.running.clear()
        self._snap.clear()
        self._orphan_dirty = False
        self.sequence = seq + 1
        self.tx_commits += 1
        self.committed_ops = self.commits
        for hook in self.after_commit:
            hook()
        self.cache.trim()
        return True

    # --------------------------------------------------------------------------------- mount / unmount
    def _write_jsb(self, head: int) -> None:
        b = bytearray(self.bs)
        init_block(b, BlockType.JOURNAL_SUPER, self.start)
        jsb = JournalSuperblock(first=self.start, blocks=self.blocks, sequence=self.sequence, head=head)
        jsb.pack_into(b)
        seal_block(b, self.cache.seed)
        self.dev.pwrite(self.start * self.bs, bytes(b))

    def open_log(self) -> None:
        """Mount: mark the journal live (``head = 1``); the caller flushes before the first commit."""
        if self.enabled:
            self._write_jsb(1)

    def close_log(self) -> None:
        """Unmount: commit, make the checkpoint durable, then mark the journal empty (caller flushes)."""
        if not self.enabled:
            return
        self.commit()
        self.flush()
        self._write_jsb(0)


class _Op:
    """The context manager :meth:`Journal.op` returns.

    A class rather than a ``@contextmanager`` generator: every FUSE request that changes anything
    opens one or more operations, and the generator protocol (create, ``next``, ``send``/``throw``)
    cost several times the two method calls this does.  A nested ``op()`` joins the outermost
    operation's transaction and does nothing at its end.
    """

    __slots__ = ("_j", "_outer", "_tx")

    def __init__(self, journal: Journal) -> None:
        self._j = journal
        self._outer = False

    def __enter__(self) -> Transaction:
        j = self._j
        tx = j._tx
        if tx is None:
            self._outer = True
            tx = j._begin()
        self._tx = tx
        return tx

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: object) -> None:
        if not self._outer:
            return
        if et is None:
            self._j._end(self._tx)
        else:
            self._j._tx = None
            self._j._abort(self._tx)


# ------------------------------------------------------------------------------------- replay
@dataclass
class Recovery:
    """What :func:`recover` found (and, unless ``dry_run``, wrote)."""

    needed: bool = False  # the journal was live (head != 0 or RECOVER)
    transactions: int = 0  # valid committed transactions replayed
    blocks: int = 0  # block images written home
    first_sequence: int = 0
    last_sequence: int = 0
    orphan_head: int | None = None
    stopped: str = ""  # why the scan stopped (first invalid record)


def journal_state(dev: BlockDevice, sb: Superblock) -> JournalSuperblock:
    """Read and verify the journal superblock. Raises Corrupt."""
    bs = sb.block_size
    data = dev.pread(sb.journal_start * bs, bs)
    verify_block(data, uuid_seed(sb.uuid), sb.journal_start, BlockType.JOURNAL_SUPER, 0, 0)
    j = JournalSuperblock.unpack(data)
    if j.version != 1 or j.first != sb.journal_start or j.blocks != sb.journal_blocks or j.sequence == 0:
        raise Corrupt(f"journal superblock (block {sb.journal_start}): version {j.version}, region "
                      f"{j.first}+{j.blocks}, sequence {j.sequence}")
    if j.head >= sb.journal_blocks:
        raise Corrupt(f"journal superblock: head {j.head} outside the region of {sb.journal_blocks} blocks")
    return j


def _scan(
    dev: BlockDevice, sb: Superblock, j: JournalSuperblock, rep: Recovery
) -> list[tuple[list[int], list[bytes], int]]:
    """The valid transactions from ``head``: (homes, images, orphan_head) each, in order (§8.3)."""
    bs, seed = sb.block_size, uuid_seed(sb.uuid)
    per = journal_desc_capacity(bs)
    region, nblk = sb.journal_start, sb.journal_blocks
    pos, want = j.head, j.sequence
    first = True
    out: list[tuple[list[int], list[bytes], int]] = []
    while True:
        if pos + 2 > nblk:
            rep.stopped = "end of region"
            break
        d0 = dev.pread((region + pos) * bs, bs)
        try:
            verify_block(d0, seed, region + pos, BlockType.JOURNAL_DESC, 0, 0)
        except Corrupt as e:
            rep.stopped = f"offset {pos}: no descriptor ({e})"
            break
        seq, _cnt, n = JOURNAL_DESC.unpack_from(d0, JOURNAL_REC_OFF)
        if (first and seq < want) or (not first and seq != want):
            rep.stopped = f"offset {pos}: sequence {seq}, expected {'>= ' if first else ''}{want}"
            break
        ndesc = max(1, -(-n // per))
        if pos + ndesc + n + 1 > nblk:
            rep.stopped = f"offset {pos}: transaction {seq} of {n} blocks overruns the region"
            break
        raw = dev.pread((region + pos) * bs, (ndesc + n + 1) * bs)
        blocks = [raw[i * bs : (i + 1) * bs] for i in range(ndesc + n + 1)]
        homes: list[int] = []
        ok = True
        for d in range(ndesc):
            try:
                verify_block(blocks[d], seed, region + pos + d, BlockType.JOURNAL_DESC, 0, 0)
            except Corrupt:
                ok = False
                break
            s2, cnt, n2 = JOURNAL_DESC.unpack_from(blocks[d], JOURNAL_REC_OFF)
            if s2 != seq or n2 != n or cnt > per:
                ok = False
                break
            homes += [_U64.unpack_from(blocks[d], JOURNAL_DESC_ENTRIES_OFF + 8 * k)[0] for k in range(cnt)]
        commit = blocks[-1]
        try:
            if not ok or len(homes) != n:
                raise Corrupt("descriptor blocks inconsistent")
            verify_block(commit, seed, region + pos + ndesc + n, BlockType.JOURNAL_COMMIT, 0, 0)
            cseq, cd, cn, _flags, _r, orphan, hsh = JOURNAL_COMMIT.unpack_from(commit, JOURNAL_REC_OFF)
            if (cseq, cd, cn) != (seq, ndesc, n):
                raise Corrupt(f"commit record ({cseq}, {cd}, {cn}) does not match ({seq}, {ndesc}, {n})")
            if journal_body_hash(b"".join(blocks[:-1]), sb.uuid) != hsh:
                raise Corrupt("transaction checksum mismatch (torn or incomplete)")
            if any(not sb.data_start <= h < sb.block_count - 1 and not sb.block_bitmap_start <= h
                   < sb.journal_start for h in homes):
                raise Corrupt("home block outside the metadata and data regions")
        except Corrupt as e:
            rep.stopped = f"offset {pos}: transaction {seq} not committed ({e})"
            break
        out.append((homes, blocks[ndesc:-1], orphan))
        if first:
            rep.first_sequence = seq
        rep.last_sequence = seq
        first = False
        pos += ndesc + n + 1
        want = seq + 1
    return out


def recover(dev: BlockDevice, sb: Superblock, *, dry_run: bool = False) -> Recovery:
    """Replay the journal of the filesystem ``sb`` describes (§8.3); ``sb`` is updated in place.

    Writes every valid transaction's blocks home, flushes, then marks the journal empty (``head = 0``,
    ``sequence`` past the last one), sets ``sb.orphan_head`` from the last commit record, clears
    ``INCOMPAT_RECOVER`` in the primary superblock and flushes again.  Idempotent: a crash during
    recovery leaves the journal to be replayed again.  ``dry_run``: only report.
    Raises Corrupt if the journal superblock is unreadable while ``RECOVER`` is set.
    """
    rep = Recovery()
    try:
        j = journal_state(dev, sb)
    except Corrupt:
        if sb.incompat & INCOMPAT_RECOVER:
            raise
        return rep
    if j.head == 0 and not sb.incompat & INCOMPAT_RECOVER:
        return rep
    rep.needed = True
    txs = _scan(dev, sb, j, rep) if j.head else []
    rep.transactions = len(txs)
    if txs:
        rep.orphan_head = txs[-1][2]
    if dry_run:
        rep.blocks = sum(len(h) for h, _, _ in txs)
        return rep
    bs = sb.block_size
    writes: dict[int, bytes] = {
        h: img for homes, images, _ in txs for h, img in zip(homes, images, strict=True)
    }
    rep.blocks = len(writes)
    if writes:
        dev.pwritev([(h * bs, img) for h, img in sorted(writes.items())])
    dev.flush()
    seq = max(j.sequence, rep.last_sequence + 1)
    b = bytearray(bs)
    init_block(b, BlockType.JOURNAL_SUPER, sb.journal_start)
    JournalSuperblock(first=sb.journal_start, blocks=sb.journal_blocks, sequence=seq, head=0).pack_into(b)
    seal_block(b, uuid_seed(sb.uuid))
    dev.pwrite(sb.journal_start * bs, bytes(b))
    if rep.orphan_head is not None:
        sb.orphan_head = rep.orphan_head
    sb.incompat &= ~INCOMPAT_RECOVER
    sb.copy = 0
    sb.sequence += 1
    dev.pwrite(SB_OFFSET, sb.pack())
    dev.flush()
    return rep


assert HEADER.size == 32 and SB_SIZE == 1024  # layout constants this module relies on
