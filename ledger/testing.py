"""Test helpers: :class:`RawDriver`, a deliberately low-level (and hostile-capable) driver.

Theory of operation
-------------------
``RawDriver`` speaks to a :class:`ledger.device.VirtioBlkDevice` the way a
guest kernel would - through ``read32``/``write32`` and guest memory - but
hides nothing: a test can write any descriptor, any available-ring entry and
any index, kick, and then wait (with a timeout) for used entries.  On top of
that raw layer, :meth:`RawDriver.submit` builds well-formed requests (direct
chains, or one indirect descriptor when INDIRECT_DESC was negotiated) so that
threaded tests can push real I/O and compare with a model.

It is single-threaded and written for clarity, not speed.  Buffers come from a
:class:`ledger.memory.GuestAllocator`; each head owns a fixed buffer slot, so
at most ``queue_size`` requests are in flight per queue.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

from ledger import _spec as S
from ledger._layout import (
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_event_offset,
    used_ring_size,
)
from ledger.memory import GuestAllocator, GuestMemory

__all__ = ["RawDriver", "RawQueue", "Request", "Used"]


@dataclass(frozen=True)
class Used:
    id: int
    len: int


@dataclass
class Request:
    """A request built by :meth:`RawDriver.submit`."""

    queue: int
    head: int
    rtype: int
    sector: int
    hdr: int
    data: int
    data_len: int
    status: int
    descs: list[int] = field(default_factory=list)


@dataclass
class RawQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    slots: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    pending: dict[int, Request] = field(default_factory=dict)


class RawDriver:
    """A raw virtio-mmio driver for tests.

    Args:
        device: the device under test.
        memory: its guest memory.
        queue_size: QueueNum for every queue.
        num_queues: how many queues to set up (≤ the device's).
        features: bits to accept; default everything offered.
        max_data: data bytes per buffer slot.
    """

    def __init__(
        self,
        device: object,
        memory: GuestMemory,
        *,
        queue_size: int = 8,
        num_queues: int = 1,
        features: int | None = None,
        max_data: int = 16 * 1024,
    ) -> None:
        from ledger.device import VirtioBlkDevice

        assert isinstance(device, VirtioBlkDevice)
        self.dev = device
        self.mem = memory
        self.alloc = GuestAllocator(memory)
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.want_features = features
        self.max_data = max_data
        self.features = 0
        self.queues: list[RawQueue] = []

    # --- registers -------------------------------------------------------------
    def r32(self, off: int) -> int:
        return self.dev.read32(off)

    def w32(self, off: int, val: int) -> None:
        self.dev.write32(off, val)

    def set_status(self, bits: int) -> int:
        """Write Status and read it back."""
        self.w32(S.VIRTIO_MMIO_STATUS, bits)
        return self.r32(S.VIRTIO_MMIO_STATUS)

    def device_features(self) -> int:
        self.w32(S.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        lo = self.r32(S.VIRTIO_MMIO_DEVICE_FEATURES)
        self.w32(S.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        hi = self.r32(S.VIRTIO_MMIO_DEVICE_FEATURES)
        return lo | hi << 32

    def write_features(self, bits: int) -> None:
        self.w32(S.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        self.w32(S.VIRTIO_MMIO_DRIVER_FEATURES, bits & 0xFFFF_FFFF)
        self.w32(S.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        self.w32(S.VIRTIO_MMIO_DRIVER_FEATURES, bits >> 32 & 0xFFFF_FFFF)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # --- handshake ---------------------------------------------------------------
    def handshake(self, *, driver_ok: bool = True) -> int:
        """§3.1.1 in order; returns the status read back at the end."""
        assert self.r32(S.VIRTIO_MMIO_MAGIC_VALUE) == S.VIRTIO_MMIO_MAGIC
        assert self.r32(S.VIRTIO_MMIO_VERSION) == 2
        self.set_status(0)
        self.alloc.reset()
        self.set_status(S.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.set_status(S.VIRTIO_CONFIG_S_ACKNOWLEDGE | S.VIRTIO_CONFIG_S_DRIVER)
        offered = self.device_features()
        self.features = offered if self.want_features is None else self.want_features
        self.write_features(self.features)
        st = self.set_status(
            S.VIRTIO_CONFIG_S_ACKNOWLEDGE | S.VIRTIO_CONFIG_S_DRIVER | S.VIRTIO_CONFIG_S_FEATURES_OK
        )
        if not st & S.VIRTIO_CONFIG_S_FEATURES_OK:
            return st
        self.queues = [self.setup_queue(i, self.queue_size) for i in range(self.num_queues)]
        if driver_ok:
            return self.set_status(st | S.VIRTIO_CONFIG_S_DRIVER_OK)
        return st

    def setup_queue(self, qi: int, size: int) -> RawQueue:
        """Allocate rings for queue ``qi`` and program its registers (QueueReady = 1)."""
        q = RawQueue(
            qi,
            size,
            self.alloc.alloc(desc_table_size(size), 16),
            self.alloc.alloc(avail_ring_size(size), 2),
            self.alloc.alloc(used_ring_size(size), 4),
            free=list(range(size)),
        )
        self.w32(S.VIRTIO_MMIO_QUEUE_SEL, qi)
        assert self.r32(S.VIRTIO_MMIO_QUEUE_READY) == 0
        self.w32(S.VIRTIO_MMIO_QUEUE_NUM, size)
        for lo, v in (
            (S.VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc),
            (S.VIRTIO_MMIO_QUEUE_DRIVER_LOW, q.avail),
            (S.VIRTIO_MMIO_QUEUE_DEVICE_LOW, q.used),
        ):
            self.w32(lo, v & 0xFFFF_FFFF)
            self.w32(lo + 4, v >> 32)
        self.w32(S.VIRTIO_MMIO_QUEUE_READY, 1)
        return q

    def driver_ok(self) -> int:
        return self.set_status(self.r32(S.VIRTIO_MMIO_STATUS) | S.VIRTIO_CONFIG_S_DRIVER_OK)

    # --- raw ring access -----------------------------------------------------------
    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Write descriptor ``i`` of the table at GPA ``table`` (any values: this is the hostile layer)."""
        self.mem.write(
            table + 16 * i,
            struct.pack("<QIHH", addr & (2**64 - 1), length & 0xFFFF_FFFF, flags & 0xFFFF, nxt & 0xFFFF),
        )

    def put_avail(self, qi: int, head: int, *, publish: bool = True) -> None:
        """Append ``head`` to the available ring (and, by default, publish the new idx)."""
        q = self.queues[qi]
        self.mem.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", head & 0xFFFF))
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        if publish:
            self.set_avail_idx(qi, q.avail_idx)

    def set_avail_idx(self, qi: int, idx: int) -> None:
        """Store avail->idx (CPython's store is a plain aligned 16-bit store; x86 keeps it ordered)."""
        q = self.queues[qi]
        self.mem.write(q.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def set_avail_flags(self, qi: int, flags: int) -> None:
        self.mem.write(self.queues[qi].avail, struct.pack("<H", flags))

    def set_used_event(self, qi: int, idx: int) -> None:
        q = self.queues[qi]
        self.mem.write(q.avail + used_event_offset(q.size), struct.pack("<H", idx & 0xFFFF))

    def used_idx(self, qi: int) -> int:
        return int(struct.unpack("<H", self.mem.read(self.queues[qi].used + 2, 2))[0])

    def used_flags(self, qi: int) -> int:
        return int(struct.unpack("<H", self.mem.read(self.queues[qi].used, 2))[0])

    def avail_event(self, qi: int) -> int:
        q = self.queues[qi]
        return int(struct.unpack("<H", self.mem.read(q.used + avail_event_offset(q.size), 2))[0])

    def used_elem(self, qi: int, idx: int) -> Used:
        q = self.queues[qi]
        i, ln = struct.unpack("<II", self.mem.read(q.used + 4 + 8 * (idx % q.size), 8))
        return Used(i, ln)

    def kick(self, qi: int, *, via_fd: bool = False) -> None:
        if via_fd:
            os.eventfd_write(self.dev.queue_notify_fd(qi), 1)
        else:
            self.w32(S.VIRTIO_MMIO_QUEUE_NOTIFY, qi)

    def wait_used(self, qi: int, count: int = 1, timeout: float = 5.0) -> list[Used]:
        """Wait until ``count`` new used entries appear; return them (advancing last_used)."""
        q = self.queues[qi]
        deadline = time.monotonic() + timeout
        while (self.used_idx(qi) - q.last_used) & 0xFFFF < count:
            if self.dev.status & S.VIRTIO_CONFIG_S_NEEDS_RESET:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"queue {qi}: {count} used entries expected, used idx {self.used_idx(qi)}, "
                    f"last seen {q.last_used}"
                )
            time.sleep(0.0002)
        n = (self.used_idx(qi) - q.last_used) & 0xFFFF
        out = [self.used_elem(qi, q.last_used + k) for k in range(n)]
        q.last_used = (q.last_used + n) & 0xFFFF
        return out

    # --- well-formed requests ------------------------------------------------------
    def _slot(self, q: RawQueue, head: int) -> tuple[int, int, int, int]:
        if head not in q.slots:
            q.slots[head] = (
                self.alloc.alloc(16, 16),
                self.alloc.alloc(1, 1),
                self.alloc.alloc(self.max_data, 512),
                self.alloc.alloc(16 * 3, 16),
            )
        return q.slots[head]

    def submit(
        self,
        qi: int,
        rtype: int,
        sector: int = 0,
        *,
        data: bytes | None = None,
        in_len: int = 0,
        indirect: bool | None = None,
        publish: bool = True,
    ) -> Request:
        """Build and make available one request: header, optional data (OUT/DISCARD...: ``data``,
        IN/GET_ID: ``in_len`` writable bytes), status.  Uses an indirect table when negotiated
        (or when ``indirect`` says so)."""
        q = self.queues[qi]
        use_ind = self.has(S.VIRTIO_RING_F_INDIRECT_DESC) if indirect is None else indirect
        need = 1 if use_ind else (3 if (data or in_len) else 2)
        if len(q.free) < need:
            raise RuntimeError(f"queue {qi}: no free descriptors")
        descs = [q.free.pop(0) for _ in range(need)]
        head = descs[0]
        hdr, status, buf, table = self._slot(q, head)
        dlen = len(data) if data else in_len
        assert dlen <= self.max_data
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(status, b"\xff")
        if data:
            self.mem.write(buf, data)
        elems: list[tuple[int, int, int]] = [(hdr, 16, 0)]
        if dlen:
            elems.append((buf, dlen, 0 if data else S.VIRTQ_DESC_F_WRITE))
        elems.append((status, 1, S.VIRTQ_DESC_F_WRITE))
        if use_ind:
            for i, (a, ln, fl) in enumerate(elems):
                nxt = i + 1 if i + 1 < len(elems) else 0
                self.write_desc(table, i, a, ln, fl | (S.VIRTQ_DESC_F_NEXT if nxt else 0), nxt)
            self.write_desc(q.desc, head, table, 16 * len(elems), S.VIRTQ_DESC_F_INDIRECT)
        else:
            for i, (a, ln, fl) in enumerate(elems):
                nxt = descs[i + 1] if i + 1 < len(elems) else 0
                more = S.VIRTQ_DESC_F_NEXT if i + 1 < len(elems) else 0
                self.write_desc(q.desc, descs[i], a, ln, fl | more, nxt)
        req = Request(qi, head, rtype, sector, hdr, buf, dlen, status, descs)
        q.pending[head] = req
        self.put_avail(qi, head, publish=publish)
        return req

    def complete(self, qi: int, used: Used) -> Request:
        """Match a used entry to its request and free its descriptors."""
        q = self.queues[qi]
        req = q.pending.pop(used.id)
        q.free.extend(req.descs)
        return req

    def status_of(self, req: Request) -> int:
        return self.mem.read(req.status, 1)[0]

    def data_of(self, req: Request) -> bytes:
        return self.mem.read(req.data, req.data_len)
