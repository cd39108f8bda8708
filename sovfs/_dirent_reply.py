"""Names-only entries for READDIRPLUS replies: an ``EntryAttributes`` whose FUSE node id is 0.

Why this exists
---------------
pyfuse3 answers every directory listing with READDIRPLUS: its init handler clears the kernel's
``FUSE_CAP_READDIRPLUS_AUTO`` and it registers no plain READDIR.  Each entry of such a reply hands the
kernel an inode: the reader's kernel allocates a dentry and an inode for it (1-2 µs of the reader's
system time per entry, measured: 10-20 ms of a 10,000-entry listing), and the daemon must first load
the inode to report its attributes, then count one more lookup for it.  A program that lists names
(``find``, ``ls`` without ``-l``, a directory walk) pays all that for nothing.

The protocol has an escape, which libfuse's own high-level API uses: a READDIRPLUS entry whose
``entry_out.nodeid`` is 0 is only *listed* - name, ``d_ino``, ``d_type`` - and the kernel links
nothing and expects no FORGET for it (``fuse_direntplus_link`` in the kernel's fs/fuse/readdir.c:
"zero nodeid ... only means the userspace filesystem did not want to return attributes/handle for
this entry").  pyfuse3 offers no way to send one: its ``st_ino`` setter writes the node id and
``attr.st_ino`` (which becomes ``d_ino``) together, and an entry with ``d_ino`` 0 is no answer either
(glibc's readdir skips it).

So :class:`NameOnlyEntry` keeps ONE ``EntryAttributes`` whose node id is 0 and writes the inode
number straight into its ``struct stat`` through ctypes.  ``pyfuse3.readdir_reply`` copies the entry
into the reply buffer at once, so the same object serves every entry of every listing.

Safety: the layout is not guessed.  The constructor finds both fields by writing marker values
through pyfuse3's own setters and reading the object's memory back, and it checks that the node id
reads 0 through pyfuse3's getter afterwards.  Any surprise (another pyfuse3, another platform, not
CPython, whose ``id`` is the object's address) raises :class:`LayoutUnknown`, and the caller then
answers every listing with full entries - slower, never wrong.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable

import pyfuse3

__all__ = ["LayoutUnknown", "NameOnlyEntry"]

# Marker values: large, distinct, and never a plausible default of any field.
_NODE_MARK = 0x5C0F_5E11_A5E7_1D01
_GEN_MARK = 0x5C0F_5E11_A5E7_1D02
_WORD = ctypes.sizeof(ctypes.c_uint64)


class LayoutUnknown(RuntimeError):
    """pyfuse3's ``EntryAttributes`` is not laid out as :class:`NameOnlyEntry` expects."""


class NameOnlyEntry:
    """READDIRPLUS entries that list names without handing the kernel their inodes.

    :meth:`reply` fills a reply with them.  No lookup is counted for such an entry: the kernel
    sends no FORGET for it.
    """

    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise LayoutUnknown("object addresses are only known on CPython")
        e = pyfuse3.EntryAttributes()
        size = type(e).__basicsize__
        words = (ctypes.c_uint64 * (size // _WORD)).from_address(id(e))
        e.st_ino = _NODE_MARK  # pyfuse3 writes fuse_entry_param.ino and attr.st_ino
        e.generation = _GEN_MARK
        marked = [i for i in range(len(words)) if words[i] == _NODE_MARK]
        # fuse_entry_param = {ino, generation, struct stat attr, ...}; Linux's struct stat begins
        # with st_dev, st_ino - so the node id is the marked word followed by the generation, and
        # d_ino's word comes three words after it.
        node = [i for i in marked if i + 1 < len(words) and words[i + 1] == _GEN_MARK]
        if len(marked) != 2 or len(node) != 1 or marked != [node[0], node[0] + 3]:
            raise LayoutUnknown(f"EntryAttributes layout not recognised (marks at words {marked})")
        self._d_ino = node[0] + 3
        e.st_ino = 0
        e.generation = 0
        words[self._d_ino] = _NODE_MARK
        if e.st_ino != 0 or words[node[0]] != 0:
            raise LayoutUnknown("EntryAttributes node id did not stay 0")
        words[self._d_ino] = 0
        self._entry = e
        self._words = words  # a view into e's memory; e lives as long as self

    def reply(self, token: pyfuse3.ReaddirToken, entries: Iterable[tuple[bytes, int, int, int]]) -> None:
        """Add ``(name, ino, dtype, next_cookie)`` entries to a READDIRPLUS reply until it is full.

        ``dtype`` is a directory entry's DT_* file type.  The loop is the listing's hot path (one
        pass per entry, ~70 replies per 10,000 names), so it sets the type only when it changes.
        """
        words, at, e, add = self._words, self._d_ino, self._entry, pyfuse3.readdir_reply
        shown = -1
        for name, ino, dtype, cookie in entries:
            words[at] = ino
            if dtype != shown:
                e.st_mode = dtype << 12
                shown = dtype
            if not add(token, name, e, cookie):
                return
