"""The ledger as a whole: guest memory, a device on an image, and the driver.

Theory of operation
-------------------
:class:`Ledger` plays the hypervisor: it creates guest memory, plugs a
:class:`~ledger.device.VirtioBlkDevice` serving an image (or RAM) into it, and
lets the :class:`~ledger.driver.VirtioBlkDriver` probe and initialise that
device through its registers, exactly as a guest kernel would.  What callers
use is one of the two front ends over the driver:

* ``ledger.sync()`` - a :class:`~ledger.client.SyncBlk` for blocking code;
* ``async with ledger.trio() as blk`` - a :class:`~ledger.client.TrioBlk`
  whose reaper tasks live in a nursery for the duration of the block.

The Numba kernels are compiled (or loaded from the on-disk cache) the first
time this module builds a ledger, before any trio code runs, so compilation
never stalls an event loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from . import _driver_kernels as K
from ._device_kernel import DIRECT_MIN
from ._trap_kernel import bind as bind_trapped
from .backend import Backend, CrashBackend, FileBackend, RamBackend
from .client import Engine, SyncBlk, TrioBlk
from .device import VirtioBlkDevice
from .driver import VirtioBlkDriver
from .memory import GuestMemory

#: Guest memory besides the buffer pool: rings, headers, indirect tables.
_RING_OVERHEAD_PER_QUEUE = 1 << 20


class Ledger:
    """A virtio-blk device on ``backend`` and the driver that talks to it.

    Args:
        backend: what the device serves (``FileBackend`` or ``RamBackend``);
            closed by :meth:`close` when ``own_backend`` is true.
        num_queues: queues to ask for (the device offers ``device_queues``).
        queue_size: entries per queue (≤ 1024).
        features: mask of features the driver may accept (tests use it to
            switch off EVENT_IDX, INDIRECT_DESC, MQ); ``None`` = all.
        pool_bytes: guest memory for data buffers.
        diag_log: a file that the device's diagnostics (refused requests, protocol
            errors) are appended to when the ledger closes; nothing is written
            when there are none.  ``ledger diag`` prints it.
        device_options: passed to :class:`VirtioBlkDevice` (``completion_order``,
            ``spin_us``, ``serial`` ...).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        num_queues: int = 2,
        queue_size: int = 256,
        features: int | None = None,
        pool_bytes: int = 32 << 20,
        max_request_bytes: int = 1 << 20,
        own_backend: bool = True,
        poll_us: int = 50,
        diag_log: str | os.PathLike[str] | None = None,
        **device_options: Any,
    ) -> None:
        self.backend = backend
        self._own_backend = own_backend
        self._sync: SyncBlk | None = None
        self.diag_log = Path(diag_log) if diag_log is not None else None
        device_queues = device_options.pop("device_queues", max(num_queues, 1))
        self.memory = GuestMemory(pool_bytes + _RING_OVERHEAD_PER_QUEUE * (device_queues + 1))
        self.device: VirtioBlkDevice | None = None
        try:
            self.device = VirtioBlkDevice(backend, self.memory, num_queues=device_queues, **device_options)
            self.driver = VirtioBlkDriver(
                self.device, self.memory, queue_size=queue_size, num_queues=num_queues,
                features=features, max_request_bytes=max_request_bytes,
            )  # fmt: skip
            # The driver's engine gets the fused kernel for trapped queues from here, the one
            # place that knows driver and device are in the same process (ledger._trap_kernel).
            self.engine = Engine(self.driver, pool_bytes=pool_bytes, trap_binder=bind_trapped)
            self._poll_us = poll_us
            self._sync = None
            self._warm_up()
        except BaseException:
            self.close()
            raise

    def _warm_up(self) -> None:
        """Run every kernel once, now, so none is compiled inside an event loop.

        With Numba's on-disk cache warm this costs one request round trip and
        a few cache loads; cold, it is where compilation happens (see
        docs/BENCHMARKS.md for both figures).  The device's worker compiles in
        its own thread, but holds the GIL while it does, so waiting for the
        first request here is what keeps it off the caller's path.
        """
        self.sync().read(0, 1)
        q = self.driver.queues[0]
        K.poll_used(self.engine.mem, q.q, 0)
        K.set_interrupts(self.engine.mem, q.q, False)
        self.engine.warm_up()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct_reads: bool = False,
        direct_min: int = DIRECT_MIN,
        direct_writes: bool = False,
        write_behind: bool = True,
        **kwargs: Any,
    ) -> Ledger:
        """A ledger on an image file (which must exist and be a multiple of 512 bytes).

        ``direct_reads``: aligned reads of ``direct_min`` bytes or more go around the host page
        cache (``direct_writes``: writes too); ``write_behind``: workers start the write-back of
        large writes once they completed them (:class:`FileBackend`).
        """
        backend = FileBackend(
            Path(path), read_only=read_only, direct_reads=direct_reads, direct_min=direct_min,
            direct_writes=direct_writes, write_behind=write_behind,
        )  # fmt: skip
        try:
            return cls(backend, **kwargs)
        except BaseException:
            backend.close()
            raise

    @classmethod
    def ram(cls, nbytes: int, **kwargs: Any) -> Ledger:
        """A ledger on a zero-filled RAM disk of ``nbytes`` bytes."""
        return cls(RamBackend(nbytes), **kwargs)

    @classmethod
    def crash(cls, backend: CrashBackend, **kwargs: Any) -> Ledger:
        """A one-queue ledger on a :class:`CrashBackend`, which outlives it (for ``power_cut``)."""
        kwargs.setdefault("own_backend", False)
        return cls(backend, num_queues=1, device_queues=1, **kwargs)

    @property
    def capacity_sectors(self) -> int:
        return self.driver.capacity_sectors

    def sync(self) -> SyncBlk:
        """The blocking front end (one per ledger)."""
        if self._sync is None:
            self._sync = SyncBlk(self.engine, poll_us=self._poll_us)
        return self._sync

    @asynccontextmanager
    async def trio(self, *, poll_us: int | None = None) -> AsyncIterator[TrioBlk]:
        """The trio front end, with its reaper tasks running inside the block."""
        blk = TrioBlk(self.engine, poll_us=self._poll_us if poll_us is None else poll_us)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blk.run_reapers)
            try:
                yield blk
            finally:
                nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Stop the device (draining in-flight requests) and release everything. Idempotent."""
        if self.device is not None:
            self.device.close()
            self._save_diagnostics(self.device)
            self.device = None
        if self._own_backend:
            self.backend.close()
        self.memory.close()

    def _save_diagnostics(self, device: VirtioBlkDevice) -> None:
        if self.diag_log is None:
            return
        diags = device.diagnostics()
        if not diags:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError), open(self.diag_log, "a", encoding="utf-8") as f:
            for d in diags:
                f.write(f"{stamp} {d}\n")

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
