"""The virtio-blk driver: probe, handshake, feature negotiation, queue set-up.

Theory of operation
-------------------
:class:`VirtioBlkDriver` does what a guest kernel's ``virtio_blk`` probe does,
through nothing but the register interface of virtio-mmio version 2 (§4.2.2)
and guest memory:

1. check MagicValue, Version and DeviceID;
2. reset (Status = 0), then ACKNOWLEDGE, then DRIVER;
3. read the 64 device feature bits, accept the subset we implement and the
   caller allows, write them back, set FEATURES_OK and re-read Status to see
   that the device kept it (§3.1.1);
4. read ``struct virtio_blk_config`` under ConfigGeneration (§2.5.1);
5. for each queue: select it, check it is not ready, read QueueNumMax, lay
   out the descriptor table, available ring and used ring in guest memory,
   write their addresses and size, set QueueReady;
6. set DRIVER_OK.

Each queue is a :class:`DriverQueue`: the driver-private bookkeeping arrays
that the kernels of :mod:`ledger._driver_kernels` operate on, plus the queue's
notification file descriptors.  The driver is single-threaded by design: one
thread (the trio thread, or the caller of the blocking client) owns all driver
state, so no lock is taken on the hot path; only the device runs elsewhere.

A request is never handed to the device unchecked by us: sectors and sizes are
checked against the capacity and the negotiated limits in :mod:`ledger.client`
before a descriptor is written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from . import _driver_kernels as K
from . import _spec as S
from .errors import DeviceError, DriverError
from .memory import GuestAllocator, GuestMemory

#: Every feature this driver implements (bit numbers).
SUPPORTED_FEATURES = (
    S.VIRTIO_F_VERSION_1,
    S.VIRTIO_RING_F_INDIRECT_DESC,
    S.VIRTIO_RING_F_EVENT_IDX,
    S.VIRTIO_BLK_F_SIZE_MAX,
    S.VIRTIO_BLK_F_SEG_MAX,
    S.VIRTIO_BLK_F_RO,
    S.VIRTIO_BLK_F_BLK_SIZE,
    S.VIRTIO_BLK_F_FLUSH,
    S.VIRTIO_BLK_F_TOPOLOGY,
    S.VIRTIO_BLK_F_CONFIG_WCE,
    S.VIRTIO_BLK_F_MQ,
    S.VIRTIO_BLK_F_DISCARD,
    S.VIRTIO_BLK_F_WRITE_ZEROES,
)
SUPPORTED_MASK = sum(1 << b for b in SUPPORTED_FEATURES)

#: Driver-side cap on data segments per request: our data buffers are
#: contiguous, so a request needs ceil(bytes / size_max) segments, and a small
#: cap keeps the per-head indirect tables small.
MAX_SEGMENTS = 16
#: Segment size used when the device does not limit it (no SIZE_MAX).
DEFAULT_SEGMENT_BYTES = 1 << 20


class MmioTransport(Protocol):
    """What the driver needs from the device side: registers and notification fds.

    The fds model KVM's ioeventfd/irqfd: writing 1 to ``queue_notify_fd(q)`` is
    the same as ``write32(QueueNotify, q)``, and the device signals
    ``queue_interrupt_fd(q)`` when it raises a used-buffer interrupt for ``q``.
    """

    def read32(self, offset: int) -> int: ...
    def write32(self, offset: int, value: int) -> None: ...
    def read_config(self, offset: int, size: int) -> bytes: ...
    def write_config(self, offset: int, data: bytes) -> None: ...
    def queue_notify_fd(self, q: int) -> int: ...
    def queue_interrupt_fd(self, q: int) -> int: ...


@dataclass
class BlkConfig:
    """The parts of ``struct virtio_blk_config`` the driver uses (§5.2.4)."""

    capacity: int  # in 512-byte sectors
    size_max: int = 0
    seg_max: int = 0
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    @classmethod
    def parse(cls, raw: bytes, features: int) -> BlkConfig:
        """Decode the config space; fields of features not negotiated keep defaults."""

        def has(bit: int) -> bool:
            return bool(features >> bit & 1)

        (capacity,) = struct.unpack_from("<Q", raw, S.BLK_CFG_CAPACITY)
        cfg = cls(capacity=capacity)
        if has(S.VIRTIO_BLK_F_SIZE_MAX):
            (cfg.size_max,) = struct.unpack_from("<I", raw, S.BLK_CFG_SIZE_MAX)
        if has(S.VIRTIO_BLK_F_SEG_MAX):
            (cfg.seg_max,) = struct.unpack_from("<I", raw, S.BLK_CFG_SEG_MAX)
        if has(S.VIRTIO_BLK_F_BLK_SIZE):
            (cfg.blk_size,) = struct.unpack_from("<I", raw, S.BLK_CFG_BLK_SIZE)
        if has(S.VIRTIO_BLK_F_TOPOLOGY):
            cfg.physical_block_exp, cfg.alignment_offset, cfg.min_io_size, cfg.opt_io_size = (
                struct.unpack_from("<BBHI", raw, S.BLK_CFG_PHYSICAL_BLOCK_EXP)
            )
        if has(S.VIRTIO_BLK_F_CONFIG_WCE) or has(S.VIRTIO_BLK_F_FLUSH):
            cfg.writeback = raw[S.BLK_CFG_WRITEBACK]
        if has(S.VIRTIO_BLK_F_MQ):
            (cfg.num_queues,) = struct.unpack_from("<H", raw, S.BLK_CFG_NUM_QUEUES)
        if has(S.VIRTIO_BLK_F_DISCARD):
            cfg.max_discard_sectors, cfg.max_discard_seg, cfg.discard_sector_alignment = struct.unpack_from(
                "<III", raw, S.BLK_CFG_MAX_DISCARD_SECTORS
            )
        if has(S.VIRTIO_BLK_F_WRITE_ZEROES):
            cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg = struct.unpack_from(
                "<II", raw, S.BLK_CFG_MAX_WRITE_ZEROES_SECTORS
            )
            cfg.write_zeroes_may_unmap = raw[S.BLK_CFG_WRITE_ZEROES_MAY_UNMAP]
        return cfg


def _i32(n: int) -> npt.NDArray[np.int32]:
    return np.zeros(n, dtype=np.int32)


@dataclass(eq=False)
class QueueState:
    """Driver-private arrays of one virtqueue, laid out for the batch kernels.

    ``layout`` carves the rings and per-head areas out of guest memory:
    descriptor table, available ring and used ring each on their own page;
    then 16-byte request headers, status bytes and indirect tables indexed by
    head descriptor, so a request's header and status need no allocation.
    """

    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    q: npt.NDArray[np.int64] = field(repr=False)
    free_next: npt.NDArray[np.int32] = field(repr=False)
    chain_next: npt.NDArray[np.int32] = field(repr=False)
    head_ndesc: npt.NDArray[np.int32] = field(repr=False)
    head_group: npt.NDArray[np.int32] = field(repr=False)
    head_gidx: npt.NDArray[np.int32] = field(repr=False)
    kick_buf: npt.NDArray[np.uint8] = field(repr=False)

    @classmethod
    def layout(
        cls,
        memory: GuestMemory,
        alloc: GuestAllocator,
        n: int,
        *,
        indirect: bool,
        event_idx: bool,
        seg_bytes: int,
        max_segs: int,
    ) -> QueueState:
        desc = alloc.alloc(16 * n, 4096)
        avail = alloc.alloc(6 + 2 * n, 4096)
        used = alloc.alloc(6 + 8 * n, 4096)
        hdr = alloc.alloc(16 * n, 16)
        status = alloc.alloc(n, 16)
        stride = max_segs + 2
        ind = alloc.alloc(16 * stride * n if indirect else 16, 16)
        m = memory
        q = np.zeros(K.Q_STATE_LEN, dtype=np.int64)
        q[K.Q_N] = n
        q[K.Q_DESC], q[K.Q_AVAIL], q[K.Q_USED] = m.offset(desc, 1), m.offset(avail, 1), m.offset(used, 1)
        q[K.Q_HDR_OFF], q[K.Q_HDR_GPA] = m.offset(hdr, 1), hdr
        q[K.Q_STATUS_OFF], q[K.Q_STATUS_GPA] = m.offset(status, 1), status
        q[K.Q_IND_OFF], q[K.Q_IND_GPA], q[K.Q_IND_STRIDE] = m.offset(ind, 1), ind, stride
        q[K.Q_FLAGS] = (K.F_INDIRECT if indirect else 0) | (K.F_EVENT_IDX if event_idx else 0)
        q[K.Q_SEG_BYTES] = seg_bytes
        q[K.Q_SEG_MAX] = max_segs
        q[K.Q_FREE_HEAD] = 0
        q[K.Q_NUM_FREE] = n
        free_next = np.arange(1, n + 1, dtype=np.int32)
        free_next[-1] = -1
        kick = np.zeros(8, dtype=np.uint8)
        kick[0] = 1
        return cls(
            desc_gpa=desc, avail_gpa=avail, used_gpa=used, q=q, free_next=free_next,
            chain_next=_i32(n), head_ndesc=_i32(n), head_group=_i32(n), head_gidx=_i32(n), kick_buf=kick,
        )  # fmt: skip


@dataclass(eq=False)
class DriverQueue:
    """One virtqueue as the driver sees it: its state and its notification fds."""

    index: int
    size: int
    mem: GuestMemory
    state: QueueState
    notify_fd: int
    interrupt_fd: int
    #: waiters asleep on ``interrupt_fd`` (a reaper task): while there is one, nobody
    #: else may suppress completion interrupts, or that waiter would never wake
    sleepers: int = 0

    @property
    def q(self) -> npt.NDArray[np.int64]:
        return self.state.q

    @property
    def inflight(self) -> int:
        return int(self.q[K.Q_INFLIGHT])

    @property
    def num_free(self) -> int:
        return int(self.q[K.Q_NUM_FREE])

    def descriptors_needed(self, nbytes: int) -> int:
        """Descriptors one request of ``nbytes`` of data takes in the main table."""
        if self.q[K.Q_FLAGS] & K.F_INDIRECT:
            return 1
        return -(-nbytes // int(self.q[K.Q_SEG_BYTES])) + 2

    def check(self) -> None:
        """Raise :class:`DeviceError` if the device has broken the protocol."""
        err = int(self.q[K.Q_ERROR])
        if err and err != K.E_NO_STATUS:
            raise DeviceError(f"queue {self.index}: {describe_queue_error(err, int(self.q[K.Q_ERROR_ARG]))}")


def describe_queue_error(code: int, arg: int) -> str:
    return {
        K.E_USED_ID_RANGE: f"device returned used id {arg}, which is not below the queue size",
        K.E_USED_NOT_HEAD: f"device returned used id {arg}, which is not a request in flight",
        K.E_USED_IDX_JUMP: f"device moved used->idx to {arg}, past the requests in flight",
        K.E_NO_STATUS: f"device completed request head {arg} without writing its status byte",
    }.get(code, f"error code {code} ({arg})")


class VirtioBlkDriver:
    """Probe and initialise a virtio-blk device over virtio-mmio; own its queues.

    Args:
        transport: the device's register interface and notification fds.
        memory: guest memory shared with the device.
        queue_size: wanted entries per queue (rounded down to a power of two and
            capped by QueueNumMax).
        num_queues: queues to use; ``None`` = all the device offers (MQ).
        features: mask of features the caller allows (tests switch off
            EVENT_IDX, INDIRECT_DESC, MQ with it); ``None`` = all supported.
        max_request_bytes: largest data buffer of one request; larger I/O is
            split by the client.

    Raises:
        DeviceError: not a virtio-blk device, or it refused the handshake.
    """

    def __init__(
        self,
        transport: MmioTransport,
        memory: GuestMemory,
        *,
        queue_size: int = 256,
        num_queues: int | None = None,
        features: int | None = None,
        max_request_bytes: int = 1 << 20,
    ) -> None:
        self.transport = transport
        self.memory = memory
        self.alloc = GuestAllocator(memory)
        self._probe()
        self.device_features = 0
        self.features = 0
        self.config = BlkConfig(capacity=0)
        self.queues: list[DriverQueue] = []
        self._handshake(
            queue_size,
            num_queues,
            SUPPORTED_MASK if features is None else features & SUPPORTED_MASK,
            max_request_bytes,
        )

    # --- probe and handshake --------------------------------------------------

    def _r(self, off: int) -> int:
        return self.transport.read32(off)

    def _w(self, off: int, val: int) -> None:
        self.transport.write32(off, val & 0xFFFFFFFF)

    def _probe(self) -> None:
        magic = self._r(S.VIRTIO_MMIO_MAGIC_VALUE)
        if magic != S.VIRTIO_MMIO_MAGIC:
            raise DeviceError(
                f"no virtio-mmio device: MagicValue is {magic:#x}, expected 0x74726976 ('virt')"
            )
        version = self._r(S.VIRTIO_MMIO_VERSION)
        if version != S.VIRTIO_MMIO_VERSION_2:
            raise DeviceError(f"virtio-mmio version {version} is not supported (need 2, i.e. virtio 1.x)")
        dev_id = self._r(S.VIRTIO_MMIO_DEVICE_ID)
        if dev_id != S.VIRTIO_ID_BLOCK:
            raise DeviceError(f"device id {dev_id} is not a block device (2)")

    def _status(self) -> int:
        return self._r(S.VIRTIO_MMIO_STATUS)

    def _add_status(self, bit: int) -> None:
        self._w(S.VIRTIO_MMIO_STATUS, self._status() | bit)

    def _fail(self, why: str) -> DeviceError:
        self._add_status(S.VIRTIO_CONFIG_S_FAILED)
        return DeviceError(why)

    def _handshake(
        self, queue_size: int, num_queues: int | None, allowed: int, max_request_bytes: int
    ) -> None:
        self._w(S.VIRTIO_MMIO_STATUS, 0)  # reset (§3.1.1 step 1)
        self._add_status(S.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self._add_status(S.VIRTIO_CONFIG_S_DRIVER)
        offered = 0
        for sel in (0, 1):
            self._w(S.VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
            offered |= self._r(S.VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel)
        self.device_features = offered
        if not offered >> S.VIRTIO_F_VERSION_1 & 1:
            raise self._fail("device does not offer VIRTIO_F_VERSION_1; legacy devices are not supported")
        accepted = offered & allowed
        for sel in (0, 1):
            self._w(S.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self._w(S.VIRTIO_MMIO_DRIVER_FEATURES, accepted >> (32 * sel))
        self._add_status(S.VIRTIO_CONFIG_S_FEATURES_OK)
        if not self._status() & S.VIRTIO_CONFIG_S_FEATURES_OK:
            raise self._fail(f"device refused our features {accepted:#x} (FEATURES_OK not kept)")
        self.features = accepted
        self.config = BlkConfig.parse(self._read_config_stable(), accepted)
        want_queues = self.config.num_queues if self.has(S.VIRTIO_BLK_F_MQ) else 1
        if num_queues is not None:
            want_queues = max(1, min(want_queues, num_queues))
        for qi in range(want_queues):
            queue = self._setup_queue(qi, queue_size, max_request_bytes)
            if queue is None:
                break
            self.queues.append(queue)
        if not self.queues:
            raise self._fail("device offers no usable queue (QueueNumMax is 0)")
        self._add_status(S.VIRTIO_CONFIG_S_DRIVER_OK)
        if self._status() & S.VIRTIO_CONFIG_S_NEEDS_RESET:
            raise DeviceError("device set DEVICE_NEEDS_RESET right after DRIVER_OK")

    def _read_config_stable(self) -> bytes:
        """Read the config space until ConfigGeneration is the same before and after (§2.5.1)."""
        for _ in range(100):
            gen = self._r(S.VIRTIO_MMIO_CONFIG_GENERATION)
            raw = self.transport.read_config(0, S.BLK_CFG_SIZE)
            if self._r(S.VIRTIO_MMIO_CONFIG_GENERATION) == gen:
                return raw
        raise self._fail("config space kept changing while being read")

    def _setup_queue(self, qi: int, queue_size: int, max_request_bytes: int) -> DriverQueue | None:
        self._w(S.VIRTIO_MMIO_QUEUE_SEL, qi)
        if self._r(S.VIRTIO_MMIO_QUEUE_READY):
            raise self._fail(f"queue {qi} is already ready right after reset")
        num_max = self._r(S.VIRTIO_MMIO_QUEUE_NUM_MAX)
        if num_max == 0:
            return None
        n = 1 << (min(queue_size, num_max, S.VIRTQ_MAX_SIZE).bit_length() - 1)
        seg_bytes = (
            self.config.size_max
            if self.has(S.VIRTIO_BLK_F_SIZE_MAX) and self.config.size_max
            else (DEFAULT_SEGMENT_BYTES)
        )
        seg_bytes = max(512, seg_bytes // 512 * 512)
        max_segs = MAX_SEGMENTS
        if self.has(S.VIRTIO_BLK_F_SEG_MAX) and self.config.seg_max:
            max_segs = min(max_segs, self.config.seg_max)
        indirect = self.has(S.VIRTIO_RING_F_INDIRECT_DESC)
        if not indirect:
            max_segs = min(max_segs, n - 2)
        if max_segs < 1:
            raise self._fail(f"queue {qi} of size {n} cannot hold a request with one data segment")
        self.max_request_bytes = min(max_request_bytes, max_segs * seg_bytes)
        self.max_request_bytes -= self.max_request_bytes % 512
        state = QueueState.layout(
            self.memory, self.alloc, n, indirect=indirect,
            event_idx=self.has(S.VIRTIO_RING_F_EVENT_IDX), seg_bytes=seg_bytes, max_segs=max_segs,
        )  # fmt: skip
        desc, avail, used = state.desc_gpa, state.avail_gpa, state.used_gpa
        self._w(S.VIRTIO_MMIO_QUEUE_NUM, n)
        for lo, gpa in (
            (S.VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (S.VIRTIO_MMIO_QUEUE_DRIVER_LOW, avail),
            (S.VIRTIO_MMIO_QUEUE_DEVICE_LOW, used),
        ):
            self._w(lo, gpa & 0xFFFFFFFF)
            self._w(lo + 4, gpa >> 32)
        self._w(S.VIRTIO_MMIO_QUEUE_READY, 1)
        return DriverQueue(
            index=qi, size=n, mem=self.memory, state=state,
            notify_fd=self.transport.queue_notify_fd(qi),
            interrupt_fd=self.transport.queue_interrupt_fd(qi),
        )  # fmt: skip

    # --- queries ----------------------------------------------------------------

    def has(self, bit: int) -> bool:
        """True if feature ``bit`` was negotiated."""
        return bool(self.features >> bit & 1)

    @property
    def capacity_sectors(self) -> int:
        return self.config.capacity

    @property
    def read_only(self) -> bool:
        return self.has(S.VIRTIO_BLK_F_RO)

    def status(self) -> int:
        return self._status()

    def needs_reset(self) -> bool:
        return bool(self._status() & S.VIRTIO_CONFIG_S_NEEDS_RESET)

    def set_writeback(self, enabled: bool) -> None:
        """Switch the device cache mode (CONFIG_WCE): writeback or writethrough."""
        if not self.has(S.VIRTIO_BLK_F_CONFIG_WCE):
            raise DriverError("device does not let the driver change its cache mode (no CONFIG_WCE)")
        self.transport.write_config(S.BLK_CFG_WRITEBACK, bytes([1 if enabled else 0]))
        self.config.writeback = self.transport.read_config(S.BLK_CFG_WRITEBACK, 1)[0]

    def reset(self) -> None:
        """Write Status = 0: the device drains in-flight requests and forgets the rings."""
        self._w(S.VIRTIO_MMIO_STATUS, 0)
        self.queues = []
