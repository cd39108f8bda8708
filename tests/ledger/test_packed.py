"""Kernels entered through an address table (ledger._native.address_table): the engine's packed
publish and harvest move the same requests as the plain calls, and only exact arrays are packed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import trio

from ledger import _driver_kernels as K
from ledger._machine import Ledger
from ledger._native import address_table

MB = 1 << 20


def test_address_table_takes_only_arrays_of_exactly_the_dtypes() -> None:
    a, b = np.zeros(8, np.int32), np.zeros(3, np.uint8)
    tab = address_table((a, b), (np.int32, np.uint8))
    assert tab is not None and tab.tolist() == [[a.ctypes.data, 8], [b.ctypes.data, 3]]
    assert address_table((a, b), (np.int64, np.uint8)) is None  # another dtype
    assert address_table((a[::2], b), (np.int32, np.uint8)) is None  # not contiguous
    ro = b.copy()
    ro.flags.writeable = False
    assert address_table((a, ro), (np.int32, np.uint8)) is None  # read-only
    assert address_table((a,), (np.int32, np.uint8)) is None  # too few
    assert address_table((a, np.zeros((2, 2), np.uint8)), (np.int32, np.uint8)) is None  # 2-D


@pytest.mark.parametrize("packed", [True, False])
def test_worker_queues_move_the_same_bytes_packed_or_not(packed: bool) -> None:
    """Concurrent trio tasks on worker queues (every request published by submit_packed and reaped
    by harvest_packed, or by the plain kernels when the engine's tables are dropped): every read
    returns what was written, and every request completes."""
    with Ledger.ram(8 * MB, num_queues=2, device_queues=2, notify="eventfd") as led:
        e = led.engine
        assert len(e._qtabs) == len(e.queues)  # the engine bound every queue
        assert all(len(arrays) == len(K.DRIVER_ARRAY_DTYPES) for _, _, arrays in e._qtabs.values())
        if not packed:
            e._qtabs.clear()
        model = bytearray(8 * MB)

        async def main() -> None:
            async with led.trio() as blk:

                async def worker(seed: int) -> None:
                    rng = random.Random(seed)
                    base = seed * (MB // 512)  # each task its own MiB
                    for _ in range(150):
                        s = base + rng.randrange(0, MB // 512 - 64)
                        data = rng.randbytes(rng.randrange(1, 64) * 512)
                        await blk.write(s, data)
                        model[s * 512 : s * 512 + len(data)] = data
                        assert await blk.read(s, len(data) // 512) == data

                async with trio.open_nursery() as n:
                    for seed in range(6):
                        n.start_soon(worker, seed)
                assert await blk.read(0, 8 * MB // 512) == bytes(model)

        trio.run(main)
        assert all(q.inflight == 0 for q in e.queues)
