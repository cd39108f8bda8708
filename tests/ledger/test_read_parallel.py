"""TrioBlk.read_parallel: a large read cut over the queues returns exactly what read() does."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ledger import Ledger, RamBackend
from ledger import _driver_kernels as K
from ledger.client import PARALLEL_MIN_PIECE, SECTOR


def _ledger(nbytes: int, **kw: object) -> Ledger:
    led = Ledger(RamBackend(nbytes), **kw)  # type: ignore[arg-type]
    assert isinstance(led.backend, RamBackend)
    led.backend.ram[:] = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    return led


@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [
        (0, 1 << 20),  # one max-size request, two pieces
        (7, (1 << 20) - 3 * SECTOR),  # unaligned start and length
        (1, 2 * PARALLEL_MIN_PIECE + SECTOR),  # a short last piece
        (3, PARALLEL_MIN_PIECE),  # too small to cut: one plain read
        (0, 2 << 20),  # larger than one request: a plain read
    ],
)
async def test_read_parallel_matches_the_disk(sector: int, nbytes: int) -> None:
    led = _ledger(8 << 20)
    try:
        ram = led.backend.ram  # type: ignore[attr-defined]
        async with led.trio() as blk:
            got = await blk.read_parallel(sector, nbytes // SECTOR)
            assert bytes(got) == bytes(ram[sector * SECTOR : sector * SECTOR + nbytes])
            assert bytes(got) == await blk.read(sector, nbytes // SECTOR)
    finally:
        led.close()


async def test_read_parallel_uses_every_queue() -> None:
    """The pieces of one large read are dealt out to both queues (both workers move data) ..."""
    led = _ledger(8 << 20, num_queues=2)
    try:
        qs = led.driver.queues
        async with led.trio() as blk:
            before = [int(q.q[K.Q_SUBMITTED]) for q in qs]
            got = await blk.read_parallel(0, (1 << 20) // SECTOR)
            after = [int(q.q[K.Q_SUBMITTED]) for q in qs]
            assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
            # ... while a batch of small requests still goes to one queue whole.
            before = after
            await blk.readv([(0, 8), (100, 8)])
            after = [int(q.q[K.Q_SUBMITTED]) for q in qs]
            assert sorted(a - b for a, b in zip(after, before, strict=True)) == [0, 2]
        assert bytes(got) == bytes(led.backend.ram[: 1 << 20])  # type: ignore[attr-defined]
    finally:
        led.close()


async def test_read_parallel_with_a_short_pool_never_deadlocks() -> None:
    """Many concurrent large reads on a pool with an odd number of piece buffers all finish."""
    import trio

    led = _ledger(16 << 20, pool_bytes=3 << 20)
    try:
        ram = led.backend.ram  # type: ignore[attr-defined]
        got: dict[int, bytes] = {}
        async with led.trio() as blk:

            async def reader(i: int) -> None:
                got[i] = bytes(await blk.read_parallel(i * 2048, 2048))

            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    for i in range(12):
                        n.start_soon(reader, i)
        assert got == {i: bytes(ram[i << 20 : (i + 1) << 20]) for i in range(12)}
    finally:
        led.close()
