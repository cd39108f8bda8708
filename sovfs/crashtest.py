"""Crash harness: a concurrent workload on the power-cut simulator, then replay, fsck and an oracle.

Theory of operation
-------------------
One *point* (id ``seed:point``, replayable) is:

1. a fresh SovFS (a cached mkfs image) on a :class:`ledger.backend.CrashBackend` behind the real ledger
   driver/device pair, mounted with the journal;
2. a workload of ``TASKS`` tasks — each with its own directory, plus a shared one — whose operation
   streams are interleaved by an explicit seeded scheduler (each FileSystem call is atomic, as in the
   FUSE adapter): creates, appends, overwrites, truncates, renames of files and directories (also
   across directories and replacing targets), hard links, unlinks of open files (written to while
   unlinked), xattrs, fsyncs;
3. the power is cut after a seeded number of device requests (every later request fails), and
   ``power_cut`` applies a seeded legal loss pattern to the unflushed writes;
4. mount (journal replay, orphan reclaim), the oracle, clean unmount, ``fsck -n`` (must be clean).

The oracle keeps a model: the namespace (paths → inode, xattrs) after every operation, and per file
its content at the last fsync plus every write since.  Every fsync commits all operations before it,
so the post-crash namespace must equal the model after some operation ``k ≥`` the last completed
fsync (a prefix: renames are atomic, nothing is half done, link counts follow); each file must have
a size it had since the last fsync, and every byte must be its fsync-time value or a value written
since (zeros only where the file had a hole) — so an fsync'd file keeps at least its fsync'd
contents and no file shows stale or foreign bytes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ledger._machine import Ledger
from ledger.backend import CrashBackend
from ledger.errors import LedgerError
from sovfs import fsck_core
from sovfs.blockdev import LedgerBlockDevice, ram_block_device
from sovfs.errors import SovError
from sovfs.fs import FileSystem
from sovfs.mkfs_core import MkfsParams, make_filesystem

__all__ = ["IMAGE_BYTES", "PointResult", "Simulator", "run_points"]

IMAGE_BYTES = 4 << 20
TASKS = 3
OPS = 60
ROOT = 1

Snapshot = tuple[frozenset[tuple[bytes, int]], frozenset[tuple[int, bytes, bytes]]]


@dataclass
class PointResult:
    id: str
    violations: list[str] = field(default_factory=list)
    fsck_errors: list[str] = field(default_factory=list)
    ops: int = 0
    requests: int = 0
    loss: str = ""
    replayed: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations and not self.fsck_errors


@dataclass
class _File:
    base: bytes  # content at the last fsync (b"" at creation)
    cur: bytearray
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    hole_ok_from: int = 0  # zeros allowed at positions >= this (outside the base)
    sizes: set[int] = field(default_factory=lambda: {0})
    truncated: bool = False

    def fsynced(self) -> None:
        self.base = bytes(self.cur)
        self.writes = []
        self.sizes = {len(self.cur)}
        self.truncated = False
        self.hole_ok_from = len(self.cur)

    def check(self, got: bytes) -> str | None:
        if len(got) not in self.sizes:
            return f"size {len(got)} never held since the last fsync (sizes {sorted(self.sizes)[:6]})"
        a = np.frombuffer(got, np.uint8)
        ok = np.zeros(len(a), bool)
        nb = min(len(self.base), len(a))
        ok[:nb] = a[:nb] == np.frombuffer(self.base, np.uint8)[:nb]
        zero_from = 0 if self.truncated else self.hole_ok_from
        if zero_from < len(a):
            ok[zero_from:] |= a[zero_from:] == 0
        for off, data in self.writes:
            if off >= len(a):
                continue
            k = min(len(data), len(a) - off)
            ok[off : off + k] |= a[off : off + k] == np.frombuffer(data, np.uint8)[:k]
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            return f"byte {i} = {a[i]:#x} was never written there (bytes at {i}.. not from this file)"
        return None


class _Model:
    """The oracle's idea of the filesystem."""

    def __init__(self) -> None:
        self.paths: dict[bytes, int] = {}  # path -> ino (dirs and files)
        self.dirs: set[int] = {ROOT}
        self.files: dict[tuple[int, int], _File] = {}  # (ino, generation): inode numbers are reused
        self.gen: dict[int, int] = {}  # ino -> generation of its current user
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.history: list[Snapshot] = []
        self.durable = 0  # index into history covered by the last completed fsync

    def snap(self) -> Snapshot:
        live = self.live()
        xs = frozenset((i, k, v) for i, d in self.xattrs.items() for k, v in d.items() if i in live)
        return frozenset(self.paths.items()), xs

    def live(self) -> set[int]:
        return set(self.paths.values())

    def record(self) -> None:
        self.history.append(self.snap())

    def fsynced(self) -> None:
        self.durable = len(self.history) - 1
        for f in self.files.values():
            f.fsynced()


def _data(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n).replace(b"\0", b"\x5a")


class _Workload:
    """Per-task operation streams, interleaved by a seeded scheduler, applied to fs and model."""

    def __init__(self, fs: FileSystem, rng: random.Random) -> None:
        self.fs = fs
        self.rng = rng
        self.m = _Model()
        self.open_unlinked: list[int] = []
        self.log: list[tuple[int, int, str]] = []  # (history index, task, op): for failure reports
        self.n = 0
        fs_ = fs
        for name in (b"/shared", *(f"/t{t}".encode() for t in range(TASKS))):
            a = fs_.mkdir(ROOT, name[1:])
            self.m.paths[name] = a.ino
            self.m.dirs.add(a.ino)
        fs_.sync()
        self.m.record()
        self.m.fsynced()

    # -------------------------------------------------------------------------- helpers
    def _parent(self, path: bytes) -> tuple[int, bytes]:
        d, _, name = path.rpartition(b"/")
        return (self.m.paths[d] if d else ROOT), name

    def _under(self, prefix: bytes, dirs: bool) -> list[bytes]:
        return sorted(p for p, i in self.m.paths.items()
                      if p.startswith(prefix + b"/") and (i in self.m.dirs) == dirs)

    def _name(self, t: int) -> bytes:
        self.n += 1
        return f"f{t}_{self.n}".encode()

    # -------------------------------------------------------------------------- one step
    def step(self, t: int) -> None:
        rng, m, fs = self.rng, self.m, self.fs
        home = f"/t{t}".encode()
        files = self._under(home, False) + [p for p in self._under(b"/shared", False) if b"/f%d_" % t in p]
        dirs = [home, *self._under(home, True)]
        op = rng.choice(["create", "create", "append", "append", "overwrite", "truncate", "rename",
                         "rename", "mkdir", "rendir", "link", "unlink", "unlink_open", "xattr", "fsync",
                         "fsync", "rmdir"])
        if not files and op not in ("create", "mkdir", "fsync"):
            op = "create"
        self.log.append((len(self.m.history), t, op))
        if op == "create":
            d = rng.choice(dirs)
            name = self._name(t)
            a = fs.create(m.paths[d], name)
            p = d + b"/" + name
            m.paths[p] = a.ino
            m.files[a.ino, a.generation] = _File(b"", bytearray())
            m.gen[a.ino] = a.generation
            m.xattrs.pop(a.ino, None)
            data = _data(rng, rng.choice([100, 1000, 5000]))
            self._wrote(a.ino, 0, data)  # the model first: a write cut short may still land in part
            fs.write(a.ino, 0, data)
        elif op in ("append", "overwrite"):
            ino = m.paths[rng.choice(files)]
            f = m.files[ino, m.gen[ino]]
            off = len(f.cur) if op == "append" else rng.randrange(0, max(len(f.cur), 1))
            data = _data(rng, rng.choice([17, 600, 3000, 9000]))
            self._wrote(ino, off, data)
            fs.write(ino, off, data)
        elif op == "truncate":
            ino = m.paths[rng.choice(files)]
            f = m.files[ino, m.gen[ino]]
            size = rng.randrange(0, len(f.cur) + 5000)
            f.truncated = True  # zeroes the tail block in place (ordered data), even if cut short
            f.sizes.add(size)
            fs.setattr(ino, size=size)
            if size < len(f.cur):
                del f.cur[size:]
                f.truncated = True
            else:
                f.cur.extend(bytes(size - len(f.cur)))
            f.sizes.add(size)
        elif op == "rename":
            src = rng.choice(files)
            ino = m.paths[src]
            if rng.random() < 0.3 and len(files) > 1:
                dst = rng.choice([p for p in files if p != src])  # replace an existing file
            else:
                dst = rng.choice([*dirs, b"/shared"]) + b"/" + self._name(t)
            if m.paths.get(dst) == ino:
                return
            sp, sn = self._parent(src)
            dp, dn = self._parent(dst)
            fs.rename(sp, sn, dp, dn)
            del m.paths[src]
            m.paths[dst] = ino
        elif op == "mkdir":
            d = rng.choice(dirs)
            name = b"d" + self._name(t)
            a = fs.mkdir(m.paths[d], name)
            m.paths[d + b"/" + name] = a.ino
            m.dirs.add(a.ino)
        elif op == "rendir":
            subs = dirs[1:]
            if not subs:
                return
            src = rng.choice(subs)
            targets = [d for d in dirs if not (d + b"/").startswith(src + b"/") and d != src]
            dst = rng.choice(targets) + b"/d" + self._name(t)
            sp, sn = self._parent(src)
            dp, dn = self._parent(dst)
            fs.rename(sp, sn, dp, dn)
            for p in [p for p in m.paths if p == src or p.startswith(src + b"/")]:
                m.paths[dst + p[len(src):]] = m.paths.pop(p)
        elif op == "link":
            src = rng.choice(files)
            d = rng.choice(dirs)
            name = self._name(t)
            fs.link(m.paths[src], m.paths[d], name)
            m.paths[d + b"/" + name] = m.paths[src]
        elif op in ("unlink", "unlink_open"):
            p = rng.choice(files)
            ino = m.paths[p]
            if op == "unlink_open":
                fs.open(ino)
            dp, n = self._parent(p)
            fs.unlink(dp, n)
            del m.paths[p]
            if op == "unlink_open":
                data = _data(rng, 2000)
                self._wrote(ino, 0, data)
                fs.write(ino, 0, data)  # writes to an orphan
                self.open_unlinked.append(ino)
        elif op == "xattr":
            ino = m.paths[rng.choice(files)]
            xs = m.xattrs.setdefault(ino, {})
            key = b"user.k%d" % rng.randrange(3)
            if key in xs and rng.random() < 0.3:
                fs.removexattr(ino, key)
                del xs[key]
            else:
                val = _data(rng, rng.choice([5, 40, 300]))
                fs.setxattr(ino, key, val)
                xs[key] = val
        elif op == "fsync":
            target = m.paths[rng.choice(files)] if files else m.paths[home]
            fs.fsync(target)
            m.record()
            m.fsynced()
            return
        elif op == "rmdir":
            empty = [d for d in dirs[1:] if not any(p.startswith(d + b"/") for p in m.paths)]
            if not empty:
                return
            d = rng.choice(empty)
            dp, n = self._parent(d)
            fs.rmdir(dp, n)
            m.dirs.discard(m.paths.pop(d))
        if self.open_unlinked and rng.random() < 0.2:
            fs.release(self.open_unlinked.pop(0))
        m.record()

    def _wrote(self, ino: int, off: int, data: bytes) -> None:
        f = self.m.files[ino, self.m.gen[ino]]
        if off > len(f.cur):
            f.cur.extend(bytes(off - len(f.cur)))
        f.cur[off : off + len(data)] = data
        f.writes.append((off, data))
        f.sizes.add(len(f.cur))


def _walk(fs: FileSystem) -> tuple[Snapshot, dict[tuple[int, int], bytes], list[str]]:
    paths: dict[bytes, int] = {}
    contents: dict[tuple[int, int], bytes] = {}
    problems: list[str] = []
    names: dict[int, int] = {}
    stack = [(b"", ROOT)]
    while stack:
        prefix, d = stack.pop()
        for it in fs.readdir(d):
            if it.name in (b".", b"..") or (d == ROOT and it.name == b"lost+found"):
                continue
            p = prefix + b"/" + it.name
            paths[p] = it.ino
            names[it.ino] = names.get(it.ino, 0) + 1
            a = fs.getattr(it.ino)
            if it.ftype == 4:
                stack.append((p, it.ino))
            elif (it.ino, a.generation) not in contents:
                contents[it.ino, a.generation] = fs.read(it.ino, 0, a.size)
    xs = frozenset((i, k, fs.getxattr(i, k)) for i in set(paths.values()) for k in fs.listxattr(i))
    for ino, n in names.items():
        a = fs.getattr(ino)
        if a.mode & 0o170000 != 0o040000 and a.nlink != n:
            problems.append(f"inode {ino}: nlink {a.nlink} but {n} names")
    return (frozenset(paths.items()), xs), contents, problems


class Simulator:
    """One ledger + CrashBackend reused for many points (reset in place between them)."""

    def __init__(self, image_bytes: int = IMAGE_BYTES) -> None:
        dev = ram_block_device(image_bytes)
        make_filesystem(dev, MkfsParams(block_size=1024, uuid=bytes(range(16)), hash_seed=bytes(16),
                                        now_ns=1_700_000_000 * 10**9))
        self.base = np.frombuffer(dev.pread(0, image_bytes), np.uint8).copy()
        dev.close()
        self.backend = CrashBackend(image=self.base, log_bytes=8 << 20)
        self.ledger = Ledger.crash(self.backend, pool_bytes=4 << 20)
        self.dev = LedgerBlockDevice(self.ledger, own=False)
        self.budget = 0
        self._budgets: dict[int, int] = {}  # seed -> requests of one uncut run (calibration)

    def close(self) -> None:
        self.ledger.close()

    def _load(self, img: np.ndarray) -> None:
        from ledger import _device_kernel as K

        b = self.backend
        b.ram[:] = img
        b.durable[:] = img
        b.wc[K.W_NENT] = b.wc[K.W_USED] = b.wc[K.W_DEAD] = 0
        b.wc[K.W_CUT_AT] = -1

    def _run_workload(self, rng: random.Random, cut: int | None) -> tuple[_Workload | None, int, str]:
        """Mount, run the workload (cut after ``cut`` requests); returns (workload, ops run, error)."""
        self._load(self.base)
        start = self.backend.requests
        fs = FileSystem.mount(self.dev)
        w = _Workload(fs, rng)
        if cut is not None:
            self.backend.cut_after(cut)
        i = 0
        try:
            for i in range(OPS):  # noqa: B007 - i is reported
                w.step(rng.randrange(TASKS))
            if cut is None:
                fs.close()
        except (LedgerError, SovError) as e:
            if self.backend.powered:
                return w, i, f"workload error before the cut: {type(e).__name__}: {e}"
        if cut is None:
            self.budget = self.backend.requests - start
        return w, i, ""

    def point(self, seed: int, point: int) -> PointResult:
        pid = f"{seed}:{point}"
        res = PointResult(pid)
        rng = random.Random(pid)
        if seed not in self._budgets:  # calibrate: requests of one full run
            self.budget = 0
            self._run_workload(random.Random(f"{seed}:calibrate"), None)
            self._budgets[seed] = self.budget
        self.budget = self._budgets[seed]
        cut = rng.randrange(0, int(self.budget * 1.1) + 1)
        w, res.ops, err = self._run_workload(random.Random(f"{pid}:w"), cut)
        if err:
            res.violations.append(err)
        res.requests = cut
        self.backend.cut_after(0)
        img = self.backend.power_cut(rng.randrange(1 << 32))
        res.loss = str(self.backend.last_loss)
        self._load(img)
        try:
            fs = FileSystem.mount(self.dev)
        except Exception as e:  # the one promise: it always mounts
            res.violations.append(f"mount after the cut failed: {type(e).__name__}: {e}")
            return res
        res.replayed = fs.recovery.transactions if fs.recovery else 0
        assert w is not None
        try:
            self._oracle(fs, w.m, res)
        except SovError as e:
            res.violations.append(f"reading the recovered filesystem failed: {type(e).__name__}: {e}")
        fs.close()
        rep = fsck_core.check(self.dev, fsck_core.Mode.NO, force=True)
        res.fsck_errors = [str(p) for p in rep.errors]
        return res

    def _oracle(self, fs: FileSystem, m: _Model, res: PointResult) -> None:
        snap, contents, problems = _walk(fs)
        res.violations += problems
        ks = [k for k in range(m.durable, len(m.history)) if m.history[k] == snap]
        if not ks:
            res.violations.append(self._explain(snap, m))
            return
        for (ino, gen), data in contents.items():
            f = m.files.get((ino, gen))
            if f is None:
                res.violations.append(f"inode {ino} generation {gen}: a file the workload never created")
                continue
            why = f.check(data)
            if why:
                res.violations.append(f"inode {ino}: {why}")

    @staticmethod
    def _explain(snap: Snapshot, m: _Model) -> str:
        """No prefix state matches: describe the difference to the durable one and the last one."""
        got = dict(snap[0])
        out = []
        for label, k in (("last fsync", m.durable), ("last op", len(m.history) - 1)):
            want = dict(m.history[k][0])
            by_ino: dict[int, tuple[list[bytes], list[bytes]]] = {}
            for p in set(got) | set(want):
                if got.get(p) != want.get(p):
                    for ino, side in ((got.get(p), 0), (want.get(p), 1)):
                        if ino is not None:
                            by_ino.setdefault(ino, ([], []))[side].append(p)
            diffs = "; ".join(f"ino {i}: on disk {sorted(a)} model {sorted(b)}"
                              for i, (a, b) in sorted(by_ino.items())[:4])
            xs = "" if snap[1] == m.history[k][1] else " (xattrs differ)"
            out.append(f"vs {label} (op {k}): {diffs or 'names equal'}{xs}")
        return "namespace matches no state between the last fsync and the cut: " + " | ".join(out)


def run_points(
    seed: int, points: int, *, first: int = 0, report: Callable[[PointResult], None] | None = None
) -> tuple[int, int, int, float]:
    """Run ``points`` points; returns (points, violations, fsck errors, seconds)."""
    sim = Simulator()
    t0 = time.perf_counter()
    v = f = 0
    try:
        for p in range(first, first + points):
            r = sim.point(seed, p)
            v += len(r.violations)
            f += len(r.fsck_errors)
            if report is not None:
                report(r)
    finally:
        sim.close()
    return points, v, f, time.perf_counter() - t0
