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

from collections.abc import Sequence
from typing import Protocol

__all__ = ["BlockDevice", "Buffer", "open_block_device"]

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


def open_block_device(path: str, read_only: bool = False) -> BlockDevice:
    """Open the image file at ``path`` through the ledger driver."""
    raise NotImplementedError("ledger driver not merged yet")
