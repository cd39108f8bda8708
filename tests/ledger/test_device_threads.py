"""The device with its worker threads: real requests, interrupts, kick suppression, reset and close.

The RawDriver submits batches on several queues, kicks (through QueueNotify or
the kick eventfd), sleeps on the call eventfd like a guest waiting for an
interrupt, and checks every read against a bytearray model of the disk.
"""

from __future__ import annotations

import os
import random
import select
import time
from collections.abc import Iterator

import pytest

from ledger import _spec as S
from ledger.backend import FileBackend, RamBackend, create_image
from ledger.device import DEFAULT_FEATURES, VirtioBlkDevice
from ledger.diagnostics import D_HEAD_OUT_OF_RANGE
from ledger.memory import GuestMemory
from ledger.testing import RawDriver

EVENT_IDX = 1 << S.VIRTIO_RING_F_EVENT_IDX
INDIRECT = 1 << S.VIRTIO_RING_F_INDIRECT_DESC
CAP = 256


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(8 << 20) as m:
        yield m


def wait_interrupt(dev: VirtioBlkDevice, q: int, timeout: float = 10.0) -> None:
    fd = dev.queue_interrupt_fd(q)
    assert select.select([fd], [], [], timeout)[0], f"no interrupt on queue {q}"
    os.eventfd_read(fd)


@pytest.mark.parametrize(
    ("features", "order"),
    [
        (DEFAULT_FEATURES, "fifo"),
        (DEFAULT_FEATURES & ~EVENT_IDX, "reverse"),
        (DEFAULT_FEATURES & ~INDIRECT, "shuffle"),
        (DEFAULT_FEATURES & ~INDIRECT & ~EVENT_IDX, "fifo"),
    ],
    ids=["all", "no-event-idx", "no-indirect", "bare"],
)
def test_random_io_against_model(
    mem: GuestMemory, tmp_path: os.PathLike[str], features: int, order: str
) -> None:
    rnd = random.Random(features ^ hash(order))
    path = os.path.join(os.fspath(tmp_path), "img")
    create_image(path, CAP * 512)
    model = bytearray(CAP * 512)
    with FileBackend(path) as be, VirtioBlkDevice(be, mem, completion_order=order, seed=3, spin_us=20) as dev:
        drv = RawDriver(dev, mem, queue_size=16, num_queues=2, features=features, max_data=8192)
        assert drv.handshake() & S.VIRTIO_CONFIG_S_DRIVER_OK
        for it in range(60):
            qi = it % 2
            q = drv.queues[qi]
            # non-overlapping sectors inside one batch: completion order is up to the device
            starts = rnd.sample(range(0, CAP - 16, 16), 5)
            batch = []
            for s in starts:
                kind = rnd.choice(["out", "in", "in", "flush", "zeroes"])
                n = rnd.randint(1, 16)
                if kind == "out":
                    data = rnd.randbytes(n * 512)
                    batch.append((drv.submit(qi, S.VIRTIO_BLK_T_OUT, s, data=data, publish=False), s, data))
                elif kind == "in":
                    req = drv.submit(qi, S.VIRTIO_BLK_T_IN, s, in_len=n * 512, publish=False)
                    batch.append((req, s, None))
                elif kind == "flush":
                    batch.append((drv.submit(qi, S.VIRTIO_BLK_T_FLUSH, publish=False), s, None))
                else:
                    seg = s.to_bytes(8, "little") + n.to_bytes(4, "little") + bytes(4)
                    batch.append((drv.submit(qi, S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg, publish=False), s,
                                  bytes(n * 512)))
            if drv.has(S.VIRTIO_RING_F_EVENT_IDX):
                drv.set_used_event(qi, q.last_used)  # interrupt me at the first completion
            drv.set_avail_idx(qi, q.avail_idx)
            drv.kick(qi, via_fd=bool(it % 3))
            wait_interrupt(dev, qi)
            got = drv.wait_used(qi, len(batch))
            while len(got) < len(batch):
                got += drv.wait_used(qi, len(batch) - len(got))
            by_head = {u.id: u for u in got}
            assert len(by_head) == len(batch)
            for req, s, data in batch:
                u = by_head[req.head]
                drv.complete(qi, u)
                assert drv.status_of(req) == S.VIRTIO_BLK_S_OK
                if req.rtype == S.VIRTIO_BLK_T_IN:
                    assert u.len == req.data_len + 1
                    assert drv.data_of(req) == bytes(model[s * 512 : s * 512 + req.data_len])
                elif data is not None:
                    assert u.len == 1
                    model[s * 512 : s * 512 + len(data)] = data
        dev.write32(S.VIRTIO_MMIO_INTERRUPT_ACK, dev.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS))
        assert dev.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
        stats = dev.stats()
        assert sum(q["requests"] for q in stats["queues"]) == 300
        assert dev.diagnostics() == []
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


def rearmed(drv: RawDriver, features: int) -> bool:
    if features & EVENT_IDX:
        return drv.avail_event(0) == 3
    return drv.used_flags(0) & S.VIRTQ_USED_F_NO_NOTIFY == 0


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, DEFAULT_FEATURES & ~EVENT_IDX], ids=["ev", "flags"])
def test_kicks_reenabled_before_sleeping(mem: GuestMemory, features: int) -> None:
    """The worker re-arms kicks before it sleeps: EVENT_IDX -> avail_event = last_avail_idx; without it
    VIRTQ_USED_F_NO_NOTIFY is clear. Otherwise the next kick would be lost."""
    with VirtioBlkDevice(RamBackend(CAP * 512), mem, spin_us=100) as dev:
        drv = RawDriver(dev, mem, features=features)
        drv.handshake()
        for _ in range(3):
            drv.submit(0, S.VIRTIO_BLK_T_FLUSH)
            drv.kick(0)
            drv.complete(0, drv.wait_used(0, 1)[0])
        deadline = time.monotonic() + 10
        while not (rearmed(drv, features) and dev.stats()["queues"][0]["sleeps"] >= 2):
            assert time.monotonic() < deadline, "worker never re-armed kicks"
            time.sleep(0.001)
        # a kick after the sleep is not lost
        drv.submit(0, S.VIRTIO_BLK_T_FLUSH)
        drv.kick(0, via_fd=True)
        assert drv.wait_used(0, 1)[0].len == 1


def test_reset_drains_popped_requests_then_device_is_reusable(mem: GuestMemory) -> None:
    """Writing 0 stops the workers only after every popped request completed; rings are forgotten."""
    be = RamBackend(CAP * 512)
    with VirtioBlkDevice(be, mem) as dev:
        drv = RawDriver(dev, mem, queue_size=16, max_data=64 * 1024)
        drv.handshake()
        reqs = [drv.submit(0, S.VIRTIO_BLK_T_IN, 0, in_len=64 * 1024) for _ in range(16)]
        drv.kick(0)
        dev.write32(S.VIRTIO_MMIO_STATUS, 0)
        assert dev.read32(S.VIRTIO_MMIO_STATUS) == 0
        done = sum(drv.status_of(r) != 0xFF for r in reqs)
        assert drv.used_idx(0) == done  # completed exactly the requests it started
        assert all(s["running"] is False for s in dev.stats()["queues"])
        drv.handshake()
        drv.submit(0, S.VIRTIO_BLK_T_OUT, 1, data=b"q" * 512)
        drv.kick(0)
        (u,) = drv.wait_used(0, 1)
        assert u.len == 1
        assert be.ram[512:1024].tobytes() == b"q" * 512


def test_needs_reset_wakes_a_sleeping_driver(mem: GuestMemory) -> None:
    """§2.1.2: NEEDS_RESET + configuration change notification; the call eventfds fire too, so a driver
    blocked on completions notices."""
    with VirtioBlkDevice(RamBackend(CAP * 512), mem, num_queues=2) as dev:
        drv = RawDriver(dev, mem, num_queues=2)
        drv.handshake()
        drv.put_avail(0, 200)
        drv.kick(0)
        assert select.select([dev.queue_interrupt_fd(1)], [], [], 10)[0]
        assert select.select([dev.config_interrupt_fd()], [], [], 0)[0]
        assert dev.read32(S.VIRTIO_MMIO_STATUS) & S.VIRTIO_CONFIG_S_NEEDS_RESET
        assert dev.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS) & S.VIRTIO_MMIO_INT_CONFIG
        # The worker may be polling and see the head before the kick arrives; the kick
        # is then refused too (NEEDS_RESET is already set), a second, legitimate record.
        (diag,) = [d for d in dev.diagnostics() if d.code == D_HEAD_OUT_OF_RANGE]
        assert "head 200" in str(diag)


def test_close_stops_running_workers(mem: GuestMemory) -> None:
    dev = VirtioBlkDevice(RamBackend(CAP * 512), mem, num_queues=3)
    RawDriver(dev, mem, num_queues=3).handshake()
    threads = [q.thread for q in dev._queues]
    assert all(t is not None and t.is_alive() for t in threads)
    dev.close()
    assert not any(t is not None and t.is_alive() for t in threads)
