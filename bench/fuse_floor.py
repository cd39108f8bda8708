"""The pyfuse3 floor: what a FUSE filesystem written with pyfuse3 + trio costs before it does any work.

A trivial filesystem (one 256 MiB file whose reads return zeros and whose writes are dropped, and an
in-memory namespace that keeps names and modes only) is mounted and measured with the same fio options
as ``bench/fio_bench.py``'s random 4 KiB jobs and with that script's own metadata harness (create,
listing after ``drop_caches`` and unlink of 10,000 files of 4 KiB, in one directory and in that
script's tree of 100 leaf directories),
alongside a SovFS mount.  The trivial filesystem's daemon CPU per request is the floor of the
per-request cost.  A create is six FUSE requests on any filesystem mounted with
``default_permissions`` (LOOKUP, CREATE, GETXATTR, WRITE, RELEASE, and a GETATTR of the parent
directory, whose attributes the kernel invalidates after each create): the summary's
``sovfs_vs_floor_create`` is SovFS's create rate against the trivial filesystem's with fastwait (the
way ``mount.sovfs`` waits).  A job ``getxattr`` reads an absent attribute of the file in a loop: one
request whose handler does next to nothing, so ``sovfs_vs_floor_getxattr`` is what SovFS's own request
path (its adapter, error wrapper and wait) costs over pyfuse3's.

The variants of the trivial filesystem:

* ``xattrs``: pyfuse3's own wait for requests, ``default_permissions``.  The kernel asks a FUSE
  filesystem for the file's ``security.capability`` xattr before every write (to strip it) unless the
  filesystem answers ENOSYS to ``getxattr`` - which switches xattrs off altogether - or the connection
  negotiated ``FUSE_HANDLE_KILLPRIV_V2``, which pyfuse3 cannot request.  SovFS supports xattrs, so
  every write it serves costs two FUSE requests (GETXATTR, then WRITE), as this variant's do.
* ``xattrs, fastwait``: waits the way ``mount.sovfs`` does by default (``-o fastwait``,
  ``sovfs/_fastloop.py``); the summary's ``fastwait_gain_randread_nj4`` is what that wait alone is
  worth.
* ``xattrs, fastwait, nodefault_permissions`` - **the ceiling**: mounted the way ``fio_bench.py``
  mounts SovFS (fastwait, without ``default_permissions``, as fuse2fs mounts), and reading real bytes:
  one ``pread`` of a data file on the host disk per read.  Its listings carry names only, the
  cheapest READDIRPLUS reply (the one pyfuse3 sends; ``sovfs/_dirent_reply.py``).  It is the best a
  pyfuse3 filesystem that keeps xattrs and reads its data from a disk does here.
* ``no xattrs, fastwait, nodefault_permissions``: the same, answering ENOSYS to ``getxattr``: the
  best a pyfuse3 filesystem does that gives xattrs up (one request fewer per write).

**The ceiling against fuse2fs.** Last, fuse2fs (an ext4 image of the same size, mounted the way
``fio_bench.py`` mounts it) runs the same jobs.  The line ``fuse-floor-ceiling`` divides the ceiling
variant's rate by fuse2fs's, job by job, from the same run, next to the issue's target for that job
(``fio_bench.py``'s ratios; ``!`` marks a ceiling under its target): where it is under, no pyfuse3
filesystem that keeps xattrs and does real work reaches the target on this machine.  Two jobs are
exceptions, whose figure is no ceiling: the listings, built name by name from Python through
``pyfuse3.readdir_reply`` (compiled code could build replies faster), and the unlinks after them,
which here need a LOOKUP each because the listing named no inodes (SovFS's listings carry attributes).
``fuse-floor-ceiling-noxattrs`` is the same for the variant without xattrs.  The warm random reads
(``-warm``) find every byte in the host's page cache; ``randread-nj1`` runs, as ``fio_bench.py``'s
does, after ``drop_caches`` and in that script's proportions, so the ceiling variants' ``pread`` and
fuse2fs's wait for the disk alike.

Usage (root, FUSE; fuse2fs and mkfs.ext4 for the ceiling lines, skipped with a note without them)::

    python bench/fuse_floor.py [--seconds 5] [--dir /var/tmp] [--files 10000]

Prints one line per (filesystem, job): IOPS (operations per second for the metadata jobs) and daemon
CPU µs per operation, then the two ceiling lines (when fuse2fs ran) and the summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

FILE_BYTES = 256 << 20
ROOT = Path(__file__).resolve().parent.parent

_TRIVIAL_FS = r'''
import errno, os, stat, sys
import pyfuse3, trio

sys.path.insert(0, sys.argv[5])
from sovfs._dirent_reply import NameOnlyEntry

NAME_ONLY = NameOnlyEntry()  # listings name entries without handing the kernel their inodes

SIZE = int(sys.argv[2])
XATTRS = sys.argv[3] == "xattrs"
ZEROS = bytes(1 << 20)
DATA_FD = os.open(sys.argv[7], os.O_RDONLY) if sys.argv[7] != "-" else -1  # reads come from this file


class Trivial(pyfuse3.Operations):
    """One file (bench.dat, inode 2) whose reads are zeros (or, given a data file, that file's bytes,
    read with one ``pread``) and whose writes are dropped, plus an in-memory namespace for the
    metadata jobs: names and modes only, no data kept.  Listings carry names only (no attributes,
    so the kernel instantiates no inode for them): the cheapest READDIRPLUS reply there is."""

    def __init__(self):
        super().__init__()
        self.names = {(1, b"bench.dat"): 2}
        self.children = {1: {b"bench.dat": 2}}
        self.modes = {1: stat.S_IFDIR | 0o755, 2: stat.S_IFREG | 0o644}
        self.next_ino = 3
        self.listings = {}
        self.next_fh = 1

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = self.modes[ino]
        a.st_nlink = 2 if stat.S_ISDIR(a.st_mode) else 1
        a.st_size = SIZE if ino == 2 else 0
        a.attr_timeout = a.entry_timeout = 5
        return a

    def _new(self, parent, name, mode):
        if (parent, name) in self.names:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        self.names[(parent, name)] = ino
        self.children[parent][name] = ino
        if stat.S_ISDIR(mode):
            self.children[ino] = {}
        self.modes[ino] = mode
        return self._attr(ino)

    async def getattr(self, ino, ctx=None):
        return self._attr(ino)

    async def lookup(self, parent, name, ctx=None):
        ino = self.names.get((parent, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def mkdir(self, parent, name, mode, ctx):
        return self._new(parent, name, stat.S_IFDIR | (mode & 0o7777))

    async def create(self, parent, name, mode, flags, ctx):
        attr = self._new(parent, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=attr.st_ino), attr

    async def unlink(self, parent, name, ctx):
        if self.names.pop((parent, name), None) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        del self.children[parent][name]

    rmdir = unlink

    async def opendir(self, ino, ctx):
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.listings[fh] = [(name, child, self.modes[child] >> 12, i + 1)
                             for i, (name, child) in enumerate(self.children[ino].items())]
        return fh

    async def readdir(self, fh, start, token):
        listing = self.listings[fh]
        NAME_ONLY.reply(token, (listing[i] for i in range(start, len(listing))))

    async def releasedir(self, fh):
        del self.listings[fh]

    async def forget(self, inode_list):
        pass

    async def release(self, fh):
        pass

    async def open(self, ino, flags, ctx):
        return pyfuse3.FileInfo(fh=ino)

    async def read(self, fh, off, size):
        return ZEROS[:size] if DATA_FD < 0 else os.pread(DATA_FD, size, off)

    async def write(self, fh, off, buf):
        return len(buf)

    async def setattr(self, ino, attr, fields, fh, ctx):
        return self._attr(ino)

    async def getxattr(self, ino, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA if XATTRS else errno.ENOSYS)


async def serve():
    if sys.argv[4] == "fastwait":
        from sovfs._fastloop import fast_session_loop

        with fast_session_loop():
            await pyfuse3.main()
    else:
        await pyfuse3.main()


opts = set(pyfuse3.default_options)
opts.add("fsname=fuse-floor")
if sys.argv[6] == "perms":
    opts.add("default_permissions")  # as mount.sovfs: the kernel checks permissions from attributes
pyfuse3.init(Trivial(), sys.argv[1], opts)
try:
    trio.run(serve)
finally:
    pyfuse3.close()
'''

JOBS = {
    "randread-4k-direct": ["--rw=randread", "--bs=4k", "--direct=1"],
    "randread-4k-direct-nj4": ["--rw=randread", "--bs=4k", "--direct=1", "--numjobs=4",
                               "--group_reporting=1"],
    "randwrite-4k-direct": ["--rw=randwrite", "--bs=4k", "--direct=1"],
    "randwrite-4k": ["--rw=randwrite", "--bs=4k"],
}
#: fio jobs run after ``echo 3 > /proc/sys/vm/drop_caches``, as bench/fio_bench.py's read jobs, and in
#: that script's proportions: 4 KiB reads of a quarter of the region that is a quarter of the file
#: (so that host read-ahead cannot load the file), a fixed number of them rather than for a time
COLD_JOBS = {
    "randread-4k-direct-cold": [*JOBS["randread-4k-direct"], f"--offset={FILE_BYTES // 4}",
                                f"--size={FILE_BYTES // 4}", f"--io_size={FILE_BYTES // 16}"],
}  # fmt: skip
ALL_FIO = {**JOBS, **COLD_JOBS}


#: metadata jobs: bench/fio_bench.py's own harness (``--meta-worker``): (phase, layout)
META_JOBS = {
    "create-flat": ("create", "flat"),
    "readdir-flat": ("readdir", "flat"),
    "unlink-flat": ("unlink", "flat"),
    "create-tree": ("create", "tree"),
    "readdir-tree": ("readdir", "tree"),
    "unlink-tree": ("unlink", "tree"),
}
#: metadata jobs run after drop_caches, as fio_bench.py's listings
COLD_META = {"readdir-flat", "readdir-tree"}
META_FILES = 10_000  # as bench/fio_bench.py (--files)

#: the ceiling line: job here -> (its name in fio_bench.py's table, the issue's SovFS/fuse2fs target)
CEILING_JOBS = {
    "randread-4k-direct": ("randread-nj1-warm", 1.0),
    "randread-4k-direct-cold": ("randread-nj1", 1.0),
    "randread-4k-direct-nj4": ("randread-nj4-warm", 2.0),
    "randwrite-4k-direct": ("randwrite-direct", 1.0),
    "randwrite-4k": ("randwrite-buf", 1.0),
    "create-flat": ("create-flat", 2.0),
    "create-tree": ("create-tree", 2.0),
    "readdir-flat": ("readdir-flat", 1.0),
    "readdir-tree": ("readdir-tree", 1.0),
    "unlink-flat": ("unlink-flat", 1.0),
    "unlink-tree": ("unlink-tree", 1.0),
}
BEST = "pyfuse3 trivial (xattrs, fastwait, nodefault_permissions)"
BEST_NOXATTRS = "pyfuse3 trivial (no xattrs, fastwait, nodefault_permissions)"


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the filesystem daemon exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} was not mounted within {timeout} s")
        time.sleep(0.05)


def _unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


@contextlib.contextmanager
def trivial_mount(
    mnt: Path, variant: str, wait: str = "pyfuse3", perms: bool = True, data: Path | None = None
) -> Iterator[int]:
    argv = [sys.executable, "-c", _TRIVIAL_FS, str(mnt), str(FILE_BYTES), variant, wait, str(ROOT),
            "perms" if perms else "noperms", str(data) if data else "-"]  # fmt: skip
    with _daemon(argv, mnt) as pid:
        yield pid


@contextlib.contextmanager
def _daemon(argv: list[str], mnt: Path, quiet: bool = False) -> Iterator[int]:
    """Run a FUSE daemon that mounts ``mnt`` and stays in the foreground; yield its pid once the mount
    is there, then unmount it and reap the daemon (killed if it has not exited within 30 s)."""
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(argv, cwd="/", stdout=out, stderr=out)
    try:
        _wait_mounted(mnt, proc)
        yield proc.pid
    finally:
        _unmount(mnt)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def sovfs_mount(work: Path, mnt: Path) -> Iterator[int]:
    img, pidfile = work / "sovfs.img", work / "sovfs.pid"
    venv_bin = Path(sys.executable).parent
    mkfs = [str(venv_bin / "mkfs.sovfs"), "-q", "-s", "1G", str(img)]
    subprocess.run(mkfs, check=True, capture_output=True)
    mount = [str(venv_bin / "mount.sovfs"), str(img), str(mnt), "-o", f"pidfile={pidfile}"]
    subprocess.run(mount, check=True)
    try:
        pid = int(pidfile.read_text())
        _fill(mnt)
        # mount.sovfs writes large extents around the host page cache (-o directwrite): read the
        # image once so that SovFS's random reads, like the trivial filesystem's, wait for no disk.
        _read_through(img)
        yield pid
    finally:
        _unmount(mnt)


def _fill(mnt: Path) -> None:
    fill = ["fio", "--name=fill", f"--directory={mnt}", "--filename=bench.dat", f"--size={FILE_BYTES}",
            "--rw=write", "--bs=1M", "--ioengine=psync", "--fallocate=none", "--end_fsync=1",
            "--output-format=terse"]  # fmt: skip
    subprocess.run(fill, check=True, capture_output=True)


def _read_through(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def _data_file(work: Path) -> Path:
    """The ceiling variant's data: FILE_BYTES of nonzero bytes written to the host disk (no holes, so
    that a cold read waits for the disk as SovFS's and fuse2fs's do), synced, then read once (warm)."""
    path = work / "floor.dat"
    if not path.exists():
        chunk = bytes(range(256)) * 4096
        with open(path, "wb") as f:
            for _ in range(FILE_BYTES // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    _read_through(path)  # again for the second variant: the cold job before it dropped it
    return path


def drop_caches() -> None:
    """fio_bench.py's drop (write back, then drop the page cache, dentries and inodes); here a cold job
    that would not be cold stops the run."""
    if not _fio_bench().drop_caches():
        raise RuntimeError("cannot write /proc/sys/vm/drop_caches (needs root): the cold jobs would be warm")


def have_fuse2fs() -> bool:
    return shutil.which("fuse2fs") is not None and shutil.which("mkfs.ext4") is not None


@contextlib.contextmanager
def fuse2fs_mount(work: Path, mnt: Path) -> Iterator[int]:
    """fuse2fs as ``bench/fio_bench.py`` mounts it (``-o fakeroot``, foreground for its pid)."""
    img = work / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(img)], check=True, capture_output=True)
    with _daemon(["fuse2fs", str(img), str(mnt), "-o", "fakeroot", "-f"], mnt, quiet=True) as pid:
        _fill(mnt)
        _read_through(img)  # its random reads, like the trivial filesystem's, wait for no disk
        yield pid


def run_fio(mnt: Path, job: str, seconds: float) -> tuple[float, int]:
    """(IOPS, operations) of one fio job on ``mnt``: time-based, but for the cold ones (a fixed size)."""
    timed = [] if job in COLD_JOBS else ["--time_based=1", f"--runtime={seconds}"]
    argv = ["fio", f"--name={job}", f"--directory={mnt}", "--filename=bench.dat", f"--size={FILE_BYTES}",
            "--ioengine=psync", "--fallocate=none", *timed, "--randrepeat=1", "--output-format=json",
            *ALL_FIO[job]]  # fmt: skip
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd="/").stdout
    side = json.loads(out)["jobs"][0]["write" if "write" in job else "read"]
    return float(side["iops"]), int(side["total_ios"])


def run_meta(mnt: Path, job: str, files: int = META_FILES) -> tuple[float, int]:
    """(operations per second, operations) of one metadata phase, by fio_bench.py's harness.

    A listing must name every file and directory the create phase made: a filesystem whose listing
    came back short would look faster than it is, so that stops the run."""
    phase, layout = META_JOBS[job]
    argv = [sys.executable, str(ROOT / "bench" / "fio_bench.py"), "--meta-worker", phase, str(mnt),
            str(files), layout]  # fmt: skip
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd="/").stdout
    secs, ops = json.loads(out.strip().splitlines()[-1])
    if phase == "readdir" and ops != (want := _listed_names(files, layout)):
        raise RuntimeError(f"{job}: the listing named {ops} entries, {want} expected")
    return ops / secs, int(ops)


def _listed_names(files: int, layout: str) -> int:
    """The names fio_bench.py's listing phase sees: every file, and every directory but the top one."""
    dirs, paths = _fio_bench().meta_paths(Path("/"), files, layout)
    return len(paths) + len(dirs) - 1


def _fio_bench() -> ModuleType:
    """bench/fio_bench.py as a module (its metadata layout and cache drop are the ones measured here)."""
    bench = str(ROOT / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("fio_bench")


def run_getxattr(mnt: Path, seconds: float) -> tuple[float, int]:
    """(requests per second, requests) of a loop of ``getxattr`` of an absent attribute of bench.dat.

    A request whose handler does next to nothing: what a filesystem's request path costs by itself.
    """
    path = str(mnt / "bench.dat")
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(256):
            with contextlib.suppress(OSError):
                os.getxattr(path, "user.fuse-floor-absent")
        n += 256
    return n / (time.perf_counter() - start), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per job (default 5)")
    ap.add_argument("--dir", default="/var/tmp", help="where the SovFS image lives (default /var/tmp)")
    ap.add_argument(
        "--files", type=int, default=META_FILES, help=f"files per metadata job (default {META_FILES:,})"
    )
    args = ap.parse_args(argv)
    results: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fuse_floor-") as tmp:
        work = Path(tmp)
        mnt = work / "mnt"
        mnt.mkdir()
        targets: dict[str, Callable[[], contextlib.AbstractContextManager[int]]] = {
            "pyfuse3 trivial (xattrs)": lambda: trivial_mount(mnt, "xattrs"),
            "pyfuse3 trivial (xattrs, fastwait)": lambda: trivial_mount(mnt, "xattrs", "fastwait"),
            "sovfs": lambda: sovfs_mount(work, mnt),
            BEST: lambda: trivial_mount(mnt, "xattrs", "fastwait", perms=False, data=_data_file(work)),
            BEST_NOXATTRS: lambda: trivial_mount(
                mnt, "noxattrs", "fastwait", perms=False, data=_data_file(work)
            ),
        }
        if have_fuse2fs():
            targets["fuse2fs"] = lambda: fuse2fs_mount(work, mnt)
        else:
            print("fuse2fs or mkfs.ext4 not found: no fuse-floor-ceiling lines", flush=True)
        for name, mount in targets.items():
            with mount() as pid:
                for job in [*ALL_FIO, *META_JOBS, "getxattr"]:
                    if job in COLD_JOBS or job in COLD_META:
                        drop_caches()
                    c0 = _cpu(pid)
                    if job in ALL_FIO:
                        iops, ops = run_fio(mnt, job, args.seconds)
                    elif job in META_JOBS:
                        iops, ops = run_meta(mnt, job, args.files)
                    else:
                        iops, ops = run_getxattr(mnt, args.seconds)
                    us = (_cpu(pid) - c0) / max(ops, 1) * 1e6
                    results[(name, job)] = (iops, us)
                    unit = "IOPS " if job in ALL_FIO else "ops/s"
                    print(f"{name:36} {job:24} {iops:10,.0f} {unit}  daemon {us:6.0f} µs/op", flush=True)
    floor_r = results[("pyfuse3 trivial (xattrs)", "randread-4k-direct")][0]
    floor_w = results[("pyfuse3 trivial (xattrs)", "randwrite-4k-direct")][0]
    sov_r = results[("sovfs", "randread-4k-direct")][0]
    sov_w = results[("sovfs", "randwrite-4k-direct")][0]
    fast_r4 = results[("pyfuse3 trivial (xattrs, fastwait)", "randread-4k-direct-nj4")][0]
    slow_r4 = results[("pyfuse3 trivial (xattrs)", "randread-4k-direct-nj4")][0]
    floor_c = results[("pyfuse3 trivial (xattrs, fastwait)", "create-flat")][0]
    sov_c = results[("sovfs", "create-flat")][0]
    floor_x = results[("pyfuse3 trivial (xattrs, fastwait)", "getxattr")][0]
    sov_x = results[("sovfs", "getxattr")][0]
    if ("fuse2fs", "create-flat") in results:
        print(ceiling_line(results))
        print(ceiling_line(results, BEST_NOXATTRS))
    print(f"fuse-floor sovfs_vs_floor_randread={sov_r / floor_r:.2f} "
          f"sovfs_vs_floor_randwrite={sov_w / floor_w:.2f} "
          f"sovfs_vs_floor_create={sov_c / floor_c:.2f} "
          f"sovfs_vs_floor_getxattr={sov_x / floor_x:.2f} "
          f"fastwait_gain_randread_nj4={fast_r4 / slow_r4:.2f}")
    return 0


def ceiling_line(results: dict[tuple[str, str], tuple[float, float]], variant: str = BEST) -> str:
    """``fuse-floor-ceiling[-noxattrs] JOB=RATIO/TARGET ...``: a ceiling variant's rate over fuse2fs's,
    job by job, with the issue's target for that job (``!`` marks a ceiling under its target)."""
    parts = []
    for job, (name, target) in CEILING_JOBS.items():
        r = round(results[(variant, job)][0] / results[("fuse2fs", job)][0], 2)
        parts.append(f"{name}={r:.2f}/{target:g}{'!' if r < target else ''}")
    label = "fuse-floor-ceiling" + ("-noxattrs" if variant == BEST_NOXATTRS else "")
    return label + " " + " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
