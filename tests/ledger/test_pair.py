"""The driver and the device together, over random traffic, against a bytearray model.

Every configuration the driver must work in is exercised: with and without
EVENT_IDX and INDIRECT_DESC, one to four queues, small and large queues, the
device completing in order, in reverse and shuffled, the sync and the trio
front ends, and a run long enough to cross the 16-bit index wrap.
"""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import _spec as S
from ledger._machine import Ledger
from ledger.client import Batch
from ledger.driver import SUPPORTED_MASK
from ledger.errors import DriverError, IOFailure

MB = 1 << 20
NO_EVENT_IDX = SUPPORTED_MASK & ~(1 << S.VIRTIO_RING_F_EVENT_IDX)
NO_INDIRECT = SUPPORTED_MASK & ~(1 << S.VIRTIO_RING_F_INDIRECT_DESC)
BARE = NO_EVENT_IDX & NO_INDIRECT & ~(1 << S.VIRTIO_BLK_F_MQ)

CONFIGS = {
    "all": dict(features=None),
    "no-event-idx": dict(features=NO_EVENT_IDX),
    "no-indirect": dict(features=NO_INDIRECT),
    "bare": dict(features=BARE),
}


class Model:
    """What the disk must contain: bytes, with discarded ranges allowed to be anything."""

    def __init__(self, nbytes: int) -> None:
        self.data = bytearray(nbytes)
        self.known = np.ones(nbytes // 512, dtype=bool)

    def write(self, sector: int, data: bytes) -> None:
        self.data[sector * 512 : sector * 512 + len(data)] = data
        self.known[sector : sector + len(data) // 512] = True

    def zero(self, sector: int, n: int) -> None:
        self.write(sector, bytes(n * 512))

    def discard(self, sector: int, n: int) -> None:
        self.known[sector : sector + n] = False

    def check(self, sector: int, got: bytes) -> None:
        n = len(got) // 512
        for i in range(n):
            if self.known[sector + i]:
                want = self.data[(sector + i) * 512 : (sector + i + 1) * 512]
                assert got[i * 512 : (i + 1) * 512] == want, f"sector {sector + i} differs"


ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "write", "flush", "zeroes", "discard", "readv"]),
        st.integers(0, 2047),
        st.integers(1, 600),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("notify", ["eventfd", "trap"])
@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=12)
@given(
    script=ops,
    queue_size=st.sampled_from([4, 16, 256]),
    nq=st.integers(1, 4),
    order=st.sampled_from(["fifo", "reverse", "shuffle"]),
)
def test_sync_random_mix_matches_model(
    notify: str, config: str, script, queue_size: int, nq: int, order: str
) -> None:
    size = 2048 * 512
    with Ledger.ram(
        size,
        notify=notify,
        num_queues=nq,
        device_queues=4,
        queue_size=queue_size,
        completion_order=order,
        pool_bytes=8 * MB,
        **CONFIGS[config],
    ) as led:
        blk = led.sync()
        model = Model(size)
        for op, sector, n, fill in script:
            n = min(n, 2048 - sector)
            if op == "read":
                model.check(sector, blk.read(sector, n))
            elif op == "readv":
                half = max(1, n // 2)
                got = blk.readv([(sector, half), (0, 1), (sector, n)])
                model.check(sector, got[0])
                model.check(0, got[1])
                model.check(sector, got[2])
            elif op == "write":
                data = bytes([fill]) * (n * 512)
                blk.write(sector, data)
                model.write(sector, data)
            elif op == "flush":
                blk.flush()
            elif op == "zeroes":
                blk.write_zeroes([(sector, n)])
                model.zero(sector, n)
            else:
                blk.discard([(sector, n)])
                model.discard(sector, n)
        model.check(0, blk.read(0, 2048))


@pytest.mark.parametrize("notify", ["eventfd", "trap", ("trap", "eventfd")])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("order", ["fifo", "shuffle"])
async def test_trio_concurrent_tasks_match_model(
    notify: str | tuple[str, ...], config: str, order: str
) -> None:
    """Sixteen tasks, each owning a region, mixing sizes; everything in flight at once."""
    size = 4 * MB
    rng = random.Random(f"{config}-{order}")
    with Ledger.ram(
        size,
        notify=notify,
        num_queues=2,
        device_queues=2,
        queue_size=32,
        completion_order=order,
        pool_bytes=8 * MB,
        **CONFIGS[config],
    ) as led:
        model = Model(size)
        region = size // 512 // 16

        async with led.trio() as blk:

            async def worker(k: int) -> None:
                base = k * region
                r = random.Random(rng.random())
                for _ in range(30):
                    sector = base + r.randrange(region - 64)
                    n = r.choice([1, 8, 8, 64])
                    if r.random() < 0.5:
                        data = r.randbytes(n * 512)
                        await blk.write(sector, data)
                        model.write(sector, data)
                    else:
                        model.check(sector, await blk.read(sector, n))
                    if r.random() < 0.1:
                        await blk.flush()

            async with trio.open_nursery() as nursery:
                for k in range(16):
                    nursery.start_soon(worker, k)
            model.check(0, await blk.read(0, size // 512))
            parts = await blk.readv([(5, 3), (0, 1), (4000, 2048 + 7), (5, 3)])
            for (sector, _), got in zip([(5, 3), (0, 1), (4000, 2048 + 7), (5, 3)], parts, strict=True):
                model.check(sector, got)
            assert [len(p) for p in parts] == [3 * 512, 512, (2048 + 7) * 512, 3 * 512]
            assert (await blk.get_id()) != b""


def test_index_wrap_is_crossed_with_data_intact() -> None:
    """More than 65,536 requests through one queue: both 16-bit indices wrap."""
    with Ledger.ram(MB, num_queues=1, device_queues=1, queue_size=256, pool_bytes=4 * MB) as led:
        blk = led.sync()
        blk.write(0, bytes(range(256)) * 2 * 2048)
        bufs = np.array([led.engine.pool.alloc(512) for _ in range(256)], np.uint64)
        sectors = (np.arange(256) * 7 % 2048).astype(np.uint64)
        for _ in range(270):
            blk.submit_batch(Batch.uniform(S.VIRTIO_BLK_T_IN, sectors, 1, bufs))
        q = led.driver.queues[0]
        assert int(q.q[22]) >= 65536 + 256  # Q_SUBMITTED
        for i in (0, 255):
            assert bytes(led.engine.pool.view(int(bufs[i]), 512)) == bytes(range(256)) * 2
        assert blk.read(5, 1) == bytes(range(256)) * 2


async def test_ring_full_submitters_wait_and_nothing_is_lost() -> None:
    """A queue of 4 with 64 concurrent requests: most must wait for descriptors."""
    with Ledger.ram(
        MB, num_queues=1, device_queues=1, queue_size=4, features=NO_INDIRECT, pool_bytes=4 * MB
    ) as led:
        async with led.trio() as blk:

            async def one(i: int) -> None:
                await blk.write(i * 8, bytes([i]) * 4096)

            async with trio.open_nursery() as n:
                for i in range(64):
                    n.start_soon(one, i)
            data = await blk.read(0, 64 * 8)
        assert all(data[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096 for i in range(64))


def test_large_request_is_split_by_the_negotiated_limits() -> None:
    with Ledger.ram(
        8 * MB, num_queues=1, device_queues=1, max_request_bytes=64 << 10, pool_bytes=4 * MB
    ) as led:
        blk = led.sync()
        data = random.Random(1).randbytes(3 * MB + 512)
        blk.write(1, data)
        assert blk.read(1, len(data) // 512) == data
        assert led.driver.max_request_bytes == 64 << 10


def test_out_of_range_and_read_only_are_driver_errors(tmp_path) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(MB))
    with Ledger.open(img, read_only=True) as led:
        assert led.driver.read_only
        blk = led.sync()
        with pytest.raises(DriverError, match="read-only"):
            blk.write(0, bytes(512))
        with pytest.raises(DriverError, match="outside the device"):
            blk.read(2048, 1)
        assert blk.read(2047, 1) == bytes(512)


def test_device_ioerr_surfaces_as_iofailure_with_the_failing_request() -> None:
    """A batch with one request past the end: the device says IOERR for exactly that one."""
    with Ledger.ram(MB, num_queues=1, device_queues=1) as led:
        blk = led.sync()
        bufs = np.array([led.engine.pool.alloc(512) for _ in range(4)], np.uint64)
        sectors = np.array([0, 1, 5000, 2], np.uint64)
        with pytest.raises(IOFailure) as ei:
            blk.submit_batch(Batch.uniform(S.VIRTIO_BLK_T_IN, sectors, 1, bufs))
        assert ei.value.index == 2 and ei.value.status == S.VIRTIO_BLK_S_IOERR and ei.value.sector == 5000
        assert blk.read(0, 1) == bytes(512)  # the queue is still healthy


def test_file_backend_round_trip_and_flush(tmp_path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(2 * MB))
    data = random.Random(7).randbytes(MB)
    with Ledger.open(img) as led:
        blk = led.sync()
        blk.write(100, data)
        blk.flush()
        assert blk.read(100, MB // 512) == data
    assert img.read_bytes()[100 * 512 : 100 * 512 + MB] == data


def _o_direct_image(where: str | os.PathLike[str], nbytes: int, *, writes: bool = False) -> str | None:
    """A zeroed image of ``nbytes`` in ``where`` if its filesystem takes O_DIRECT (read-write too
    with ``writes``), else None."""
    from ledger.backend import FileBackend

    img = os.path.join(where, "disk.img")
    with open(img, "wb") as f:
        f.truncate(nbytes)
    probe = FileBackend(img, direct_reads=True, direct_writes=writes)
    ok = probe.direct_fd >= 0 and (probe.direct_writes or not writes)
    probe.close()
    return img if ok else None


def _direct_bytes(led: Ledger) -> int:
    from ledger import _device_kernel as DK

    assert led.device is not None
    return sum(int(q.ctl[DK.C_DIRECT_BYTES]) for q in led.device._queues)


def test_large_aligned_reads_go_around_the_page_cache_and_see_every_write(tmp_path) -> None:
    """With ``direct_reads`` a file backend opens the image a second time with O_DIRECT: reads of
    DIRECT_MIN bytes or more, 4 KiB-aligned, go through it (no page-cache copy); smaller or unaligned
    reads, and all writes, go through the page cache.  A direct read of a range just written (still
    dirty in the page cache) returns the new data: the kernel writes such pages back first.  Off by
    default."""
    import tempfile

    from ledger import _device_kernel as DK

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        img = _o_direct_image(tmp_path, 8 * MB) or _o_direct_image(d, 8 * MB)
        if img is None:
            pytest.skip("no filesystem here accepts O_DIRECT")
        rng = random.Random(11)
        big = DK.DIRECT_MIN
        with Ledger.open(img, num_queues=1, device_queues=1, direct_reads=True) as led:
            blk = led.sync()
            for rnd in range(3):  # overwrite and read back: every read sees the write before it
                data = rng.randbytes(2 * MB)
                blk.write(2048, data)
                d0 = _direct_bytes(led)
                assert blk.read(2048, 2 * MB // 512) == data
                assert _direct_bytes(led) - d0 == 2 * MB
                d1 = _direct_bytes(led)
                assert blk.read(2048 + 8, 8) == data[4096:8192]  # small: page cache
                assert blk.read(2049, big // 512) == data[512 : 512 + big]  # not 4 KiB-aligned
                assert blk.read(2048, big // 512 - 1) == data[: big - 512]  # shorter than DIRECT_MIN
                assert _direct_bytes(led) == d1, rnd
            blk.flush()
        with open(img, "rb") as f:
            f.seek(2048 * 512)
            assert f.read(2 * MB) == data
        with Ledger.open(img, num_queues=1, device_queues=1, direct_reads=True) as led:  # a new ledger too
            assert led.sync().read(2048, 2 * MB // 512) == data and _direct_bytes(led) == 2 * MB
        with Ledger.open(img, num_queues=1, device_queues=1) as led:  # the default: the page cache only
            assert led.backend.direct_fd == -1
            assert led.sync().read(2048, 2 * MB // 512) == data and _direct_bytes(led) == 0


def _queue_counters(led: Ledger, slot: int) -> list[int]:
    assert led.device is not None
    return [int(q.ctl[slot]) for q in led.device._queues]


def _settled_counters(led: Ledger, slot: int, want: list[int]) -> list[int]:
    """The counters once they reach ``want``, or as they are after 5 s (a worker updates its
    write-behind count just after it published the completion the caller saw)."""
    deadline = time.monotonic() + 5
    while (got := _queue_counters(led, slot)) != want and time.monotonic() < deadline:
        time.sleep(0.001)
    return got


def test_a_worker_starts_the_write_back_of_the_large_writes_it_completed(tmp_path) -> None:
    """Write-behind (file backends, on by default): a device worker that completed writes of
    WRITE_BEHIND_MIN bytes or more starts the host's write-back of them (C_WB_BYTES counts it).
    Writes near each other in one pass make one range; a distant one is left to the host.  The
    blocking front end sends such writes to a worker queue even when they run alone; small writes
    and reads stay on the trapped queue, which never does write-behind.  The data is the same
    either way."""
    from ledger import _device_kernel as DK
    from ledger.client import WORKER_WRITE_MIN

    assert WORKER_WRITE_MIN >= DK.WRITE_BEHIND_MIN  # what the front end routes, the worker writes behind
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8 * MB))
    rng = random.Random(5)
    big, half, small = rng.randbytes(MB), rng.randbytes(MB // 2), rng.randbytes(4096)
    with Ledger.open(img, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
        assert led.device is not None
        trapped = led.device.trapped.index(True)
        worker = 1 - trapped
        blk = led.sync()
        blk.write(2048, big)
        want = [0, 0]
        want[worker] = MB
        assert _settled_counters(led, DK.C_WB_BYTES, want) == want
        assert _queue_counters(led, DK.C_REQUESTS)[worker] == 1
        blk.writev([(4096, half), (4096 + MB // 1024, half)])  # adjacent pieces: one range
        want[worker] = 2 * MB
        assert _settled_counters(led, DK.C_WB_BYTES, want) == want
        # Far apart in one pass: the first is written behind, not the 5 MiB span between them
        # (it would take every dirty page in the gap along).
        blk.writev([(6144, half), (15360, half)])
        want[worker] = 2 * MB + MB // 2
        assert _settled_counters(led, DK.C_WB_BYTES, want) == want
        before = _queue_counters(led, DK.C_REQUESTS)
        blk.write(8, small)
        assert blk.read(2048, MB // 512) == big
        after = _queue_counters(led, DK.C_REQUESTS)
        assert after[trapped] - before[trapped] == 2 and after[worker] == before[worker]
        time.sleep(0.05)  # what a worker would have counted by now
        assert _queue_counters(led, DK.C_WB_BYTES) == want  # small writes, reads: none
        blk.flush()
    raw = img.read_bytes()
    assert raw[2048 * 512 : 2048 * 512 + MB] == big
    assert raw[4096 * 512 : 4096 * 512 + MB] == half + half
    assert raw[6144 * 512 : 6144 * 512 + MB // 2] == half == raw[15360 * 512 : 15360 * 512 + MB // 2]
    assert raw[8 * 512 : 8 * 512 + 4096] == small
    pair = {"num_queues": 2, "device_queues": 2, "notify": ("trap", "eventfd")}
    with Ledger.open(img, write_behind=False, **pair) as led:
        led.sync().write(2048, small * 256)
        time.sleep(0.05)
        assert _queue_counters(led, DK.C_WB_BYTES) == [0, 0]
    with Ledger.open(img, num_queues=1, device_queues=1, notify="trap") as led:  # trapped only
        blk = led.sync()
        blk.write(2048, big)
        assert blk.read(2048, MB // 512) == big
        assert _queue_counters(led, DK.C_WB_BYTES) == [0]
    with Ledger.open(img, read_only=True) as led:
        assert led.backend.write_behind_min == 0


async def test_idle_ledger_uses_no_cpu() -> None:
    """After the polling windows end, both sides sleep in the kernel: no busy-spinning."""
    with Ledger.ram(MB, num_queues=2, device_queues=2) as led:
        async with led.trio() as blk:
            await blk.write(0, bytes(4096))
            assert await blk.read(0, 8) == bytes(4096)
            await trio.sleep(0.2)  # longer than any spin or poll window
            c0 = time.process_time()
            await trio.sleep(0.5)
            used = time.process_time() - c0
    assert used < 0.05, f"an idle ledger used {used:.3f} s of CPU in 0.5 s"


async def test_cancelled_waiters_leave_the_ledger_consistent() -> None:
    """Cancelling tasks mid-request neither loses completions nor reuses in-flight buffers."""
    with Ledger.ram(4 * MB, num_queues=2, device_queues=2, queue_size=8, completion_order="shuffle") as led:
        async with led.trio() as blk:
            await blk.write(0, bytes(range(256)) * 2 * 8192)
            with trio.move_on_after(0.001):
                async with trio.open_nursery() as nursery:
                    for i in range(200):
                        nursery.start_soon(blk.read, (i * 16) % 8000, 16)
            # Everything still works, and every request came back.
            got = await blk.read(0, 8192)
            assert got == bytes(range(256)) * 2 * 8192
            await trio.sleep(0.05)
            assert all(q.inflight == 0 for q in led.driver.queues)
            assert len(led.engine.free_groups) == len(led.engine.on_done)


async def test_more_concurrent_batches_than_groups_all_complete() -> None:
    """Group ids, staging room and descriptors all run out; every batch still completes."""
    with Ledger.ram(MB, num_queues=1, device_queues=1, queue_size=4, pool_bytes=4 * MB) as led:
        ngroups = len(led.engine.on_done)
        # poll_us=0: no task finds its completion by polling, so all of them wait at once.
        async with led.trio(poll_us=0) as blk:
            gpa, view = blk.alloc_buffer(512)
            view[:] = 7
            await blk.write(0, bytes([7]) * 512)

            async def one() -> None:
                await blk.submit_batch(Batch.uniform(S.VIRTIO_BLK_T_IN, [0, 0], 1, [gpa, gpa]))

            waited = 0
            real_wait = blk._wait_space

            async def counting_wait() -> None:
                nonlocal waited
                waited += 1
                await real_wait()

            blk._wait_space = counting_wait  # type: ignore[method-assign]
            async with trio.open_nursery() as n:
                for _ in range(ngroups + 50):
                    n.start_soon(one)
        assert waited > 0  # some tasks really had to wait for a group
        assert len(led.engine.free_groups) == ngroups


async def test_started_batches_overlap_and_finish_in_any_order() -> None:
    with Ledger.ram(MB, num_queues=2, device_queues=2, completion_order="shuffle") as led:
        async with led.trio() as blk:
            await blk.write(0, bytes(range(256)) * 4 * 8)  # sectors 0..15
            bufs = [np.array([blk.alloc_buffer(512)[0] for _ in range(8)], np.uint64) for _ in range(2)]
            a = blk.start_batch(Batch.uniform(S.VIRTIO_BLK_T_IN, np.arange(8), 1, bufs[0]))
            b = blk.start_batch(Batch.uniform(S.VIRTIO_BLK_T_IN, np.arange(8, 16), 1, bufs[1]))
            await blk.finish_batch(b)
            await blk.finish_batch(a)
            for k in range(2):
                for i in range(8):
                    got = bytes(led.engine.pool.view(int(bufs[k][i]), 512))
                    assert got == (bytes(range(256)) * 2)
            bad = blk.start_batch(Batch.uniform(S.VIRTIO_BLK_T_IN, [1, 4000], 1, bufs[0][:2]))
            with pytest.raises(IOFailure) as ei:
                await blk.finish_batch(bad)
            assert ei.value.index == 1
            assert ei.value.sector == 4000
        assert len(led.engine.free_groups) == len(led.engine.on_done)


def test_trapped_notify_serves_on_the_callers_thread_without_workers() -> None:
    """notify="trap": no ioeventfd and no worker threads; the QueueNotify write does the I/O."""
    before = {t.name for t in threading.enumerate()}
    with Ledger.ram(MB, num_queues=2, device_queues=2, notify="trap") as led:
        assert led.device is not None
        assert [led.device.queue_notify_fd(q) for q in range(2)] == [-1, -1]
        assert not {t.name for t in threading.enumerate()} - before  # no ledger-q* threads
        blk = led.sync()
        blk.write(10, b"\xab" * 4096)
        # the write completed on this thread, so the bytes are in the backend already
        assert bytes(led.backend.ram[10 * 512 : 10 * 512 + 4096]) == b"\xab" * 4096
        assert blk.read(10, 8) == b"\xab" * 4096


def test_notify_modes_per_queue_are_checked() -> None:
    with pytest.raises(ValueError, match="per queue"):
        Ledger.ram(MB, num_queues=2, device_queues=2, notify=("trap",))
    with pytest.raises(ValueError, match="per queue"):
        Ledger.ram(MB, num_queues=2, device_queues=2, notify=("trap", "ioeventfd"))


async def test_mixed_queues_serve_a_serial_client_on_its_thread_and_others_on_the_worker() -> None:
    """notify=("trap", "eventfd"): only queue 1 has a worker thread.  A serial client's requests go
    to the trapped queue once ALONE_RUN_TO_TRAP requests in a row were alone, the pieces of its large
    reads to both queues; requests while other work is queued (the ``contended`` hint) go to the
    worker queue."""
    from ledger import _device_kernel as DK
    from ledger.client import ALONE_RUN_TO_TRAP

    before = {t.name for t in threading.enumerate()}
    with Ledger.ram(4 * MB, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
        dev = led.device
        assert dev is not None
        assert dev.queue_notify_fd(0) == -1 and dev.queue_notify_fd(1) >= 0
        assert {t.name for t in threading.enumerate()} - before == {"ledger-q1"}
        data = bytes(random.Random(3).randbytes(4 * MB))
        led.sync().write(0, data)

        def served() -> list[int]:
            return [int(dev._queues[q].ctl[DK.C_REQUESTS]) for q in range(2)]

        async with led.trio() as blk:
            s0 = served()
            n = ALONE_RUN_TO_TRAP + 40
            for i in range(n):
                sector = (i * 37 % 1000) * 8
                assert await blk.read(sector, 8) == data[sector * 512 : sector * 512 + 4096]
            s1 = served()
            assert s1[0] - s0[0] == n - ALONE_RUN_TO_TRAP + 1  # all after the run of lone ones
            assert s1[1] - s0[1] == ALONE_RUN_TO_TRAP - 1

            # the pieces of a serial client's large read: on both queues, the worker's in parallel
            # with the trapped queue's
            assert await blk.read_parallel(0, 2048) == data[: 2048 * 512]
            s2 = served()
            assert s2[0] - s1[0] >= 1 and s2[1] - s1[1] >= 1

            # other work queued for this thread (the FUSE daemon's hint): never the trapped queue,
            # and the run of lone requests starts again afterwards
            blk.contended = lambda: True
            for i in range(10):
                assert await blk.read(i * 8, 8) == data[i * 4096 : (i + 1) * 4096]
            blk.contended = None
            for i in range(ALONE_RUN_TO_TRAP - 1):
                assert await blk.read(i * 8, 8) == data[i * 4096 : (i + 1) * 4096]
            s3 = served()
            assert s3[0] == s2[0] and s3[1] - s2[1] == 10 + ALONE_RUN_TO_TRAP - 1


def test_mixed_queues_serve_a_synchronous_lone_request_on_the_calling_thread() -> None:
    """SyncBlk waits for every group it submits: a one-request group goes to the trapped queue
    (served before the notify returns, no hand-off to the worker); a multi-request group is spread
    over both queues."""
    from ledger import _device_kernel as DK

    with Ledger.ram(4 * MB, num_queues=2, device_queues=2, notify=("trap", "eventfd")) as led:
        dev = led.device
        assert dev is not None
        blk = led.sync()

        def served() -> list[int]:
            return [int(dev._queues[q].ctl[DK.C_REQUESTS]) for q in range(2)]

        data = bytes(random.Random(5).randbytes(64 * 4096))
        s0 = served()
        for i in range(64):
            blk.write(i * 8, data[i * 4096 : (i + 1) * 4096])
        for i in range(64):
            assert blk.read(i * 8, 8) == data[i * 4096 : (i + 1) * 4096]
        blk.flush()
        s1 = served()
        assert s1[0] - s0[0] == 64 + 64 + 1 and s1[1] == s0[1]

        pieces = [(i * 8, 8) for i in range(0, 64, 2)]  # 32 separate ranges: one group of 32
        assert blk.readv(pieces) == [data[s * 512 : s * 512 + 4096] for s, _ in pieces]
        s2 = served()
        assert s2[0] - s1[0] >= 1 and s2[1] - s1[1] >= 1 and sum(s2) - sum(s1) == 32


async def test_multi_piece_operations_never_hold_buffers_while_waiting() -> None:
    """Many tasks, each needing more pool buffers at once than the pool can give them all.

    Each large write or multi-range read is several requests; a task that took some buffers and
    then waited for the rest would deadlock with the others doing the same.  Everything must
    complete, with the data right.
    """
    size = 16 * MB
    with Ledger.ram(size, num_queues=2, device_queues=2, queue_size=64, pool_bytes=2 * MB,
                    max_request_bytes=256 * 1024) as led:  # fmt: skip
        model = Model(size)
        async with led.trio() as blk:

            async def worker(k: int) -> None:
                base = k * (MB // 512)  # 1 MiB region per task, in sectors
                data = bytes([k + 1]) * MB
                await blk.write(base, data)
                model.write(base, data)
                half = MB // 512 // 2
                parts = await blk.readv([(base, half), (base + half, half), (base, 2 * half)])
                model.check(base, parts[0])
                model.check(base + half, parts[1])
                model.check(base, parts[2])

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for k in range(12):
                        nursery.start_soon(worker, k)


def test_every_buffer_class_survives_an_arena_carved_up_by_others() -> None:
    """Small buffers take the whole arena; after they come back a 1 MiB buffer must still be had
    (buffers never change class: a class without any would make its waiters wait forever)."""
    with Ledger.ram(MB, num_queues=1, device_queues=1, pool_bytes=4 * MB) as led:
        pool = led.engine.pool
        small = []
        while (gpa := pool.alloc(4096)) is not None:
            small.append(gpa)
        assert len(small) > 100  # the arena really went to the 4 KiB class
        for gpa in small:
            pool.free(gpa, 4096)
        for size in (MB, 512 * 1024, 64 * 1024, 8192):
            gpa = pool.alloc(size)
            assert gpa is not None, size
            pool.free(gpa, size)
        blk = led.sync()
        blk.write(0, b"\x5a" * MB)
        assert blk.read(0, MB // 512) == b"\x5a" * MB


async def test_blocking_call_never_swallows_the_interrupt_a_sleeping_reaper_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mount runs both front ends on one thread: trio tasks read through TrioBlk while a
    blocking call (a write) goes through SyncBlk.  When SyncBlk, sleeping for its own request,
    consumed the queue's interrupt while a trio reaper slept on it, the reaper's used_event was
    left behind the used index, the device sent no interrupt for the next completion, and the next
    trio request waited forever (seen as a FUSE request that never returned).  Here the device is
    served by hand so that the interleaving is exact."""
    from ledger import _driver_kernels as K

    monkeypatch.setattr(Ledger, "_warm_up", lambda self: None)  # it would wait for the hand-served device
    led = Ledger.ram(MB, num_queues=1, device_queues=1, poll_us=0, single_pass=True)
    dev = led.device
    assert dev is not None
    q = led.engine.queues[0]
    assert q.q[K.Q_FLAGS] & K.F_EVENT_IDX
    sync = led.sync()
    got: dict[str, bytes] = {}
    b_done = trio.Event()
    try:
        async with led.trio() as blk, trio.open_nursery() as nursery:

            async def reader(tag: str, sector: int) -> None:
                got[tag] = await blk.read(sector, 1)
                if tag == "b":
                    b_done.set()

            nursery.start_soon(reader, "a", 0)
            await trio.testing.wait_all_tasks_blocked()
            assert q.sleepers == 1  # the reaper sleeps on the interrupt fd, a's request in flight
            # A blocking write on the trio thread; the device serves both requests 50 ms later.
            serve = threading.Timer(0.05, dev.run_queue_once, (0,))
            serve.start()
            sync.write(8, b"s" * 512)
            serve.join()
            await trio.testing.wait_all_tasks_blocked()
            assert got["a"] == bytes(512)  # completed by the blocking call's harvest
            nursery.start_soon(reader, "b", 8)
            await trio.testing.wait_all_tasks_blocked()
            serve = threading.Timer(0.05, dev.run_queue_once, (0,))
            serve.start()
            with trio.move_on_after(5) as waited:  # the old code waited here forever
                await b_done.wait()
            serve.join()
            if waited.cancelled_caught:
                os.eventfd_write(q.interrupt_fd, 1)  # release the stuck reaper so the test can end
                pytest.fail("the reaper slept through b's completion: its interrupt was swallowed")
            assert got["b"] == b"s" * 512
    finally:
        led.close()


def test_poll_window_spins_while_polls_catch_completions_and_probes_otherwise() -> None:
    """PollWindow: full spins while at least half the recent polls caught their completion; after a
    run of misses (a cold disk) no spin but a probe every 8th wait; hits bring the spin back; a
    request alone in flight always spins."""
    from ledger.client import PollWindow

    w = PollWindow(50_000)
    assert w.budget(alone=False) == 50_000
    for _ in range(8):
        w.record(False)
    budgets = [w.budget(alone=False) for _ in range(16)]
    assert budgets.count(50_000) == 2 and budgets[7] == budgets[15] == 50_000
    assert w.budget(alone=True) == 50_000  # nothing else could use the CPU
    for _ in range(8):
        w.record(True)
    assert w.budget(alone=False) == 50_000


async def test_contended_front_end_stops_spinning_on_a_slow_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With other work queued (``contended``) and a device that completes each request about 1 ms
    after it is published (served by hand from a thread), polls never catch a completion: the hit
    rate falls below one half and the front end stops spinning; the data is still right."""
    monkeypatch.setattr(Ledger, "_warm_up", lambda self: None)  # it would wait for the hand-served device
    led = Ledger.ram(MB, num_queues=1, device_queues=1, poll_us=20, single_pass=True)
    dev = led.device
    assert dev is not None
    stop = threading.Event()

    def slow_device() -> None:
        while not stop.wait(0.001):
            dev.run_queue_once(0)

    server = threading.Thread(target=slow_device, daemon=True)
    server.start()
    try:
        async with led.trio() as blk:
            blk.contended = lambda: True
            await blk.write(0, b"d" * 4096)
            for _ in range(32):
                assert await blk.read(0, 8) == b"d" * 4096
            assert blk.window.hit_rate < 0.5
            assert blk.window.budget(alone=False) in (0, blk.poll_ns)
    finally:
        stop.set()
        server.join()
        led.close()


def test_the_smallest_direct_read_is_the_backends_choice(tmp_path) -> None:
    """``direct_min``: aligned reads of at least that many bytes go through the O_DIRECT descriptor,
    smaller ones through the page cache; it must be a positive multiple of 4 KiB."""
    import tempfile

    from ledger.backend import FileBackend

    with pytest.raises(ValueError, match="multiple of 4096"):
        FileBackend(tmp_path / "none.img", direct_reads=True, direct_min=1000)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        img = _o_direct_image(d, 4 * MB)
        if img is None:
            pytest.skip("no O_DIRECT on /var/tmp")
        data = random.Random(4).randbytes(64 << 10)
        with Ledger.open(img, num_queues=1, device_queues=1, direct_reads=True, direct_min=8192) as led:
            blk = led.sync()
            blk.write(64, data)
            d0 = _direct_bytes(led)
            assert blk.read(64, 8) == data[:4096]  # 4 KiB: below the minimum
            assert _direct_bytes(led) == d0
            assert blk.read(64, 16) == data[:8192]  # 8 KiB, aligned: direct
            assert _direct_bytes(led) == d0 + 8192


def test_direct_writes_go_around_the_page_cache_and_read_back_every_way(tmp_path) -> None:
    """``direct_writes``: aligned writes of ``direct_min`` bytes or more go through the O_DIRECT
    descriptor (opened read-write for it), smaller ones through the page cache; every read - small
    through the page cache, large and direct - returns the last write, a FLUSH completes, and the
    image file holds the data afterwards.  Without ``direct_reads`` (or read-only) there are none."""
    import fcntl
    import tempfile

    from ledger import _device_kernel as DK
    from ledger.backend import FileBackend

    def written(led: Ledger) -> int:
        assert led.device is not None
        return sum(int(q.ctl[DK.C_DIRECT_WRITTEN]) for q in led.device._queues)

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        img = _o_direct_image(d, 8 * MB, writes=True)
        if img is None:
            pytest.skip("no read-write O_DIRECT on /var/tmp")
        probe = FileBackend(img, direct_reads=True, direct_writes=True)
        assert fcntl.fcntl(probe.direct_fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        probe.close()
        assert not FileBackend(img, direct_writes=True).direct_writes  # needs direct_reads
        ro = FileBackend(img, read_only=True, direct_reads=True, direct_writes=True)
        assert not ro.direct_writes
        ro.close()
        rng = random.Random(8)
        model = bytearray(8 * MB)
        with Ledger.open(img, num_queues=2, direct_reads=True, direct_writes=True) as led:
            blk = led.sync()
            for rnd in range(4):
                big = rng.randbytes(2 * MB)
                s = rng.randrange(0, 6 * MB // 4096) * 8  # 4 KiB-aligned
                w0 = written(led)
                blk.write(s, big)
                model[s * 512 : s * 512 + len(big)] = big
                assert written(led) - w0 == 2 * MB
                small = rng.randbytes(4096)
                blk.write(s + 16, small)  # inside the big one, through the page cache
                model[(s + 16) * 512 : (s + 16) * 512 + 4096] = small
                assert written(led) - w0 == 2 * MB
                assert blk.read(s + 8, 8) == bytes(model[(s + 8) * 512 : (s + 16) * 512])  # page cache
                assert blk.read(s, 4096) == bytes(model[s * 512 : s * 512 + 2 * MB]), rnd  # direct
            blk.flush()
        with open(img, "rb") as f:
            assert f.read() == bytes(model)


def test_direct_writes_only_from_workers_and_without_write_behind() -> None:
    """With ``direct_writes``: a large aligned write a worker serves goes direct and is not written
    behind (it left no dirty pages); the same write served by a trapped queue (on the notifier's
    thread) goes through the page cache.  The data is the same either way."""
    import tempfile

    from ledger import _device_kernel as DK

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        img = _o_direct_image(d, 8 * MB, writes=True)
        if img is None:
            pytest.skip("no read-write O_DIRECT on /var/tmp")
        rng = random.Random(6)
        big = rng.randbytes(MB)
        pair = {"num_queues": 2, "device_queues": 2, "notify": ("trap", "eventfd")}
        with Ledger.open(img, direct_reads=True, direct_writes=True, **pair) as led:
            assert led.device is not None
            trapped = led.device.trapped.index(True)
            worker = 1 - trapped
            blk = led.sync()
            blk.write(2048, big)  # large: the front end sends it to the worker
            written = _queue_counters(led, DK.C_DIRECT_WRITTEN)
            assert written[worker] == MB and written[trapped] == 0
            time.sleep(0.05)
            assert _queue_counters(led, DK.C_WB_BYTES) == [0, 0]
            assert blk.read(2048, MB // 512) == big
            blk.flush()
        with Ledger.open(img, direct_reads=True, direct_writes=True, num_queues=1, device_queues=1,
                         notify="trap") as led:  # fmt: skip
            blk = led.sync()
            half = rng.randbytes(MB // 2)
            blk.write(4096, half)  # served on this thread: through the page cache
            assert _queue_counters(led, DK.C_DIRECT_WRITTEN) == [0]
            assert blk.read(4096, MB // 1024) == half
            blk.flush()
        with open(img, "rb") as f:
            raw = f.read()
        assert raw[2048 * 512 : 2048 * 512 + MB] == big
        assert raw[4096 * 512 : 4096 * 512 + MB // 2] == half
