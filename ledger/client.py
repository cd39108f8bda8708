"""Block I/O over the driver: a buffer pool, request batching, and two front ends.

Theory of operation
-------------------
:class:`Engine` turns block operations into virtio-blk requests and back.  It
owns three things besides the driver's queues:

* a **buffer pool** in guest memory: the device can only DMA to and from
  guest memory, so every data buffer lives there (callers' bytes are copied in
  for writes and out for reads - one ``memcpy`` - or, with :class:`Batch`,
  callers use pool buffers directly and nothing is copied);
* a **staging area**: parallel numpy arrays (type, sector, buffer, length,
  group, index) where requests wait until one kernel call publishes all of
  them with one index update and at most one kick;
* a **group table**: a group is one caller-visible operation (one ``read``,
  one :class:`Batch`), possibly many requests.  The harvest kernel counts a
  group's completions and records its first failure, so Python wakes one waiter
  per group and touches no per-request object.

Two front ends share the engine:

* :class:`SyncBlk` blocks the calling thread: it polls the used ring briefly,
  then sleeps in ``poll(2)`` on the queue's interrupt eventfd.  mkfs and fsck
  use it.
* :class:`TrioBlk` serves many concurrent trio tasks.  A task stages its
  requests and, if no flush is pending, yields once before flushing so that
  every task that became runnable in the same scheduling round joins the same
  batch.  One reaper task per queue harvests completions (polling for
  ``poll_us`` before arming the interrupt and sleeping in
  ``trio.lowlevel.wait_readable``), wakes the groups, and flushes whatever
  waited for descriptors.  Waiting for a request cannot be cancelled (the
  cancellation point is before staging): once the device owns a buffer the
  buffer must not be reused before the device gives it back, exactly as a
  kernel waits for DMA to end.

The engine is single-threaded: all calls come from one thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import trio

from . import _driver_kernels as K
from . import _spec as S
from ._native import address_table
from .driver import DriverQueue, VirtioBlkDriver
from .errors import DeviceError, DriverError, IOFailure

SECTOR = S.VIRTIO_BLK_SECTOR_SIZE
#: Batches of at least this many requests per queue are spread over all queues.
SPREAD_MIN = 8
#: ... and so are smaller batches (2+ reads) that move at least this many bytes: a large read cut
#: into pieces (:meth:`TrioBlk.read_parallel`) has one piece per queue worker.  Not writes:
#: pwrites to one image file serialize on its inode lock, so a second worker only adds a hand-off.
SPREAD_BYTES = 256 << 10
#: TrioBlk sends a request to a trapped queue (served on its own thread, no hand-off, no wake-up)
#: once this many requests in a row found nothing else in flight or queued: a serial client.
#: Measured with fio, cold image, 4 KiB random reads: 1 job +35%; with 4 jobs, routing every lone
#: request there cost 15% (each blocked the thread while other jobs' requests arrived).
ALONE_RUN_TO_TRAP = 32
#: :class:`SyncBlk` sends a lone write this large to a worker queue rather than a trapped one
#: (the device's write-behind, ``_device_kernel.WRITE_BEHIND_MIN``, runs on workers only).
WORKER_WRITE_MIN = 256 << 10
#: :meth:`TrioBlk.read_parallel` pieces are at least this large (smaller ones cost more than they overlap).
PARALLEL_MIN_PIECE = 128 << 10
_MIN_CLASS = 4096


class BufferPool:
    """Power-of-two size classes of guest-memory buffers, carved from one arena.

    ``alloc`` returns a GPA or ``None`` when the arena is exhausted (the caller
    waits for buffers to come back).  Buffers are 4 KiB aligned.

    Buffers never change class, so once the arena is carved up, a class that
    owns no buffer could never be served — a trio task waiting for one would
    wait forever (a mount hung that way: 1 MiB reads after the arena had gone to
    smaller classes).  Every class therefore gets one buffer when the pool is
    made (largest first, as far as the arena allows): a waiter then only waits
    for a holder, and holders give buffers back when their I/O completes.
    """

    def __init__(self, driver: VirtioBlkDriver, arena_bytes: int, max_buffer: int) -> None:
        self.max_buffer = max(_MIN_CLASS, 1 << (max_buffer - 1).bit_length())
        self.base = driver.alloc.alloc(arena_bytes, 4096)
        self.end = self.base + arena_bytes
        self._next = self.base
        self._free: dict[int, list[int]] = {}
        self._class_of: dict[int, int] = {}  # request size -> size class, for the hot path
        self.mem = driver.memory
        cls = self.max_buffer
        while cls >= _MIN_CLASS and self._next + cls <= self.end:
            self._free[cls] = [self._next]
            self._next += cls
            cls //= 2

    @staticmethod
    def size_class(nbytes: int) -> int:
        return max(_MIN_CLASS, 1 << (max(nbytes, 1) - 1).bit_length())

    def alloc(self, nbytes: int) -> int | None:
        cls = self._class_of.get(nbytes) or self._remember_class(nbytes)
        if cls > self.max_buffer:
            raise DriverError(f"buffer of {nbytes} bytes is larger than the pool's {self.max_buffer}")
        lst = self._free.get(cls)
        if lst:
            return lst.pop()
        if self._next + cls > self.end:
            return None
        gpa = self._next
        self._next += cls
        return gpa

    def free(self, gpa: int, nbytes: int) -> None:
        cls = self._class_of.get(nbytes) or self._remember_class(nbytes)
        self._free.setdefault(cls, []).append(gpa)

    def _remember_class(self, nbytes: int) -> int:
        cls = self.size_class(nbytes)
        if len(self._class_of) < 4096:
            self._class_of[nbytes] = cls
        return cls

    def view(self, gpa: int, nbytes: int) -> npt.NDArray[np.uint8]:
        off = gpa - self.mem.base
        return self.mem.array[off : off + nbytes]


@dataclass
class Batch:
    """Many requests submitted with one kernel call and completed as one group.

    Arrays are parallel; ``buf`` holds guest-physical addresses of buffers the
    caller allocated with :meth:`Engine.alloc_buffer` (or 0 for FLUSH).

    Example:
        >>> b = Batch.uniform(VIRTIO_BLK_T_IN, [0, 8], 8, [gpa0, gpa1])  # doctest: +SKIP
    """

    rtype: npt.NDArray[np.uint32]
    sector: npt.NDArray[np.uint64]
    buf: npt.NDArray[np.uint64]
    nbytes: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.rtype)

    @classmethod
    def uniform(cls, rtype: int, sectors: npt.ArrayLike, nsectors: int, bufs: npt.ArrayLike) -> Batch:
        sec = np.asarray(sectors, dtype=np.uint64)
        k = len(sec)
        return cls(
            rtype=np.full(k, rtype, dtype=np.uint32),
            sector=sec,
            buf=np.asarray(bufs, dtype=np.uint64),
            nbytes=np.full(k, nsectors * SECTOR, dtype=np.int64),
        )


#: (the device's gate, run_trapped bound to everything but the request)
_TrapCall = tuple[npt.NDArray[np.int64], Callable[[int, int, int, int, int], int]]
#: (the queue state it was made for, its packed kernels' address table, the arrays in the table)
_QueueTable = tuple[object, npt.NDArray[np.int64], tuple[npt.NDArray[np.generic], ...]]
#: makes a _TrapCall's callable from run_trapped's arguments before and after the request
TrapBinder = Callable[[tuple[object, ...], tuple[object, ...]], Callable[[int, int, int, int, int], int]]


class Engine:
    """Staging, groups, buffers and completion dispatch over a driver's queues."""

    def __init__(
        self,
        driver: VirtioBlkDriver,
        *,
        pool_bytes: int = 32 << 20,
        staging: int = 8192,
        trap_binder: TrapBinder | None = None,
    ) -> None:
        if not driver.queues:
            raise DriverError("driver has no queues (was it reset?)")
        self.driver = driver
        self.mem = driver.memory.array
        self.queues: list[DriverQueue] = driver.queues
        self.capacity = driver.capacity_sectors
        self.max_request = driver.max_request_bytes
        self.pool = BufferPool(driver, pool_bytes, self.max_request)
        ring_total = sum(q.size for q in self.queues)
        ngroups = 2 * ring_total + 64
        self.grp_remaining = np.zeros(ngroups, dtype=np.int32)
        self.grp_err_status = np.zeros(ngroups, dtype=np.int32)
        self.grp_err_idx = np.zeros(ngroups, dtype=np.int32)
        self.grp_bytes = np.zeros(ngroups, dtype=np.int64)
        self.free_groups = list(range(ngroups - 1, -1, -1))
        self.on_done: list[Callable[[int], None] | None] = [None] * ngroups
        self.out_groups = np.zeros(max(q.size for q in self.queues), dtype=np.int32)
        self.st_rtype = np.zeros(staging, dtype=np.uint32)
        self.st_sector = np.zeros(staging, dtype=np.uint64)
        self.st_buf = np.zeros(staging, dtype=np.uint64)
        self.st_nbytes = np.zeros(staging, dtype=np.int64)
        self.st_group = np.zeros(staging, dtype=np.int32)
        self.st_gidx = np.zeros(staging, dtype=np.int32)
        self.st_head = 0  # first staged request not yet submitted
        self.st_count = 0  # staged requests in total (submitted ones before st_head)
        # Per queue: its arrays and the engine's, bound once for the packed kernels.  A table holds
        # addresses only: each entry keeps the arrays it points into, and is used only for the queue
        # state it was made from.
        self._qtabs: dict[int, _QueueTable] = {}
        for q in self.queues:
            arrays = (
                self.mem, q.state.q, q.state.free_next, q.state.chain_next, q.state.head_ndesc,
                q.state.head_group, q.state.head_gidx, q.state.kick_buf,
                self.st_rtype, self.st_sector, self.st_buf, self.st_nbytes, self.st_group, self.st_gidx,
                self.grp_remaining, self.grp_err_status, self.grp_err_idx, self.grp_bytes, self.out_groups,
            )  # fmt: skip
            tab = address_table(arrays, K.DRIVER_ARRAY_DTYPES)
            if tab is not None:
                self._qtabs[q.index] = (q.state, tab, arrays)
        # Queues whose notify traps (the device serves them on this thread before the register
        # write returns) and queues with a worker thread.  Every queue (None) lists the workers
        # first: a batch dealt out in shares reaches them before a trapped queue serves its own
        # share on this thread, so they move theirs meanwhile.
        trapped = [q for q in self.queues if q.notify_fd < 0]
        workers = [q for q in self.queues if q.notify_fd >= 0]
        self._routes: dict[bool | None, list[DriverQueue]] = {None: workers + trapped}
        #: queues whose notify is trapped (served on the notifying thread before it returns)
        self.trapped: list[DriverQueue] = trapped
        if trapped and workers:
            self._routes[True] = trapped
            self._routes[False] = workers
        self._rr_route: dict[bool | None, int] = {None: 0, True: 0, False: 0}
        #: binds the fused publish-serve-harvest kernel for lone requests on trapped queues
        #: (``ledger._trap_kernel.bind``, given by ``Ledger``: the driver never imports the
        #: device's kernels); None: every request goes through the registers
        self._trap_binder = trap_binder
        # queue index -> (gate, bound run_trapped) from the device's trap target
        self._trap_targets: dict[int, _TrapCall | None] = {}
        self.broken: DeviceError | None = None
        #: called when a group is released (a front end waiting for room wakes up)
        self.on_space: Callable[[], None] | None = None
        for q in self.queues:
            K.set_interrupts(self.mem, q.q, False)

    # --- groups and staging -------------------------------------------------------

    def new_group(self, nrequests: int, on_done: Callable[[int], None]) -> int | None:
        if not self.free_groups:
            return None
        g = self.free_groups.pop()
        self.grp_remaining[g] = nrequests
        self.grp_err_status[g] = 0
        self.grp_err_idx[g] = 0
        self.grp_bytes[g] = 0
        self.on_done[g] = on_done
        return g

    def release_group(self, g: int) -> tuple[int, int, int]:
        """Free group ``g``; return (first error status or 0, its index, used bytes)."""
        res = int(self.grp_err_status[g]), int(self.grp_err_idx[g]), int(self.grp_bytes[g])
        self.on_done[g] = None
        self.free_groups.append(g)
        if self.on_space is not None:
            self.on_space()
        return res

    def staging_room(self) -> int:
        if self.st_head == self.st_count:
            self.st_head = self.st_count = 0
        return len(self.st_rtype) - self.st_count

    def stage(self, rtype: int, sector: int, buf: int, nbytes: int, group: int, gidx: int) -> None:
        i = self.st_count
        self.st_rtype[i] = rtype
        self.st_sector[i] = sector
        self.st_buf[i] = buf
        self.st_nbytes[i] = nbytes
        self.st_group[i] = group
        self.st_gidx[i] = gidx
        self.st_count = i + 1

    def stage_batch(self, batch: Batch, group: int) -> None:
        i, k = self.st_count, len(batch)
        self.st_rtype[i : i + k] = batch.rtype
        self.st_sector[i : i + k] = batch.sector
        self.st_buf[i : i + k] = batch.buf
        self.st_nbytes[i : i + k] = batch.nbytes
        self.st_group[i : i + k] = group
        self.st_gidx[i : i + k] = np.arange(k, dtype=np.int32)
        self.st_count = i + k

    @property
    def staged(self) -> int:
        return self.st_count - self.st_head

    def flush(self, alone: bool | None = None) -> int:
        """Publish staged requests, spreading them over the queues; return how many went.

        ``alone``: a hint from a front end, used when the device has trapped queues and worker
        queues.  True - nothing else is in flight or waiting, so a trapped queue serves the
        requests on this thread with no hand-off and no wake-up; False - others are, so a worker
        queue serves them while this thread goes on.  None (and on a device with one kind of
        queue): every queue.
        """
        total = 0
        route = alone if alone in self._routes else None
        queues = self._routes[route]
        nq = len(queues)
        # A large batch is dealt out in equal shares, so every queue's worker
        # thread moves data in parallel; a small one goes to one queue whole.
        staged = self.staged
        if staged >= SPREAD_MIN * nq or (
            nq > 1
            and staged > 1
            and int(self.st_nbytes[self.st_head : self.st_count].sum()) >= SPREAD_BYTES
            and not (self.st_rtype[self.st_head : self.st_count] != S.VIRTIO_BLK_T_IN).any()
        ):
            share = -(-staged // nq)
        else:
            share = staged
        # Shares start at the first queue (workers first); a whole batch goes to the next in turn.
        spread = share < staged
        rr = 0 if spread else self._rr_route[route] % nq
        for _ in range(2 * nq):
            if self.st_head == self.st_count:
                break
            q = queues[rr]
            qs = q.state
            rr = (rr + 1) % nq
            kicks = qs.q[K.Q_KICKS]
            bound = self._qtabs.get(q.index)
            if bound is not None and bound[0] is qs:
                count = min(share, self.st_count - self.st_head)
                done = K.submit_packed(bound[1], self.st_head, count, q.notify_fd)
            else:
                done = K.submit_requests(
                    self.mem, qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx,
                    self.st_rtype, self.st_sector, self.st_buf, self.st_nbytes, self.st_group, self.st_gidx,
                    self.st_head, min(share, self.st_count - self.st_head), q.notify_fd, qs.kick_buf,
                )  # fmt: skip
            self.st_head += done
            total += done
            if q.notify_fd < 0 and qs.q[K.Q_KICKS] != kicks:
                # No ioeventfd: the kick is the register write (which may serve the queue before
                # it returns, as a trapped MMIO write does).
                self.driver.transport.write32(S.VIRTIO_MMIO_QUEUE_NOTIFY, q.index)
        if not spread:
            self._rr_route[route] = rr
        if self.st_head == self.st_count:
            self.st_head = self.st_count = 0
        elif route is not None:
            total += self.flush()  # the preferred queues are full: any queue will do
        return total

    def warm_up(self) -> None:
        """Load the packed kernels now (publishing nothing, harvesting what is there), not in a loop."""
        for q in self.queues:
            bound = self._qtabs.get(q.index)
            if bound is not None and bound[0] is q.state:
                K.submit_packed(bound[1], 0, 0, -1)
                self.harvest(q)

    def run_trapped(self, g: int, rtype: int, sector: int, buf: int, nbytes: int) -> int:
        """Run one request, all of group ``g``, on an idle trapped queue in one kernel call.

        The fast path of a lone request (ledger._trap_kernel): it is published, served by the
        device and harvested before this returns, with none of the register file's Python
        between.  Returns 1 when it was: the group is complete and its callback was NOT run (the
        caller releases it).  Returns 0 when the request was published but went the usual way
        (the device must be notified through its registers, or could not serve it): it completes
        through the group's callback.  Returns -1 when the fast path does not apply (something is
        staged, no trapped queue is idle, the device offers no trap target): nothing was done.
        """
        if self._trap_binder is None or self.st_head != self.st_count or self.broken is not None:
            return -1  # (staged requests of others would be published after ours)
        for q in self.trapped:
            if q.q[K.Q_INFLIGHT]:
                continue
            target = self._trap_targets.get(q.index)
            if target is None or not target[0][0]:
                target = self._trap_target(q)
                if target is None:
                    continue
            self.st_head = self.st_count = 0
            r = target[1](rtype, sector, buf, nbytes, g)
            if r == 1 and self.out_groups[0] == g:
                return 1
            if r == K.RT_NO_ROOM:
                continue
            if r == K.RT_NOTIFY:
                self.driver.transport.write32(S.VIRTIO_MMIO_QUEUE_NOTIFY, q.index)
                self.harvest(q)
            elif r == K.RT_DEVICE_ERROR:
                self.fail(DeviceError(f"queue {q.index}: " + _queue_error(q)))
            else:
                for done in self.out_groups[: max(r, 0)].tolist():
                    cb = self.on_done[done]
                    if cb is not None:
                        cb(done)
            return 0
        return -1

    def _trap_target(self, q: DriverQueue) -> _TrapCall | None:
        """The device's gate for ``q`` and run_trapped bound to its arguments around the request
        (built once per gate: every array in them lives as long as the engine and the device's
        queue)."""
        binder = self._trap_binder
        get = getattr(self.driver.transport, "trap_target", None)
        target = None if get is None else get(q.index)
        call: _TrapCall | None = None
        if target is not None and binder is not None:
            gate, dev_args = target
            qs = q.state
            head = (
                self.mem, qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx,
                qs.kick_buf, self.st_rtype, self.st_sector, self.st_buf, self.st_nbytes, self.st_group,
                self.st_gidx, 0,
            )  # fmt: skip
            tail = (
                self.grp_remaining, self.grp_err_status, self.grp_err_idx, self.grp_bytes, self.out_groups,
                gate, *dev_args,
            )  # fmt: skip
            call = (gate, binder(head, tail))
        self._trap_targets[q.index] = call
        return call

    def harvest(self, q: DriverQueue) -> int:
        """Consume q's used entries and run the callbacks of completed groups."""
        qs = q.state
        bound = self._qtabs.get(q.index)
        if bound is not None and bound[0] is qs:
            n = K.harvest_packed(bound[1])
        else:
            n = K.harvest(
                self.mem, qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx,
                self.grp_remaining, self.grp_err_status, self.grp_err_idx, self.grp_bytes, self.out_groups,
            )  # fmt: skip
        if n < 0:
            self.fail(DeviceError(f"queue {q.index}: " + _queue_error(q)))
            return 0
        for g in self.out_groups[:n].tolist():
            cb = self.on_done[g]
            if cb is not None:
                cb(g)
        return int(n)

    def fail(self, err: DeviceError) -> None:
        """The device broke the protocol: fail every waiter; the ledger needs a reset."""
        if self.broken is None:
            self.broken = err
        for g, cb in enumerate(self.on_done):
            if cb is not None:
                self.grp_err_status[g] = -1
                cb(g)

    def check_device(self) -> None:
        """After an interrupt: acknowledge it and notice DEVICE_NEEDS_RESET."""
        t = self.driver.transport
        isr = t.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS)
        if isr:
            t.write32(S.VIRTIO_MMIO_INTERRUPT_ACK, isr)
        if isr & S.VIRTIO_MMIO_INT_CONFIG and self.driver.needs_reset():
            self.fail(DeviceError("device set DEVICE_NEEDS_RESET (see the device diagnostics)"))

    # --- request building -------------------------------------------------------

    def check_range(self, sector: int, nsectors: int, write: bool) -> None:
        if self.broken is not None:
            raise self.broken
        if sector < 0 or nsectors < 0 or sector + nsectors > self.capacity:
            raise DriverError(
                f"sectors {sector}..{sector + nsectors - 1} are outside the device ({self.capacity} sectors)"
            )
        if write and self.driver.read_only:
            raise DriverError("the device is read-only (VIRTIO_BLK_F_RO)")

    def split(self, sector: int, nbytes: int) -> list[tuple[int, int]]:
        """Cut ``nbytes`` at ``sector`` into (sector, bytes) pieces of at most one request."""
        step = self.max_request
        return [(sector + off // SECTOR, min(step, nbytes - off)) for off in range(0, nbytes, step)]

    def segment_payloads(
        self, rtype: int, feature: int, ranges: Sequence[tuple[int, int]], flags: int
    ) -> list[tuple[int, bytes]]:
        """DISCARD / WRITE_ZEROES data: 16-byte segments {le64 sector, le32 sectors, le32 flags}.

        Ranges are cut to the device's max sectors per segment and grouped into
        requests of at most max segments; returns (first sector, payload) per request.
        """
        if not self.driver.has(feature):
            raise DriverError(f"device did not negotiate VIRTIO_{S.FEATURE_NAMES[feature]}")
        for sector, n in ranges:
            self.check_range(sector, n, True)
        cfg = self.driver.config
        if rtype == S.VIRTIO_BLK_T_DISCARD:
            max_sec, max_seg = cfg.max_discard_sectors, cfg.max_discard_seg
        else:
            max_sec, max_seg = cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg
        segs = _segments(ranges, flags, max_sec)
        per_req = max(1, min(max_seg or 1, 4096 // S.VIRTIO_BLK_DISCARD_SEGMENT_SIZE))
        return [
            (segs[i][0], b"".join(struct.pack("<QII", s, n, f) for s, n, f in segs[i : i + per_req]))
            for i in range(0, len(segs), per_req)
        ]

    def raise_for(self, g: int, rtypes: Sequence[int] | int, sectors: Sequence[int]) -> None:
        st, idx, _ = self.release_group(g)
        if st == -1:
            raise self.broken or DeviceError("device failed")
        if st:
            rt = rtypes if isinstance(rtypes, int) else rtypes[idx]
            raise IOFailure(st, rt, sectors[idx] if idx < len(sectors) else -1, idx)


def _queue_error(q: DriverQueue) -> str:
    from .driver import describe_queue_error

    return describe_queue_error(int(q.q[K.Q_ERROR]), int(q.q[K.Q_ERROR_ARG]))


def _segments(ranges: Iterable[tuple[int, int]], flags: int, max_sectors: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for sector, n in ranges:
        while n > 0:
            step = min(n, max_sectors) if max_sectors else n
            out.append((sector, step, flags))
            sector += step
            n -= step
    return out


class PollWindow:
    """Whether a front end spins on the used ring before it sleeps, judged by whether spinning works.

    Spinning pays when the completion comes within the window (a request served from the page
    cache: a few µs) and is pure waste when it does not (a read from a cold disk takes ~100 µs: the
    whole window is spun, then the task sleeps anyway - measured as 35 µs of extra daemon CPU per
    4 KiB FUSE read).  So the front end keeps a running hit rate of its polls (a moving average
    over roughly the last eight) and spins only while at least half of them catch their
    completion.  While it does not spin, every eighth wait still polls, as a probe, so that the
    window comes back when the device gets fast again.  (Judging by the latency of the completions
    themselves does not work here: once polling stops, every latency includes the wake-up through
    the interrupt eventfd and trio, which alone is longer than the window.)
    """

    PROBE_EVERY = 8

    def __init__(self, max_ns: int) -> None:
        self.max_ns = max_ns
        self.hit_rate = 1.0
        self._since_probe = 0

    def budget(self, alone: bool) -> int:
        """Nanoseconds to spin for the next wait (0: go straight to sleep).

        ``alone``: the waiter's request is the only one in flight.  Then nothing else could use
        the CPU meanwhile, and a spin that outlasts a slow completion still saves the wake-up
        (measured: one reader of a cold disk does 12 % more IOPS spinning than sleeping).
        """
        if alone:
            return self.max_ns
        if self.hit_rate >= 0.5:
            return self.max_ns
        self._since_probe += 1
        if self._since_probe >= self.PROBE_EVERY:
            self._since_probe = 0
            return self.max_ns
        return 0

    def record(self, caught: bool) -> None:
        """The outcome of a poll that was given a budget."""
        self.hit_rate += ((1.0 if caught else 0.0) - self.hit_rate) * 0.125


# ---------------------------------------------------------------------------------
# Blocking front end


def _large_write(reqs: Sequence[tuple[int, int, int, int]]) -> bool:
    """Writes only, one of them :data:`WORKER_WRITE_MIN` bytes or more (the device's write-behind
    looks at each request, so many small pieces would only pay the hand-off)."""
    if reqs[0][0] != S.VIRTIO_BLK_T_OUT:
        return False
    if len(reqs) == 1:
        return reqs[0][3] >= WORKER_WRITE_MIN
    return all(r[0] == S.VIRTIO_BLK_T_OUT for r in reqs) and max(r[3] for r in reqs) >= WORKER_WRITE_MIN


class SyncBlk:
    """Blocking block I/O for single-threaded tools (mkfs, fsck, the CLI).

    Args:
        engine: the engine over an initialised driver.
        poll_us: how long to spin on the used ring before sleeping.
    """

    def __init__(self, engine: Engine, *, poll_us: int = 50) -> None:
        self.e = engine
        self.poll_ns = poll_us * 1000
        self._done: set[int] = set()
        self._poller = select.poll()
        self._fd_queue: dict[int, DriverQueue] = {}
        for q in engine.queues:
            self._poller.register(q.interrupt_fd, select.POLLIN)
            self._fd_queue[q.interrupt_fd] = q

    @property
    def capacity(self) -> int:
        """Device capacity in 512-byte sectors."""
        return self.e.capacity

    def _mark(self, g: int) -> None:
        self._done.add(g)

    def _wait(self, g: int) -> None:
        e = self.e
        while g not in self._done:
            if e.staged:
                e.flush()
            busy = [q for q in e.queues if q.inflight]
            if not busy:
                if e.staged:
                    continue
                raise DriverError("internal: waiting for a group with nothing in flight")
            progressed = False
            for q in busy:
                if K.poll_used(e.mem, q.q, self.poll_ns // len(busy)):
                    e.harvest(q)
                    progressed = True
            if progressed or g in self._done:
                continue
            # Nothing came while polling: arm interrupts and sleep.
            pending = False
            for q in busy:
                pending |= bool(K.set_interrupts(e.mem, q.q, True))
            if not pending:
                for fd, _ in self._poller.poll(1000):
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 8)
                    if self._fd_queue[fd].sleepers:
                        # A trio reaper sleeps on this fd with used_event where it armed it, and
                        # this harvest moves the used index past it: the device sends no
                        # interrupt for the next completion.  Hand the interrupt on: the reaper
                        # wakes and re-arms at the new index (else it could sleep forever).
                        os.eventfd_write(fd, 1)
                e.check_device()
            for q in busy:
                if not q.sleepers:  # a trio reaper asleep on this queue needs them armed
                    K.set_interrupts(e.mem, q.q, False)
                e.harvest(q)
        self._done.discard(g)

    def _run(self, reqs: Sequence[tuple[int, int, int, int]]) -> int:
        """Run (type, sector, buf, nbytes) requests as one group; return the group."""
        e = self.e
        g = e.new_group(len(reqs), self._mark)
        if g is None:
            raise DriverError("internal: out of request groups")
        if len(reqs) == 1 and e.trapped and not _large_write(reqs):
            # A lone request: served on this thread in one kernel call (Engine.run_trapped).
            t, sector, buf, nbytes = reqs[0]
            took = e.run_trapped(g, t, sector, buf, nbytes)
            if took >= 0:
                if took == 0:
                    self._wait(g)
                return g
        if e.staging_room() < len(reqs):
            e.flush()
        for i, (t, sector, buf, nbytes) in enumerate(reqs):
            e.stage(t, sector, buf, nbytes, g, i)
        # This thread waits for the group anyway: a lone request is served on it by a trapped
        # queue (no hand-off, no wake-up); several are spread so worker queues move in parallel.
        # Counted over everything staged: a trio task may have staged requests of its own (meant
        # for the workers) and yielded before publishing them, and this flush publishes those too.
        # Large writes (of ours alone) go to a worker all the same: having completed them, the
        # worker starts the host's write-back (device write-behind), work a trapped queue would
        # do on this thread before the write returns.
        if e.staged == len(reqs) and _large_write(reqs):
            e.flush(False)
        elif e.staged == 1:
            e.flush(True)
            for q in e.trapped:  # served during the notify: the completion is in its used ring
                if q.inflight:
                    e.harvest(q)
        else:
            e.flush(None)
        self._wait(g)
        return g

    def _window(self) -> int:
        """A quarter of the buffer pool (at least one request).

        A vectored call keeps up to twice this in flight per round."""
        return max(self.e.max_request, min(8 << 20, (self.e.pool.end - self.e.pool.base) // 4))

    def read(self, sector: int, nsectors: int) -> bytes:
        """Read ``nsectors`` 512-byte sectors starting at ``sector``."""
        return self.readv([(sector, nsectors)])[0]

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (a whole number of sectors) starting at ``sector``."""
        self.writev([(sector, data)])

    def readv(self, requests: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read many (sector, nsectors) ranges with all requests in flight at once."""
        e = self.e
        if len(requests) == 1 and 0 < requests[0][1] * SECTOR <= e.max_request:
            # The common case (a metadata block, a small file read): one request, one copy out.
            sector, n = requests[0]
            e.check_range(sector, n, False)
            nbytes = n * SECTOR
            gpa = e.pool.alloc(nbytes)
            if gpa is not None:
                try:
                    g = self._run(((S.VIRTIO_BLK_T_IN, sector, gpa, nbytes),))
                    e.raise_for(g, S.VIRTIO_BLK_T_IN, (sector,))
                    return [e.pool.view(gpa, nbytes).tobytes()]
                finally:
                    e.pool.free(gpa, nbytes)
        pieces: list[tuple[int, int, int]] = []  # (owner, sector, bytes)
        for i, (sector, n) in enumerate(requests):
            e.check_range(sector, n, False)
            pieces.extend((i, s, b) for s, b in e.split(sector, n * SECTOR))
        out = [bytearray(n * SECTOR) for _, n in requests]
        done = 0
        while done < len(pieces):
            chunk: list[tuple[int, int, int, int]] = []
            budget = self._window() * 2
            while done + len(chunk) < len(pieces) and (not chunk or budget > 0):
                i, s, b = pieces[done + len(chunk)]
                gpa = self.e.pool.alloc(b)
                if gpa is None:
                    break
                chunk.append((i, s, b, gpa))
                budget -= b
            if not chunk:
                raise DriverError("buffer pool exhausted")
            try:
                g = self._run([(S.VIRTIO_BLK_T_IN, s, gpa, b) for _, s, b, gpa in chunk])
                e.raise_for(g, S.VIRTIO_BLK_T_IN, [s for _, s, _, _ in chunk])
                for i, s, b, gpa in chunk:
                    pos = (s - requests[i][0]) * SECTOR
                    memoryview(out[i])[pos : pos + b] = e.pool.view(gpa, b).data
            finally:
                for _, _, b, gpa in chunk:
                    e.pool.free(gpa, b)
            done += len(chunk)
        return [bytes(o) for o in out]

    def writev(self, requests: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write many (sector, data) pieces with all requests in flight at once."""
        e = self.e
        if len(requests) == 1:
            # The common case (a 4 KiB random write, a journal block): one request.
            sector, data = requests[0]
            one = np.frombuffer(data, dtype=np.uint8)
            n = len(one)
            if 0 < n <= e.max_request:
                if n % SECTOR:
                    raise DriverError(f"write of {n} bytes is not a whole number of 512-byte sectors")
                e.check_range(sector, n // SECTOR, True)
                gpa = e.pool.alloc(n)
                if gpa is not None:
                    try:
                        e.pool.view(gpa, n)[:] = one
                        g = self._run(((S.VIRTIO_BLK_T_OUT, sector, gpa, n),))
                        e.raise_for(g, S.VIRTIO_BLK_T_OUT, (sector,))
                    finally:
                        e.pool.free(gpa, n)
                    return
        pieces: list[tuple[int, int, npt.NDArray[np.uint8]]] = []
        for sector, data in requests:
            src = np.frombuffer(data, dtype=np.uint8)
            if len(src) % SECTOR:
                raise DriverError(f"write of {len(src)} bytes is not a whole number of 512-byte sectors")
            e.check_range(sector, len(src) // SECTOR, True)
            for s, b in e.split(sector, len(src)):
                off = (s - sector) * SECTOR
                pieces.append((s, b, src[off : off + b]))
        done = 0
        while done < len(pieces):
            chunk: list[tuple[int, int, int]] = []
            budget = self._window() * 2
            while done + len(chunk) < len(pieces) and (not chunk or budget > 0):
                s, b, src = pieces[done + len(chunk)]
                gpa = e.pool.alloc(b)
                if gpa is None:
                    break
                e.pool.view(gpa, b)[:] = src
                chunk.append((s, b, gpa))
                budget -= b
            if not chunk:
                raise DriverError("buffer pool exhausted")
            try:
                g = self._run([(S.VIRTIO_BLK_T_OUT, s, gpa, b) for s, b, gpa in chunk])
                e.raise_for(g, S.VIRTIO_BLK_T_OUT, [s for s, _, _ in chunk])
            finally:
                for _, b, gpa in chunk:
                    e.pool.free(gpa, b)
            done += len(chunk)

    def flush(self) -> None:
        """VIRTIO_BLK_T_FLUSH: everything completed before is durable when this returns."""
        if self.e.broken is not None:
            raise self.e.broken
        if not self.e.driver.has(S.VIRTIO_BLK_F_FLUSH):
            return  # no volatile cache: writes are durable on completion (§5.2.6.2)
        g = self._run([(S.VIRTIO_BLK_T_FLUSH, 0, 0, 0)])
        self.e.raise_for(g, S.VIRTIO_BLK_T_FLUSH, [0])

    def _ranges_op(self, rtype: int, feature: int, ranges: Sequence[tuple[int, int]], flags: int) -> None:
        e = self.e
        for first_sector, raw in e.segment_payloads(rtype, feature, ranges, flags):
            gpa = self._alloc(len(raw))
            try:
                e.pool.view(gpa, len(raw))[:] = np.frombuffer(raw, dtype=np.uint8)
                g = self._run([(rtype, 0, gpa, len(raw))])
                e.raise_for(g, rtype, [first_sector])
            finally:
                e.pool.free(gpa, len(raw))

    def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """VIRTIO_BLK_T_DISCARD the (sector, nsectors) ranges: they may read back as anything."""
        self._ranges_op(S.VIRTIO_BLK_T_DISCARD, S.VIRTIO_BLK_F_DISCARD, ranges, 0)

    def write_zeroes(self, ranges: Sequence[tuple[int, int]], *, unmap: bool = False) -> None:
        """VIRTIO_BLK_T_WRITE_ZEROES: the ranges read back as zeros (``unmap`` lets the device deallocate)."""
        flags = S.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        self._ranges_op(S.VIRTIO_BLK_T_WRITE_ZEROES, S.VIRTIO_BLK_F_WRITE_ZEROES, ranges, flags)

    def get_id(self) -> bytes:
        """VIRTIO_BLK_T_GET_ID: the device serial, without trailing NULs."""
        gpa = self._alloc(S.VIRTIO_BLK_ID_BYTES)
        try:
            g = self._run([(S.VIRTIO_BLK_T_GET_ID, 0, gpa, S.VIRTIO_BLK_ID_BYTES)])
            self.e.raise_for(g, S.VIRTIO_BLK_T_GET_ID, [0])
            return bytes(self.e.pool.view(gpa, S.VIRTIO_BLK_ID_BYTES)).rstrip(b"\0")
        finally:
            self.e.pool.free(gpa, S.VIRTIO_BLK_ID_BYTES)

    def submit_batch(self, batch: Batch) -> None:
        """Run a :class:`Batch` of requests on caller-owned pool buffers; raise on the first failure."""
        e = self.e
        for start in range(0, len(batch), len(e.st_rtype)):
            part = batch if len(batch) <= len(e.st_rtype) else _slice(batch, start, len(e.st_rtype))
            g = e.new_group(len(part), self._mark)
            if g is None:
                raise DriverError("internal: out of request groups")
            e.stage_batch(part, g)
            e.flush()
            self._wait(g)
            e.raise_for(g, part.rtype.tolist(), part.sector.tolist())

    def _alloc(self, nbytes: int) -> int:
        gpa = self.e.pool.alloc(nbytes)
        if gpa is None:
            raise DriverError("guest buffer pool exhausted")
        return gpa


def _refuse_abort(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _slice(b: Batch, start: int, n: int) -> Batch:
    s = slice(start, start + n)
    return Batch(b.rtype[s], b.sector[s], b.buf[s], b.nbytes[s])


# ---------------------------------------------------------------------------------
# trio front end


class TrioBlk:
    """Concurrent block I/O for trio tasks; see the module docstring.

    Use through :meth:`ledger.Ledger.trio` (``async with ledger.trio() as blk``),
    which runs the reaper tasks in a nursery for the client's lifetime.
    """

    def __init__(self, engine: Engine, *, poll_us: int = 30) -> None:
        self.e = engine
        self.poll_ns = poll_us * 1000
        self.window = PollWindow(self.poll_ns)
        #: optional hint from the application: is other work queued for this thread?  (Then a
        #: request is not "alone" even when it is the only one in flight here.)
        self.contended: Callable[[], bool] | None = None
        # group -> the task waiting for it (None: nobody waits yet). A group leaves
        # the dict when it completes, so "g not in _waiters" means "done".
        self._waiters: dict[int, trio.lowlevel.Task | None] = {}
        self._flush_pending = False
        self._active = 0  # tasks inside _submit_group (staging or waiting)
        self._alone_run = 0  # requests in a row that were alone (see _submit_group)
        self._work = [trio.Event() for _ in engine.queues]
        self._space = trio.Event()  # set when descriptors, staging room, groups or buffers come back
        self._space_waiters = 0
        engine.on_space = self._wake_space

    @property
    def capacity(self) -> int:
        return self.e.capacity

    # --- plumbing ---------------------------------------------------------------

    def _mark(self, g: int) -> None:
        if g in self._waiters:
            task = self._waiters.pop(g)
            if task is not None:
                trio.lowlevel.reschedule(task)

    def _wake_space(self) -> None:
        if self._space_waiters:
            self._space.set()
            self._space = trio.Event()

    async def _wait_space(self) -> None:
        self._space_waiters += 1
        try:
            await self._space.wait()
        finally:
            self._space_waiters -= 1

    def _kick_reapers(self) -> None:
        for i, q in enumerate(self.e.queues):
            if q.inflight:
                self._work[i].set()

    async def _submit_group(self, reqs: Sequence[tuple[int, int, int, int]] | Batch) -> int:
        e = self.e
        n = len(reqs)
        # The cancellation point comes before anything is staged: from here on the
        # group belongs to the device until it completes, and the caller releases it.
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if e.broken is not None:
                raise e.broken
            if e.free_groups and e.staging_room() >= n:
                break
            await self._wait_space()
        g = e.new_group(n, self._mark)
        assert g is not None  # checked above, and nothing awaited since
        self._waiters[g] = None
        self._active += 1
        try:
            if self._flush_pending:
                # Another task yielded before flushing: its flush publishes ours too.
                self._stage(reqs, g)
            else:
                staged = self._active > 1
                if staged:
                    # Other tasks use the ledger: yield once so that those runnable
                    # now stage their requests too; one kernel call publishes them all.
                    self._stage(reqs, g)
                    self._flush_pending = True
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    self._flush_pending = False
                # Route (devices with trapped and worker queues): a trapped queue serves the
                # request before flush returns, with no hand-off and no wake-up, but blocks this
                # thread meanwhile (a disk read: ~0.1 ms) - worth it for a serial client (a run of
                # requests that each were alone), not when others may come meanwhile.  The pieces
                # of a serial client's large read go to every queue: the workers move theirs while
                # the trapped queue moves its own.
                alone = self._alone()
                self._alone_run = self._alone_run + 1 if alone else 0
                serial = self._alone_run >= ALONE_RUN_TO_TRAP
                took = -1
                if serial and n == 1 and not staged and not isinstance(reqs, Batch):
                    # Nothing of ours is staged yet: one kernel call publishes, serves and
                    # harvests it (Engine.run_trapped).
                    t, sector, buf, nbytes = reqs[0]
                    took = e.run_trapped(g, t, sector, buf, nbytes)
                    if took == 1:
                        del self._waiters[g]
                        return g
                if took < 0:
                    if not staged:
                        self._stage(reqs, g)
                    e.flush((n == 1 or None) if serial else False)
                    if serial and n == 1:
                        # Served during the notify: the completion is in a trapped queue's used ring.
                        for q in e.trapped:
                            if q.inflight:
                                self._reap(q)
                # The flushing task polls for the completions itself (its own and
                # those of the requests it published for others) instead of paying
                # two task switches through the reaper, while polling pays (PollWindow).
                budget = self.window.budget(alone) if g in self._waiters else 0
                if budget:
                    self._poll_inline(g, budget)
                    if not alone:
                        self.window.record(g not in self._waiters)
                # Whatever is still in flight (ours or other tasks') needs a reaper.
                self._kick_reapers()
            if g in self._waiters:
                # Uninterruptible, like a kernel waiting out DMA: the device owns the
                # buffers until the group completes (cheaper than a shielded scope).
                self._waiters[g] = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
        finally:
            self._active -= 1
        return g

    def _stage(self, reqs: Sequence[tuple[int, int, int, int]] | Batch, g: int) -> None:
        if isinstance(reqs, Batch):
            self.e.stage_batch(reqs, g)
        else:
            for i, (t, sector, buf, nbytes) in enumerate(reqs):
                self.e.stage(t, sector, buf, nbytes, g, i)

    def _alone(self) -> bool:
        """One request group in flight and no other work queued for this thread (PollWindow)."""
        return len(self._waiters) == 1 and not (self.contended and self.contended())

    def _poll_inline(self, g: int, budget_ns: int) -> None:
        e = self.e
        deadline = time.monotonic_ns() + budget_ns
        while g in self._waiters:
            busy = [q for q in e.queues if q.inflight]
            if not busy:
                return
            budget = deadline - time.monotonic_ns()
            if budget <= 0:
                return
            for q in busy:
                if K.poll_used(e.mem, q.q, budget // len(busy)):
                    self._reap(q)

    async def _alloc_first(self, nbytes: int, *, held: bool) -> int | None:
        """A buffer for the next piece of a multi-request operation.

        A task that already holds buffers never waits for more (None when the pool is short):
        two tasks each holding part of what they need and waiting for the rest would wait
        forever.  The caller submits what it holds and comes back for the remainder.
        """
        if held:
            return self.e.pool.alloc(nbytes)
        return await self._alloc(nbytes)

    async def _alloc(self, nbytes: int) -> int:
        while True:
            gpa = self.e.pool.alloc(nbytes)
            if gpa is not None:
                return gpa
            if self.e.broken is not None:
                raise self.e.broken
            await self._wait_space()

    def _free(self, gpa: int, nbytes: int) -> None:
        self.e.pool.free(gpa, nbytes)
        self._wake_space()

    async def run_reapers(self) -> None:
        """Run one reaper per queue until cancelled (the ledger's nursery does this)."""
        async with trio.open_nursery() as nursery:
            for i in range(len(self.e.queues)):
                nursery.start_soon(self._reaper, i)

    async def _reaper(self, i: int) -> None:
        e = self.e
        q = e.queues[i]
        mem = e.mem
        while True:
            if not q.inflight:
                self._work[i] = trio.Event()
                if not q.inflight:
                    await self._work[i].wait()
                continue
            alone = self._alone()
            budget = self.window.budget(alone)
            if budget:
                caught = bool(K.poll_used(mem, q.q, budget))
                if not alone:
                    self.window.record(caught)
                if caught:
                    self._reap(q)
                    await trio.lowlevel.checkpoint()
                    continue
            elif K.poll_used(mem, q.q, 0):  # already there: no spin needed to see it
                self._reap(q)
                await trio.lowlevel.checkpoint()
                continue
            if K.set_interrupts(mem, q.q, True):
                K.set_interrupts(mem, q.q, False)
                continue
            q.sleepers += 1
            try:
                await trio.lowlevel.wait_readable(q.interrupt_fd)
            finally:
                q.sleepers -= 1
            with contextlib.suppress(BlockingIOError):
                os.read(q.interrupt_fd, 8)
            if not q.sleepers:
                K.set_interrupts(mem, q.q, False)
            e.check_device()
            self._reap(q)

    def _reap(self, q: DriverQueue) -> None:
        e = self.e
        before = q.num_free
        e.harvest(q)
        if e.staged:
            e.flush(False)
            self._kick_reapers()
        if q.num_free != before or e.broken is not None:
            self._wake_space()

    # --- public API ---------------------------------------------------------------

    async def read(self, sector: int, nsectors: int) -> bytes:
        """Read ``nsectors`` sectors at ``sector``."""
        e = self.e
        e.check_range(sector, nsectors, False)
        total = nsectors * SECTOR
        if total <= e.max_request:  # the common case: one request, no splitting
            gpa = await self._alloc(total)
            try:
                g = await self._submit_group(((S.VIRTIO_BLK_T_IN, sector, gpa, total),))
                e.raise_for(g, S.VIRTIO_BLK_T_IN, (sector,))
                return e.pool.view(gpa, total).tobytes()
            finally:
                self._free(gpa, total)
        return (await self.readv([(sector, nsectors)]))[0]

    async def read_parallel(self, sector: int, nsectors: int) -> bytes:
        """:meth:`read`, cut into one piece per queue so that the device's workers move it in parallel.

        For reads of up to one request (each piece at least :data:`PARALLEL_MIN_PIECE`, 4 KiB
        aligned); others are a plain :meth:`read`.  The pieces are one
        group (one wait) into one pool buffer, copied out once (as ``read``).
        """
        e = self.e
        total = nsectors * SECTOR
        n = min(len(e.queues), total // PARALLEL_MIN_PIECE)
        if n < 2 or total > e.max_request:  # larger: read() goes through readv, many requests already
            return await self.read(sector, nsectors)
        e.check_range(sector, nsectors, False)
        step = min(e.max_request, (-(-total // n) + 4095) // 4096 * 4096)
        parts = [(off, min(step, total - off)) for off in range(0, total, step)]
        # One buffer for all the pieces (each request covers its part of it): the same pool
        # class as a plain read, and nothing held while waiting for more.
        gpa = await self._alloc(total)
        try:
            reqs = [(S.VIRTIO_BLK_T_IN, sector + off // SECTOR, gpa + off, b) for off, b in parts]
            g = await self._submit_group(reqs)
            e.raise_for(g, S.VIRTIO_BLK_T_IN, [sector + off // SECTOR for off, _ in parts])
            return e.pool.view(gpa, total).tobytes()
        finally:
            self._free(gpa, total)

    async def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (whole sectors) at ``sector``."""
        e = self.e
        src = np.frombuffer(data, dtype=np.uint8)
        if len(src) % SECTOR:
            raise DriverError(f"write of {len(src)} bytes is not a whole number of 512-byte sectors")
        e.check_range(sector, len(src) // SECTOR, True)
        total = len(src)
        if total <= e.max_request:  # the common case: one request, no splitting
            gpa = await self._alloc(total)
            try:
                e.pool.view(gpa, total)[:] = src
                g = await self._submit_group(((S.VIRTIO_BLK_T_OUT, sector, gpa, total),))
                e.raise_for(g, S.VIRTIO_BLK_T_OUT, (sector,))
                return
            finally:
                self._free(gpa, total)
        pieces = e.split(sector, total)
        done = 0
        while done < len(pieces):
            chunk: list[tuple[int, int, int]] = []  # (sector, bytes, gpa)
            room = max(e.max_request, 8 << 20)
            try:
                while done + len(chunk) < len(pieces) and (not chunk or room > 0):
                    s, n = pieces[done + len(chunk)]
                    piece_gpa = await self._alloc_first(n, held=bool(chunk))
                    if piece_gpa is None:
                        break  # the pool is short: move what we hold, come back for the rest
                    pos = (s - sector) * SECTOR
                    e.pool.view(piece_gpa, n)[:] = src[pos : pos + n]
                    chunk.append((s, n, piece_gpa))
                    room -= n
                g = await self._submit_group([(S.VIRTIO_BLK_T_OUT, s, gpa, n) for s, n, gpa in chunk])
                e.raise_for(g, S.VIRTIO_BLK_T_OUT, [s for s, _, _ in chunk])
            finally:
                for _, n, gpa in chunk:
                    self._free(gpa, n)
            done += len(chunk)

    async def readv(self, requests: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read many (sector, nsectors) ranges with all their requests in flight at once.

        One group for everything: the task waits once, however many requests
        the ranges take.  Ranges larger than the buffer pool's share are done
        in windows, one after another.
        """
        e = self.e
        pieces: list[tuple[int, int, int]] = []  # (owner, sector, bytes)
        for i, (sector, n) in enumerate(requests):
            e.check_range(sector, n, False)
            pieces.extend((i, s, b) for s, b in e.split(sector, n * SECTOR))
        out = [bytearray(n * SECTOR) for _, n in requests]
        budget = max(e.max_request, (self.e.pool.end - self.e.pool.base) // 4)
        done = 0
        while done < len(pieces):
            chunk: list[tuple[int, int, int, int]] = []
            room = budget
            try:
                while done + len(chunk) < len(pieces) and (not chunk or room > 0):
                    i, s, b = pieces[done + len(chunk)]
                    piece_gpa = await self._alloc_first(b, held=bool(chunk))
                    if piece_gpa is None:
                        break  # the pool is short: move what we hold, come back for the rest
                    chunk.append((i, s, b, piece_gpa))
                    room -= b
                g = await self._submit_group([(S.VIRTIO_BLK_T_IN, s, gpa, b) for _, s, b, gpa in chunk])
                e.raise_for(g, S.VIRTIO_BLK_T_IN, [s for _, s, _, _ in chunk])
                for i, s, b, gpa in chunk:
                    pos = (s - requests[i][0]) * SECTOR
                    memoryview(out[i])[pos : pos + b] = e.pool.view(gpa, b).data
            finally:
                for _, _, b, gpa in chunk:
                    self._free(gpa, b)
            done += len(chunk)
        return [bytes(o) for o in out]

    async def flush(self) -> None:
        """VIRTIO_BLK_T_FLUSH: all writes completed before it are durable when it returns."""
        if not self.e.driver.has(S.VIRTIO_BLK_F_FLUSH):
            return
        g = await self._submit_group([(S.VIRTIO_BLK_T_FLUSH, 0, 0, 0)])
        self.e.raise_for(g, S.VIRTIO_BLK_T_FLUSH, [0])

    async def _ranges_op(
        self, rtype: int, feature: int, ranges: Sequence[tuple[int, int]], flags: int
    ) -> None:
        e = self.e
        for first_sector, raw in e.segment_payloads(rtype, feature, ranges, flags):
            gpa = await self._alloc(len(raw))
            try:
                e.pool.view(gpa, len(raw))[:] = np.frombuffer(raw, dtype=np.uint8)
                g = await self._submit_group([(rtype, 0, gpa, len(raw))])
                e.raise_for(g, rtype, [first_sector])
            finally:
                self._free(gpa, len(raw))

    async def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """VIRTIO_BLK_T_DISCARD the (sector, nsectors) ranges."""
        await self._ranges_op(S.VIRTIO_BLK_T_DISCARD, S.VIRTIO_BLK_F_DISCARD, ranges, 0)

    async def write_zeroes(self, ranges: Sequence[tuple[int, int]], *, unmap: bool = False) -> None:
        """VIRTIO_BLK_T_WRITE_ZEROES the (sector, nsectors) ranges."""
        flags = S.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        await self._ranges_op(S.VIRTIO_BLK_T_WRITE_ZEROES, S.VIRTIO_BLK_F_WRITE_ZEROES, ranges, flags)

    async def get_id(self) -> bytes:
        """VIRTIO_BLK_T_GET_ID: the device serial without trailing NULs."""
        n = S.VIRTIO_BLK_ID_BYTES
        gpa = await self._alloc(n)
        try:
            g = await self._submit_group([(S.VIRTIO_BLK_T_GET_ID, 0, gpa, n)])
            self.e.raise_for(g, S.VIRTIO_BLK_T_GET_ID, [0])
            return bytes(self.e.pool.view(gpa, n)).rstrip(b"\0")
        finally:
            self._free(gpa, n)

    def alloc_buffer(self, nbytes: int) -> tuple[int, npt.NDArray[np.uint8]]:
        """A guest buffer for :class:`Batch` requests: (GPA, writable numpy view)."""
        gpa = self.e.pool.alloc(nbytes)
        if gpa is None:
            raise DriverError("guest buffer pool exhausted")
        return gpa, self.e.pool.view(gpa, nbytes)

    async def submit_batch(self, batch: Batch) -> None:
        """Submit a whole :class:`Batch` with one kernel call (one kick) and wait for all of it.

        Raises:
            IOFailure: for the lowest-indexed failed request (``.index``).
        """
        if len(batch) > len(self.e.st_rtype):
            raise DriverError(
                f"batch of {len(batch)} is larger than the staging area ({len(self.e.st_rtype)})"
            )
        g = await self._submit_group(batch)
        self.e.raise_for(
            g,
            batch.rtype.tolist() if self.e.grp_err_status[g] else 0,
            batch.sector.tolist() if self.e.grp_err_status[g] else [],
        )

    def start_batch(self, batch: Batch) -> BatchTicket:
        """Publish a :class:`Batch` now and return without waiting (fio's async submit).

        The caller keeps working — typically filling the next batch — while the
        device moves this one; :meth:`finish_batch` waits for it.  Two batches
        in turn keep the device and the driver busy at the same time.

        Raises:
            DriverError: no room (too many batches started and not finished).
        """
        e = self.e
        if e.broken is not None:
            raise e.broken
        if len(batch) > e.staging_room() or not e.free_groups:
            raise DriverError("no room to start another batch: finish one first")
        g = e.new_group(len(batch), self._mark)
        assert g is not None
        self._waiters[g] = None
        e.stage_batch(batch, g)
        e.flush(False)
        return BatchTicket(g, batch)

    async def finish_batch(self, ticket: BatchTicket) -> None:
        """Wait for a batch from :meth:`start_batch`; raise :class:`IOFailure` for its first failure."""
        g = ticket.group
        if g in self._waiters:
            self._poll_inline(g, self.poll_ns)
        if g in self._waiters:
            self._kick_reapers()
            self._waiters[g] = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        b = ticket.batch
        failed = bool(self.e.grp_err_status[g])
        self.e.raise_for(g, b.rtype.tolist() if failed else 0, b.sector.tolist() if failed else [])


@dataclass(frozen=True)
class BatchTicket:
    """A batch in flight, from :meth:`TrioBlk.start_batch`."""

    group: int
    batch: Batch
