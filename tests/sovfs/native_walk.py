"""Walk images with the core and print what every operation gave, as JSON (one list per image).

``python -m tests.sovfs.native_walk IMG...``: mount each image (``require_clean=False``), list every
directory, look up, stat, read and list the xattrs of every entry, then create, write, mkdir, unlink,
sync and close.  Results are summarised (attributes without times, digests of data), so that two
runs - one with the compiled core, one with ``SOVFS_PURE=1`` - give equal output exactly when the
two forms of the core behave alike.  An exception other than a ``SovError`` is recorded as ``OTHER``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from typing import Any

from sovfs.blockdev import open_block_device
from sovfs.errors import SovError
from sovfs.fs import FileSystem


def _summary(r: object) -> str:
    if hasattr(r, "ino") and hasattr(r, "mode"):
        return repr((r.ino, r.mode, getattr(r, "size", None), getattr(r, "nlink", None)))
    if isinstance(r, (bytes, bytearray)):
        return hashlib.sha1(bytes(r)).hexdigest()[:16]
    if isinstance(r, FileSystem):
        return "mounted"
    return hashlib.sha1(repr(r).encode()).hexdigest()[:16]


def walk(path: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []

    def rec(op: str, f: Callable[[], Any]) -> Any:
        try:
            r = f()
        except SovError as e:
            out.append((op, type(e).__name__, str(e)))
            return None
        except Exception as e:  # what the comparison is looking for
            out.append((op, "OTHER " + type(e).__name__, str(e)))
            return None
        out.append((op, "ok", _summary(r)))
        return r

    dev = open_block_device(path)
    try:
        fs: FileSystem | None = rec("mount", lambda: FileSystem.mount(dev, require_clean=False))
        if fs is None:
            return out
        stack, seen = [1], set()
        while stack and len(seen) < 200:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            ents = rec(f"readdir {d}", lambda d=d: [(n, a.ino, a.mode) for n, a, _ in fs.readdir_plus(d)])
            for name, ino, mode in (ents or [])[:60]:
                if name in (b".", b".."):
                    continue
                rec(f"lookup {d}/{name!r}", lambda d=d, name=name: fs.lookup(d, name))
                rec(f"getattr {ino}", lambda ino=ino: fs.getattr(ino))
                kind = mode & 0o170000
                if kind == 0o040000:
                    stack.append(ino)
                elif kind == 0o100000:
                    rec(f"read {ino}", lambda ino=ino: fs.read(ino, 0, 1 << 20))
                elif kind == 0o120000:
                    rec(f"readlink {ino}", lambda ino=ino: fs.readlink(ino))
                rec(f"listxattr {ino}", lambda ino=ino: fs.listxattr(ino))
        new = rec("create", lambda: fs.create(1, b"walk-new"))
        if new is not None:
            rec("write", lambda: fs.write(new.ino, 0, b"w" * 70_000))
        rec("mkdir", lambda: fs.mkdir(1, b"walk-dir"))
        rec("unlink", lambda: fs.unlink(1, b"walk-new"))
        rec("sync", fs.sync)
        rec("close", fs.close)
        return out
    finally:
        dev.close()


if __name__ == "__main__":
    print(json.dumps([walk(p) for p in sys.argv[1:]]))
