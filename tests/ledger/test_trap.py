"""The trapped fast path (ledger._trap_kernel): a lone request published, served and harvested
in one kernel call, and handed back to the register file whenever the device may not serve it."""

from __future__ import annotations

import random

import pytest
import trio

from ledger import _device_kernel as DK
from ledger import _spec as S
from ledger._machine import Ledger
from ledger.client import ALONE_RUN_TO_TRAP
from ledger.errors import DeviceError

MB = 1 << 20


def _count_notifies(led: Ledger) -> list[int]:
    """Wrap the device's register write: count QueueNotify writes per queue."""
    dev = led.device
    assert dev is not None
    counts = [0] * dev.num_queues
    write32 = dev.write32

    def counting(off: int, val: int) -> None:
        if off == S.VIRTIO_MMIO_QUEUE_NOTIFY:
            counts[val] += 1
        write32(off, val)

    dev.write32 = counting  # type: ignore[method-assign]
    return counts


@pytest.mark.parametrize("features", [None, "bare"])
def test_lone_requests_skip_the_register_file_and_move_the_right_bytes(features: str | None) -> None:
    """Every lone SyncBlk request goes through the fused kernel: no QueueNotify register write,
    one request served per call, and the data read back is the data written (with and without
    EVENT_IDX / INDIRECT_DESC, which change how the kick is decided and the chain is built)."""
    from ledger.driver import SUPPORTED_MASK

    feats = None
    if features == "bare":
        feats = SUPPORTED_MASK & ~(1 << S.VIRTIO_RING_F_EVENT_IDX) & ~(1 << S.VIRTIO_RING_F_INDIRECT_DESC)
    with Ledger.ram(4 * MB, num_queues=2, device_queues=2, notify=("trap", "eventfd"), features=feats) as led:
        dev = led.device
        assert dev is not None
        notifies = _count_notifies(led)
        blk = led.sync()
        rng = random.Random(11)
        model = bytearray(4 * MB)
        before = int(dev._queues[0].ctl[DK.C_REQUESTS])
        for _ in range(300):  # more than a 256-entry ring: indices and descriptors wrap
            sector = rng.randrange(0, 4 * MB // 512 - 16)
            n = rng.randrange(1, 16)
            data = rng.randbytes(n * 512)
            blk.write(sector, data)
            model[sector * 512 : (sector + n) * 512] = data
            assert blk.read(sector, n) == data
        blk.flush()
        assert int(dev._queues[0].ctl[DK.C_REQUESTS]) - before == 601
        assert notifies == [0, 0]
        assert blk.read(0, 4 * MB // 512 // 2) == bytes(model[: 2 * MB])  # many requests: the usual way
        assert bytes(led.backend.ram) == bytes(model)


async def test_a_serial_trio_client_takes_the_fast_path() -> None:
    """Once a trio client is serial (ALONE_RUN_TO_TRAP lone requests in a row), its lone requests
    are served by the fused kernel: no register write, nothing left in flight, no group leaked."""
    with Ledger.ram(4 * MB, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
        dev = led.device
        assert dev is not None
        data = random.Random(4).randbytes(MB)
        led.sync().write(0, data)
        notifies = _count_notifies(led)
        async with led.trio() as blk:
            for i in range(ALONE_RUN_TO_TRAP + 50):
                sector = (i * 29 % 200) * 8
                assert await blk.read(sector, 8) == data[sector * 512 : sector * 512 + 4096]
            await blk.write(8, b"\x5a" * 4096)
            assert await blk.read(8, 8) == b"\x5a" * 4096
        assert notifies == [0, 0]
        assert all(q.inflight == 0 for q in led.engine.queues)
        assert len(led.engine.free_groups) == len(led.engine.on_done)


def test_a_device_that_needs_reset_gets_the_notify_through_its_registers() -> None:
    """With DEVICE_NEEDS_RESET set the fused kernel must not serve: it hands the notify to the
    register file, which refuses it with a diagnostic, and the driver reports the broken device."""
    with Ledger.ram(MB, num_queues=1, device_queues=1, notify="trap") as led:
        dev = led.device
        assert dev is not None
        blk = led.sync()
        blk.write(0, b"\x01" * 512)  # fast path, target cached
        args = dev.kernel_args(0)
        DK.needs_reset(args[1], args[2], args[3], args[4])  # what the kernel does on a broken ring
        notifies = _count_notifies(led)
        with pytest.raises(DeviceError, match="NEEDS_RESET"):
            blk.write(0, b"\x02" * 512)
        assert notifies == [1]
        assert any("DEVICE_NEEDS_RESET" in d.detail for d in dev.collect_diagnostics() + dev._diags)
        assert bytes(led.backend.ram[:512]) == b"\x01" * 512  # the refused request did nothing


def test_the_gate_shuts_for_good_on_reset_and_close() -> None:
    """trap_target hands out a gate that is open only while a notify would be served."""
    with Ledger.ram(MB, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
        dev = led.device
        assert dev is not None
        assert dev.trap_target(1) is None  # a worker queue
        assert dev.trap_target(5) is None
        target = dev.trap_target(0)
        assert target is not None
        gate, args = target
        assert gate[0] == 1 and args[0] is dev.memory.array
        dev.reset()
        assert gate[0] == 0 and dev.trap_target(0) is None
    with Ledger.ram(MB, num_queues=1, device_queues=1, notify="trap") as led:
        dev = led.device
        assert dev is not None
        target = dev.trap_target(0)
        assert target is not None
        dev.close()
        assert target[0][0] == 0 and dev.trap_target(0) is None


def test_trio_fast_path_survives_cancellation_of_other_tasks() -> None:
    """A cancelled task never leaves a request half-published: after a storm of cancelled readers
    the serial fast path still serves, and no group or descriptor is lost."""

    async def main() -> None:
        with Ledger.ram(MB, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
            async with led.trio() as blk:
                async with trio.open_nursery() as nursery:
                    for k in range(20):
                        nursery.start_soon(blk.read, k * 8, 8)
                    nursery.cancel_scope.cancel()
                for i in range(ALONE_RUN_TO_TRAP + 5):
                    assert await blk.read(i, 1) == bytes(512)
            assert all(q.inflight == 0 for q in led.engine.queues)
            assert all(q.num_free == q.size for q in led.engine.queues)
            assert len(led.engine.free_groups) == len(led.engine.on_done)

    trio.run(main)


def _bound_calls(led: Ledger) -> list[tuple[bool, tuple[object, ...]]]:
    """Make the engine bind its trap targets through ``bind`` and record (packed?, arrays) of each."""
    from ledger import _trap_kernel as TK

    seen: list[tuple[bool, tuple[object, ...]]] = []

    def recording(head: tuple[object, ...], tail: tuple[object, ...]) -> object:
        call = TK.bind(head, tail)
        seen.append((getattr(call, "func", None) is TK.run_trapped_packed, (*head[:14], *tail)))
        return call

    led.engine._trap_binder = recording  # type: ignore[assignment]
    led.engine._trap_targets.clear()
    return seen


@pytest.mark.parametrize("packed", [True, False])
def test_packed_and_plain_trapped_calls_move_the_same_bytes(packed: bool) -> None:
    """The engine's bound trap call - arrays passed as a table of addresses (the default) or as
    run_trapped's own 38 arguments - serves the same requests with the same results, and the
    table's callable keeps every array it points into alive."""
    import gc

    from ledger import _trap_kernel as TK

    with Ledger.ram(4 * MB, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
        dev = led.device
        assert dev is not None
        seen = _bound_calls(led)
        if not packed:
            led.engine._trap_binder = lambda h, t: TK.bind(h, t, packed=False)  # type: ignore[assignment]
        notifies = _count_notifies(led)
        blk = led.sync()
        rng = random.Random(5)
        model = bytearray(4 * MB)
        before = int(dev._queues[0].ctl[DK.C_REQUESTS])
        for i in range(200):
            sector = rng.randrange(0, 4 * MB // 512 - 8)
            data = rng.randbytes(rng.randrange(1, 8) * 512)
            blk.write(sector, data)
            model[sector * 512 : sector * 512 + len(data)] = data
            if i % 50 == 0:
                gc.collect()  # nothing the table points into may go away meanwhile
            got = blk.read(sector, len(data) // 512)
            assert got == data
        assert notifies[0] == 0  # every lone request took the bound call, none the registers
        assert int(dev._queues[0].ctl[DK.C_REQUESTS]) - before == 400
        assert blk.read(0, 4 * MB // 512) == bytes(model)
        if packed:
            assert seen and all(p for p, _ in seen)
            (_, arrays), *_ = seen
            assert len(arrays) == len(TK.TRAP_ARRAY_DTYPES)


def test_arrays_of_another_dtype_get_the_plain_call() -> None:
    """bind never reinterprets memory: one array of an unexpected dtype and the table is not used."""
    import numpy as np

    from ledger import _trap_kernel as TK

    with Ledger.ram(1 * MB, num_queues=1, device_queues=1, notify=("trap",)) as led:
        captured: list[tuple[tuple[object, ...], tuple[object, ...]]] = []
        real = led.engine._trap_binder
        assert real is not None

        def capture(head: tuple[object, ...], tail: tuple[object, ...]) -> object:
            captured.append((head, tail))
            return real(head, tail)

        led.engine._trap_binder = capture  # type: ignore[assignment]
        led.engine._trap_targets.clear()
        led.sync().write(0, b"\x5a" * 512)
        (head, tail), *_ = captured
        assert getattr(TK.bind(head, tail), "func", None) is TK.run_trapped_packed
        odd = list(tail)
        odd[4] = np.asarray(odd[4], dtype=np.int64)  # out_groups as int64 instead of int32
        assert getattr(TK.bind(head, tuple(odd)), "func", None) is not TK.run_trapped_packed
