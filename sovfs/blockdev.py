"""The block device contract SovFS sits on.

Theory of operation
-------------------
Every byte SovFS reads or writes goes through a :class:`BlockDevice`: the lead's ``LedgerBlockDevice``
(virtio-blk driver over the ledger) in production, the same driver over the RAM backend in tests.  Offsets
and lengths are multiples of 512.  Each request costs a ledger round trip, but many may be in flight, so
callers batch: the cache writes a transaction's dirty blocks with one :meth:`pwritev`, file I/O reads a
whole extent with one :meth:`pread`, read-ahead uses :meth:`preadv`.

:func:`open_block_device` is the one way a command-line tool opens an image file.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from ledger._machine import Ledger
from ledger._spec import VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES
from ledger._spec import VIRTIO_BLK_SECTOR_SIZE as SECTOR
from ledger.client import TrioBlk

__all__ = ["BlockDevice", "Buffer", "LedgerBlockDevice", "open_block_device", "ram_block_device"]

Buffer = bytes | bytearray | memoryview


class BlockDevice(Protocol):
    size: int  # capacity in bytes (multiple of 512)
    read_only: bool

    def pread(self, offset: int, length: int) -> bytes: ...  # offset/length multiples of 512

    def pwrite(self, offset: int, data: Buffer) -> None: ...

    def preadv(self, requests: Sequence[tuple[int, int]]) -> list[bytes]: ...  # batched, many in flight

    def pwritev(self, requests: Sequence[tuple[int, Buffer]]) -> None: ...

    def flush(self) -> None: ...  # durable: VIRTIO_BLK_T_FLUSH

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


class LedgerBlockDevice:
    """A :class:`BlockDevice` over the ledger's blocking front end.

    The only way SovFS reaches the image: each call becomes virtio-blk
    requests that the device half of the ledger serves.  Vectored calls put all
    their requests in flight at once.

    Args:
        ledger: the driver/device pair; closed with this device when ``own`` is true.
    """

    def __init__(self, ledger: Ledger, *, own: bool = True) -> None:
        self.ledger = ledger
        self._blk = ledger.sync()
        self._own = own
        self.size = ledger.capacity_sectors * SECTOR
        self.read_only = ledger.driver.read_only
        self._trio: TrioBlk | None = None

    def pread(self, offset: int, length: int) -> bytes:
        return self._blk.read(offset // SECTOR, length // SECTOR)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self._blk.write(offset // SECTOR, data)

    def preadv(self, requests: Sequence[tuple[int, int]]) -> list[bytes]:
        return self._blk.readv([(off // SECTOR, ln // SECTOR) for off, ln in requests])

    def pwritev(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        self._blk.writev([(off // SECTOR, data) for off, data in requests])

    def flush(self) -> None:
        self._blk.flush()

    def stats(self) -> dict[str, Any] | None:
        """The ledger device's per-queue statistics (``VirtioBlkDevice.stats``), or None when the
        device is not in this process."""
        dev = self.ledger.device
        return None if dev is None else dev.stats()

    def discard(self, offset: int, length: int) -> None:
        if self.ledger.driver.has(VIRTIO_BLK_F_DISCARD):
            self._blk.discard([(offset // SECTOR, length // SECTOR)])

    def write_zeroes(self, offset: int, length: int) -> None:
        if self.ledger.driver.has(VIRTIO_BLK_F_WRITE_ZEROES):
            self._blk.write_zeroes([(offset // SECTOR, length // SECTOR)])
        else:
            step = 1 << 20
            for pos in range(offset, offset + length, step):
                self._blk.write(pos // SECTOR, bytes(min(step, offset + length - pos)))

    @contextlib.asynccontextmanager
    async def serving(self, contended: Callable[[], bool] | None = None) -> AsyncIterator[None]:
        """While inside (in a trio task), :meth:`preadv_async` uses the ledger's trio front end.

        ``contended``: says whether other work is queued for this thread (the FUSE daemon passes
        "requests are waiting on /dev/fuse"); the front end then spins on the used ring only while
        spinning catches completions (:class:`ledger.client.PollWindow`).
        """
        async with self.ledger.trio() as blk:
            blk.contended = contended
            self._trio = blk
            try:
                yield
            finally:
                self._trio = None

    async def preadv_async(self, requests: Sequence[tuple[int, int]]) -> Sequence[bytes | bytearray]:
        """:meth:`preadv` that lets other trio tasks run while the data is in flight.

        A single large range is cut over the ledger's queues, so that the device's worker
        threads read its pieces in parallel.  Outside
        :meth:`serving` it is the blocking call.
        """
        if self._trio is None:
            return self.preadv(requests)
        if len(requests) == 1:  # the common read: one range, none of readv's windowing
            off, ln = requests[0]
            return [await self._trio.read_parallel(off // SECTOR, ln // SECTOR)]
        return await self._trio.readv([(off // SECTOR, ln // SECTOR) for off, ln in requests])

    def close(self) -> None:
        if self._own:
            self.ledger.close()


def open_block_device(path: str, read_only: bool = False, **ledger_options: Any) -> LedgerBlockDevice:
    """Open the image file at ``path`` through the ledger driver.

    ``ledger_options`` go to :meth:`ledger.Ledger.open` (queues, polling windows, direct reads, write-behind).

    Raises:
        ledger.backend.BackendError: the file is missing, unreadable, or not a
            whole number of 512-byte sectors.
    """
    return LedgerBlockDevice(Ledger.open(path, read_only=read_only, **ledger_options))


def ram_block_device(nbytes: int) -> LedgerBlockDevice:
    """A zero-filled RAM disk behind the same driver/device pair, for tests and tools."""
    return LedgerBlockDevice(Ledger.ram(nbytes))
