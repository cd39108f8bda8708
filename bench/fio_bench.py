"""fio benchmark: SovFS against fuse2fs and the host disk, in one run, alternating between targets.

Targets, each set up in a temp dir on the host disk (/var/tmp by default):

* **sovfs**   — ``mkfs.sovfs -s IMG_SIZE img`` + ``mount.sovfs img mnt -o nodefault_permissions``
  (this checkout's code; see below);
* **fuse2fs** — ``mkfs.ext4 -F -q img`` (same image size) + ``fuse2fs img mnt -o fakeroot -f``
  (fuse2fs's default caching; ``-f`` only keeps it in the foreground so we know its pid);

Permission checks are configured alike: fuse2fs mounts without the kernel's ``default_permissions``
(and with ``fakeroot`` checks nothing itself), so SovFS is mounted without it too
(:data:`SOVFS_OPTIONS`; its daemon still applies the POSIX rules to non-root callers).  Mount.sovfs's
own default keeps the kernel's checks, which cost a GETATTR of the parent before each create and
unlink; ``--sovfs-options ''`` measures that.
* **host**    — a plain directory on the same disk (the limit on this machine).

Jobs are defined once (:func:`build_jobs`) and turned into the same fio command line for every
target (:func:`fio_args`; only ``--directory`` differs).  Every job runs on every target, targets
alternating per job, their order rotating per repetition (ABC BCA CAB, :func:`schedule`); ``sync`` +
``echo 3 > /proc/sys/vm/drop_caches`` before every fio job and before the cold metadata phases,
``sync`` alone before the other metadata phases (no job starts with another job's dirty data still to
write back).  Metadata jobs (create, stat warm/cold, readdir, unlink of N small files, flat and
two-level tree) are timed by a small Python harness (:func:`meta_phase`, run as a subprocess: the
same code on every target) because fio has no readdir engine.  Figures are the median of ``--reps``
repetitions, spread = min–max.

Also measured: daemon CPU (utime+stime from /proc/PID/stat) per job for the FUSE daemons, the time
``mount.sovfs`` takes until the mountpoint answers (cold = empty Numba cache, warm), and the peak RSS
(VmHWM) of the SovFS daemon on a 4 GiB image.

Writes a section between ``<!-- fio:begin -->`` / ``<!-- fio:end -->`` in docs/BENCHMARKS.md, PNG
plots and the raw results (JSON) in docs/bench/, a progress line per job, and as the last line:
``fio-vs-fuse2fs min_ratio=<x> randread_nj4_ratio=<y> create_ratio=<z>``.

Usage: ``python bench/fio_bench.py [--quick] [--reps 3] [--size 512M] [--targets sovfs,fuse2fs,host]
[--out docs/BENCHMARKS.md] [--profile DIR]`` (``--profile``: ``py-spy record`` of the SovFS daemon during
the first repetition of each job, collapsed stacks in DIR/JOB.txt; py-spy must be on PATH).
Needs root, /dev/fuse, fio, fuse2fs, mkfs.ext4, fusermount3.
Exit status: 0 all targets and jobs ran, 1 some target or job failed (the others are still reported),
2 a missing tool or bad usage.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
BEGIN, END = "<!-- fio:begin -->", "<!-- fio:end -->"
TARGETS = ("sovfs", "fuse2fs", "host")
DATAFILE = "bench.dat"
META_FILE_BYTES = 4096
FUSE2FS_OPTS = ("-o", "fakeroot")
#: mount.sovfs -o options of the sovfs target: the permission setup fuse2fs runs with (module docstring)
SOVFS_OPTIONS = "nodefault_permissions"

# --------------------------------------------------------------------------------------------------
# The job table


@dataclass(frozen=True)
class Job:
    """One benchmark job: fio options (identical on every target) or a metadata phase."""

    name: str
    group: str  # plot / table group: seq, randread, randwrite, meta
    title: str
    unit: str  # "MiB/s", "IOPS", "ops/s"
    target_ratio: float  # SovFS / fuse2fs goal from the issue
    fio: tuple[tuple[str, str], ...] = ()  # (option, value) pairs; empty for metadata jobs
    fresh: bool = False  # delete the data file before the job (a write that allocates)
    meta: tuple[str, str] | None = None  # (phase, layout) for metadata jobs
    drop: bool = True  # sync + drop caches before the job

    @property
    def is_fio(self) -> bool:
        return bool(self.fio)


META_PHASES = ("create", "stat_warm", "stat_cold", "readdir", "unlink")
META_LAYOUTS = ("flat", "tree")


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {s!r}")
    mult = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def quarter_offset(size: int, seed: int) -> int:
    """A seeded random 1 MiB-aligned offset of a quarter of the file (same for all targets)."""
    import random

    slots = max(1, (size - size // 4) // MiB + 1)
    return random.Random(seed).randrange(slots) * MiB


def build_jobs(size: int, *, quick: bool, seed: int = 1) -> list[Job]:
    """The fixed job set.  ``size``: the data file (512 MiB in the full run)."""
    rand_read_io = 4 * MiB if quick else 32 * MiB  # per fio job (numjobs 4 reads 4x as much)
    rand_write_io = 8 * MiB if quick else 64 * MiB
    cap = "20" if quick else "120"  # runtime cap, seconds: a slow target stops early, rate stays valid
    common = (
        ("ioengine", "psync"),
        ("fallocate", "none"),
        ("filename", DATAFILE),
        ("size", str(size)),
        ("runtime", cap),
        ("invalidate", "1"),
        ("randrepeat", "1"),
        ("group_reporting", "1"),
    )

    def fio(*opts: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        names = {k for k, _ in opts}
        return tuple(kv for kv in common if kv[0] not in names) + opts

    q_off = quarter_offset(size, seed)
    quarter = (("offset", str(q_off)), ("size", str(size // 4)))
    jobs = [
        Job(
            "seqwrite-buf",
            "seq",
            "seq write 1M buffered (end_fsync)",
            "MiB/s",
            1.0,
            fio(("rw", "write"), ("bs", "1M"), ("end_fsync", "1")),
            fresh=True,
        ),
        Job(
            "seqread-buf",
            "seq",
            "seq read 1M buffered, cold",
            "MiB/s",
            1.5,
            fio(("rw", "read"), ("bs", "1M")),
        ),
        Job(
            "seqwrite-direct",
            "seq",
            "seq write 1M O_DIRECT",
            "MiB/s",
            1.0,
            fio(("rw", "write"), ("bs", "1M"), ("direct", "1")),
            fresh=True,
        ),
        Job(
            "seqread-direct",
            "seq",
            "seq read 1M O_DIRECT, cold",
            "MiB/s",
            1.5,
            fio(("rw", "read"), ("bs", "1M"), ("direct", "1")),
        ),
        Job(
            "randread-nj1",
            "randread",
            "rand read 4K O_DIRECT, numjobs 1",
            "IOPS",
            1.0,
            fio(("rw", "randread"), ("bs", "4k"), ("direct", "1"), ("io_size", str(rand_read_io)), *quarter),
        ),
        Job(
            "randread-nj4",
            "randread",
            "rand read 4K O_DIRECT, numjobs 4",
            "IOPS",
            2.0,
            fio(
                ("rw", "randread"),
                ("bs", "4k"),
                ("direct", "1"),
                ("io_size", str(rand_read_io)),
                ("numjobs", "4"),
                *quarter,
            ),
        ),
        Job(
            "randwrite-buf",
            "randwrite",
            "rand write 4K buffered (end_fsync)",
            "IOPS",
            1.0,
            fio(("rw", "randwrite"), ("bs", "4k"), ("io_size", str(rand_write_io)), ("end_fsync", "1")),
        ),
        Job(
            "randwrite-direct",
            "randwrite",
            "rand write 4K O_DIRECT",
            "IOPS",
            1.0,
            fio(("rw", "randwrite"), ("bs", "4k"), ("direct", "1"), ("io_size", str(rand_write_io))),
        ),
        Job(
            "randwrite-fsync32",
            "randwrite",
            "rand write 4K, fsync every 32",
            "IOPS",
            1.0,
            fio(("rw", "randwrite"), ("bs", "4k"), ("fsync", "32"), ("io_size", str(rand_write_io))),
        ),
    ]
    jobs += [
        Job(
            f"{phase}-{layout}",
            "meta",
            f"{phase.replace('_', ' ')} ({layout})",
            "ops/s",
            2.0 if phase == "create" else 1.0,
            meta=(phase, layout),
            drop=phase in ("stat_cold", "readdir"),
        )
        for layout in META_LAYOUTS
        for phase in META_PHASES
    ]
    return jobs


def job_blocks(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs that must run in sequence within one repetition: each fio job alone; the metadata phases of
    one layout together (create, stat, readdir, unlink need the files of the same repetition).  The run
    loops block → repetition → job → target, so targets still alternate per job (ABC ABC ABC)."""
    blocks: list[list[Job]] = []
    for j in jobs:
        if j.meta and blocks and blocks[-1][0].meta and blocks[-1][0].meta[1] == j.meta[1]:
            blocks[-1].append(j)
        else:
            blocks.append([j])
    return blocks


T = TypeVar("T")


def schedule(
    blocks: Sequence[Sequence[Job]], targets: Sequence[T], reps: int
) -> Iterator[tuple[int, Job, T]]:
    """(repetition, job, target) in run order: block by block, repetition by repetition, each job on
    every target in turn.  The targets' order rotates with the repetition (ABC BCA CAB): each takes
    each place once per ``len(targets)`` repetitions, so none always runs right after another
    target's writes (the host may still be writing those back to the disk the next one reads)."""
    n = len(targets)
    for block in blocks:
        for rep in range(reps):
            order = [*targets[rep % n :], *targets[: rep % n]] if n else []
            for job in block:
                for t in order:
                    yield rep, job, t


def fio_args(job: Job, directory: str | os.PathLike[str], fio_bin: str = "fio") -> list[str]:
    """The fio command line: the job's options, then the target directory (the only difference)."""
    # --directory must come before --filename: fio resolves the file name when it parses it.
    args = [fio_bin, "--output-format=json", f"--name={job.name}", f"--directory={directory}"]
    args += [f"--{k}={v}" for k, v in job.fio]
    return args


# --------------------------------------------------------------------------------------------------
# fio output


def parse_fio(text: str, unit: str) -> dict[str, float]:
    """Figures from fio ``--output-format=json`` (any text before the JSON object is ignored).

    Returns value (in ``unit``: MiB/s from bw_bytes, IOPS), ops, mean / p99 completion latency (µs)
    of the main direction, and sync latency where fio measured one.  Raises ValueError on a fio error.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    data = json.loads(text[start:])
    jobs = data.get("jobs") or []
    if not jobs:
        raise ValueError("fio output has no jobs")
    j = jobs[0]
    if j.get("error"):
        raise ValueError(f"fio job error {j['error']}")
    rd, wr = j.get("read", {}), j.get("write", {})
    side = rd if rd.get("io_bytes", 0) >= wr.get("io_bytes", 0) else wr
    if not side.get("io_bytes"):
        raise ValueError("fio did no I/O")
    value = side["bw_bytes"] / MiB if unit == "MiB/s" else float(side["iops"])
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    out = {
        "value": value,
        "ops": float(rd.get("total_ios", 0) + wr.get("total_ios", 0)),
        "lat_mean_us": clat.get("mean", 0.0) / 1e3,
        "lat_p99_us": pct.get("99.000000", 0.0) / 1e3,
        "runtime_s": side.get("runtime", 0) / 1e3,
    }
    sync = j.get("sync", {}).get("lat_ns", {})
    if sync.get("N"):
        out["sync_mean_us"] = sync.get("mean", 0.0) / 1e3
    return out


# --------------------------------------------------------------------------------------------------
# Metadata harness (runs in a subprocess: ``fio_bench.py --meta-worker PHASE ROOT N LAYOUT``)


def meta_paths(root: Path, n: int, layout: str) -> tuple[list[Path], list[Path]]:
    """(directories to create, files): flat = N files in one dir; tree = dNN/dMM/ with N files spread."""
    base = root / f"meta-{layout}"
    if layout == "flat":
        return [base], [base / f"f{i:06d}" for i in range(n)]
    fan = 10  # 10 x 10 leaf directories, n/100 files each
    dirs = [base] + [base / f"d{a:02d}" for a in range(fan)]
    leaves = [base / f"d{a:02d}" / f"d{b:02d}" for a in range(fan) for b in range(fan)]
    dirs += leaves
    files = [leaves[i % len(leaves)] / f"f{i:06d}" for i in range(n)]
    return dirs, files


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def meta_phase(phase: str, root: Path, n: int, layout: str) -> tuple[float, int]:
    """Run one metadata phase; return (seconds, operations).  Same code on every target.

    create: mkdir the tree, then open(O_CREAT|O_EXCL|O_WRONLY) + write 4 KiB + close per file, then
    syncfs; stat_warm / stat_cold: os.stat per file; readdir: os.scandir of every directory (names
    only); unlink: unlink every file, rmdir the tree, syncfs.  Operations = files (readdir: entries).
    """
    dirs, files = meta_paths(root, n, layout)
    payload = b"s" * META_FILE_BYTES
    ops = len(files)
    t0 = time.perf_counter()
    if phase == "create":
        for d in dirs:
            d.mkdir()
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        for f in files:
            fd = os.open(f, flags, 0o644)
            os.write(fd, payload)
            os.close(fd)
        _syncfs(root)
    elif phase in ("stat_warm", "stat_cold"):
        for f in files:
            os.stat(f)
    elif phase == "readdir":
        ops = 0
        for d in dirs:
            with os.scandir(d) as it:
                for _ in it:
                    ops += 1
    elif phase == "unlink":
        for f in files:
            os.unlink(f)
        for d in reversed(dirs):
            d.rmdir()
        _syncfs(root)
    else:
        raise ValueError(f"unknown metadata phase {phase!r}")
    return time.perf_counter() - t0, ops


# --------------------------------------------------------------------------------------------------
# System helpers


def drop_caches() -> bool:
    """sync + drop page cache, dentries and inodes.  False if not permitted (recorded, run continues)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def is_mounted(mnt: Path) -> bool:
    target = str(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def abort_fuse(mnt: Path) -> None:
    """Abort a hung FUSE connection through /sys/fs/fuse/connections/N/abort (last resort)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(mnt):
                minor = parts[2].split(":")[1]
                with contextlib.suppress(OSError):
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


def fuse_unmount(mnt: Path) -> None:
    """fusermount3 -u, then -uz (lazy) if that fails; never raises."""
    if not is_mounted(mnt):
        return
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False, timeout=60)
    if r.returncode != 0 and is_mounted(mnt):
        abort_fuse(mnt)
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False, timeout=60)


def image_idle(img: Path, timeout: float) -> bool:
    """Wait until no daemon holds the image's flock (mount.sovfs releases it after closing clean)."""
    from sovfs.mount import wait_image_released

    return wait_image_released(img, timeout)


def pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def py_env(**extra: str) -> dict[str, str]:
    pp = str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return {**os.environ, "PYTHONPATH": pp, **extra}


# --------------------------------------------------------------------------------------------------
# Targets


class TargetError(Exception):
    pass


class Target(abc.ABC):
    name = "?"
    fuse = True

    def __init__(self, work: Path, img_size: int) -> None:
        self.work = work
        self.img = work / "image.img"
        self.mnt = work / "mnt"
        self.img_size = img_size
        self.pid: int | None = None
        self.hwm_kib: int | None = None
        self.check: str = ""
        self.mount_seconds = 0.0

    @property
    def root(self) -> Path:
        return self.mnt

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)

    @abc.abstractmethod
    def mount(self) -> None:
        """Make the target's filesystem available at :attr:`root`."""

    @abc.abstractmethod
    def unmount(self) -> None:
        """Undo :meth:`mount`; never raises."""

    def alive(self) -> bool:
        return not self.fuse or is_mounted(self.mnt)

    def integrity(self) -> None:
        """An offline check of the image after unmount (fills self.check); the host has none."""
        self.check = ""

    def _run(self, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> None:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise TargetError(f"{args[0]} failed ({r.returncode}): {msg[-1] if msg else ''}")


class SovfsTarget(Target):
    name = "sovfs"

    def __init__(self, work: Path, img_size: int, options: str = "", env: dict[str, str] | None = None):
        super().__init__(work, img_size)
        self.options = options
        self.env = py_env()  # mkfs / fsck
        self.mount_env = env or self.env  # mount.sovfs (the mount-time probe gives it an empty Numba cache)
        self.pidfile = work / "mount.pid"
        self.log = work / "mount.log"

    def setup(self) -> None:
        super().setup()
        self._run(
            sys.executable,
            "-m",
            "mkfs.mkfs",
            "-q",
            "-F",
            "-s",
            str(self.img_size),
            str(self.img),
            env=self.env,
        )

    def mount(self) -> None:
        opts = ",".join(o for o in (f"log={self.log}", f"pidfile={self.pidfile}", self.options) if o)
        t0 = time.perf_counter()
        self._run(
            sys.executable,
            "-m",
            "sovfs.mount",
            str(self.img),
            str(self.mnt),
            "-o",
            opts,
            timeout=300,
            env=self.mount_env,
        )
        os.stat(self.mnt)
        self.mount_seconds = time.perf_counter() - t0
        if not is_mounted(self.mnt):
            raise TargetError("mount.sovfs returned 0 but nothing is mounted")
        self.pid = int(self.pidfile.read_text())

    def unmount(self) -> None:
        if self.pid is not None:
            self.hwm_kib = vm_hwm_kib(self.pid) or self.hwm_kib
        fuse_unmount(self.mnt)
        if not image_idle(self.img, 120) and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            image_idle(self.img, 10)
        self.pid = None

    def integrity(self) -> None:
        r = subprocess.run(
            [sys.executable, "-m", "mkfs.fsck", "-n", "-f", str(self.img)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
            check=False,
        )
        last = (r.stdout + r.stderr).strip().splitlines()
        self.check = f"fsck.sovfs -n -f: exit {r.returncode}" + (f" ({last[-1]})" if last else "")


class Fuse2fsTarget(Target):
    name = "fuse2fs"

    def __init__(self, work: Path, img_size: int) -> None:
        super().__init__(work, img_size)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "fuse2fs.log"

    def setup(self) -> None:
        super().setup()
        with open(self.img, "wb") as f:
            f.truncate(self.img_size)
        self._run("mkfs.ext4", "-F", "-q", str(self.img))

    def mount(self) -> None:
        t0 = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["fuse2fs", str(self.img), str(self.mnt), *FUSE2FS_OPTS, "-f"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                tail = self.log.read_text(errors="replace").strip().splitlines()
                raise TargetError(f"fuse2fs did not mount: {tail[-1] if tail else 'no output'}")
            time.sleep(0.02)
        os.stat(self.mnt)
        self.mount_seconds = time.perf_counter() - t0
        self.pid = self.proc.pid

    def unmount(self) -> None:
        if self.pid is not None:
            self.hwm_kib = vm_hwm_kib(self.pid) or self.hwm_kib
        fuse_unmount(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.pid = None

    def integrity(self) -> None:
        r = subprocess.run(
            ["e2fsck", "-f", "-n", str(self.img)], capture_output=True, text=True, timeout=600, check=False
        )
        self.check = f"e2fsck -f -n: exit {r.returncode}"


class HostTarget(Target):
    name = "host"
    fuse = False

    def mount(self) -> None:
        self.mount_seconds = 0.0

    def unmount(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class Result:
    job: str
    target: str
    rep: int
    value: float | None = None
    ops: float = 0.0
    cpu_s: float | None = None
    lat_mean_us: float | None = None
    lat_p99_us: float | None = None
    error: str = ""
    seconds: float = 0.0


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    failed_targets: dict[str, str] = field(default_factory=dict)
    drop_ok: bool = True
    mount_times: dict[str, Any] = field(default_factory=dict)
    peak_rss: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)

    def values(self, job: str, target: str) -> list[float]:
        return [r.value for r in self.results if r.job == job and r.target == target and r.value is not None]

    def cpus(self, job: str, target: str) -> list[tuple[float, float]]:
        return [
            (r.cpu_s, r.ops)
            for r in self.results
            if r.job == job and r.target == target and r.cpu_s is not None and r.value is not None
        ]


def median_spread(vals: Sequence[float]) -> tuple[float, float, float] | None:
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def ratio(run: Run, job: str, a: str = "sovfs", b: str = "fuse2fs") -> float | None:
    va, vb = median_spread(run.values(job, a)), median_spread(run.values(job, b))
    if va is None or vb is None or vb[0] <= 0:
        return None
    return va[0] / vb[0]


def summary_line(run: Run, jobs: Sequence[Job]) -> str:
    """``fio-vs-fuse2fs min_ratio=<x> randread_nj4_ratio=<y> create_ratio=<z>`` (nan where missing).

    min_ratio: the smallest SovFS/fuse2fs median ratio over all jobs; create_ratio: the smaller of the
    two create jobs (flat directory, tree)."""
    ratios = {j.name: ratio(run, j.name) for j in jobs}
    have = [r for r in ratios.values() if r is not None]
    creates = [r for n, r in ratios.items() if n.startswith("create-") and r is not None]
    nj4 = ratios.get("randread-nj4")

    def f(x: float | None) -> str:
        return "nan" if x is None else f"{x:.2f}"

    return (
        f"fio-vs-fuse2fs min_ratio={f(min(have) if have else None)} randread_nj4_ratio={f(nj4)} "
        f"create_ratio={f(min(creates) if creates else None)}"
    )


def fmt_value(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def run_job(
    job: Job, target: Target, rep: int, n_files: int, run: Run, timeout: float, profile: str | None = None
) -> Result:
    res = Result(job.name, target.name, rep)
    if job.drop:
        if not drop_caches():
            run.drop_ok = False
    else:
        # Write back whatever earlier jobs left dirty (fuse2fs's image writes, the host target's
        # files): otherwise the kernel flushes it during this job, on the CPUs the job runs on,
        # charging one target for another's leftovers.
        os.sync()
    if job.fresh:
        with contextlib.suppress(FileNotFoundError):
            (target.root / DATAFILE).unlink()
        os.sync()
    spy = start_profile(profile, job, target, rep)
    c0 = cpu_seconds(target.pid)
    t0 = time.perf_counter()
    try:
        if job.is_fio:
            p = subprocess.run(
                fio_args(job, target.root), capture_output=True, text=True, timeout=timeout, check=False
            )
            if p.returncode != 0:
                err = (p.stderr or p.stdout).strip().splitlines()
                raise RuntimeError(f"fio exit {p.returncode}: {err[-1] if err else ''}")
            if not (target.root / DATAFILE).exists():
                raise RuntimeError(f"fio did not use {target.root / DATAFILE}")
            fig = parse_fio(p.stdout, job.unit)
            res.value, res.ops = fig["value"], fig["ops"]
            res.lat_mean_us, res.lat_p99_us = fig["lat_mean_us"], fig["lat_p99_us"]
        else:
            assert job.meta is not None
            phase, layout = job.meta
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--meta-worker",
                phase,
                str(target.root),
                str(n_files),
                layout,
            ]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            if p.returncode != 0:
                err = p.stderr.strip().splitlines()
                raise RuntimeError(f"metadata {phase}: {err[-1] if err else p.returncode}")
            secs, ops = json.loads(p.stdout.strip().splitlines()[-1])
            res.value, res.ops = ops / secs, float(ops)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired, OSError) as e:
        res.error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    res.seconds = time.perf_counter() - t0
    c1 = cpu_seconds(target.pid)
    if c0 is not None and c1 is not None:
        res.cpu_s = c1 - c0
    stop_profile(spy)
    return res


def start_profile(profile: str | None, job: Job, target: Target, rep: int) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of the SovFS daemon during one job (collapsed stacks, all threads, idle excluded)."""
    if not profile or target.name != "sovfs" or rep != 0 or target.pid is None:
        return None
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    out = Path(profile) / f"{job.name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [spy, "record", "--pid", str(target.pid), "--format", "raw", "--threads", "--rate", "250",
           "--nonblocking", "--output", str(out)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # let it attach
    return p


def summarize_profile(path: Path, top: int = 6) -> list[tuple[str, float]]:
    """Top self-time frames of a py-spy ``--format raw`` (collapsed stacks) file, as (frame, % of samples).

    Frames are shortened to ``function (file.py)``; the thread name and line numbers are dropped."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frame = stack.rsplit(";", 1)[-1]
        m = re.match(r"(.*?) \((?:.*/)?([^/:]+)(?::\d+)?\)$", frame)
        key = f"{m.group(1)} ({m.group(2)})" if m else frame
        counts[key] = counts.get(key, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [(k, 100.0 * v / total) for k, v in ranked] if total else []


def stop_profile(p: subprocess.Popen[bytes] | None) -> None:
    if p is None:
        return
    p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


@contextlib.contextmanager
def mounted(target: Target, run: Run) -> Iterator[bool]:
    try:
        target.setup()
        target.mount()
        ok = True
    except (TargetError, OSError, subprocess.TimeoutExpired) as e:
        run.failed_targets[target.name] = f"setup/mount failed: {e}"
        print(f"!! {target.name}: {run.failed_targets[target.name]}", flush=True)
        ok = False
    try:
        yield ok
    finally:
        target.unmount()


def measure_mount_times(work: Path, img_size: int, options: str, warm_reps: int) -> dict[str, Any]:
    """mount.sovfs until the mountpoint answers: cold (fresh NUMBA_CACHE_DIR), then warm (same cache)."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="numba-", dir=work) as cache:
        t = SovfsTarget(work / "mounttime", img_size, options, env=py_env(NUMBA_CACHE_DIR=cache))
        t.setup()
        times = []
        for i in range(1 + warm_reps):
            try:
                t.mount()
                times.append(t.mount_seconds)
            finally:
                t.unmount()
            print(f"mount.sovfs {'cold' if i == 0 else 'warm'}: {times[-1]:.2f} s", flush=True)
        out["cold_s"] = times[0]
        out["warm_s"] = statistics.median(times[1:]) if warm_reps else None
        out["warm_all"] = times[1:]
    shutil.rmtree(work / "mounttime", ignore_errors=True)
    return out


def measure_peak_rss(work: Path, options: str, data: int, n_files: int, timeout: float) -> dict[str, Any]:
    """VmHWM of the SovFS daemon on a 4 GiB image after writing + reading ``data`` and N small files."""
    t = SovfsTarget(work / "rss", 4 * GiB, options)
    out: dict[str, Any] = {"image": "4 GiB", "data": data, "files": n_files}
    try:
        t.setup()
        t.mount()
        base = vm_hwm_kib(t.pid)
        out["after_mount_mib"] = (base or 0) / 1024
        w = Job(
            "rss-write",
            "x",
            "",
            "MiB/s",
            1,
            (
                ("ioengine", "psync"),
                ("fallocate", "none"),
                ("filename", DATAFILE),
                ("size", str(data)),
                ("rw", "write"),
                ("bs", "1M"),
                ("end_fsync", "1"),
            ),
        )
        r = Job(
            "rss-read", "x", "", "MiB/s", 1, tuple(kv if kv[0] != "rw" else ("rw", "read") for kv in w.fio)
        )
        scratch = Run()
        for j in (w, r):
            res = run_job(j, t, 0, n_files, scratch, timeout)
            if res.error:
                out["error"] = res.error
        for phase in ("create", "stat_cold", "readdir"):
            run_job(
                Job("rss-meta", "x", "", "ops/s", 1, meta=(phase, "flat")), t, 0, n_files, scratch, timeout
            )
        out["peak_mib"] = (vm_hwm_kib(t.pid) or 0) / 1024
    except (TargetError, OSError, subprocess.TimeoutExpired) as e:
        out["error"] = str(e)
    finally:
        t.unmount()
        shutil.rmtree(work / "rss", ignore_errors=True)
    return out


def run_all(args: argparse.Namespace, jobs: Sequence[Job], work: Path) -> Run:
    run = Run()
    img_size = args.image_size
    targets: list[Target] = []
    for name in args.targets:
        d = work / name
        if name == "sovfs":
            targets.append(SovfsTarget(d, img_size, args.sovfs_options))
        elif name == "fuse2fs":
            targets.append(Fuse2fsTarget(d, img_size))
        else:
            targets.append(HostTarget(d, img_size))
    if "sovfs" in args.targets and not args.skip_extras:
        try:
            run.mount_times = measure_mount_times(work, 256 * MiB, args.sovfs_options, 1 if args.quick else 3)
        except (TargetError, OSError, subprocess.TimeoutExpired) as e:
            run.mount_times = {"error": str(e)}
            print(f"!! mount time: {e}", flush=True)
    total = len(jobs) * args.reps * len(targets)
    k = 0
    with contextlib.ExitStack() as stack:
        live = [t for t in targets if stack.enter_context(mounted(t, run))]
        for rep, job, t in schedule(job_blocks(jobs), targets, args.reps):
            k += 1
            if t not in live:
                continue
            timeout = float(dict(job.fio).get("runtime", 300)) * 2 + 300
            res = run_job(job, t, rep, args.files, run, timeout, args.profile)
            run.results.append(res)
            cpu = f"  daemon cpu {res.cpu_s:6.2f} s" if res.cpu_s is not None else ""
            ok = res.value is not None
            what = f"{fmt_value(res.value):>10} {job.unit}" if ok else f"FAILED: {res.error}"
            print(
                f"[{k:3d}/{total}] {job.name:18} rep {rep + 1}/{args.reps} {t.name:8} {what}{cpu}"
                f"  ({res.seconds:.1f} s)",
                flush=True,
            )
            if res.error and not t.alive():
                run.failed_targets[t.name] = f"mount died during {job.name}: {res.error}"
                print(f"!! {t.name}: {run.failed_targets[t.name]}", flush=True)
                live.remove(t)
    for t in targets:  # all unmounted here (ExitStack)
        if t.hwm_kib:
            run.peak_rss[f"{t.name} (run image)"] = t.hwm_kib / 1024
        if t.name not in run.failed_targets or "mount died" in run.failed_targets[t.name]:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                t.integrity()
            if t.check:
                run.checks[t.name] = t.check
    if "sovfs" in args.targets and not args.skip_extras:
        data = 256 * MiB if args.quick else 2 * GiB
        run.peak_rss["sovfs 4 GiB image"] = measure_peak_rss(work, args.sovfs_options, data, args.files, 900)
        print(f"sovfs peak RSS (4 GiB image): {run.peak_rss['sovfs 4 GiB image']}", flush=True)
    return run


# --------------------------------------------------------------------------------------------------
# Report


def replace_section(text: str, section: str) -> str:
    """Replace what lies between the fio markers (markers kept); append the marked section if absent."""
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    b, e = text.find(BEGIN), text.find(END)
    if b >= 0 and e > b:
        return text[:b] + block + text[e + len(END) :]
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + block + "\n"


def _cell(ms: tuple[float, float, float] | None) -> str:
    if ms is None:
        return "—"
    med, lo, hi = ms
    return f"{fmt_value(med)} ({fmt_value(lo)}–{fmt_value(hi)})"


def _git_commit() -> str:
    """The measured code's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            # docs/ excluded: the run's own figures and plots are written there before this runs
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude)docs"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def render_markdown(
    run: Run, jobs: Sequence[Job], args: argparse.Namespace, plots: Sequence[str], summary: str
) -> str:
    tnames = list(args.targets)
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M')} of commit {_git_commit()} on {platform.node()} "
        f"({os.cpu_count()} CPUs, kernel "
        f"{platform.release()}), {_fio_version()}, fuse2fs {_fuse2fs_version()}; "
        f"{'**quick** mode, ' if args.quick else ''}data file {args.size_h}, {args.files:,} small files, "
        f"images {args.image_size / GiB:.2f} GiB on {args.dir}, {args.reps} repetition(s); "
        f"mount.sovfs options: `{args.sovfs_options or '(defaults)'}`; fuse2fs `{' '.join(FUSE2FS_OPTS)}`."
        + ("" if run.drop_ok else " **drop_caches was not permitted: reads may be warm.**"),
        "",
        "Median (min–max) of the repetitions. Ratio = SovFS / fuse2fs medians from this run; "
        "target from the issue; ✔ met, ✘ missed.",
        "",
        "| job | unit | " + " | ".join(tnames) + " | SovFS/fuse2fs | target | | SovFS/host |",
        "|---|---|" + "---:|" * len(tnames) + "---:|---:|---|---:|",
    ]
    for j in jobs:
        cells = [_cell(median_spread(run.values(j.name, t))) for t in tnames]
        r, rh = ratio(run, j.name), ratio(run, j.name, "sovfs", "host")
        mark = "" if r is None else ("✔" if r >= j.target_ratio else "✘")
        lines.append(
            f"| {j.title} | {j.unit} | "
            + " | ".join(cells)
            + f" | {'—' if r is None else f'{r:.2f}'} | ≥ {j.target_ratio:g} | {mark} | "
            + f"{'—' if rh is None else f'{rh:.2f}'} |"
        )
    errs = [r for r in run.results if r.error]
    fuse_t = [t for t in tnames if t != "host"]
    if fuse_t:
        lines += [
            "",
            "Daemon CPU per job (utime+stime of the FUSE daemon, median seconds; µs per operation):",
            "",
            "| job | " + " | ".join(f"{t} s | {t} µs/op" for t in fuse_t) + " |",
            "|---|" + "---:|---:|" * len(fuse_t),
        ]
        for j in jobs:
            row = []
            for t in fuse_t:
                c = run.cpus(j.name, t)
                if not c:
                    row += ["—", "—"]
                    continue
                s = statistics.median(x for x, _ in c)
                per = statistics.median(x / o * 1e6 for x, o in c if o)
                row += [f"{s:.2f}", f"{per:.0f}"]
            lines.append(f"| {j.title} | " + " | ".join(row) + " |")
    lines += [""]
    mt = run.mount_times
    if mt.get("cold_s") is not None:
        warm = mt.get("warm_s")
        ok = "" if warm is None else (" ✔" if warm <= 1.0 else " ✘")
        lines.append(
            f"- `mount.sovfs` until the mountpoint answers: cold (empty Numba cache) "
            f"{mt['cold_s']:.2f} s, warm {'—' if warm is None else f'{warm:.2f}'} s (target ≤ 1 s){ok}."
        )
    elif mt.get("error"):
        lines.append(f"- `mount.sovfs` time: failed ({mt['error']}).")
    for k, v in run.peak_rss.items():
        if isinstance(v, dict):
            if "peak_mib" in v:
                lines.append(
                    f"- Peak RSS (VmHWM) of the SovFS daemon, {v['image']} image, after writing and "
                    f"reading {v['data'] / MiB:.0f} MiB and creating/stat/readdir of {v['files']:,} "
                    f"files: {v['peak_mib']:.0f} MiB (after mount: {v['after_mount_mib']:.0f} MiB)"
                    + (f"; error: {v['error']}" if v.get("error") else "")
                    + "."
                )
            else:
                lines.append(f"- Peak RSS, {k}: failed ({v.get('error')}).")
        else:
            lines.append(f"- Peak RSS (VmHWM) of the {k} daemon at unmount: {v:.0f} MiB.")
    for k, v in run.checks.items():
        lines.append(f"- Image check after the run, {k}: {v}.")
    for k, v in run.failed_targets.items():
        lines.append(f"- **{k} failed**: {v}")
    if errs:
        lines.append(
            f"- {len(errs)} job run(s) failed: "
            + "; ".join(f"{r.job}/{r.target}: {r.error}" for r in errs[:8])
        )
    if args.profile:
        lines += [
            "",
            "Where the SovFS daemon spends its time (py-spy, first repetition; top self-time frames):",
            "",
        ]
        for j in jobs:
            prof = Path(args.profile) / f"{j.name}.txt"
            if prof.exists() and (top := summarize_profile(prof, 4)):
                lines.append(f"- {j.title}: " + "; ".join(f"`{k}` {v:.0f} %" for k, v in top))
    lines += [
        "",
        *[f"![{Path(p).stem}](bench/{Path(p).name})" for p in plots],
        "",
        "The fio command lines (generated from one table; `--directory` is the target):",
        "",
        "```",
    ]
    for j in jobs:
        if j.is_fio:
            lines.append(" ".join(fio_args(j, "DIR")[1:]))
    lines += ["```", "", "```", summary, "```"]
    return "\n".join(lines)


def _fio_version() -> str:
    try:
        return subprocess.run(
            ["fio", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "fio ?"


def _fuse2fs_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "fuse2fs"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return out or "?"
    except OSError:
        return "?"


def make_plots(run: Run, jobs: Sequence[Job], targets: Sequence[str], outdir: Path) -> list[str]:
    """One bar chart per job group: targets side by side, error bars = min–max, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    colors = {"sovfs": "#2b6cb0", "fuse2fs": "#dd6b20", "host": "#718096"}
    paths = []
    for group in dict.fromkeys(j.group for j in jobs):
        gj = [j for j in jobs if j.group == group]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(gj) + 2), 4.2))
        w = 0.8 / len(targets)
        for i, t in enumerate(targets):
            meds, lo, hi, xs = [], [], [], []
            for x, j in enumerate(gj):
                ms = median_spread(run.values(j.name, t))
                if ms is None:
                    continue
                xs.append(x + (i - (len(targets) - 1) / 2) * w)
                meds.append(ms[0])
                lo.append(ms[0] - ms[1])
                hi.append(ms[2] - ms[0])
            if xs:
                ax.bar(xs, meds, w, yerr=[lo, hi], capsize=3, label=t, color=colors.get(t))
        ax.set_xticks(range(len(gj)))
        ax.set_xticklabels([j.title.replace(", ", "\n").replace(" (", "\n(") for j in gj], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(gj[0].unit)
        ax.set_title(f"fio bench: {group} (median, min–max)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        p = outdir / f"fio_{group}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


# --------------------------------------------------------------------------------------------------


def missing_tools(targets: Sequence[str]) -> list[str]:
    need = ["fio", "fusermount3"] if set(targets) - {"host"} else ["fio"]
    if "fuse2fs" in targets:
        need += ["fuse2fs", "mkfs.ext4", "e2fsck"]
    return [t for t in need if shutil.which(t) is None]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB file, 1,000 files, 1 rep: a few minutes")
    ap.add_argument(
        "--reps", type=int, default=None, help="repetitions per job and target (default 3; quick 1)"
    )
    ap.add_argument("--size", default=None, help="data file size (default 512M; quick 64M)")
    ap.add_argument("--files", type=int, default=None, help="small files per metadata job (default 10000)")
    ap.add_argument("--targets", default="sovfs,fuse2fs,host", help="comma list of sovfs,fuse2fs,host")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="markdown file to update")
    ap.add_argument("--plots", default=None, help="PNG directory (default: bench/ next to --out)")
    ap.add_argument("--dir", default="/var/tmp", help="where targets live (the host disk)")
    ap.add_argument(
        "--sovfs-options", default=SOVFS_OPTIONS,
        help=f"mount.sovfs -o options of the sovfs target (default: {SOVFS_OPTIONS}; '' for none)",
    )
    ap.add_argument("--jobs", default=None, help="only these jobs (comma list of names; for development)")
    ap.add_argument(
        "--profile", default=None, help="py-spy record the SovFS daemon (rep 1 of each job) into DIR"
    )
    ap.add_argument("--skip-extras", action="store_true", help="skip mount time and 4 GiB peak-RSS runs")
    ap.add_argument(
        "--meta-worker", nargs=4, metavar=("PHASE", "ROOT", "N", "LAYOUT"), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.size_h = a.size or ("64M" if a.quick else "512M")
    a.size_bytes = parse_size(a.size_h)
    a.files = a.files or (1000 if a.quick else 10000)
    a.image_size = max(3 * a.size_bytes, 512 * MiB)
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    bad = [t for t in a.targets if t not in TARGETS]
    if bad or not a.targets:
        ap.error(f"unknown target(s) {bad}; choose from {','.join(TARGETS)}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.meta_worker:
        phase, root, n, layout = args.meta_worker
        secs, ops = meta_phase(phase, Path(root), int(n), layout)
        print(json.dumps([secs, ops]))
        return 0
    miss = missing_tools(args.targets)
    if miss:
        print(
            f"fio_bench: missing tool(s): {', '.join(miss)} (apt-get install fio fuse2fs e2fsprogs fuse3)",
            file=sys.stderr,
        )
        return 2
    if set(args.targets) - {"host"} and (os.geteuid() != 0 or not os.path.exists("/dev/fuse")):
        print("fio_bench: FUSE targets need root and /dev/fuse", file=sys.stderr)
        return 2
    jobs = build_jobs(args.size_bytes, quick=args.quick)
    if args.jobs:
        keep = set(args.jobs.split(","))
        jobs = [j for j in jobs if j.name in keep]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fio_bench-", dir=args.dir) as tmp:
        run = run_all(args, jobs, Path(tmp))
    out = Path(args.out)
    plots_dir = Path(args.plots) if args.plots else out.parent / "bench"
    plots = make_plots(run, jobs, args.targets, plots_dir)
    summary = summary_line(run, jobs)
    section = render_markdown(run, jobs, args, plots, summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(replace_section(out.read_text() if out.exists() else "", section))
    raw = {
        "args": {k: v for k, v in vars(args).items() if k != "meta_worker"},
        "results": [r.__dict__ for r in run.results],
        "mount_times": run.mount_times,
        "peak_rss": run.peak_rss,
        "failed_targets": run.failed_targets,
        "checks": run.checks,
    }
    (plots_dir / "fio_results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(f"\nwrote {out} and {len(plots)} plot(s) in {plots_dir} ({time.perf_counter() - t0:.0f} s)")
    failed = bool(run.failed_targets) or any(r.error for r in run.results)
    for k, v in run.failed_targets.items():
        print(f"FAILED target {k}: {v}")
    print(summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
