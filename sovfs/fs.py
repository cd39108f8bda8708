"""FileSystem: the façade every front end (mkfs -d, fsck, the FUSE adapter) uses.

Theory of operation
-------------------
Operations take inode numbers (and names as bytes), run inside ONE transaction each
(``with self.journal.op()``), validate everything that can fail before the first change, and raise
:class:`sovfs.errors.SovError` subclasses carrying errno.  The core is synchronous; the FUSE adapter will
call it from trio without ``await`` inside an operation.

Lifetimes: ``unlink``/``rmdir``/``rename`` drop ``nlink``; an inode whose ``nlink`` reaches 0 is freed at
once unless it is in use — open handles (``open``/``release``) or kernel lookups (``ref``/``forget``, the
FUSE adapter's lookup counts) — in which case it becomes an *orphan* and is freed by whichever of
``release``/``forget`` brings both counts to 0, or by :meth:`FileSystem.close` (the kernel sends no
forgets at unmount).  (The on-disk orphan list for crashes in between is the journaling issue's.)

Durability: every operation commits its transaction before returning (write-through), so nothing dirty
stays in this process; :meth:`fsync`/:meth:`sync` add the device FLUSH (and the superblock counters).

Failsafe: :meth:`fail` (called by the FUSE adapter on the first ``Corrupt`` or device error) makes the
filesystem read-only for the rest of the mount (mutations raise ``ReadOnly``/EROFS), records
``STATE_ERRORS`` in the superblock once, and :meth:`close` then leaves the image marked not clean so it
is checked before the next mount.

Layers below: journal (transactions) → cache → alloc → inode (extents, data) → dir.  This module also
holds the xattr and path helpers, which are thin.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import trio

from sovfs.alloc import BitmapAllocator
from sovfs.blockdev import BlockDevice, Buffer
from sovfs.cache import BufferCache
from sovfs.dir import Directories
from sovfs.errors import (
    BadName,
    Corrupt,
    Exists,
    InvalidArgument,
    IsDir,
    NameTooLong,
    NeedsCheck,
    NoData,
    NoSpace,
    NotDir,
    NotEmpty,
    NotFound,
    NotSupported,
    PermissionDenied,
    RangeError,
    ReadOnly,
    SovError,
    TooManyLinks,
)
from sovfs.format import (
    INCOMPAT_RECOVER,
    INLINE_SYMLINK_MAX,
    INODE_AREA_SIZE,
    INODE_XATTR_SIZE,
    MAX_LOGICAL_BLOCKS,
    MAX_NAME_LEN,
    MAX_SYMLINK_LEN,
    ROOT_INO,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    SB_OFFSET,
    SB_SIZE,
    STATE_CLEAN,
    STATE_ERRORS,
    XATTR_HDR,
    XATTR_OFF,
    XATTR_PREFIXES,
    XATTR_SYSTEM_NAMES,
    BlockType,
    Inode,
    Superblock,
    dirent_type,
    init_block,
    pack_xattrs,
    unpack_xattrs,
    uuid_seed,
    xattr_block_capacity,
)
from sovfs.inode import InodeRec, InodeStore, ReadPlan
from sovfs.journal import Journal, Recovery, Transaction, journal_state, recover

S_ISGID = 0o2000

__all__ = ["RENAME_EXCHANGE", "RENAME_NOREPLACE", "Attr", "DirItem", "FileSystem", "StatFs"]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
MAX_LINKS = 2**32 - 1


class Attr(NamedTuple):
    """An inode's attributes as reported to stat(2) and the kernel.

    A named tuple rather than a frozen dataclass: one is built for every lookup, getattr and
    readdirplus entry, and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field) cost
    about 2 µs of the ~5 µs a cached readdirplus entry took.  Build it positionally (:meth:`_attr`).
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # in 512-byte units, like st_blocks
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int
    generation: int
    flags: int


@dataclass(frozen=True)
class DirItem:
    name: bytes
    ino: int
    ftype: int
    next_cookie: int


@dataclass(frozen=True)
class StatFs:
    block_size: int
    blocks: int
    free_blocks: int
    files: int
    free_files: int
    name_max: int


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise BadName(f"invalid name {name!r}")
    if len(name) > MAX_NAME_LEN:
        raise NameTooLong(f"name of {len(name)} bytes > {MAX_NAME_LEN}")


def check_xattr_name(name: bytes) -> None:
    if not name or len(name) > 255:
        raise RangeError(f"xattr name length {len(name)} not in [1, 255]")
    prefixed = name.startswith(XATTR_PREFIXES) and name not in XATTR_PREFIXES
    if not prefixed and name not in XATTR_SYSTEM_NAMES:
        raise NotSupported(f"xattr namespace of {name!r} not supported")


_DT_DIR = dirent_type(S_IFDIR)  # a directory entry's file type for . and ..

log = logging.getLogger("sovfs.fs")

#: Verify every cached ``Attr`` against the inode (FileSystem._attr); the test suite sets it.
_CHECK_ATTR_CACHE = os.environ.get("SOVFS_CHECK_ATTR_CACHE") == "1"

#: Bytes a sequential page-cache read fetches from the device at once (:meth:`FileSystem.read_async`).
READAHEAD_CHUNK = 1 << 20
#: Files with read-ahead chunks at a time.
READAHEAD_FILES = 8
#: With a background runner (:attr:`FileSystem.background`): bytes of a sequential stream fetched
#: ahead of its last read, and the chunks kept per file (the one being read and those ahead of it).
FETCH_AHEAD = 2 * READAHEAD_CHUNK
READAHEAD_DEPTH = 3
#: Blocks freed by the running transaction (unusable until it commits) worth a commit before the next
#: operation, so that a file rewritten after a large delete reuses the space (``short_of_space``).
PENDING_COMMIT_BYTES = 64 << 20

#: Linux's CLOCK_REALTIME_COARSE (the time at the last kernel tick; the time module has no name for
#: it).  A data write updates mtime and ctime at most once per tick - see :meth:`FileSystem.write`.
_CLOCK_COARSE = 5
_TICK_NS = max(1, round(time.clock_getres(_CLOCK_COARSE) * 1e9))


def _tick_ns() -> int:
    """The start of the current timestamp tick (the kernel's coarse clock)."""
    return time.clock_gettime_ns(_CLOCK_COARSE)


@dataclass(eq=False)
class _ReadAhead:
    start: int  # file offset of data[0] (block-aligned)
    stop: int  # start + the bytes mapped when the chunk was planned (data's length once read)
    data: bytes | bytearray | memoryview  # the file's bytes from start, up to READAHEAD_CHUNK or EOF
    rec: InodeRec  # the file's record and its data_version when the chunk was mapped ...
    version: int
    releases: int  # ... and BitmapAllocator.releases then (for the fill: see _fill_chunk)
    eof: bool  # data ends at the end of the file
    done: trio.Event | None  # set when the device read completes (None once it has)


class FileSystem:
    """A mounted SovFS on a BlockDevice. Use as a context manager or call :meth:`close`."""

    def __init__(
        self, dev: BlockDevice, sb: Superblock, *, read_only: bool, journal_sequence: int = 1,
        journaling: bool = True,
    ) -> None:
        self.dev = dev
        self.sb = sb
        self.read_only = read_only
        self.bs = sb.block_size
        seed = uuid_seed(sb.uuid)
        self.cache = BufferCache(dev, self.bs, seed)
        self.journal = Journal(
            self.cache, start=sb.journal_start, blocks=sb.journal_blocks, sequence=journal_sequence,
            enabled=journaling,
        )
        self.journal.orphan_head = sb.orphan_head
        self.journal.uuid = sb.uuid
        self._committed_orphan_head = sb.orphan_head
        self._data_writes = 0  # file data writes issued (ordered data) ...
        self._ra: dict[int, list[_ReadAhead]] = {}  # ino -> its read-ahead chunks, in file order
        self._fetch_errors: set[str] = set()  # fetch-ahead failures already logged
        #: Runs a coroutine function as a background task (a trio nursery's ``start_soon``), for
        #: fetching ahead of sequential reads; None (the default): no background fetches.  Set by the
        #: FUSE adapter's owner; the tasks end with the nursery.
        self.background: Callable[[Callable[[], Awaitable[None]]], None] | None = None
        self._ra_next: dict[int, int] = {}  # ino -> where its last read-ahead-eligible read ended
        self._data_flushed = 0  # ... and how many of them the last FLUSH covered
        self.recovery: Recovery | None = None  # what mount replayed
        self.balloc = BitmapAllocator(
            self.cache, sb.block_bitmap_start, sb.block_bitmap_blocks, sb.block_count, BlockType.BLOCK_BITMAP,
            "block",
        )
        self.ialloc = BitmapAllocator(
            self.cache, sb.inode_bitmap_start, sb.inode_bitmap_blocks, sb.inode_count, BlockType.INODE_BITMAP,
            "inode",
        )
        self.journal.abort_hooks += [self.balloc.recount, self.ialloc.recount]
        self.balloc.defer_frees = self.journal.enabled
        self.balloc.pending_commit = max(1, PENDING_COMMIT_BYTES // self.bs)
        self.journal.pressure.append(self.balloc.short_of_space)
        self.journal.after_commit += [self.balloc.frees_committed, self._checkpointed]
        self.inodes = InodeStore(sb, self.cache, self.journal, self.balloc, self.ialloc)
        self.dirs = Directories(self.inodes, sb.hash_seed)
        self._open: dict[int, int] = {}
        self._lookups: dict[int, int] = {}
        self._orphans: set[int] = set()
        #: orphan -> the orphan before it on the on-disk list (0: the head), a hint that makes taking
        #: one off the list O(1); checked against the inodes before use, rebuilt by a walk if stale
        self._orphan_prev: dict[int, int] = {}
        self.orphan_walks = 0  # walks of the whole list (an abort, or a stale hint; tests count them)
        # after the inode store's own hooks (registered above): re-derive the orphan set from the list
        self.journal.abort_hooks.append(self._index_orphans)
        self.failed: str | None = None  # failsafe reason, once switched
        self.closed = False

    # ------------------------------------------------------------------------ mount / unmount
    @classmethod
    def mount(
        cls, dev: BlockDevice, *, read_only: bool = False, require_clean: bool = False,
        journaling: bool | None = None,
    ) -> FileSystem:
        """Read and check the superblock (falling back to the backup), then mount.

        Raises:
            Corrupt: no valid superblock, or the device is smaller than the filesystem.
            NotSupported: unknown incompatible features (or ro-compatible ones for a writable mount).
            NeedsCheck: ``require_clean`` and the image has ``STATE_ERRORS``, or was not cleanly
                unmounted while the journal was off; or the journal needs replay and the device is
                read-only.
        Nothing is written unless every check passed and the mount is writable — except journal replay
        (§8.3), which runs whenever the journal is live and the device is writable (as ext4 does, even
        for a read-only mount); a ``require_clean`` refusal comes before that and writes nothing.
        Orphans (§4.5)
        are freed at a writable mount.  ``journaling=False`` (or ``SOVFS_JOURNAL=0``) is the debug
        switch for cost comparisons: metadata is written in place per operation, no crash guarantees.
        """
        raw = dev.pread(SB_OFFSET, SB_SIZE)
        try:
            sb = Superblock.unpack(raw, "primary superblock")
        except Corrupt as primary_err:
            found: Superblock | None = None
            for bs in (4096, 1024, 2048, 8192, 16384, 32768, 65536):
                n = dev.size // bs
                if n < 2:
                    continue
                try:
                    cand = Superblock.unpack(dev.pread((n - 1) * bs, SB_SIZE), "backup superblock")
                except Corrupt:
                    continue
                if cand.block_size == bs and cand.block_count == n:
                    found = cand
                    break
            if found is None:
                raise primary_err from None
            sb = found
            sb.copy = 0
        why = sb.features_check(writable=not read_only)
        if why:
            raise NotSupported(why)
        if sb.block_count * sb.block_size > dev.size:
            raise Corrupt(f"superblock: {sb.block_count} blocks, device holds {dev.size // sb.block_size}")
        if require_clean and (
            sb.state & STATE_ERRORS or not (sb.state & STATE_CLEAN or sb.incompat & INCOMPAT_RECOVER)
        ):
            # An unclean stop with the journal live is what the journal is for: replay and
            # mount (as ext4 does).  Recorded errors, or an unclean stop without a journal
            # (the journaling=False debug switch), need fsck.
            why = "has errors" if sb.state & STATE_ERRORS else "was not cleanly unmounted and has no journal"
            raise NeedsCheck(f"filesystem {why}; run fsck.sovfs")
        if journaling is None:
            journaling = os.environ.get("SOVFS_JOURNAL", "1") != "0"
        rec = recover(dev, sb, dry_run=True)
        if rec.needed:
            if dev.read_only:
                raise NeedsCheck("the journal needs replay and the device is read-only; run fsck.sovfs")
            rec = recover(dev, sb)
        try:
            jseq = journal_state(dev, sb).sequence
        except Corrupt:
            if not read_only:
                raise
            jseq = 1
        read_only = read_only or dev.read_only
        fs = cls(dev, sb, read_only=read_only, journal_sequence=jseq, journaling=journaling)
        fs.recovery = rec if rec.needed else None
        if not read_only:
            sb.state &= ~STATE_CLEAN
            sb.mount_count += 1
            sb.mount_time_ns = time.time_ns()
            if fs.journal.enabled:
                sb.incompat |= INCOMPAT_RECOVER
            fs._write_sb()
            fs.journal.open_log()
            fs.dev.flush()
            fs._reclaim_orphans()
        return fs

    def _reclaim_orphans(self) -> None:
        """§4.5: free every inode on the on-disk orphan list (unlinked while open before a crash)."""
        ino, seen = self.sb.orphan_head, 0
        if not ino:
            return
        with self.journal.op() as tx:
            while ino and seen <= self.sb.inode_count:
                if not 0 < ino < self.sb.inode_count:
                    raise Corrupt(f"orphan list: inode {ino} out of range")
                rec = self.inodes.get(ino)
                nxt = rec.inode.parent
                if not rec.inode.is_free and rec.inode.nlink == 0:
                    self.inodes.free(tx, rec)
                ino, seen = nxt, seen + 1
            self.journal.set_orphan_head(0)
        self.journal.commit()

    def _checkpointed(self) -> None:
        """After a commit: the superblock gets the committed orphan head and the free counts."""
        self._committed_orphan_head = self.journal.orphan_head
        self._data_flushed = self._data_writes
        self._write_sb()

    def _write_sb(self) -> None:
        sb = self.sb
        sb.orphan_head = self._committed_orphan_head
        sb.free_blocks = self.balloc.free
        sb.free_inodes = self.ialloc.free
        sb.write_time_ns = time.time_ns()
        sb.sequence += 1
        self.dev.pwrite(SB_OFFSET, sb.pack())

    def sync(self) -> None:
        """Commit the running transaction: everything done so far is durable when this returns."""
        if self.read_only:
            self.dev.flush()
            return
        if not self.journal.commit():
            if not self.journal.enabled:
                self._write_sb()
            self._data_flushed = self._data_writes
            self.dev.flush()

    def fsync(self, ino: int, datasync: bool = False) -> None:
        """fsync(2)/fdatasync(2) of ``ino`` (group commit).

        Commits the running transaction — which holds every operation so far, so all fsyncs waiting at
        that moment share its one commit record and its flushes.  An fsync that finds nothing
        uncommitted and no file data written since the last FLUSH returns at once (an earlier commit
        already covered it).  Raises NotFound for a free inode.
        """
        self._rec(ino)
        if self.read_only:
            return
        if self.journal.dirty:
            self.journal.commit()
        elif self._data_writes != self._data_flushed or not self.journal.enabled:
            self._data_flushed = self._data_writes
            self.dev.flush()

    def fail(self, reason: str) -> bool:
        """Switch to failsafe mode: read-only from now on, ``STATE_ERRORS`` in the superblock (once).

        Returns True the first time (the caller logs), False when already failed."""
        if self.failed is not None:
            return False
        self.failed = reason
        if not self.read_only:
            self.read_only = True
            try:
                self.sb.state |= STATE_ERRORS
                self.sb.state &= ~STATE_CLEAN
                self._write_sb()
                self.dev.flush()
            except Exception:  # the device itself may be what failed; failsafe must still engage
                pass
        return True

    def close(self) -> None:
        """Clean unmount: free orphans, commit, checkpoint, leave an empty journal (§8.3)."""
        if self.closed:
            return
        if not self.read_only:
            for ino in list(self._orphans):
                self._free_if_unused(ino, force=True)
            self.journal.close_log()
            self.sb.state |= STATE_CLEAN
            self.sb.incompat &= ~INCOMPAT_RECOVER
            self._write_sb()
            self.dev.flush()
        self.closed = True

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ helpers
    def _rw(self) -> None:
        if self.read_only:
            raise ReadOnly("filesystem is read-only")

    def _rec(self, ino: int) -> InodeRec:
        if not 0 < ino < self.sb.inode_count:
            raise NotFound(f"inode {ino} out of range")
        rec = self.inodes.get(ino)
        if rec.inode.mode == 0:  # free (Inode.is_free, without a property call on every stat)
            raise NotFound(f"inode {ino} is free")
        return rec

    def _dir(self, ino: int) -> InodeRec:
        rec = self._rec(ino)
        if rec.inode.fmt != S_IFDIR:
            raise NotDir(f"inode {ino} is not a directory")
        return rec

    def _attr(self, rec: InodeRec) -> Attr:
        """The inode's attributes: the record's cached ``Attr`` while the inode is unchanged.

        Cached because readdirplus, lookup and getattr report the same inodes over and over (building
        one was ~0.7 µs of a ~2.4 µs readdirplus entry), and because an unchanged inode then keeps the
        same ``Attr`` object, which lets the FUSE adapter reuse what it built from it.  ``put`` clears
        the cache; with ``SOVFS_CHECK_ATTR_CACHE=1`` (the tests) every hit is compared with a fresh one.
        """
        a: Attr | None = rec.attr
        if a is not None:
            if _CHECK_ATTR_CACHE and a != self._fresh_attr(rec):
                raise AssertionError(f"inode {rec.ino}: cached attributes {a} are stale")
            return a
        a = rec.attr = self._fresh_attr(rec)
        return a

    def _fresh_attr(self, rec: InodeRec) -> Attr:
        i = rec.inode
        # Positional, in Attr's field order: keyword arguments cost as much as the tuple itself.
        return Attr(
            rec.ino, i.mode, i.nlink, i.uid, i.gid, i.rdev, i.size, i.blocks * (self.bs // 512), self.bs,
            i.atime_ns, i.mtime_ns, i.ctime_ns, i.crtime_ns, i.generation, i.flags,
        )

    def _touch(self, rec: InodeRec, now: int, *, m: bool = True, c: bool = True) -> None:
        if m:
            rec.inode.mtime_ns = now
        if c:
            rec.inode.ctime_ns = now

    # ------------------------------------------------------------------------ attributes
    def getattr(self, ino: int) -> Attr:
        return self._attr(self._rec(ino))

    def setattr(
        self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
        size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
        ctime_ns: int | None = None, crtime_ns: int | None = None, flags: int | None = None,
    ) -> Attr:
        """Change attributes. ``mode`` changes permission bits only. Raises IsDir for size on a dir."""
        self._rw()
        rec = self._rec(ino)
        if size is not None:
            if rec.inode.fmt == S_IFDIR:
                raise IsDir("cannot truncate a directory")
            if rec.inode.fmt != S_IFREG:
                raise InvalidArgument("size can only be set on regular files")
            if size < 0:
                raise InvalidArgument("negative size")
        now = time.time_ns()
        with self.journal.op() as tx:
            i = rec.inode
            if mode is not None:
                i.mode = (i.mode & S_IFMT) | (mode & 0o7777)
            if uid is not None:
                i.uid = uid
            if gid is not None:
                i.gid = gid
            if size is not None and size != i.size:
                self._data_writes += 1
                self.inodes.truncate(tx, rec, size)
                i.mtime_ns = now
            if atime_ns is not None:
                i.atime_ns = atime_ns
            if mtime_ns is not None:
                i.mtime_ns = mtime_ns
            if crtime_ns is not None:
                i.crtime_ns = crtime_ns
            if flags is not None:
                i.flags = (i.flags & 1) | (flags & ~1)
            i.ctime_ns = ctime_ns if ctime_ns is not None else now
            self.inodes.put(tx, rec)
        return self._attr(rec)

    def statfs(self) -> StatFs:
        return StatFs(
            block_size=self.bs, blocks=self.sb.block_count - self.sb.data_start, free_blocks=self.balloc.free,
            files=self.sb.inode_count - 1, free_files=self.ialloc.free, name_max=MAX_NAME_LEN,
        )

    # ------------------------------------------------------------------------ namespace
    def lookup(self, parent: int, name: bytes) -> Attr:
        d = self._dir(parent)
        if name == b".":
            return self._attr(d)
        if name == b"..":
            return self._attr(self._rec(d.inode.parent or ROOT_INO))
        if len(name) > MAX_NAME_LEN:
            raise NameTooLong(f"name of {len(name)} bytes")
        e = self.dirs.lookup(d, name)
        if e is None:
            raise NotFound(f"{name!r} not in directory {parent}")
        return self._attr(self._rec(e.ino))

    def lookup_path(self, path: bytes | str) -> Attr:
        """Resolve an absolute '/'-separated path without following symlinks (tests and tools)."""
        p = path.encode() if isinstance(path, str) else path
        ino: int = ROOT_INO
        for part in p.split(b"/"):
            if part:
                ino = self.lookup(ino, part).ino
        return self.getattr(ino)

    def _make(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, rdev: int = 0,
        target: bytes | None = None,
    ) -> Attr:
        self._rw()
        check_name(name)
        d = self._dir(parent)
        if self.dirs.lookup(d, name) is not None:
            raise Exists(f"{name!r} exists")
        fmt = mode & S_IFMT
        if fmt == S_IFDIR and d.inode.nlink >= MAX_LINKS:
            raise TooManyLinks("parent has too many links")
        if self.ialloc.free == 0:
            raise NoSpace("no free inodes")
        if d.inode.mode & S_ISGID:  # BSD group semantics in set-group-ID directories
            gid = d.inode.gid
            if fmt == S_IFDIR:
                mode |= S_ISGID
        now = time.time_ns()
        with self.journal.op() as tx:
            inode = Inode(
                mode=mode, uid=uid, gid=gid, nlink=2 if fmt == S_IFDIR else 1, atime_ns=now, mtime_ns=now,
                ctime_ns=now, crtime_ns=now, rdev=rdev if fmt in (S_IFCHR, S_IFBLK) else 0,
                parent=parent if fmt == S_IFDIR else 0,
            )
            rec = self.inodes.allocate(tx, inode)
            if fmt == S_IFDIR:
                self.dirs.init_dir(tx, rec)
                d.inode.nlink += 1
            elif target is not None:
                rec.inode.size = len(target)
                if len(target) <= INLINE_SYMLINK_MAX:
                    rec.inode.flags |= 1
                    rec.inode.area = target.ljust(INODE_AREA_SIZE, b"\0")
                else:
                    self.inodes.write(tx, rec, 0, target)
            self.inodes.put(tx, rec)
            self.dirs.add(tx, d, name, rec.ino, dirent_type(mode))
            self._touch(d, now)
            self.inodes.put(tx, d)
        return self._attr(rec)

    def create(self, parent: int, name: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Attr:
        return self._make(parent, name, S_IFREG | (mode & 0o7777), uid, gid)

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Attr:
        return self._make(parent, name, S_IFDIR | (mode & 0o7777), uid, gid)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int = 0, uid: int = 0, gid: int = 0) -> Attr:
        fmt = mode & S_IFMT
        if fmt == 0:
            mode |= S_IFREG
        elif fmt not in (S_IFREG, S_IFCHR, S_IFBLK, S_IFIFO, S_IFSOCK):
            raise InvalidArgument(f"mknod of type {fmt:#o}")
        return self._make(parent, name, mode, uid, gid, rdev=rdev)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0) -> Attr:
        if not target or len(target) > MAX_SYMLINK_LEN or b"\0" in target:
            raise (NameTooLong if len(target) > MAX_SYMLINK_LEN else InvalidArgument)("bad symlink target")
        return self._make(parent, name, S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        rec = self._rec(ino)
        if rec.inode.fmt != S_IFLNK:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        if rec.inode.flags & 1:
            return rec.inode.area[: rec.inode.size]
        return self.inodes.read(rec, 0, rec.inode.size)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._rw()
        check_name(new_name)
        rec = self._rec(ino)
        if rec.inode.fmt == S_IFDIR:
            raise PermissionError_()
        d = self._dir(new_parent)
        if self.dirs.lookup(d, new_name) is not None:
            raise Exists(f"{new_name!r} exists")
        if rec.inode.nlink >= MAX_LINKS:
            raise TooManyLinks("too many links")
        now = time.time_ns()
        with self.journal.op() as tx:
            self.dirs.add(tx, d, new_name, ino, dirent_type(rec.inode.mode))
            rec.inode.nlink += 1
            rec.inode.ctime_ns = now
            self.inodes.put(tx, rec)
            self._touch(d, now)
            self.inodes.put(tx, d)
        return self._attr(rec)

    def unlink(self, parent: int, name: bytes) -> None:
        self._rw()
        d = self._dir(parent)
        e = self.dirs.lookup(d, name)
        if e is None:
            raise NotFound(f"{name!r} not found")
        rec = self._rec(e.ino)
        if rec.inode.fmt == S_IFDIR:
            raise IsDir(f"{name!r} is a directory")
        now = time.time_ns()
        with self.journal.op() as tx:
            self.dirs.remove(tx, d, name)
            self._touch(d, now)
            self.inodes.put(tx, d)
            self._drop_link(tx, rec, now)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._rw()
        if name == b".":
            raise InvalidArgument("rmdir of '.'")
        if name == b"..":
            raise NotEmpty("rmdir of '..'")
        d = self._dir(parent)
        e = self.dirs.lookup(d, name)
        if e is None:
            raise NotFound(f"{name!r} not found")
        rec = self._rec(e.ino)
        if rec.inode.fmt != S_IFDIR:
            raise NotDir(f"{name!r} is not a directory")
        if not self.dirs.is_empty(rec):
            raise NotEmpty(f"{name!r} is not empty")
        now = time.time_ns()
        with self.journal.op() as tx:
            self.dirs.remove(tx, d, name)
            d.inode.nlink -= 1
            self._touch(d, now)
            self.inodes.put(tx, d)
            rec.inode.nlink = 0
            self._release_inode(tx, rec)

    def _drop_link(self, tx: object, rec: InodeRec, now: int) -> None:
        rec.inode.nlink -= 1
        rec.inode.ctime_ns = now
        txn = self.journal.active
        if txn is None:
            raise Corrupt("link drop outside a transaction")
        if rec.inode.nlink == 0:
            self._release_inode(txn, rec)
        else:
            self.inodes.put(txn, rec)

    def _release_inode(self, tx: object, rec: InodeRec) -> None:
        txn = self.journal.active
        if txn is None:
            raise Corrupt("release outside a transaction")
        if self._in_use(rec.ino):
            self._orphans.add(rec.ino)
            head = self.journal.orphan_head
            rec.inode.parent = head  # §4.5: push on the on-disk orphan list
            self.journal.set_orphan_head(rec.ino)
            self.inodes.put(txn, rec)
            self._orphan_prev[rec.ino] = 0
            if head:
                self._orphan_prev[head] = rec.ino
        else:
            self.inodes.free(txn, rec)

    def _in_use(self, ino: int) -> bool:
        return self._open.get(ino, 0) > 0 or self._lookups.get(ino, 0) > 0

    def _free_if_unused(self, ino: int, force: bool = False) -> None:
        if ino in self._orphans and (force or not self._in_use(ino)):
            self._orphans.discard(ino)
            with self.journal.op() as tx:
                rec = self.inodes.get(ino)
                self._unlink_orphan(tx, rec)
                self.inodes.free(tx, rec)

    def _unlink_orphan(self, tx: Transaction, rec: InodeRec) -> None:
        """Take ``rec`` off the on-disk orphan list (§4.5).

        The list is singly linked (through ``parent``) and an orphan leaves it from anywhere - the
        first file unlinked is usually the first released, at the far end from the head.  The
        ``_orphan_prev`` hint names its predecessor; it is trusted only if that inode is an orphan
        that still links to ``rec``, else one walk of the list re-records every hint.  (Before the
        hint, releasing n orphans in the order they were unlinked walked the list n times: O(n²)
        inode reads.)
        """
        ino, nxt = rec.ino, rec.inode.parent
        hints = self._orphan_prev
        hint = hints.pop(ino, None)
        if self.journal.orphan_head == ino:
            self.journal.set_orphan_head(nxt)
            if nxt:
                hints[nxt] = 0
            return
        prev = self.inodes.get(hint) if hint and hint in self._orphans else None
        if prev is None or prev.inode.parent != ino:
            self._index_orphans(keep_set=True)
            hints = self._orphan_prev  # a new dict
            hint = hints.pop(ino, None)
            if not hint:
                return  # not on the list (nothing to unlink)
            prev = self.inodes.get(hint)
        prev.inode.parent = nxt
        self.inodes.put(tx, prev)
        if nxt:
            hints[nxt] = prev.ino

    def _index_orphans(self, keep_set: bool = False) -> None:
        """Walk the on-disk orphan list and re-record every predecessor hint; unless ``keep_set``,
        the in-memory orphan set becomes the list's members too.

        The abort hook: the aborted operation may have pushed an orphan on the list or taken one off
        (the journal restores the head and the inodes' links), and set and hints follow the restored
        list.  With ``keep_set``, the repair of a stale hint (the set may already lack an orphan
        being taken off).  Stops at a link out of range or back into the list (a corrupt list).
        """
        self.orphan_walks += 1
        hints: dict[int, int] = {}
        before, ino = 0, self.journal.orphan_head
        while 0 < ino < self.sb.inode_count and ino not in hints:
            hints[ino] = before
            before, ino = ino, self.inodes.get(ino).inode.parent
        self._orphan_prev = hints
        if not keep_set:
            self._orphans = set(hints)

    def open(self, ino: int) -> None:
        """Count an open handle: an unlinked inode stays allocated until the last release."""
        self._rec(ino)
        self._open[ino] = self._open.get(ino, 0) + 1

    def release(self, ino: int) -> None:
        n = self._open.get(ino, 0) - 1
        if n <= 0:
            self._open.pop(ino, None)
            self._ra.pop(ino, None)
            self._ra_next.pop(ino, None)
            if not self.read_only:
                self._free_if_unused(ino)
        else:
            self._open[ino] = n

    def ref(self, ino: int, n: int = 1) -> None:
        """Count ``n`` kernel lookups of ``ino`` (every entry a FUSE reply hands out)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + n

    def ref_many(self, inos: Iterable[int]) -> None:
        """:meth:`ref` once for each of ``inos`` (the entries of one readdirplus reply, counted after
        the reply was fully built so that a failed reply counts none)."""
        lookups = self._lookups
        get = lookups.get
        for ino in inos:
            lookups[ino] = get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` lookups: an unlinked inode nobody uses any more is freed now."""
        left = self._lookups.get(ino, 0) - n
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if not self.read_only:
            self._free_if_unused(ino)

    def is_orphan(self, ino: int) -> bool:
        return ino in self._orphans

    def accessed(self, ino: int, policy: str = "relatime") -> None:
        """Update atime after a read/readdir per ``policy``: ``noatime`` never; ``relatime`` when atime is
        not newer than mtime/ctime or older than a day; ``strictatime`` always. No-op when read-only."""
        if self.read_only or policy == "noatime":
            return
        rec = self._rec(ino)
        i = rec.inode
        now = time.time_ns()
        if policy == "relatime" and not (
            i.atime_ns <= i.mtime_ns or i.atime_ns <= i.ctime_ns or now - i.atime_ns >= 86400 * 10**9
        ):
            return
        with self.journal.op() as tx:
            i.atime_ns = now
            self.inodes.put(tx, rec)

    def access(self, ino: int, mask: int, uid: int, gids: set[int] | frozenset[int]) -> None:
        """access(2) for ``uid``/``gids``: ``mask`` of R_OK=4, W_OK=2, X_OK=1 (F_OK=0: existence).

        Root passes R/W always and X if any x bit is set (or for directories). Raises PermissionDenied
        (EACCES), ReadOnly for W_OK on a read-only filesystem, NotFound."""
        rec = self._rec(ino)
        i = rec.inode
        if mask & 2 and self.read_only and i.fmt in (S_IFREG, S_IFDIR, S_IFLNK):
            raise ReadOnly("filesystem is read-only")
        if uid == 0:
            if mask & 1 and i.fmt != S_IFDIR and not i.mode & 0o111:
                raise PermissionDenied("no execute bit", errno=errno.EACCES)
            return
        if uid == i.uid:
            bits = (i.mode >> 6) & 7
        elif i.gid in gids:
            bits = (i.mode >> 3) & 7
        else:
            bits = i.mode & 7
        if mask & 7 & ~bits:
            raise PermissionDenied(f"access {mask:#o} denied on inode {ino}", errno=errno.EACCES)

    # The two checks below, with :meth:`access`, are the POSIX rules a kernel applies with FUSE's
    # default_permissions.  The FUSE adapter applies them itself when the kernel does not (see
    # SovOps.check_permissions); root (uid 0) passes them all, as it would with CAP_FOWNER/CAP_CHOWN.

    def may_remove(self, parent: int, name: bytes, uid: int, gids: set[int] | frozenset[int]) -> None:
        """May ``uid`` remove (unlink, rmdir, rename away or over) ``name`` in ``parent``?

        Write and search permission on the directory; in a sticky directory (S_ISVTX, like /tmp) also
        ownership of the directory or of the entry (EPERM).  An absent name passes: the operation
        itself reports ENOENT."""
        self.access(parent, 3, uid, gids)
        if uid == 0:
            return
        drec = self._dir(parent)
        if drec.inode.mode & 0o1000 and drec.inode.uid != uid:
            e = self.dirs.lookup(drec, name) if 0 < len(name) <= MAX_NAME_LEN else None
            if e is not None and self._rec(e.ino).inode.uid != uid:
                raise PermissionDenied(f"{name!r}: sticky directory {parent}, not the owner")

    def check_setattr(
        self, ino: int, uid: int, gids: set[int] | frozenset[int], *, mode: int | None = None,
        owner: int | None = None, group: int | None = None, size: bool = False, times: bool = False,
    ) -> int | None:
        """May ``uid`` change these attributes of ``ino``?  Returns the mode to store (``mode``, or
        ``mode`` without S_ISGID when the caller is not in the file's group, as chmod(2) does).

        chmod: the owner (EPERM) - or anyone, when it only clears S_ISUID/S_ISGID (the kernel's request
        after a write by someone else); chown to another owner: root only; chgrp: the owner, to one of
        its groups; truncate: write permission; times: the owner or a writer (FUSE does not say whether
        they were set to "now", which a writer may do, or to given values, which only the owner may).
        """
        if uid == 0:
            return mode
        i = self._rec(ino).inode
        owns = i.uid == uid
        if mode is not None and not owns:
            old = i.mode & 0o7777
            if not (mode & 0o7777 == old & ~0o6000 != old):
                raise PermissionDenied(f"inode {ino}: not the owner")
        if (group is not None or owner is not None) and not owns:
            raise PermissionDenied(f"inode {ino}: not the owner")
        if owner is not None and owner != i.uid:
            raise PermissionDenied(f"inode {ino}: only root changes the owner")
        if group is not None and group != i.gid and group not in gids:
            raise PermissionDenied(f"inode {ino}: not a member of group {group}")
        if size or (times and not owns):
            self.access(ino, 2, uid, gids)
        file_gid = group if group is not None else i.gid
        if mode is not None and owns and mode & 0o2000 and file_gid not in gids:
            mode &= ~0o2000
        return mode

    def may_link(self, ino: int, uid: int, gids: set[int] | frozenset[int]) -> None:
        """May ``uid`` make a hard link to ``ino``?  Linux's protected_hardlinks rule: the owner, or a
        regular file that is not set-user-ID nor set-group-ID-and-group-executable and that the
        caller may read and write (EPERM)."""
        if uid == 0:
            return
        i = self._rec(ino).inode
        if i.uid == uid:
            return
        risky = i.mode & 0o4000 or (i.mode & 0o2010) == 0o2010
        if i.fmt != S_IFREG or risky:
            raise PermissionDenied(f"inode {ino}: hard link to a file of another owner")
        try:
            self.access(ino, 6, uid, gids)
        except PermissionDenied:
            raise PermissionDenied(f"inode {ino}: hard link to a file of another owner") from None

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """True if directory ``anc`` is ``ino`` or one of its ancestors (walks ``parent`` links)."""
        seen = 0
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INO:
                return False
            ino = self._rec(ino).inode.parent
            seen += 1
            if seen > self.sb.inode_count or ino == 0:
                raise Corrupt("directory parent chain does not reach the root")

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0) -> None:
        """rename(2)/renameat2: ``flags`` may be RENAME_NOREPLACE or RENAME_EXCHANGE.

        Raises NotFound, Exists (NOREPLACE), NotDir/IsDir (type mismatch), NotEmpty, InvalidArgument
        (moving a directory under itself, bad flags).
        """
        self._rw()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise InvalidArgument(f"bad rename flags {flags:#x}")
        check_name(new_name)
        sd, dd = self._dir(parent), self._dir(new_parent)
        se = self.dirs.lookup(sd, name)
        if se is None:
            raise NotFound(f"{name!r} not found")
        de = self.dirs.lookup(dd, new_name)
        src = self._rec(se.ino)
        s_dir = src.inode.fmt == S_IFDIR
        if flags & RENAME_EXCHANGE:
            if de is None:
                raise NotFound(f"{new_name!r} not found")
        elif de is not None and flags & RENAME_NOREPLACE:
            raise Exists(f"{new_name!r} exists")
        dst = self._rec(de.ino) if de is not None else None
        if dst is not None and dst.ino == src.ino:
            return  # same inode: POSIX says do nothing
        d_dir = dst is not None and dst.inode.fmt == S_IFDIR
        if s_dir and self._is_ancestor(src.ino, new_parent):
            raise InvalidArgument("cannot move a directory into itself")
        if flags & RENAME_EXCHANGE and d_dir and dst is not None and self._is_ancestor(dst.ino, parent):
            raise InvalidArgument("cannot move a directory into itself")
        if dst is not None and not flags & RENAME_EXCHANGE:
            if s_dir and not d_dir:
                raise NotDir(f"{new_name!r} is not a directory")
            if d_dir and not s_dir:
                raise IsDir(f"{new_name!r} is a directory")
            if d_dir and not self.dirs.is_empty(dst):
                raise NotEmpty(f"{new_name!r} is not empty")
        now = time.time_ns()
        with self.journal.op() as tx:
            if flags & RENAME_EXCHANGE and dst is not None:
                self.dirs.replace(tx, sd, name, dst.ino, dirent_type(dst.inode.mode))
                self.dirs.replace(tx, dd, new_name, src.ino, dirent_type(src.inode.mode))
                if sd.ino != dd.ino:
                    if s_dir:
                        src.inode.parent = dd.ino
                        sd.inode.nlink -= 1
                        dd.inode.nlink += 1
                    if d_dir:
                        dst.inode.parent = sd.ino
                        dd.inode.nlink -= 1
                        sd.inode.nlink += 1
                dst.inode.ctime_ns = now
                self.inodes.put(tx, dst)
            else:
                if dst is not None:
                    self.dirs.replace(tx, dd, new_name, src.ino, dirent_type(src.inode.mode))
                    if d_dir:
                        dd.inode.nlink -= 1
                        dst.inode.nlink = 0
                        self._release_inode(tx, dst)
                    else:
                        self._drop_link(tx, dst, now)
                else:
                    self.dirs.add(tx, dd, new_name, src.ino, dirent_type(src.inode.mode))
                self.dirs.remove(tx, sd, name)
                if s_dir and sd.ino != dd.ino:
                    src.inode.parent = dd.ino
                    sd.inode.nlink -= 1
                    dd.inode.nlink += 1
            src.inode.ctime_ns = now
            self.inodes.put(tx, src)
            for d in (sd, dd):
                self._touch(d, now)
                self.inodes.put(tx, d)

    def readdir(self, ino: int, cookie: int = 0) -> Iterator[DirItem]:
        """Entries after ``cookie`` (0 = start), each with the cookie that resumes after it (§6.4)."""
        for item in self.readdir_names(ino, cookie):
            yield DirItem(*item)

    def readdir_names(self, ino: int, cookie: int = 0) -> Iterator[tuple[bytes, int, int, int]]:
        """:meth:`readdir` as plain ``(name, ino, ftype, next_cookie)`` tuples.

        For the FUSE adapter's names-only listings, which list 10,000 entries in a few milliseconds:
        no object is built per entry and no inode is loaded.
        """
        d = self._dir(ino)
        if cookie < 1:
            yield b".", d.ino, _DT_DIR, 1
        if cookie < 2:
            yield b"..", d.inode.parent or ROOT_INO, _DT_DIR, 2
        for ents in self.dirs.leaves(d, max(cookie, 3)):
            for key, child, ftype, name in ents:
                yield name, child, ftype, key + 1

    def readdir_plus(self, ino: int, cookie: int = 0) -> Iterator[tuple[bytes, Attr, int]]:
        """:meth:`readdir` with each entry's attributes: ``(name, attr, next_cookie)`` (READDIRPLUS).

        Same entries and cookies as :meth:`readdir` followed by :meth:`getattr` per entry, in one pass:
        per leaf, the inode-table blocks of its not yet loaded inodes are read with one ``preadv``
        before the entries are decoded, and no per-entry :class:`DirItem` is built.  Raises NotFound
        (as getattr would) when an entry names a free or out-of-range inode.
        """
        d = self._dir(ino)
        if cookie < 1:
            yield b".", self._attr(d), 1
        if cookie < 2:
            yield b"..", self._attr(self._rec(d.inode.parent or ROOT_INO)), 2
        attr, rec_of, prefetch, loaded = self._attr, self._rec, self.inodes.prefetch, self.inodes.loaded
        check = _CHECK_ATTR_CACHE
        for ents in self.dirs.leaves(d, max(cookie, 3)):
            prefetch([e.ino for e in ents])
            for e in ents:
                # A cached Attr is current and of a live inode (freeing one puts it, which clears it):
                # taking it straight from the record skips _rec's checks and a touch of the Inode -
                # this loop is memory-bound in the daemon (~1 µs per entry in a warm loop, ~5 in
                # the daemon between kernel round trips).
                # In check mode the full path runs: _rec refuses a freed inode and _attr compares
                # the cached Attr (the very object the shortcut would yield) with a fresh one.
                rec = loaded(e.ino)
                a = None if rec is None else rec.attr
                if a is None or check:
                    a = attr(rec_of(e.ino))
                yield e.name, a, e.key + 1

    # ------------------------------------------------------------------------ data
    def read(self, ino: int, offset: int, size: int) -> bytes:
        rec = self._rec(ino)
        if rec.inode.fmt == S_IFDIR:
            raise IsDir(f"inode {ino} is a directory")
        if offset < 0 or size < 0:
            raise InvalidArgument("negative offset or size")
        return self.inodes.read(rec, offset, size)

    def read_plan(self, ino: int, offset: int, size: int) -> ReadPlan:
        """Like :meth:`read`, but return the device requests instead of doing them.

        For callers that overlap the data I/O with other work (the FUSE adapter):
        after the I/O, :meth:`plan_still_valid` says whether the result may be used.
        """
        rec = self._rec(ino)
        if rec.inode.fmt == S_IFDIR:
            raise IsDir(f"inode {ino} is a directory")
        if offset < 0 or size < 0:
            raise InvalidArgument("negative offset or size")
        return self.inodes.read_plan(rec, offset, size)

    def plan_still_valid(self, plan: ReadPlan) -> bool:
        """True if no block was freed since ``plan`` was made (so none was reused)."""
        return plan.releases == self.balloc.releases

    async def read_async(
        self, ino: int, offset: int, size: int, *, readahead: bool = False
    ) -> bytes | bytearray | memoryview:
        """:meth:`read`, with the data in flight while other trio tasks run.

        The core's only ``await``: the mapping is made atomically before it and
        checked after it.  If any block was freed meanwhile (a truncate or hole
        punch in another task), the mapped blocks may have been reused, so the
        read is redone synchronously.  Devices without ``preadv_async`` block.

        ``readahead``: the caller reads through a page cache (not O_DIRECT), so a
        sequential run of reads may be served from a :data:`READAHEAD_CHUNK` read
        from the device at once (see :meth:`_read_ahead`).

        Returns a buffer (bytes, or a bytearray / view of one, never written again),
        without the copies that making it ``bytes`` would cost.
        """
        if readahead or self.background is not None:
            data = await self._read_ahead(ino, offset, size, fill=readahead)
            if data is not None:
                return data
        plan = self.read_plan(ino, offset, size)
        if not plan.requests:
            return plan.assemble([])
        preadv_async = getattr(self.dev, "preadv_async", None)
        if preadv_async is None:
            return plan.assemble_buffer(self.dev.preadv(plan.requests))
        datas = await preadv_async(plan.requests)
        if not self.plan_still_valid(plan):
            return self.read(ino, offset, size)
        return plan.assemble_buffer(datas)

    async def _read_ahead(
        self, ino: int, offset: int, size: int, *, fill: bool
    ) -> bytes | bytearray | memoryview | None:
        """Serve a read from the file's read-ahead chunks; ``None``: read it normally.

        A chunk is up to :data:`READAHEAD_CHUNK` bytes of the file read by one device request
        (cut over the ledger's queues).  Chunks come from two places:

        * ``fill`` (page-cache reads): a sequential read that no chunk covers reads the chunk
          from its block on, and the reads that follow (the kernel's read-ahead sends
          128 KiB - 1 MiB at a time) are slices of it, without a device round trip each;
        * :attr:`background` (reads that bypass the page cache: O_DIRECT): after each sequential
          read, tasks fetch the :data:`FETCH_AHEAD` bytes after it, so the device works on the
          next reads while this one travels back through the kernel (like a disk's read-ahead;
          O_DIRECT still bypasses the page cache, and the chunk is the file as it is, below).
          Page-cache reads get none: the kernel's read-ahead already keeps two reads in flight,
          and more concurrent image reads measured slower (1.1-1.2 against 1.0-1.3 GB/s).

        Reads that arrive while their chunk is in flight wait for it.

        Coherence: a chunk is the file's bytes as of one ``InodeRec.data_version`` (bumped by every
        write, truncate, hole punch, allocation or free of that file); it is used only while the
        file's record and version are unchanged, so no write is ever hidden, and writes to other
        files leave it alone.  A chunk whose fill raced with a change of the file, or with any
        block free (the mapped blocks could have been reused), is dropped, never used.
        """
        if size <= 0 or size > READAHEAD_CHUNK or getattr(self.dev, "preadv_async", None) is None:
            return None
        sequential = offset == 0 or self._ra_next.get(ino) == offset
        self._ra_next[ino] = offset + size
        if not sequential and ino not in self._ra:
            return None  # a random read of a file with no chunks: nothing to make, fetch or use
        made = None
        if sequential and fill and not any(c.start <= offset < c.stop for c in self._ra.get(ino, ())):
            start = offset - offset % self.bs
            made = self._plan_chunk(ino, start, offset)
            if made is not None and made[0].stop - start <= size:
                self._drop_chunk(ino, made[0])  # nothing to gain: the normal path
                made = None
        if sequential and not fill and self.background is not None:
            self._fetch_ahead(ino, offset + size)
        if made is not None and not await self._fill_chunk(ino, *made):
            return None
        return await self._from_chunks(ino, offset, size)

    async def _from_chunks(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview | None:
        """The read's bytes from a valid chunk that holds them (waiting while it is in flight)."""
        while True:
            c = next((c for c in self._ra.get(ino, ()) if c.start <= offset < c.stop), None)
            if c is None:
                return None
            if c.done is not None:
                await c.done.wait()  # the chunk this read falls into is in flight
                continue
            if not self._chunk_current(ino, c):
                self._drop_chunk(ino, c)  # stale: the file changed since it was read
                continue
            pos = offset - c.start
            if pos + size <= len(c.data) or (c.eof and pos < len(c.data)):
                return memoryview(c.data)[pos : pos + size]
            return None

    def _fetch_ahead(self, ino: int, end: int) -> None:
        """Start background fetches of the chunks after a sequential read ending at ``end``, until
        chunks cover :data:`FETCH_AHEAD` bytes past it (or the file ends)."""
        assert self.background is not None
        at = end
        for c in self._ra.get(ino, ()):
            if c.start <= at < c.stop:
                at = c.stop
        while at < end + FETCH_AHEAD and not any(c.eof and c.stop <= at for c in self._ra.get(ino, ())):
            made = self._plan_chunk(ino, at, end)
            if made is None:
                return
            chunk, plan = made
            self.background(functools.partial(self._fetch_chunk, ino, chunk, plan))
            at = chunk.stop

    async def _fetch_chunk(self, ino: int, chunk: _ReadAhead, plan: ReadPlan) -> None:
        # A failed fetch is only a dropped chunk: the read of that range meets the error itself.
        try:
            await self._fill_chunk(ino, chunk, plan)
        except Exception as e:
            key = f"{type(e).__name__}: {e}"
            if key not in self._fetch_errors:
                self._fetch_errors.add(key)
                log.warning("fetch-ahead of inode %d at %d failed (the read will retry): %s", ino,
                            chunk.start, key)

    def _plan_chunk(self, ino: int, start: int, pos: int) -> tuple[_ReadAhead, ReadPlan] | None:
        """Map the chunk at ``start`` and register it as in flight; None for a hole, a fragmented
        range or EOF (one device request per chunk, or no chunk).  ``pos``: where the reader is."""
        plan = self.read_plan(ino, start, READAHEAD_CHUNK)
        if len(plan.requests) != 1:
            return None
        rec = self._rec(ino)
        chunk = _ReadAhead(
            start, start + plan.size, b"", rec, rec.data_version, self.balloc.releases,
            plan.size < READAHEAD_CHUNK, trio.Event(),
        )
        chunks = self._ra.pop(ino, [])
        self._ra[ino] = chunks  # most recently used file last
        chunks.append(chunk)
        chunks.sort(key=lambda c: c.start)
        while len(chunks) > READAHEAD_DEPTH:  # drop one the reader has passed, else the farthest ahead
            chunks.remove(max(chunks, key=lambda c: (c.stop <= pos, abs(c.start - pos))))
        while len(self._ra) > READAHEAD_FILES:
            self._ra.pop(next(iter(self._ra)))
        return chunk, plan

    def _chunk_current(self, ino: int, c: _ReadAhead) -> bool:
        """Whether the chunk still holds the file's bytes: the same record (an abort reloads the
        records, a free and a new file of that number makes a new one) at the same data_version."""
        return self.inodes.loaded(ino) is c.rec and c.rec.data_version == c.version

    def _drop_chunk(self, ino: int, chunk: _ReadAhead) -> None:
        chunks = self._ra.get(ino)
        if chunks is not None and chunk in chunks:
            chunks.remove(chunk)
            if not chunks:
                del self._ra[ino]

    async def _fill_chunk(self, ino: int, chunk: _ReadAhead, plan: ReadPlan) -> bool:
        """Read a planned chunk; False (and the chunk dropped) if the file changed meanwhile."""
        done = chunk.done
        assert done is not None
        try:
            datas = await self.dev.preadv_async(plan.requests)  # type: ignore[attr-defined]
            # Filled: current while the file is.  In flight, a block freed anywhere could have been
            # one of the mapped ones, reused (as for any read: plan_still_valid).
            if not self._chunk_current(ino, chunk) or chunk.releases != self.balloc.releases:
                self._drop_chunk(ino, chunk)
                return False
            chunk.data = plan.assemble_buffer(datas)
            return True
        except BaseException:
            self._drop_chunk(ino, chunk)  # never left behind empty, blocking a fetch of its range
            raise
        finally:
            chunk.done = None
            done.set()

    def write(self, ino: int, offset: int, data: Buffer) -> int:
        self._rw()
        rec = self._rec(ino)
        if rec.inode.fmt == S_IFDIR:
            raise IsDir(f"inode {ino} is a directory")
        if rec.inode.fmt != S_IFREG:
            raise InvalidArgument(f"inode {ino} is not a regular file")
        if offset < 0:
            raise InvalidArgument("negative offset")
        n = len(memoryview(data).cast("B"))
        if offset + n > MAX_LOGICAL_BLOCKS * self.bs:
            raise FileTooBig_()
        with self.journal.op() as tx:
            self._data_writes += 1
            size = rec.inode.size
            self.inodes.write(tx, rec, offset, data)
            # Timestamps have the granularity of the kernel's clock tick for data writes, as the
            # Linux VFS gives them (file_update_time with coarse timestamps): an overwrite whose
            # mtime and ctime were already set during the current tick changes no metadata at all,
            # so a burst of random overwrites does not pack, checksum and journal the inode each
            # time.  Anything else - a new block, a longer file, stamps from an earlier tick or set
            # by hand to another time - updates them to the exact time now.
            i = rec.inode
            tick = _tick_ns()
            if (
                rec.map_dirty
                or i.size != size
                or not tick <= i.mtime_ns < tick + _TICK_NS
                or not tick <= i.ctime_ns < tick + _TICK_NS
            ):
                self._touch(rec, max(time.time_ns(), tick))
                self.inodes.put(tx, rec)
        return n

    def truncate(self, ino: int, size: int) -> Attr:
        return self.setattr(ino, size=size)

    # ------------------------------------------------------------------------ xattrs
    def _xattrs(self, rec: InodeRec) -> dict[bytes, bytes]:
        i = rec.inode
        if i.xattr_block:
            buf = self.cache.read(i.xattr_block, BlockType.XATTR, rec.ino, i.generation)
            _count, _, used, _ = XATTR_HDR.unpack_from(buf.data, 32)
            if XATTR_OFF + used > self.bs:
                raise Corrupt(f"xattr block {i.xattr_block}: used {used} overflows")
            return unpack_xattrs(buf.data[XATTR_OFF : XATTR_OFF + used], f"xattr block {i.xattr_block}")
        return unpack_xattrs(i.inline_xattr, f"inode {rec.ino} inline xattrs")

    def _store_xattrs(self, rec: InodeRec, items: dict[bytes, bytes]) -> None:
        packed = pack_xattrs(items)
        i = rec.inode
        if len(packed) > xattr_block_capacity(self.bs):
            raise NoSpace(f"xattrs of {len(packed)} bytes exceed one block")
        with self.journal.op() as tx:
            if len(packed) <= INODE_XATTR_SIZE:
                i.inline_xattr = packed
                if i.xattr_block:
                    self.balloc.release(tx, i.xattr_block)
                    self.cache.forget(i.xattr_block)
                    i.xattr_block = 0
                    i.blocks -= 1
            else:
                i.inline_xattr = b""
                if not i.xattr_block:
                    goal = rec.extents[0].physical if rec.extents else self.sb.data_start
                    i.xattr_block = self.balloc.alloc_one(tx, goal)
                    i.blocks += 1
                buf = self.cache.new(i.xattr_block)
                init_block(buf.data, BlockType.XATTR, i.xattr_block, rec.ino, i.generation)
                XATTR_HDR.pack_into(buf.data, 32, len(items), 0, len(packed), 0)
                buf.data[XATTR_OFF : XATTR_OFF + len(packed)] = packed
                tx.dirty(buf)
            i.ctime_ns = time.time_ns()
            self.inodes.put(tx, rec)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.xattr(ino, name)
        if value is None:
            raise NoData(f"no xattr {name!r}")
        return value

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        """:meth:`getxattr` that says "absent" with ``None`` instead of raising :class:`NoData`.

        The kernel asks for ``security.capability`` before every write to a file (to strip it), so
        "absent" is the common answer: it costs no exception and, for the usual inode without
        xattrs, no decoding.
        """
        rec = self._rec(ino)
        i = rec.inode
        if not i.xattr_block and not i.inline_xattr:
            return None
        return self._xattrs(rec).get(name)

    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self._xattrs(self._rec(ino)))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._rw()
        check_xattr_name(name)
        if len(value) > 65535:
            raise RangeError("xattr value larger than 64 KiB")
        rec = self._rec(ino)
        items = self._xattrs(rec)
        if flags & XATTR_CREATE and name in items:
            raise Exists(f"xattr {name!r} exists")
        if flags & XATTR_REPLACE and name not in items:
            raise NoData(f"no xattr {name!r}")
        items[name] = bytes(value)
        self._store_xattrs(rec, items)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._rw()
        rec = self._rec(ino)
        items = self._xattrs(rec)
        if name not in items:
            raise NoData(f"no xattr {name!r}")
        del items[name]
        self._store_xattrs(rec, items)


def PermissionError_() -> SovError:
    from sovfs.errors import PermissionDenied

    return PermissionDenied("hard links to directories are not allowed")


def FileTooBig_() -> SovError:
    from sovfs.errors import FileTooBig

    return FileTooBig("write beyond the maximum file size")
