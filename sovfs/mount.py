"""mount.sovfs: mount a SovFS image with FUSE (pyfuse3 + trio); every sector goes through the ledger.

Theory of operation
-------------------
``mount.sovfs SPEC DIR [-o opts]`` follows the mount(8) helper convention, so ``mount -t sovfs img /mnt``
and fstab lines work once the helper is installed as /sbin/mount.sovfs (scripts/setup.sh).

Life of a mount::

    parent: parse options ─ fork ─ wait on a pipe ──────────────────────────── exit 0 / 32 + one line
    child:  setsid → lock the image (flock, before the ledger opens it) → ledger → FileSystem.mount
            (superblock, features, clean?) → pyfuse3.init (the kernel mount) → trio.run:
            nursery[pyfuse3.main, signal watcher, write-back timer, readiness probe]
            readiness probe: stat(DIR) from a worker thread, answered by our own loop → "OK" to the pipe
            → stdio to /dev/null.  On umount/fusermount3 -u (session ends), SIGTERM/SIGINT/SIGHUP
            (pyfuse3.terminate): main returns → pyfuse3.close(unmount) → fs.close() (orphans freed,
            superblock marked clean, FLUSH) → ledger closed → lock released → exit.

Nothing touches the image before every check passed: a missing image or mountpoint, a foreign file, an
image that is locked (mounted elsewhere), not clean (needs fsck), or has unknown incompatible features
(or unknown ro-compatible ones for rw) is refused with one line and exit code 32.  A waiter can use the
image lock as "the daemon has finished writing": it is released last.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sovfs import _native

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "MountOptions", "main", "parse_args"]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAIL = 32

USAGE = """usage: mount.sovfs SPEC DIR [-f] [-r|-w] [-v] [-o OPTION[,OPTION...]]

Mount the SovFS image SPEC (a file) on the directory DIR through FUSE.  Daemonizes once the mount
works (unless -f).  Unmount with `umount DIR`, `fusermount3 -u DIR`, or SIGTERM/SIGINT to the daemon.

options:
  -f, -o foreground     stay in the foreground (logs to stderr)
  -r, -o ro             read-only             -w, -o rw   read-write (default)
  -v                    verbose (log level INFO)
  -n, -s                accepted for mount(8) (no mtab / sloppy); ignored
  -h, --help            this text
  -o allow_other        let other users access the mount      -o allow_root (libfuse permitting)
  -o default_permissions  the kernel checks permissions (default)
  -o nodefault_permissions  the daemon checks them, for every caller but uid 0 (POSIX rules on its
                        fsuid and groups).  Faster: the kernel then stops refreshing a directory's
                        attributes before each create and unlink in it.  Weaker: uid 0 passes every
                        check even without capabilities, and a directory's search permission guards
                        only the names the kernel has not cached (see docs/DESIGN.md)
  -o nosuid,nodev,noexec,suid,dev,exec   passed to the kernel mount
  -o relatime (default), noatime, strictatime   atime updates
  -o writeback_cache    kernel write-back cache (fsync still waits for the data on the image)
  -o iothreads (default)  two ledger queues: a request that runs alone (a serial client) is served
                        on the daemon's thread (a trapped notify: no hand-off, no wake-up); others go
                        to a queue with a device worker thread, so disk I/O overlaps other requests
  -o iothreads=all      every queue has a worker thread (no trapped queue)
  -o noiothreads        every request served on the daemon's thread: no I/O overlap at all
  -o directread (default)  large reads (128 KiB or more, aligned) bypass the host page cache: the
                        device reads the image with O_DIRECT (no copy, no double caching; like QEMU's
                        cache=none); smaller reads use the page cache
  -o directread=KIB     the same, for aligned reads of KIB KiB or more (a multiple of 4)
  -o nodirectread       every read and write through the host page cache (faster for large reads
                        of image data the host still caches, slower and erratic when it does not)
  -o directwrite (default)  with directread, writes of that size (aligned) that a device worker
                        serves go to the image with O_DIRECT too; a FLUSH (fsync) still makes them
                        durable
  -o nodirectwrite      every write through the host page cache
  -o writebehind (default)  once a device worker completed a large write (256 KiB or more), it
                        starts the host's write-back of it: an fsync after a bulk write has little
                        left to write (needs a worker thread: none with noiothreads)
  -o nowritebehind      leave the write-back to the host's flusher threads and to fsync
  -o fetchahead (default)  while a sequential O_DIRECT read travels back to the reader, the daemon
                        already reads the next 2 MiB of the file from the image (chunks of 1 MiB,
                        dropped if the file changes; page-cache reads have the kernel's read-ahead)
  -o nofetchahead       O_DIRECT reads only read what they ask for
  -o readdirplus=auto (default)  a listing's first reply carries every entry's attributes (the
                        kernel instantiates the inodes, so `ls -l` needs no lookups); later replies
                        carry only names, inode numbers and types, unless names of the directory
                        were looked up since (then the rest of that listing is full): the kernel's
                        own adaptive rule, which pyfuse3 switches off
  -o readdirplus=yes    every reply carries attributes        -o readdirplus=no   none does
  -o fastwait (default)  take the next FUSE request without a scheduler round trip when one is
                        already queued (see sovfs/_fastloop.py)     -o nofastwait: pyfuse3's own wait
  -o reqspin=US         with fastwait: poll /dev/fuse this long for the next request before sleeping,
                        when nothing else is runnable (default 50; 0 = sleep at once)
  -o readahead=KIB      the kernel's read-ahead window for this mount (default 1024: 1 MiB reads,
                        several in flight; 0 leaves the kernel's 128 KiB)
  -o entry_timeout=S,attr_timeout=S   kernel entry/attribute cache lifetimes (default 5)
  -o commit=S           write back superblock counters and FLUSH every S seconds (default 5, 0=off)
  -o fsname=NAME        source shown in /proc/mounts (default: the image path)
  -o debug              FUSE request trace and debug logging (implies -f)
  -o force              mount even if the image is not marked clean (run fsck.sovfs instead!)
  -o log=FILE           log to FILE (default: stderr with -f, else syslog)
  -o pidfile=FILE       write the daemon's pid to FILE once mounted
  -o max_tasks=N        concurrent FUSE requests (trio tasks, default 99)
  (kill -USR1 PID logs every task of the daemon and where it waits - for a request that never
  returns - and what each ledger queue served)
  defaults, auto, noauto, user, users, nouser, nofail, _netdev, async, comment=…, x-…  (fstab) ignored

environment: SOVFS_PURE=1 runs the core as Python even where its compiled build is present and
current (for py-spy, which sees no frames inside compiled code; -v logs which one runs)

exit codes: 0 mounted (or, with -f, unmounted cleanly), 1 usage error, 32 mount failure
"""

_KERNEL_FLAGS = {"nosuid", "suid", "nodev", "dev", "noexec", "exec", "dirsync"}
_IGNORED = {"defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "async",
            "owner", "group", "nodiratime", "diratime", "lazytime", "nolazytime", "loop", "sync"}


class UsageError(Exception):
    pass


class MountError(Exception):
    """A refused mount: one line for the user, exit code 32."""


@dataclass
class MountOptions:
    spec: str = ""
    mountpoint: str = ""
    read_only: bool = False
    foreground: bool = False
    verbose: bool = False
    debug: bool = False
    allow_other: bool = False
    allow_root: bool = False
    default_permissions: bool = True
    writeback_cache: bool = False
    iothreads: bool = True
    lone_trap: bool = True  # iothreads: a trapped queue for lone requests (iothreads=all: False)
    direct_reads: bool = True
    direct_min_kib: int = 128
    direct_writes: bool = True
    write_behind: bool = True
    fetch_ahead: bool = True
    readdirplus: str = "auto"
    fastwait: bool = True
    reqspin_us: int = 50
    readahead_kib: int = 1024
    atime: str = "relatime"
    entry_timeout: float = 5.0
    attr_timeout: float = 5.0
    commit: float = 5.0
    force: bool = False
    fsname: str | None = None
    log: str | None = None
    pidfile: str | None = None
    max_tasks: int = 99
    kernel_flags: list[str] = field(default_factory=list)

    def fuse_options(self) -> set[str]:
        opts = {f"fsname={self.fsname or self.spec}", "subtype=sovfs", *self.kernel_flags}
        if self.default_permissions:
            opts.add("default_permissions")
        if self.allow_other:
            opts.add("allow_other")
        if self.allow_root:
            opts.add("allow_root")
        if self.read_only:
            opts.add("ro")
        if self.debug:
            opts.add("debug")
        return opts


def _number(name: str, value: str, kind: type = float) -> Any:
    try:
        v = kind(value)
    except ValueError:
        raise UsageError(f"option {name}={value!r}: not a number") from None
    if v < 0:
        raise UsageError(f"option {name}={value!r}: negative")
    return v


def _apply(o: MountOptions, opt: str) -> None:
    name, eq, value = opt.partition("=")
    if not name:
        return
    if name in ("ro", "rw"):
        o.read_only = name == "ro"
    elif name == "foreground":
        o.foreground = True
    elif name == "debug":
        o.debug = o.foreground = o.verbose = True
    elif name == "allow_other":
        o.allow_other = True
    elif name == "allow_root":
        o.allow_root = True
    elif name == "default_permissions":
        o.default_permissions = True
    elif name == "nodefault_permissions":
        o.default_permissions = False
    elif name == "writeback_cache":
        o.writeback_cache = True
    elif name in ("iothreads", "noiothreads") and not eq:
        o.iothreads = name == "iothreads"
        o.lone_trap = True
    elif name == "iothreads" and value == "all":
        o.iothreads, o.lone_trap = True, False
    elif name in ("directread", "nodirectread") and not eq:
        o.direct_reads = name == "directread"
    elif name == "directread":
        kib = _number(name, value, int)
        if kib < 4 or kib % 4:
            raise UsageError(f"option {opt!r}: the smallest direct read is a multiple of 4 KiB")
        o.direct_reads, o.direct_min_kib = True, kib
    elif name in ("directwrite", "nodirectwrite") and not eq:
        o.direct_writes = name == "directwrite"
    elif name in ("writebehind", "nowritebehind") and not eq:
        o.write_behind = name == "writebehind"
    elif name in ("fetchahead", "nofetchahead") and not eq:
        o.fetch_ahead = name == "fetchahead"
    elif name == "readdirplus":
        if value not in ("auto", "yes", "no"):
            raise UsageError(f"option {opt!r}: readdirplus=auto, readdirplus=yes or readdirplus=no")
        o.readdirplus = value
    elif name in ("fastwait", "nofastwait") and not eq:
        o.fastwait = name == "fastwait"
    elif name in ("relatime", "noatime", "strictatime"):
        o.atime = name
    elif name == "atime":
        o.atime = "relatime"
    elif name == "force":
        o.force = True
    elif name in ("entry_timeout", "attr_timeout", "commit") and eq:
        setattr(o, name, _number(name, value))
    elif name == "readahead" and eq:
        o.readahead_kib = max(0, _number(name, value, int))
    elif name == "reqspin" and eq:
        o.reqspin_us = max(0, _number(name, value, int))
    elif name == "max_tasks" and eq:
        o.max_tasks = max(1, _number(name, value, int))
    elif name in ("fsname", "log", "pidfile") and eq and value:
        setattr(o, name, value)
    elif name in _KERNEL_FLAGS:
        o.kernel_flags.append(name)
    elif name in _IGNORED or name.startswith(("x-", "comment")) or name == "subtype":
        pass
    else:
        raise UsageError(f"unknown mount option {opt!r} (see mount.sovfs --help)")


def parse_args(argv: Sequence[str]) -> MountOptions:
    """mount(8) helper convention: ``SPEC DIR [-sfnvrw] [-o opts] [-t type]``, options anywhere."""
    o = MountOptions()
    pos: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a in ("-h", "--help"):
            raise SystemExit(print(USAGE, end="") or EXIT_OK)
        if a in ("-o", "-t", "-N"):
            if i >= len(args):
                raise UsageError(f"option {a} needs an argument")
            val = args[i]
            i += 1
            if a == "-o":
                for opt in val.split(","):
                    _apply(o, opt.strip())
            continue
        if a.startswith("-o") and len(a) > 2:
            for opt in a[2:].split(","):
                _apply(o, opt.strip())
            continue
        if a.startswith("-") and len(a) > 1 and a != "--":
            for ch in a[1:]:
                if ch == "f":
                    o.foreground = True
                elif ch == "r":
                    o.read_only = True
                elif ch == "w":
                    o.read_only = False
                elif ch == "v":
                    o.verbose = True
                elif ch == "d":
                    _apply(o, "debug")
                elif ch in "ns":
                    pass
                else:
                    raise UsageError(f"unknown flag -{ch}")
            continue
        pos.append(a)
    if len(pos) != 2:
        raise UsageError("expected SPEC DIR")
    o.spec, o.mountpoint = os.path.abspath(pos[0]), os.path.abspath(pos[1])
    return o


# --------------------------------------------------------------------------------------------------
def _setup_logging(o: MountOptions) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if o.debug else logging.INFO if o.verbose else logging.WARNING)
    handler: logging.Handler
    if o.log:
        handler = logging.FileHandler(o.log)
        fmt = "%(asctime)s mount.sovfs[%(process)d] %(levelname)s %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    elif o.foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mount.sovfs: %(levelname)s %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("mount.sovfs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _lock_image(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(f"{path}: no such image file") from None
    except OSError as e:
        raise MountError(f"{path}: {e.strerror}") from None
    try:
        if not os.path.isfile(path):
            raise MountError(f"{path}: not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MountError(f"{path}: image is in use (already mounted or being checked)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Daemon:
    """One mount's resources, opened in order and closed in reverse."""

    def __init__(self, o: MountOptions, ready_fd: int | None) -> None:
        self.o = o
        self.ready_fd = ready_fd
        self.log = logging.getLogger("sovfs.mount")

    def _tell(self, msg: str) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, (msg + "\n").encode())
            finally:
                os.close(self.ready_fd)
                self.ready_fd = None

    def run(self) -> int:
        o = self.o
        if not os.path.isdir(o.mountpoint):
            raise MountError(f"mount point {o.mountpoint} does not exist or is not a directory")
        lock_fd = _lock_image(o.spec)
        try:
            return self._with_lock()
        finally:
            os.close(lock_fd)  # last: waiters take it as "the image is clean and closed"

    def _with_lock(self) -> int:
        from sovfs.blockdev import open_block_device
        from sovfs.errors import Corrupt, NeedsCheck, SovError

        o = self.o
        try:
            # The ledger device's queues (LEDGER.md "Trapped notifications"): a trapped one serves
            # a request on this thread before the notify returns - the cheapest path for a request
            # that runs alone, but a disk read there holds up every other FUSE request; a worker
            # queue overlaps them.  The trio front end picks per request (ALONE_RUN_TO_TRAP).
            notify: str | tuple[str, ...] = "trap"
            if o.iothreads:
                notify = ("trap", "eventfd") if o.lone_trap else "eventfd"
            dev = open_block_device(
                o.spec,
                read_only=o.read_only,
                direct_reads=o.direct_reads,
                direct_min=o.direct_min_kib * 1024,
                direct_writes=o.direct_writes,
                write_behind=o.write_behind,
                num_queues=2,
                notify=notify,
            )
        except (OSError, ValueError) as e:
            raise MountError(f"{o.spec}: cannot open image: {_first_line(e)}") from None
        try:
            from sovfs.fs import FileSystem

            try:
                fs = FileSystem.mount(dev, read_only=o.read_only, require_clean=not o.force)
            except NeedsCheck as e:
                raise MountError(f"{o.spec}: {_first_line(e)}") from None
            except Corrupt as e:
                why = _first_line(e)
                raise MountError(f"{o.spec}: not a SovFS image, or damaged ({why}): run fsck.sovfs") from None
            except SovError as e:
                raise MountError(f"{o.spec}: cannot mount: {_first_line(e)}") from None
            try:
                return self._serve(fs)
            finally:
                fs.close()
                self.log.info("%s: closed (%s)", o.spec, "failsafe: NOT clean" if fs.failed else "clean")
        finally:
            if self.log.isEnabledFor(logging.INFO):
                self.log.info("%s: the ledger served\n%s", o.spec, ledger_summary(dev))
            dev.close()

    def _serve(self, fs: Any) -> int:
        import pyfuse3
        import trio

        from sovfs.fuse_ops import SovOps

        o = self.o
        ops = SovOps(
            fs, entry_timeout=o.entry_timeout, attr_timeout=o.attr_timeout, atime=o.atime,
            writeback_cache=o.writeback_cache, check_permissions=not o.default_permissions,
            readdirplus=o.readdirplus,
        )
        try:
            pyfuse3.init(ops, o.mountpoint, o.fuse_options())
        except Exception as e:  # RuntimeError from libfuse (busy mountpoint, bad option, no /dev/fuse)
            raise MountError(f"cannot mount on {o.mountpoint}: {_first_line(e)}") from None
        mounted = True
        try:
            trio.run(self._loop, ops)
            mounted = False
        finally:
            try:
                pyfuse3.close(unmount=True)
            except Exception:  # already unmounted by umount(8)/fusermount3
                if mounted:
                    self.log.exception("unmount failed")
            ops.release_all()
            if o.pidfile:
                with contextlib.suppress(OSError):
                    os.unlink(o.pidfile)
        return EXIT_OK

    async def _loop(self, ops: Any) -> None:
        import pyfuse3
        import trio

        from sovfs._fastloop import fast_session_loop

        o = self.o

        async def signals() -> None:
            with trio.open_signal_receiver(
                signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1
            ) as sigs:
                async for s in sigs:
                    if s == signal.SIGUSR1:
                        self.log.warning("signal USR1: the daemon's tasks\n%s", task_dump())
                        self.log.warning("signal USR1: the ledger\n%s", ledger_summary(ops.fs.dev))
                        continue
                    self.log.info("signal %d: unmounting", s)
                    pyfuse3.terminate()

        async def writeback() -> None:
            seen = -1
            while True:
                await trio.sleep(o.commit)
                if ops.fs.read_only:
                    continue
                if ops.fs.journal.commits != seen:
                    try:
                        ops.fs.sync()
                    except Exception as e:
                        ops._failsafe("writeback", (), e, trace=True)
                    seen = ops.fs.journal.commits

        async def ready() -> None:
            try:
                st = await trio.to_thread.run_sync(os.stat, o.mountpoint)
            except OSError as e:
                self._tell(f"ERR mount on {o.mountpoint} does not answer: {e.strerror}")
                pyfuse3.terminate()
                return
            if o.readahead_kib:
                err = set_readahead(st.st_dev, o.readahead_kib)
                if err:
                    self.log.warning("read-ahead window left as it was: %s", err)
            if o.pidfile:
                await trio.Path(o.pidfile).write_text(f"{os.getpid()}\n")
            self.log.info("%s mounted on %s (core: %s)", o.spec, o.mountpoint, _native.STATE)
            if not o.foreground:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(null)
            self._tell("OK")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals)
            if o.commit > 0:
                nursery.start_soon(writeback)
            nursery.start_soon(ready)
            try:
                # File data moves through the device's async path while mounted, so
                # the reads of concurrent FUSE requests are in flight together.
                serving = getattr(ops.fs.dev, "serving", None)
                fast = fast_session_loop(spin_us=o.reqspin_us) if o.fastwait else contextlib.nullcontext()
                with fast as queued:
                    # queued(): FUSE requests are waiting - the ledger then spins for a completion
                    # only while spinning pays (it would hold those requests up)
                    # The background nursery (fetch-ahead) inside serving: a fetch still in flight at
                    # unmount waits out its device request (uninterruptible) while the reapers run.
                    async with (
                        serving(queued) if serving is not None else contextlib.nullcontext(),
                        trio.open_nursery() as background,
                    ):
                        if o.fetch_ahead:
                            ops.fs.background = background.start_soon
                        try:
                            await pyfuse3.main(max_tasks=o.max_tasks)
                        finally:
                            ops.fs.background = None
                            background.cancel_scope.cancel()
            finally:
                nursery.cancel_scope.cancel()


def ledger_summary(dev: Any) -> str:
    """What the ledger's device served, one line per queue (``kill -USR1``; at unmount with ``-v``).

    For a look at a running mount's I/O path: how the requests divide between the trapped queue and
    the worker's, how much moved around the host page cache (direct) or had its write-back started
    early (write-behind), and how often the worker slept and the device interrupted.  Never raises:
    a report must not take the daemon, or its unmount, down.
    """

    def size(n: int) -> str:
        units = ("B", "KiB", "MiB", "GiB", "TiB")
        x, i = float(n), 0
        while x >= 1024 and i < len(units) - 1:
            x /= 1024
            i += 1
        return f"{n} B" if i == 0 else f"{x:,.1f} {units[i]}"

    get = getattr(dev, "stats", None)
    try:
        stats = get() if get is not None else None
        if stats is None:
            return "  (no ledger device in this process)"
        lines = []
        for q in stats["queues"]:
            kind = "trapped" if q["trapped"] else "worker"
            lines.append(
                f"  queue {q['queue']} ({kind}): {q['requests']:,} requests, {q['errors']:,} errors; "
                f"read {size(q['bytes_read'])} ({size(q['direct_read'])} direct), "
                f"written {size(q['bytes_written'])} ({size(q['direct_written'])} direct, "
                f"{size(q['write_behind'])} write-behind); {q['interrupts']:,} interrupts, "
                f"{q['sleeps']:,} sleeps" + ("; BROKEN (needs reset)" if q["broken"] else "")
            )
        if stats["diagnostics"]:
            n = stats["diagnostics"]
            lines.append(f"  {n:,} device diagnostics (refused requests: see the log above)")
        return "\n".join(lines)
    except Exception as e:
        return f"  (no ledger statistics: {type(e).__name__}: {_first_line(e)})"


def task_dump() -> str:
    """Every trio task of this run and where it waits, innermost frame last (``kill -USR1`` logs it).

    A FUSE request the kernel still counts as waiting (``/sys/fs/fuse/connections/N/waiting``) is one
    of the ``pyfuse-NN`` tasks.  pyfuse3's compiled handlers hide the frames below them, so the trail
    is read from the other tasks: a ledger reaper asleep on its interrupt fd while nothing completes,
    a task parked on the buffer pool, the write-back timer.
    """
    import trio

    lines: list[str] = []

    def frames(coro: Any) -> list[str]:
        out = []
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                code = frame.f_code
                out.append(f"{code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        return out

    def walk(task: Any, depth: int) -> None:
        lines.append("  " * depth + f"task {task.name}")
        lines.extend("  " * depth + f"    at {f}" for f in frames(task.coro))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)


def set_readahead(dev: int, kib: int) -> str | None:
    """Set the kernel's read-ahead window of the FUSE mount with device number ``dev``.

    A FUSE mount starts with the default window (128 KiB), so a sequential buffered read reaches the
    daemon as 256 KiB requests, at most two in flight; with 1 MiB the kernel sends 1 MiB requests,
    several in flight, which the daemon reads in parallel over the ledger's queues.  pyfuse3 cannot
    negotiate ``max_readahead`` at FUSE_INIT, so the window is set the way ``blockdev --setra``
    would, through the mount's backing-device entry in sysfs.  Returns None, or why it failed.
    """
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        return f"{path}: {e.strerror}"
    return None


def wait_image_released(image: str | os.PathLike[str], timeout: float = 30) -> bool:
    """Wait until no daemon holds ``image``'s lock; True if released within ``timeout`` seconds.

    A daemon releases the lock last, after it has closed the image clean, so this
    is the way to know that an unmount has finished writing (``umount`` returns
    before the daemon is done).
    """
    deadline = time.monotonic() + timeout
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


def _child(o: MountOptions, ready_fd: int | None) -> int:
    from sovfs._malloc import tune_malloc

    tune_malloc()  # 1 MiB reads/writes: heap buffers instead of fresh mmaps (see sovfs/_malloc.py)
    _setup_logging(o)
    d = _Daemon(o, ready_fd)
    try:
        return d.run()
    except MountError as e:
        if d.ready_fd is not None:
            d._tell(f"ERR {e}")
        else:
            print(f"mount.sovfs: {e}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as e:
        logging.getLogger("sovfs.mount").exception("mount failed")
        msg = f"internal error: {type(e).__name__}: {_first_line(e)}"
        if d.ready_fd is not None:
            d._tell(f"ERR {msg}")
        else:
            print(f"mount.sovfs: {msg}", file=sys.stderr)
        return EXIT_FAIL


def main(argv: Sequence[str] | None = None) -> int:
    try:
        o = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"mount.sovfs: {e}\n{USAGE.splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    if o.foreground:
        return _child(o, None)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        code = EXIT_FAIL
        try:
            code = _child(o, w)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(w)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(r, 4096)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    msg = buf.decode(errors="replace").strip()
    if msg == "OK":
        return EXIT_OK
    if msg.startswith("ERR "):
        print(f"mount.sovfs: {msg[4:]}", file=sys.stderr)
    else:
        os.waitpid(pid, 0)
        print("mount.sovfs: the daemon exited before the mount was ready", file=sys.stderr)
    return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
