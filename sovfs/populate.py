"""Copy a host directory tree into a SovFS (``mkfs.sovfs -d``).

Theory of operation
-------------------
Walks the host tree with ``os.scandir`` (no symlink following), creating each object through the
:class:`FileSystem` façade: regular files (only the data segments found with SEEK_DATA/SEEK_HOLE, so sparse
files stay sparse, copied in 4 MiB chunks), directories, symlinks, hard links (by host (dev, ino)), device
nodes, FIFOs and sockets; then modes, owners, xattrs and nanosecond times (directories last, after their
contents).  Anything that cannot be copied is recorded in the returned list, never silently skipped.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from sovfs.errors import SovError
from sovfs.format import ROOT_INO
from sovfs.fs import FileSystem

__all__ = ["copy_tree"]

CHUNK = 4 << 20


def _data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    segs: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            segs.append((start, min(end, size)))
            pos = end
    except OSError:  # ENXIO: no more data; or SEEK_DATA unsupported
        if not segs and pos == 0:
            return [(0, size)] if size else []
    return segs


def copy_tree(fs: FileSystem, src: str, progress: Callable[[int], None] | None = None) -> list[str]:
    """Copy the contents of host directory ``src`` into the root directory. Returns problems found."""
    problems: list[str] = []
    links: dict[tuple[int, int], int] = {}
    dirs_meta: list[tuple[int, os.stat_result, str]] = []

    def meta(ino: int, st: os.stat_result, path: str, is_link: bool = False) -> None:
        try:
            for name in os.listxattr(path, follow_symlinks=False):
                try:
                    fs.setxattr(ino, name.encode(), os.getxattr(path, name, follow_symlinks=False))
                except (SovError, OSError) as e:
                    problems.append(f"{path}: xattr {name}: {e}")
        except OSError as e:
            problems.append(f"{path}: listxattr: {e}")
        fs.setattr(
            ino, mode=None if is_link else stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
            atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
        )

    def walk(host: str, parent: int) -> None:
        try:
            entries = sorted(os.scandir(host), key=lambda e: e.name)
        except OSError as e:
            problems.append(f"{host}: {e.strerror}")
            return
        for ent in entries:
            path = ent.path
            name = os.fsencode(ent.name)
            try:
                st = ent.stat(follow_symlinks=False)
                mode = st.st_mode
                key = (st.st_dev, st.st_ino)
                if not stat.S_ISDIR(mode) and st.st_nlink > 1 and key in links:
                    fs.link(links[key], parent, name)
                    continue
                if stat.S_ISDIR(mode):
                    ino = fs.mkdir(parent, name, stat.S_IMODE(mode)).ino
                    walk(path, ino)
                    dirs_meta.append((ino, st, path))
                    continue
                if stat.S_ISREG(mode):
                    ino = fs.create(parent, name, stat.S_IMODE(mode)).ino
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        for start, end in _data_segments(fd, st.st_size):
                            pos = start
                            while pos < end:
                                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                                if not chunk:
                                    break
                                fs.write(ino, pos, chunk)
                                pos += len(chunk)
                        if fs.getattr(ino).size != st.st_size:
                            fs.truncate(ino, st.st_size)
                    finally:
                        os.close(fd)
                    if progress:
                        progress(st.st_size)
                elif stat.S_ISLNK(mode):
                    ino = fs.symlink(parent, name, os.fsencode(os.readlink(path))).ino
                elif stat.S_IFMT(mode) in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                    ino = fs.mknod(parent, name, mode, st.st_rdev).ino
                else:
                    problems.append(f"{path}: unsupported file type {stat.S_IFMT(mode):#o}")
                    continue
                if st.st_nlink > 1:
                    links[key] = ino
                meta(ino, st, path, is_link=stat.S_ISLNK(mode))
            except (SovError, OSError) as e:
                problems.append(f"{path}: {e}")

    root_st = os.stat(src)
    walk(src, ROOT_INO)
    for ino, st, path in reversed(dirs_meta):
        try:
            meta(ino, st, path)
        except (SovError, OSError) as e:
            problems.append(f"{path}: {e}")
    try:
        meta(ROOT_INO, root_st, src)
    except (SovError, OSError) as e:
        problems.append(f"{src}: {e}")
    return problems
