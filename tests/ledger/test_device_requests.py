"""Requests through the device kernel, one pass at a time (deterministic, no threads).

A :class:`ledger.testing.RawDriver` lays out the rings; the test then calls
``run_queue_once`` which runs the compiled worker kernel in single-pass mode.
Each spec "device MUST" that the device implements has a negative test with the
clause quoted (virtio 1.2; wording shortened where marked "paraphrased").
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from ledger import _spec as S
from ledger.backend import FileBackend, ImageSizeError, RamBackend, create_image
from ledger.device import DEFAULT_FEATURES, VirtioBlkDevice
from ledger.diagnostics import (
    D_AVAIL_IDX_JUMP,
    D_CHAIN_TOO_LONG,
    D_DATA_NOT_SECTOR_MULTIPLE,
    D_DESC_OUTSIDE_MEMORY,
    D_DISCARD_UNMAP,
    D_DUPLICATE_HEAD,
    D_HEAD_OUT_OF_RANGE,
    D_HEADER_SHORT,
    D_IN_DATA_NOT_WRITABLE,
    D_INDIRECT_BAD_LEN,
    D_INDIRECT_NOT_NEGOTIATED,
    D_INDIRECT_WITH_NEXT,
    D_NESTED_INDIRECT,
    D_NEXT_OUT_OF_RANGE,
    D_NO_STATUS,
    D_OUT_DATA_NOT_READABLE,
    D_READABLE_AFTER_WRITABLE,
    D_RING_OUTSIDE_MEMORY,
    D_SECTOR_OUT_OF_RANGE,
    D_SEGMENT_BAD_FLAGS,
    D_TOO_MANY_SEGMENTS,
    D_UNSUPPORTED_TYPE,
    D_WRITE_READ_ONLY,
)
from ledger.memory import GuestMemory
from ledger.testing import RawDriver, Used

NEXT, WRITE, INDIRECT = S.VIRTQ_DESC_F_NEXT, S.VIRTQ_DESC_F_WRITE, S.VIRTQ_DESC_F_INDIRECT
OK, IOERR, UNSUPP = S.VIRTIO_BLK_S_OK, S.VIRTIO_BLK_S_IOERR, S.VIRTIO_BLK_S_UNSUPP
NEEDS_RESET = S.VIRTIO_CONFIG_S_NEEDS_RESET
NO_INDIRECT = DEFAULT_FEATURES & ~(1 << S.VIRTIO_RING_F_INDIRECT_DESC)
NO_EVENT_IDX = DEFAULT_FEATURES & ~(1 << S.VIRTIO_RING_F_EVENT_IDX)
CAP = 128  # sectors


class Rig:
    """A device in single-pass mode, its memory, backend and a RawDriver after the handshake."""

    def __init__(
        self, mem: GuestMemory, backend: RamBackend | FileBackend, dev: VirtioBlkDevice, drv: RawDriver
    ) -> None:
        self.mem, self.backend, self.dev, self.drv = mem, backend, dev, drv

    def run(self, q: int = 0) -> int:
        return self.dev.run_queue_once(q)

    def one(self, rtype: int, sector: int = 0, **kw: object) -> tuple[int, Used, bytes]:
        """Submit one well-formed request, run the queue, return (status, used, data)."""
        req = self.drv.submit(0, rtype, sector, **kw)  # type: ignore[arg-type]
        assert self.run() == 1
        (u,) = self.drv.wait_used(0, 1, timeout=0)
        self.drv.complete(0, u)
        assert u.id == req.head
        return self.drv.status_of(req), u, self.drv.data_of(req)

    def raw(self, descs: list[tuple[int, ...]], head: int = 0, table: int | None = None) -> list[Used]:
        """Write descriptors ``(index, addr, len, flags[, next])`` and make ``head`` available."""
        q = self.drv.queues[0]
        for i, addr, ln, fl, *nx in descs:
            self.drv.write_desc(q.desc if table is None else table, i, addr, ln, fl, nx[0] if nx else 0)
        self.drv.put_avail(0, head)
        self.run()
        return self.drv.wait_used(0, 1, timeout=0) if self.drv.used_idx(0) != q.last_used else []

    def codes(self) -> list[int]:
        return [d.code for d in self.dev.diagnostics()]

    def buf(self, n: int, fill: bytes = b"\0") -> int:
        gpa = self.drv.alloc.alloc(max(n, 1), 16)
        self.mem.write(gpa, (fill * n)[:n])
        return gpa

    def hdr(self, rtype: int, sector: int = 0) -> int:
        gpa = self.buf(16)
        self.mem.write(gpa, struct.pack("<IIQ", rtype, 0, sector))
        return gpa


Factory = Callable[..., Rig]


@pytest.fixture
def rig(tmp_path: os.PathLike[str]) -> Iterator[Factory]:
    made: list[tuple[GuestMemory, VirtioBlkDevice, RamBackend | FileBackend]] = []

    def make(
        features: int | None = None,
        *,
        read_only: bool = False,
        file: bool = False,
        queue_size: int = 8,
        **dev_kw: object,
    ) -> Rig:
        mem = GuestMemory(2 << 20)
        backend: RamBackend | FileBackend
        if file:
            path = os.path.join(os.fspath(tmp_path), "disk.img")
            create_image(path, CAP * 512)
            backend = FileBackend(path, read_only=read_only)
        else:
            backend = RamBackend(CAP * 512, read_only=read_only, name="ramdisk")
            backend.ram[:] = np.arange(CAP * 512) % 251
        dev = VirtioBlkDevice(backend, mem, single_pass=True, **dev_kw)  # type: ignore[arg-type]
        drv = RawDriver(dev, mem, queue_size=queue_size, features=features)
        drv.handshake()
        made.append((mem, dev, backend))
        return Rig(mem, backend, dev, drv)

    yield make
    for mem, dev, backend in made:
        dev.close()
        backend.close()
        mem.close()


def ram_bytes(r: Rig, sector: int, n: int) -> bytes:
    assert isinstance(r.backend, RamBackend)
    return r.backend.ram[sector * 512 : sector * 512 + n].tobytes()


# --- well-formed requests ------------------------------------------------------


@pytest.mark.parametrize("features", [None, NO_INDIRECT])
def test_write_then_read_round_trip(rig: Factory, features: int | None) -> None:
    """§2.7.8.2 (paraphrased): the device MUST set used len to the number of bytes it wrote into the
    buffer (data + status for a read; just the status byte for a write)."""
    r = rig(features)
    data = bytes(range(256)) * 8  # 4 sectors
    st, u, _ = r.one(S.VIRTIO_BLK_T_OUT, 10, data=data)
    assert (st, u.len) == (OK, 1)
    assert ram_bytes(r, 10, len(data)) == data
    st, u, got = r.one(S.VIRTIO_BLK_T_IN, 10, in_len=len(data))
    assert (st, u.len, got) == (OK, len(data) + 1, data)
    s = r.dev.stats()["queues"][0]
    assert (s["requests"], s["bytes_read"], s["bytes_written"]) == (2, 2048, 2048)


def test_get_id_flush_and_unsupported(rig: Factory) -> None:
    """§5.2.6: GET_ID answers 20 bytes; unknown types get VIRTIO_BLK_S_UNSUPP."""
    r = rig(serial="SOVFS-TEST")
    st, u, got = r.one(S.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (st, u.len, got) == (OK, 21, b"SOVFS-TEST".ljust(20, b"\0"))
    assert r.one(S.VIRTIO_BLK_T_FLUSH)[0] == OK
    assert r.one(S.VIRTIO_BLK_T_GET_LIFETIME, in_len=8)[0] == UNSUPP
    assert r.one(99)[0] == UNSUPP
    assert r.codes() == [D_UNSUPPORTED_TYPE, D_UNSUPPORTED_TYPE]


def test_default_serial_from_backend_name(rig: Factory) -> None:
    r = rig()
    assert r.one(S.VIRTIO_BLK_T_GET_ID, in_len=20)[2] == b"ramdisk".ljust(20, b"\0")


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def test_write_zeroes_and_discard(rig: Factory) -> None:
    """§5.2.6.1: "after a write zeroes command is completed, reads of the specified ranges of sectors
    MUST return zeroes" (with or without the unmap flag)."""
    r = rig()
    assert r.one(S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg(2, 3) + seg(20, 1, 1))[0] == OK
    assert ram_bytes(r, 2, 3 * 512) == bytes(3 * 512)
    assert ram_bytes(r, 20, 512) == bytes(512)
    assert ram_bytes(r, 5, 1) != b"\0"
    assert r.one(S.VIRTIO_BLK_T_DISCARD, data=seg(40, 8))[0] == OK
    assert r.dev.diagnostics() == []


def test_discard_and_write_zeroes_flag_rules(rig: Factory) -> None:
    """§5.2.6.1: "the device MUST set the status byte to VIRTIO_BLK_S_UNSUPP for discard and write
    zeroes commands if any unknown flag is set. Furthermore, the device MUST set the status byte to
    VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is set." """
    r = rig()
    before = ram_bytes(r, 0, CAP * 512)
    assert r.one(S.VIRTIO_BLK_T_DISCARD, data=seg(1, 1, 1))[0] == UNSUPP
    assert r.one(S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg(1, 1, 2))[0] == UNSUPP
    assert r.one(S.VIRTIO_BLK_T_DISCARD, data=seg(1, 1, 0x80))[0] == UNSUPP
    assert r.codes() == [D_DISCARD_UNMAP, D_SEGMENT_BAD_FLAGS, D_SEGMENT_BAD_FLAGS]
    assert ram_bytes(r, 0, CAP * 512) == before


def test_too_many_segments_unsupp(rig: Factory) -> None:
    """QSD behaviour (reference §2.3): more segments than max_write_zeroes_seg -> UNSUPP."""
    r = rig()
    maxseg = struct.unpack("<I", r.dev.read_config(S.BLK_CFG_MAX_WRITE_ZEROES_SEG, 4))[0]
    r.drv.max_data = 16 * (maxseg + 1)
    r.drv.queues[0].slots.clear()
    assert r.one(S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg(0, 1) * (maxseg + 1))[0] == UNSUPP
    assert r.codes() == [D_TOO_MANY_SEGMENTS]


def test_write_to_read_only_device(rig: Factory) -> None:
    """§5.2.6.1: "A device MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if the
    VIRTIO_BLK_F_RO feature if offered, and MUST NOT write any data." """
    r = rig(read_only=True)
    assert r.drv.has(S.VIRTIO_BLK_F_RO)
    before = ram_bytes(r, 0, CAP * 512)
    assert r.one(S.VIRTIO_BLK_T_OUT, 4, data=b"\xaa" * 512)[0] == IOERR
    assert r.one(S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg(4, 1))[0] == IOERR
    assert r.one(S.VIRTIO_BLK_T_DISCARD, data=seg(4, 1))[0] == IOERR
    assert ram_bytes(r, 0, CAP * 512) == before
    assert r.codes() == [D_WRITE_READ_ONLY] * 3
    assert r.one(S.VIRTIO_BLK_T_IN, 4, in_len=512)[0] == OK


def test_range_and_length_checks(rig: Factory) -> None:
    """Sector ranges past capacity and data lengths that are not whole sectors -> IOERR (§5.2.6)."""
    r = rig()
    assert r.one(S.VIRTIO_BLK_T_IN, CAP - 1, in_len=1024)[0] == IOERR
    assert r.one(S.VIRTIO_BLK_T_IN, 2**63 + 5, in_len=512)[0] == IOERR
    assert r.one(S.VIRTIO_BLK_T_OUT, 0, data=b"x" * 100)[0] == IOERR
    assert r.one(S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg(CAP, 1))[0] == IOERR
    assert r.codes() == [D_SECTOR_OUT_OF_RANGE, D_SECTOR_OUT_OF_RANGE, D_DATA_NOT_SECTOR_MULTIPLE,
                         D_SECTOR_OUT_OF_RANGE]


# --- chain layout -------------------------------------------------------------


def test_reads_into_readable_buffer_are_refused_and_explained(rig: Factory) -> None:
    """The classic "reads come back as zeros" bug: the data descriptor lacks VIRTQ_DESC_F_WRITE."""
    r = rig(NO_INDIRECT)
    h, d, s = r.hdr(S.VIRTIO_BLK_T_IN, 8), r.buf(512), r.buf(1, b"\xff")
    r.drv.queues[0].last_used = 0
    for _ in range(12):  # make this request number 12 on the queue
        r.one(S.VIRTIO_BLK_T_FLUSH)
    (u,) = r.raw([(3, h, 16, NEXT, 5), (5, d, 512, NEXT, 6), (6, s, 1, WRITE)], head=3)
    assert (u.id, u.len) == (3, 1)
    assert r.mem.read(s, 1) == bytes([IOERR])
    (diag,) = r.dev.diagnostics()
    assert diag.code == D_IN_DATA_NOT_WRITABLE
    assert str(diag) == (
        "queue 0 request 12 (IN, sector 8, head 3): data descriptor 5 is not device-writable "
        "(VIRTQ_DESC_F_WRITE missing), so nothing can be read into it; answered IOERR"
    )


def test_any_layout(rig: Factory) -> None:
    """§2.7.4: "The device MUST NOT make assumptions about the particular arrangement of descriptors."
    Header split 4+12, data split 100+412, status sharing the last writable buffer."""
    r = rig(NO_INDIRECT)
    r.backend.ram[512 * 7 : 512 * 8] = 0x5A  # type: ignore[union-attr]
    h = r.hdr(S.VIRTIO_BLK_T_IN, 7)
    d = r.buf(513, b"\xee")
    (u,) = r.raw([(0, h, 4, NEXT, 1), (1, h + 4, 12, NEXT, 2), (2, d, 100, NEXT | WRITE, 3),
                  (3, d + 100, 413, WRITE)])
    assert (u.id, u.len) == (0, 513)
    assert r.mem.read(d, 512) == b"\x5a" * 512
    assert r.mem.read(d + 512, 1) == bytes([OK])


def test_readable_after_writable_refused(rig: Factory) -> None:
    """§2.7.4.2 (driver MUST): device-writable descriptors come after all device-readable ones."""
    r = rig(NO_INDIRECT)
    h, s, d = r.hdr(S.VIRTIO_BLK_T_OUT, 0), r.buf(1, b"\xff"), r.buf(512)
    (u,) = r.raw([(0, h, 16, NEXT, 1), (1, s, 1, NEXT | WRITE, 2), (2, d, 512, 0)])
    assert u.len == 0
    assert r.codes() == [D_READABLE_AFTER_WRITABLE]
    assert r.mem.read(s, 1) == b"\xff"  # the walk failed: no status byte can be trusted


def test_out_data_must_be_readable_and_header_complete(rig: Factory) -> None:
    r = rig(NO_INDIRECT)
    h, d, s = r.hdr(S.VIRTIO_BLK_T_OUT, 0), r.buf(512), r.buf(1)
    (u,) = r.raw([(0, h, 16, NEXT, 1), (1, d, 512, NEXT | WRITE, 2), (2, s, 1, WRITE)])
    assert r.mem.read(s, 1) == bytes([IOERR])
    (u,) = r.raw([(0, h, 8, NEXT, 1), (1, s, 1, WRITE)])
    assert (u.len, r.mem.read(s, 1)) == (1, bytes([IOERR]))
    (u,) = r.raw([(0, h, 16, 0)])
    assert u.len == 0
    assert r.codes() == [D_OUT_DATA_NOT_READABLE, D_HEADER_SHORT, D_NO_STATUS]


def test_loop_and_next_out_of_range(rig: Factory) -> None:
    """§2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"; chains are
    bounded by the queue size; next must name a descriptor of the table. The walk never hangs."""
    r = rig(NO_INDIRECT)
    h, s = r.hdr(S.VIRTIO_BLK_T_FLUSH), r.buf(1)
    (u,) = r.raw([(0, h, 16, NEXT, 1), (1, s, 0, NEXT, 0)])
    assert (u.id, u.len) == (0, 0)
    (u,) = r.raw([(0, h, 16, NEXT, 8)])
    assert u.len == 0
    (u,) = r.raw([(0, 2**64 - 8, 16, NEXT, 1), (1, s, 1, WRITE)])
    assert r.codes() == [D_CHAIN_TOO_LONG, D_NEXT_OUT_OF_RANGE, D_DESC_OUTSIDE_MEMORY]
    assert "next = 8" in str(r.dev.diagnostics()[1])


# --- indirect descriptors -----------------------------------------------------------


def test_indirect_write_flag_ignored_and_chain_then_indirect(rig: Factory) -> None:
    """§2.7.5.3.2: "The device MUST ignore the write-only flag (flags&VIRTQ_DESC_F_WRITE) in the
    descriptor that refers to an indirect table. The device MUST handle the case of zero or more normal
    chained descriptors followed by a single descriptor with flags&VIRTQ_DESC_F_INDIRECT." """
    r = rig()
    h, d, s = r.hdr(S.VIRTIO_BLK_T_IN, 1), r.buf(512), r.buf(1, b"\xff")
    t = r.buf(48)
    for i, (a, ln, fl) in enumerate([(h, 16, 0), (d, 512, WRITE), (s, 1, WRITE)]):
        r.drv.write_desc(t, i, a, ln, fl | (NEXT if i < 2 else 0), i + 1)
    (u,) = r.raw([(0, t, 48, INDIRECT | WRITE)])
    assert (u.len, r.mem.read(s, 1)) == (513, bytes([OK]))
    # header in the main table, data + status in an indirect table
    t2 = r.buf(32)
    r.drv.write_desc(t2, 0, d, 512, WRITE | NEXT, 1)
    r.drv.write_desc(t2, 1, s, 1, WRITE)
    r.mem.write(s, b"\xff")
    (u,) = r.raw([(0, h, 16, NEXT, 1), (1, t2, 32, INDIRECT)])
    assert (u.len, r.mem.read(s, 1)) == (513, bytes([OK]))
    assert r.dev.diagnostics() == []


def test_indirect_table_rules(rig: Factory) -> None:
    """§2.7.5.3.1 (driver MUSTs the device checks): no INDIRECT inside an indirect table, not INDIRECT
    together with NEXT, table length a multiple of 16; INDIRECT only when negotiated."""
    r = rig()
    h, _s = r.hdr(S.VIRTIO_BLK_T_FLUSH), r.buf(1)
    t = r.buf(64)
    r.drv.write_desc(t, 0, h, 16, NEXT, 1)
    r.drv.write_desc(t, 1, t, 32, INDIRECT)
    assert r.raw([(0, t, 32, INDIRECT)])[0].len == 0
    assert r.raw([(0, t, 32, INDIRECT | NEXT, 1)])[0].len == 0
    assert r.raw([(0, t, 24, INDIRECT)])[0].len == 0
    assert r.raw([(0, t, 16 * 4096, INDIRECT)])[0].len == 0
    assert r.codes() == [D_NESTED_INDIRECT, D_INDIRECT_WITH_NEXT, D_INDIRECT_BAD_LEN, D_INDIRECT_BAD_LEN]
    r2 = rig(NO_INDIRECT)
    assert r2.raw([(0, t, 32, INDIRECT)])[0].len == 0
    assert r2.codes() == [D_INDIRECT_NOT_NEGOTIATED]


# --- ring corruption -> DEVICE_NEEDS_RESET ------------------------------------------


def assert_needs_reset(r: Rig, code: int) -> None:
    """§2.1.2: "The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state that a reset is
    needed. If DRIVER_OK is set, after it sets DEVICE_NEEDS_RESET, the device MUST send a device
    configuration change notification to the driver." """
    assert r.dev.read32(S.VIRTIO_MMIO_STATUS) & NEEDS_RESET
    assert r.dev.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS) & S.VIRTIO_MMIO_INT_CONFIG
    assert select.select([r.dev.config_interrupt_fd()], [], [], 0)[0]
    assert select.select([r.dev.queue_interrupt_fd(0)], [], [], 0)[0]  # sleeping drivers wake too
    assert code in r.codes()
    assert r.dev.diagnostics()[-1].is_ring_error


def test_head_out_of_range_needs_reset(rig: Factory) -> None:
    r = rig()
    req = r.drv.submit(0, S.VIRTIO_BLK_T_FLUSH)
    r.drv.put_avail(0, 8)  # head 8 of a queue of 8
    r.run()
    assert_needs_reset(r, D_HEAD_OUT_OF_RANGE)
    assert r.drv.wait_used(0, 1, timeout=0) == [Used(req.head, 1)]  # popped before: completed
    r.drv.submit(0, S.VIRTIO_BLK_T_FLUSH)
    assert r.run() == 0  # the queue stays stopped
    r.dev.write32(S.VIRTIO_MMIO_STATUS, 0)
    assert r.dev.read32(S.VIRTIO_MMIO_STATUS) == 0


def test_avail_idx_jump_needs_reset(rig: Factory) -> None:
    r = rig()
    r.drv.set_avail_idx(0, 9)
    r.run()
    assert_needs_reset(r, D_AVAIL_IDX_JUMP)


def test_duplicate_in_flight_head_needs_reset(rig: Factory) -> None:
    r = rig()
    req = r.drv.submit(0, S.VIRTIO_BLK_T_FLUSH, publish=False)
    r.drv.put_avail(0, req.head)
    r.run()
    assert_needs_reset(r, D_DUPLICATE_HEAD)
    assert r.drv.wait_used(0, 1, timeout=0) == [Used(req.head, 1)]


def test_rings_outside_memory_need_reset(rig: Factory) -> None:
    r = rig(queue_size=8)
    r.dev.write32(S.VIRTIO_MMIO_STATUS, 0)
    d = r.drv
    for v in (1, 3):
        d.set_status(v)
    d.write_features(d.features)
    d.set_status(11)
    d.w32(S.VIRTIO_MMIO_QUEUE_SEL, 0)
    d.w32(S.VIRTIO_MMIO_QUEUE_NUM, 8)
    d.w32(S.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000)  # below guest memory
    d.w32(S.VIRTIO_MMIO_QUEUE_READY, 1)
    d.set_status(15)
    r.run()
    assert r.dev.read32(S.VIRTIO_MMIO_STATUS) & NEEDS_RESET
    assert D_RING_OUTSIDE_MEMORY in r.codes()


# --- notifications and ordering -----------------------------------------------------


def test_no_buffers_consumed_before_driver_ok(rig: Factory) -> None:
    """§3.1.1 / §2.1.2 (paraphrased): the device MUST NOT consume buffers or notify the driver before
    DRIVER_OK."""
    r = rig()
    r.dev.write32(S.VIRTIO_MMIO_STATUS, 0)
    r.drv.handshake(driver_ok=False)
    r.drv.submit(0, S.VIRTIO_BLK_T_FLUSH)
    r.drv.kick(0)
    r.drv.kick(0, via_fd=True)
    assert r.run() == 0
    assert r.drv.used_idx(0) == 0
    r.drv.driver_ok()
    assert r.run() == 1


def test_interrupt_suppression_without_event_idx(rig: Factory) -> None:
    """§2.7.7.2: without EVENT_IDX the device does not interrupt while avail->flags has NO_INTERRUPT."""
    r = rig(NO_EVENT_IDX)
    fd = r.dev.queue_interrupt_fd(0)
    r.drv.set_avail_flags(0, S.VIRTQ_AVAIL_F_NO_INTERRUPT)
    r.one(S.VIRTIO_BLK_T_FLUSH)
    assert r.dev.interrupt_status == 0
    assert not select.select([fd], [], [], 0)[0]
    r.drv.set_avail_flags(0, 0)
    r.one(S.VIRTIO_BLK_T_FLUSH)
    assert r.dev.interrupt_status & S.VIRTIO_MMIO_INT_VRING
    assert os.eventfd_read(fd) == 1


def test_interrupt_decision_with_event_idx(rig: Factory) -> None:
    """§2.7.10: with EVENT_IDX the device interrupts iff used_event lies in [old used idx, new used idx)."""
    r = rig()
    fd = r.dev.queue_interrupt_fd(0)
    r.drv.set_used_event(0, 2)  # "interrupt me after the third completion"
    r.one(S.VIRTIO_BLK_T_FLUSH)
    r.one(S.VIRTIO_BLK_T_FLUSH)
    assert not select.select([fd], [], [], 0)[0]
    r.one(S.VIRTIO_BLK_T_FLUSH)
    assert os.eventfd_read(fd) == 1
    assert r.dev.interrupt_status & S.VIRTIO_MMIO_INT_VRING


@pytest.mark.parametrize("order", ["fifo", "reverse"])
def test_completion_order(rig: Factory, order: str) -> None:
    """Each popped batch completes in the configured order (drivers must match used ids, not positions)."""
    r = rig(NO_INDIRECT, completion_order=order, queue_size=16)
    heads = [r.drv.submit(0, S.VIRTIO_BLK_T_IN, i, in_len=512).head for i in range(4)]
    assert heads == [0, 3, 6, 9]
    r.run()
    got = [u.id for u in r.drv.wait_used(0, 4, timeout=0)]
    assert sorted(got) == heads
    if order == "fifo":
        assert got == heads
    else:
        assert got == heads[::-1]


def test_shuffled_completion_is_seeded(rig: Factory) -> None:
    orders = []
    for _ in range(2):
        r = rig(NO_INDIRECT, completion_order="shuffle", seed=7, queue_size=32)
        heads = [r.drv.submit(0, S.VIRTIO_BLK_T_FLUSH).head for _ in range(10)]
        r.run()
        got = [u.id for u in r.drv.wait_used(0, 10, timeout=0)]
        assert sorted(got) == sorted(heads)
        orders.append(got)
    assert orders[0] == orders[1]
    assert orders[0] != sorted(orders[0])


def test_index_wrap_past_65536(rig: Factory) -> None:
    """Ring indices are free-running u16 (§2.7.6): 65,600 requests cross the wrap without a stall."""
    r = rig(NO_INDIRECT, queue_size=16)
    req = r.drv.submit(0, S.VIRTIO_BLK_T_FLUSH, publish=False)
    q = r.drv.queues[0]
    q.avail_idx = 0
    total = 0
    mem16 = r.mem.view(q.avail, 4 + 2 * 16).view(np.uint16)
    mem16[2:] = req.head  # every ring slot names the same (completed-before-reuse) chain
    for _ in range(65_600):
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        mem16[1] = q.avail_idx
        total += r.run()
    assert total == 65_600
    assert r.drv.used_idx(0) == 65_600 & 0xFFFF
    assert r.dev.stats()["queues"][0]["requests"] == 65_600
    assert r.dev.diagnostics() == []


# --- file backend -------------------------------------------------------------------


def test_file_backend_round_trip_and_zeroing(rig: Factory) -> None:
    r = rig(file=True)
    assert isinstance(r.backend, FileBackend)
    data = os.urandom(2048)
    assert r.one(S.VIRTIO_BLK_T_OUT, 3, data=data)[0] == OK
    assert r.one(S.VIRTIO_BLK_T_FLUSH)[0] == OK
    with open(r.backend.path, "rb") as f:
        f.seek(3 * 512)
        assert f.read(2048) == data
    assert r.one(S.VIRTIO_BLK_T_WRITE_ZEROES, data=seg(3, 1) + seg(4, 1, 1))[0] == OK
    assert r.one(S.VIRTIO_BLK_T_DISCARD, data=seg(5, 1))[0] == OK
    assert r.one(S.VIRTIO_BLK_T_IN, 3, in_len=2048)[2][:1024] == bytes(1024)
    assert r.dev.diagnostics() == []


def test_file_backend_read_only(rig: Factory) -> None:
    r = rig(file=True, read_only=True)
    assert r.one(S.VIRTIO_BLK_T_OUT, 0, data=b"z" * 512)[0] == IOERR
    with open(r.backend.path, "rb") as f:  # type: ignore[union-attr]
        assert f.read(512) == bytes(512)


def test_image_size_must_be_sector_multiple(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "odd.img")
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    with pytest.raises(ImageSizeError, match="multiple of 512"):
        FileBackend(path)
    assert issubclass(ImageSizeError, ValueError)
