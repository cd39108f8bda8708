"""FUSE adapter: pyfuse3 requests → :class:`sovfs.fs.FileSystem` calls.

Theory of operation
-------------------
:class:`SovOps` is a thin ``pyfuse3.Operations``: each handler translates arguments, makes ONE call (or a
short fixed sequence of calls) into the synchronous core, and translates the result into
``EntryAttributes``/``FileInfo``/``StatvfsData``.  It owns only FUSE-level state:

* file handles (``fh`` → :class:`Handle`: inode and open flags); the core counts opens per inode;
* lookup counts: every reply that hands the kernel an entry (lookup, create, mkdir, mknod, symlink, link,
  each full readdirplus entry except ``.``/``..``) calls ``fs.ref`` (readdir: one ``fs.ref_many`` once
  the reply is complete); ``forget`` calls ``fs.forget``.  The core
  frees an unlinked inode only when nlink, lookups and open handles are all 0;
* listings: pyfuse3 makes every listing a READDIRPLUS.  A reply either carries each entry's
  attributes (a *full* entry: the kernel instantiates the inode) or only names it (node id 0:
  name, inode number and type, nothing instantiated, no lookup counted; see
  ``sovfs/_dirent_reply.py``).  ``readdirplus=auto`` (default) chooses per reply by the kernel's
  own adaptive rule (:meth:`SovOps._plus`);
* permissions: the kernel's (``default_permissions``) unless the mount says otherwise; then
  (``check_permissions``) each handler asks the core's ``access`` / ``may_remove`` / ``check_setattr``
  / ``may_link`` on behalf of any caller but root before it acts (:meth:`SovOps._caller`);
* errors: this is the ONLY module that builds ``FUSEError``.  A ``SovError`` becomes its errno.  A
  ``Corrupt`` (checksum or structure) or an unexpected exception (device failure, our bug) is logged once
  with its traceback/block/inode, switches the core to failsafe (read-only, ``STATE_ERRORS``) and is
  answered with EIO — an exception other than FUSEError escaping a handler would end ``pyfuse3.main``
  and kill the mount.

Concurrency: pyfuse3 runs every request as a trio task on one thread.  The core is synchronous and no
handler awaits between its first and last core call, so each handler is atomic with respect to every other
request — that is the filesystem's lock (docs/DESIGN.md, "FUSE adapter").  Never add an ``await`` inside
a handler's core sequence (e.g. between ``fs.create`` and ``fs.ref``, or inside the readdir loop).

Caching: entries and attributes are cached by the kernel for ``entry_timeout``/``attr_timeout`` seconds
(every change goes through this kernel, so its cache stays coherent); file data stays in the page cache
across opens (``keep_cache``).  ``writeback_cache`` (mount option) lets the kernel batch writes; fsync
stays honest because the kernel writes dirty pages back before sending FSYNC.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pyfuse3

from sovfs._dirent_reply import LayoutUnknown, NameOnlyEntry
from sovfs.errors import Corrupt, Exists, PermissionDenied, SovError
from sovfs.format import ROOT_INO
from sovfs.fs import RENAME_EXCHANGE, Attr, FileSystem

__all__ = ["Handle", "SovOps"]

log = logging.getLogger("sovfs.fuse")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass
class Handle:
    ino: int
    flags: int
    #: a directory opened by a caller who may list it but not search it: its readdirplus entries
    #: must not let the kernel skip the LOOKUP that would refuse that caller (see readdir)
    no_search: bool = False
    #: a listing whose reader looks names up as it goes: every further reply is full (see _plus)
    full_listing: bool = False


#: Replies kept by :meth:`SovOps._entry` (about 0.3 KiB each with their ``Attr``); all are dropped at
#: once when full: a scan of a larger tree simply builds them again.
ENTRY_CACHE_SIZE = 32768

#: Directories remembered as advised for full listings (:meth:`SovOps._plus`); the set is emptied
#: when full.
PLUS_ADVICE_LIMIT = 65536


def _open_mask(flags: int) -> int:
    """The access(2) mask an open with ``flags`` needs: R and/or W by the access mode, W for O_TRUNC."""
    acc = flags & os.O_ACCMODE
    mask = os.R_OK if acc == os.O_RDONLY else os.W_OK if acc == os.O_WRONLY else os.R_OK | os.W_OK
    return mask | (os.W_OK if flags & os.O_TRUNC else 0)


def _guard(func: F) -> F:
    """Answer every failure with a FUSEError; never let another exception reach pyfuse3."""

    @functools.wraps(func)
    async def wrapper(self: SovOps, *args: Any) -> Any:
        try:
            return await func(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Corrupt as e:
            self._failsafe(func.__name__, args, e, trace=False)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except SovError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:
            self._failsafe(func.__name__, args, e, trace=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)


class SovOps(pyfuse3.Operations):
    """pyfuse3 operations over a mounted :class:`FileSystem`.

    Args:
        fs: the mounted filesystem (the caller closes it after ``pyfuse3.main`` returns).
        entry_timeout, attr_timeout: kernel cache lifetimes in seconds.
        atime: ``relatime`` (default), ``noatime`` or ``strictatime``.
        writeback_cache: request the kernel's writeback cache (FUSE_CAP_WRITEBACK_CACHE).
        check_permissions: apply the POSIX permission rules here, for a mount without the kernel's
            ``default_permissions`` (see :meth:`_caller`).
        readdirplus: which listing replies carry each entry's attributes: ``auto`` (the kernel's
            adaptive rule: a listing's first reply, and the rest of a listing once names of the
            directory are looked up between its replies; see :meth:`_plus`), ``yes`` (every
            reply: pyfuse3's behaviour) or ``no`` (none: names, inode numbers and types).
    """

    supports_dot_lookup = True

    def __init__(
        self, fs: FileSystem, *, entry_timeout: float = 5.0, attr_timeout: float = 5.0,
        atime: str = "relatime", writeback_cache: bool = False, check_permissions: bool = False,
        readdirplus: str = "auto",
    ) -> None:
        super().__init__()
        self.fs = fs
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.atime = atime
        self.enable_writeback_cache = writeback_cache
        self.check_permissions = check_permissions
        if readdirplus not in ("auto", "yes", "no"):
            raise ValueError(f"readdirplus={readdirplus!r}: auto, yes or no")
        self.readdirplus = readdirplus
        self._plus_advised: set[int] = set()  # directories with lookups since their last listing reply
        self._name_only: NameOnlyEntry | None = None
        if readdirplus != "yes":
            try:
                self._name_only = NameOnlyEntry()
            except LayoutUnknown as e:
                log.warning("every listing carries attributes (readdirplus=yes): %s", e)
        self._entries: dict[int, tuple[Attr, pyfuse3.EntryAttributes]] = {}  # ino -> (attr, reply)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._logged: set[str] = set()
        self.errors = 0  # failures answered with EIO (tests, statistics)

    # ------------------------------------------------------------------------ helpers
    def _failsafe(self, op: str, args: Sequence[Any], e: BaseException, *, trace: bool) -> None:
        self.errors += 1
        shown = ", ".join(repr(a) for a in args if isinstance(a, int | bytes | str))[:200]
        key = f"{type(e).__name__}: {e}"
        if key not in self._logged:
            self._logged.add(key)
            log.error("%s(%s) failed: %s", op, shown, key, exc_info=e if trace else None)
        if self.fs.fail(key):
            log.error("switching to read-only failsafe mode until unmounted and checked (fsck.sovfs)")

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        """The reply for ``a``: built once per ``Attr`` object.

        The core hands out the same ``Attr`` object while an inode is unchanged (``FileSystem._attr``),
        so the ``EntryAttributes`` built for it can answer every lookup, getattr and readdirplus entry
        of that inode until it changes: pyfuse3 copies it into each reply and never writes to it.
        Building one (16 attribute stores) was a third of a cached readdirplus entry's cost.
        """
        c = self._entries.get(a.ino)
        if c is not None and c[0] is a:
            return c[1]
        e = self._build_entry(a)
        if len(self._entries) >= ENTRY_CACHE_SIZE:
            self._entries.clear()
        self._entries[a.ino] = (a, e)
        return e

    def _expired_entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = self._build_entry(a)
        e.entry_timeout = e.attr_timeout = 0
        return e

    def _build_entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = a.generation
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _ref(self, a: Attr) -> pyfuse3.EntryAttributes:
        self.fs.ref(a.ino)
        return self._entry(a)

    def _caller(self, ctx: pyfuse3.RequestContext) -> tuple[int, set[int]] | None:
        """``(uid, groups)`` of a request whose permissions this handler must check, or None.

        None when the kernel checks them (``default_permissions``, the default) and for uid 0, which
        passes every check.  Without ``default_permissions`` (``-o nodefault_permissions``) the kernel
        leaves all checks to the filesystem but access(2) (sent as ACCESS) and an exec's "some x bit";
        these handlers then apply the POSIX rules to the caller's fsuid and groups.  What they cannot
        see: a process's capabilities (uid 0 without CAP_DAC_OVERRIDE still passes), and the path
        walks the kernel serves from its cache (a directory's search permission guards only the names
        it has to look up).  The supplementary groups come from /proc (slow, but only for non-root).
        """
        if not self.check_permissions or ctx.uid == 0:
            return None
        gids = {ctx.gid}
        with contextlib.suppress(OSError, ValueError):
            gids |= pyfuse3.get_sup_groups(ctx.pid)
        return ctx.uid, gids

    def _may(self, ctx: pyfuse3.RequestContext, ino: int, mask: int) -> None:
        c = self._caller(ctx)
        if c is not None:
            self.fs.access(ino, mask, *c)

    def _may_remove(self, ctx: pyfuse3.RequestContext, parent: int, name: bytes) -> None:
        c = self._caller(ctx)
        if c is not None:
            self.fs.may_remove(parent, name, *c)

    def _new_fh(self, ino: int, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.fs.open(ino)
        self.handles[fh] = Handle(ino, flags)
        return fh

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    def _file_info(self, fh: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    # ------------------------------------------------------------------------ lookups
    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        self._may(ctx, parent_inode, os.X_OK)
        entry = self._ref(self.fs.lookup(parent_inode, name))
        # A name found here that the kernel did not have: its next listing reply should carry
        # attributes (_plus).  Like the kernel's rule, a failed lookup advises nothing.
        advised = self._plus_advised
        if len(advised) >= PLUS_ADVICE_LIMIT:
            advised.clear()  # advice only: forgetting it costs a later listing its attributes
        advised.add(parent_inode)
        return entry

    @_guard
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            if ino != ROOT_INO:
                self.fs.forget(ino, n)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> Any:
        return self._entry(self.fs.getattr(inode))

    @_guard
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> Any:
        mode: int | None = attr.st_mode if fields.update_mode else None
        c = self._caller(ctx)
        if c is not None:
            mode = self.fs.check_setattr(
                inode, *c, mode=mode,
                owner=attr.st_uid if fields.update_uid else None,
                group=attr.st_gid if fields.update_gid else None,
                size=fields.update_size and fh is None,  # ftruncate: checked when the file was opened
                times=fields.update_atime or fields.update_mtime or fields.update_ctime,
            )
        kw: dict[str, int] = {}
        if mode is not None:
            kw["mode"] = mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime_ns"] = attr.st_ctime_ns
        return self._entry(self.fs.setattr(inode, **kw))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Sent only without default_permissions; answered for root too (X needs an x bit).
        c = self._caller(ctx)
        self.fs.access(inode, mode, *(c or (ctx.uid, {ctx.gid})))
        return True

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> Any:
        s = self.fs.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = s.block_size
        st.f_blocks = s.blocks
        st.f_bfree = st.f_bavail = s.free_blocks
        st.f_files = s.files
        st.f_ffree = st.f_favail = s.free_files
        st.f_namemax = s.name_max
        return st

    # ------------------------------------------------------------------------ namespace
    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> Any:
        self._may(ctx, parent_inode, os.W_OK | os.X_OK)
        return self._ref(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        self._may(ctx, parent_inode, os.W_OK | os.X_OK)
        return self._ref(self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> Any:
        self._may(ctx, parent_inode, os.W_OK | os.X_OK)
        return self._ref(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> Any:
        c = self._caller(ctx)
        if c is not None:
            self.fs.access(new_parent_inode, os.W_OK | os.X_OK, *c)
            self.fs.may_link(inode, *c)
        return self._ref(self.fs.link(inode, new_parent_inode, new_name))

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._may_remove(ctx, parent_inode, name)
        self.fs.unlink(parent_inode, name)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._may_remove(ctx, parent_inode, name)
        self.fs.rmdir(parent_inode, name)

    @_guard
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        c = self._caller(ctx)
        if c is not None:
            self.fs.may_remove(parent_inode_old, name_old, *c)
            self.fs.may_remove(parent_inode_new, name_new, *c)
            if parent_inode_new != parent_inode_old:  # a directory moved away: its ".." changes
                moved = [self.fs.lookup(parent_inode_old, name_old)]
                if flags & RENAME_EXCHANGE:
                    moved.append(self.fs.lookup(parent_inode_new, name_new))
                for a in moved:
                    if a.mode & 0o170000 == 0o040000:
                        self.fs.access(a.ino, os.W_OK, *c)
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # ------------------------------------------------------------------------ directories
    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.fs.getattr(inode)
        c = self._caller(ctx)
        no_search = False
        if c is not None:
            self.fs.access(inode, os.R_OK, *c)
            try:
                self.fs.access(inode, os.X_OK, *c)
            except PermissionDenied:
                no_search = True
        fh = self._new_fh(inode, os.O_RDONLY | os.O_DIRECTORY)
        self.handles[fh].no_search = no_search
        return fh

    def _plus(self, h: Handle, start_id: int) -> bool:
        """Whether this READDIRPLUS request gets full entries (see the module docstring)."""
        if self._name_only is None:
            return True
        if self.readdirplus != "auto":
            return self.readdirplus == "yes"
        # The kernel's FUSE_CAP_READDIRPLUS_AUTO rule, which pyfuse3 turns off: a listing's first
        # reply is full; a later one is full when names of the directory were looked up since
        # (the advice is used up by the reply that takes it, as the kernel's test_and_clear_bit).
        advised = h.ino in self._plus_advised
        self._plus_advised.discard(h.ino)
        if start_id == 0:
            return True
        if advised:
            # The kernel also takes advice from a cached dentry used while it is still valid -
            # which the daemon never sees: for a reader that stats while it lists (ls -l), the
            # entries of a full reply come from the cache and advise nothing here.  So a listing
            # whose names were looked up between two replies stays full until it ends.
            h.full_listing = True
        return h.full_listing

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._handle(fh)
        ino = h.ino
        added: list[int] = []  # lookups to count: full entries the kernel will get, except . and ..
        name_only = self._name_only
        if name_only is not None and not self._plus(h, start_id):
            name_only.reply(token, self.fs.readdir_names(ino, start_id))
        else:
            reply, entry = pyfuse3.readdir_reply, self._entry
            if h.no_search:
                # Entries that expire at once: the kernel caches nothing that would spare the next
                # path walk through them the LOOKUP (and its search-permission check) of a name.
                entry = self._expired_entry
            for name, a, cookie in self.fs.readdir_plus(ino, start_id):
                if not reply(token, name, entry(a), cookie):
                    break
                if name != b"." and name != b"..":
                    added.append(a.ino)
        if start_id == 0:
            self.fs.accessed(ino, self.atime)
        # Counted last, once nothing can fail any more: if a later entry (or the atime update)
        # fails, the kernel gets an error instead of the entries, and must not be charged lookups.
        self.fs.ref_many(added)

    @_guard
    async def releasedir(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None:
            self.fs.release(h.ino)

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(self._handle(fh).ino, datasync)

    # ------------------------------------------------------------------------ files
    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> Any:
        a = self.fs.getattr(inode)
        self._may(ctx, inode, _open_mask(flags))
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY and a.size:
            self.fs.setattr(inode, size=0)
        return self._file_info(self._new_fh(inode, flags))

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> Any:
        self._may(ctx, parent_inode, os.W_OK | os.X_OK)
        try:
            a = self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        except Exists:
            if flags & os.O_EXCL:
                raise
            a = self.fs.lookup(parent_inode, name)  # lost a race with another creator: open it
            self._may(ctx, a.ino, _open_mask(flags))
            if a.mode & 0o170000 == 0o040000:
                raise pyfuse3.FUSEError(errno.EISDIR) from None
            if flags & os.O_TRUNC and a.size:
                a = self.fs.setattr(a.ino, size=0)
        entry = self._ref(a)
        return self._file_info(self._new_fh(a.ino, flags)), entry

    @_guard
    async def read(  # type: ignore[override]  # pyfuse3 replies with any contiguous buffer
        self, fh: int, off: int, size: int
    ) -> bytes | bytearray | memoryview:
        h = self._handle(fh)
        ino = h.ino
        # O_DIRECT reads bypass the kernel's page cache: they get no read-ahead here either.
        data = await self.fs.read_async(ino, off, size, readahead=not h.flags & os.O_DIRECT)
        self.fs.accessed(ino, self.atime)
        return data

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        if h.flags & os.O_APPEND and not self.enable_writeback_cache:
            off = self.fs.getattr(h.ino).size
        return self.fs.write(h.ino, off, buf)

    # No flush handler: pyfuse3 answers FLUSH with ENOSYS, and the kernel then stops sending FLUSH
    # on this connection (fc->no_flush).  Writes reach the core as they happen (write-through; with
    # -o writeback_cache the kernel writes dirty pages back before it would send FLUSH anyway), so
    # close() has nothing to report - and saves a round trip: one of the 7 requests of a create.

    @_guard
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is not None:
            self.fs.release(h.ino)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(self._handle(fh).ino, datasync)

    # ------------------------------------------------------------------------ xattrs
    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._may_xattr(ctx, inode, name, os.R_OK)
        value = self.fs.xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)  # straight through _guard: no SovError to map
        return value

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name.startswith(b"system.posix_acl_"):
            # The kernel only enforces POSIX ACLs with FUSE_POSIX_ACL, which this mount does not request;
            # storing one would make it lie (cp -a would then skip its chmod). Tools fall back to modes.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self._may_xattr(ctx, inode, name, os.W_OK)
        self.fs.setxattr(inode, name, value)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._may_xattr(ctx, inode, name, os.W_OK)
        self.fs.removexattr(inode, name)

    def _may_xattr(self, ctx: pyfuse3.RequestContext, inode: int, name: bytes, mask: int) -> None:
        """user.* xattrs follow the file's permission bits.  The other namespaces are the VFS's to
        guard (trusted.* wants CAP_SYS_ADMIN, security.* the security modules) whatever the FS does."""
        if name.startswith(b"user."):
            self._may(ctx, inode, mask)

    # ------------------------------------------------------------------------ teardown
    def release_all(self) -> None:
        """Drop every handle still open (unmount without RELEASE requests)."""
        for h in self.handles.values():
            self.fs.release(h.ino)
        self.handles.clear()
