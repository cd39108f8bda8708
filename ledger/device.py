"""The virtio-blk device: a virtio-mmio version 2 register file in front of Numba queue workers.

Theory of operation
-------------------
:class:`VirtioBlkDevice` is what a guest sees at an MMIO window: 32-bit
registers (virtio 1.2 §4.2.2) read and written with :meth:`read32` /
:meth:`write32`, and the ``struct virtio_blk_config`` at 0x100.  It owns three
kinds of state, kept apart:

* the **status machine** (:class:`ledger._status.StatusMachine`, sans-I/O):
  status bits and feature negotiation; it decides, the device acts;
* the **queue registers** per queue (QueueNum, QueueReady, ring addresses),
  writable only before DRIVER_OK;
* the **workers**: when DRIVER_OK is written, every queue whose QueueReady is 1
  gets a thread running :func:`ledger._device_kernel.serve_queue` (Numba,
  ``nogil``), which owns the queue's ring state (``ctl``) until stopped.

Notifications are modelled on KVM's ioeventfd/irqfd.  Each queue has a *kick*
eventfd (blocking): writing 1 to it is exactly a QueueNotify write, and the
worker sleeps in ``read()`` on it.  Each queue has a *call* eventfd
(non-blocking): the worker sets InterruptStatus bit 0 with an atomic OR, then
writes 1.  A configuration change (DEVICE_NEEDS_RESET) sets bit 1 and writes
the config eventfd *and* every call eventfd.  InterruptStatus and the
device-set status bits live in one shared ``uint32[2]`` array, so the kernels
and :meth:`read32` see the same words; InterruptACK clears bits atomically.

Lifecycle: construct -> handshake (reset, ACKNOWLEDGE, DRIVER, features,
FEATURES_OK, queue set-up, DRIVER_OK) -> workers run -> write 0 (reset: every
worker is told to stop, finishes the requests it popped, and is joined; rings
and features are forgotten) -> ... -> :meth:`close` (idempotent; stops the
workers and closes the eventfds; the backend belongs to its owner).

Every refusal, here or in a kernel, becomes a :class:`ledger.diagnostics.Diagnostic`;
see :meth:`diagnostics`.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ledger import _device_kernel as K
from ledger import _spec as S
from ledger._status import StatusMachine
from ledger.backend import Backend
from ledger.diagnostics import (
    D_BAD_REGISTER,
    D_CONFIG_WRITE_REFUSED,
    D_NOTIFY_REFUSED,
    D_QUEUE_NUM_INVALID,
    D_QUEUE_SETUP_LOCKED,
    Diagnostic,
    harvest,
    new_diag_array,
)
from ledger.memory import GuestMemory

__all__ = ["DEFAULT_FEATURES", "VENDOR_ID", "VirtioBlkDevice"]

log = logging.getLogger("ledger.device")

VENDOR_ID: Final = 0x534F5646  # "SOVF"


def _bit(*bits: int) -> int:
    v = 0
    for b in bits:
        v |= 1 << b
    return v


DEFAULT_FEATURES: Final = _bit(
    S.VIRTIO_F_VERSION_1,
    S.VIRTIO_RING_F_INDIRECT_DESC,
    S.VIRTIO_RING_F_EVENT_IDX,
    S.VIRTIO_BLK_F_SIZE_MAX,
    S.VIRTIO_BLK_F_SEG_MAX,
    S.VIRTIO_BLK_F_BLK_SIZE,
    S.VIRTIO_BLK_F_FLUSH,
    S.VIRTIO_BLK_F_TOPOLOGY,
    S.VIRTIO_BLK_F_CONFIG_WCE,
    S.VIRTIO_BLK_F_MQ,
    S.VIRTIO_BLK_F_DISCARD,
    S.VIRTIO_BLK_F_WRITE_ZEROES,
)
_KNOWN_FEATURES: Final = DEFAULT_FEATURES | _bit(S.VIRTIO_BLK_F_RO)

MAX_DISCARD_SECTORS: Final = 1 << 21  # 1 GiB per segment
MAX_DISCARD_SEG: Final = 256
MAX_WRITE_ZEROES_SECTORS: Final = 1 << 21
MAX_WRITE_ZEROES_SEG: Final = 256
INDIRECT_MAX: Final = 1024  # entries in one indirect table (as QEMU/libvhost-user)
_ORDERS: Final = {"fifo": K.ORDER_FIFO, "reverse": K.ORDER_REVERSE, "shuffle": K.ORDER_SHUFFLE}


@dataclass
class _Queue:
    """Registers and worker of one virtqueue."""

    index: int
    kick_fd: int
    call_fd: int
    num: int = 0
    ready: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ctl: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(K.C_SIZE, np.int64))
    diag: npt.NDArray[np.int64] = field(default_factory=new_diag_array)
    diag_pos: int = 0
    params: npt.NDArray[np.int64] | None = None
    thread: threading.Thread | None = None
    #: 1 while a notify of this (trapped) queue would be served: read by ``ledger._trap_kernel``
    gate: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(1, np.int64))

    def forget(self) -> None:
        """Reset values of the queue registers (§4.2.2) and a fresh ring state."""
        # Whoever holds the old gate (a driver's cached trap target, with the old ring state)
        # sees it shut for good; a new one opens at the next DRIVER_OK.
        self.gate[0] = 0
        self.gate = np.zeros(1, np.int64)
        self.num = self.ready = self.desc = self.driver = self.device = 0
        self.ctl = np.zeros(K.C_SIZE, np.int64)
        self.params = None


class VirtioBlkDevice:
    """A virtio-blk device behind a virtio-mmio v2 register interface.

    Args:
        backend: :class:`ledger.backend.FileBackend` or :class:`ledger.backend.RamBackend`.
        memory: the guest memory the driver's rings and buffers live in.
        num_queues: request queues (config ``num_queues``; MQ).
        queue_num_max: QueueNumMax of every queue (≤ 32768; 1024 by default).
        seg_max, size_max: advertised in config (segments per request, bytes per segment).
        offer: feature bits to offer (default :data:`DEFAULT_FEATURES`).  VERSION_1 is
            always offered, RO whenever the backend is read-only, FLUSH whenever CONFIG_WCE.
        completion_order: "fifo", "reverse" or "shuffle" (seeded by ``seed``): the order in
            which each popped batch is completed, to test drivers against reordering.
        spin_us: how long a worker polls an empty ring before sleeping on its kick fd.
        serial: GET_ID answer (≤ 20 bytes, NUL-padded); default from the backend's name.
        single_pass: test mode, workers are not started at DRIVER_OK; call :meth:`run_queue_once`.
        notify: how QueueNotify reaches the device.  ``"eventfd"`` (default) is KVM's ioeventfd
            model: one worker thread per queue sleeps on a kick eventfd (after polling the ring
            for up to ``spin_us``) and serves the queue concurrently with the driver.  ``"trap"``
            models a notify without ioeventfd, which traps into the hypervisor on the notifying
            vCPU: there are no worker threads and no kick fds (:meth:`queue_notify_fd` is -1),
            and a ``write32(QueueNotify, q)`` serves queue ``q`` to empty on the caller's thread
            before it returns.  No thread hand-offs and no polling, at the price of overlap: a
            request that waits for the disk blocks the notifier.  It suits a single-threaded
            driver on a machine with few CPUs.  A sequence gives each queue its own mode (its
            length is ``num_queues``): ``("trap", "eventfd")`` is what ``mount.sovfs`` uses, a
            queue for a request that runs alone and one whose worker overlaps concurrent ones.
    """

    def __init__(
        self,
        backend: Backend,
        memory: GuestMemory,
        *,
        num_queues: int = 2,
        queue_num_max: int = 1024,
        seg_max: int = 254,
        size_max: int = 1 << 20,
        offer: int | None = None,
        completion_order: str = "fifo",
        seed: int = 0,
        spin_us: int = 200,
        serial: str | bytes | None = None,
        single_pass: bool = False,
        notify: str | Sequence[str] = "eventfd",
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be 1..65535, got {num_queues}")
        if not 1 <= queue_num_max <= S.VIRTQ_MAX_SIZE:
            raise ValueError(f"queue_num_max must be 1..32768, got {queue_num_max}")
        if backend.wc[K.W_ON] and num_queues != 1:
            raise ValueError("a backend with a simulated write cache is served by exactly one queue")
        modes = [notify] * num_queues if isinstance(notify, str) else list(notify)
        if len(modes) != num_queues or any(m not in ("eventfd", "trap") for m in modes):
            raise ValueError(
                f"notify must be 'eventfd', 'trap' or one of them per queue ({num_queues}), got {notify!r}"
            )
        if completion_order not in _ORDERS:
            raise ValueError(f"completion_order must be one of {sorted(_ORDERS)}, got {completion_order!r}")
        self.backend = backend
        self.memory = memory
        self.num_queues = num_queues
        self.queue_num_max = queue_num_max
        self.seg_max = seg_max
        self.size_max = size_max
        self.completion_order = completion_order
        self.seed = seed
        self.spin_us = spin_us
        #: per queue: True when a notify traps (served on the notifier's thread, no worker)
        self.trapped = [m == "trap" for m in modes]
        self.notify = notify if isinstance(notify, str) else tuple(modes)
        self.single_pass = single_pass
        feats = DEFAULT_FEATURES if offer is None else offer
        feats &= _KNOWN_FEATURES
        feats |= _bit(S.VIRTIO_F_VERSION_1)
        if backend.read_only:
            feats |= _bit(S.VIRTIO_BLK_F_RO)
        if feats >> S.VIRTIO_BLK_F_CONFIG_WCE & 1:
            feats |= _bit(S.VIRTIO_BLK_F_FLUSH)  # §5.2.5.1: CONFIG_WCE implies FLUSH
        self.device_features = feats
        sb = backend.default_serial() if serial is None else serial
        raw = sb.encode() if isinstance(sb, str) else bytes(sb)
        self.serial = np.frombuffer(raw[:20].ljust(20, b"\0"), np.uint8).copy()
        self._zeros = np.zeros(1 << 16, np.uint8)
        self._machine = StatusMachine(offered=feats)
        self._shared = np.zeros(2, np.uint32)  # [device-set status bits, InterruptStatus]
        self._config_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._queues = [
            _Queue(i, os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            for i in range(num_queues)
        ]
        self._call_fds = np.array([q.call_fd for q in self._queues], np.int64)
        self._dev_feat_sel = 0
        self._drv_feat_sel = 0
        self._queue_sel = 0
        self._writeback = 1
        self._diags: list[Diagnostic] = []
        self._lost = 0
        self._lock = threading.RLock()
        self._closed = False

    # --- context manager / lifetime ------------------------------------------
    def __enter__(self) -> VirtioBlkDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (draining popped requests) and close the eventfds.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            for q in self._queues:
                q.gate[0] = 0
            self._stop_workers()
            self.collect_diagnostics()
            self._closed = True
            for q in self._queues:
                os.close(q.kick_fd)
                os.close(q.call_fd)
            os.close(self._config_fd)

    # --- fds ---------------------------------------------------------------------
    def queue_notify_fd(self, q: int) -> int:
        """Kick eventfd of queue ``q``: writing 1 equals ``write32(QueueNotify, q)``.

        -1 for a trapped queue: there is no ioeventfd, the driver writes the register.
        """
        return -1 if self.trapped[q] else self._queues[q].kick_fd

    def queue_interrupt_fd(self, q: int) -> int:
        """Call eventfd of queue ``q`` (non-blocking): the used-buffer interrupt (and config changes)."""
        return self._queues[q].call_fd

    def config_interrupt_fd(self) -> int:
        """Eventfd written on a configuration change (DEVICE_NEEDS_RESET)."""
        return self._config_fd

    # --- properties ------------------------------------------------------------
    @property
    def status(self) -> int:
        return self._machine.status | int(self._shared[0])

    @property
    def negotiated_features(self) -> int:
        return self._machine.negotiated

    @property
    def interrupt_status(self) -> int:
        return int(self._shared[1])

    def _feature(self, bit: int) -> bool:
        return bool(self._machine.negotiated >> bit & 1)

    # --- diagnostics ---------------------------------------------------------
    def _refuse(self, code: int, text: str, queue: int = -1) -> None:
        d = Diagnostic(code, queue=queue, detail=text)
        self._diags.append(d)
        log.warning("%s", d)

    def collect_diagnostics(self) -> list[Diagnostic]:
        """Harvest new kernel records (logging each one); returns just the new ones."""
        new: list[Diagnostic] = []
        with self._lock:
            for q in self._queues:
                got, q.diag_pos, lost = harvest(q.diag, q.diag_pos)
                self._lost += lost
                new.extend(got)
            for d in new:
                log.warning("%s", d)
            self._diags.extend(new)
        return new

    def diagnostics(self) -> list[Diagnostic]:
        """Every refusal since construction (or :meth:`clear_diagnostics`), oldest first."""
        self.collect_diagnostics()
        return list(self._diags)

    def clear_diagnostics(self) -> None:
        self.collect_diagnostics()
        self._diags.clear()

    def stats(self) -> dict[str, Any]:
        """Requests served and bytes moved, per queue.

        Per queue: ``requests`` and ``errors`` (completed with a status other than OK),
        ``bytes_read`` / ``bytes_written`` (of which ``direct_read`` / ``direct_written`` went
        through the backend's O_DIRECT descriptor), ``write_behind`` (bytes whose host write-back a
        worker started), ``interrupts`` raised, ``sleeps`` (times its worker slept on the kick fd
        after polling), ``trapped`` (served on the notifier's thread) and ``running``/``broken``.
        """
        qs = []
        for q in self._queues:
            c = q.ctl
            qs.append(
                {
                    "queue": q.index,
                    "running": q.thread is not None and q.thread.is_alive(),
                    "requests": int(c[K.C_REQUESTS]),
                    "errors": int(c[K.C_ERRORS]),
                    "bytes_read": int(c[K.C_BYTES_READ]),
                    "bytes_written": int(c[K.C_BYTES_WRITTEN]),
                    "direct_read": int(c[K.C_DIRECT_BYTES]),
                    "direct_written": int(c[K.C_DIRECT_WRITTEN]),
                    "write_behind": int(c[K.C_WB_BYTES]),
                    "trapped": self.trapped[q.index],
                    "interrupts": int(c[K.C_INTERRUPTS]),
                    "sleeps": int(c[K.C_SLEEPS]),
                    "last_avail_idx": int(c[K.C_LAST_AVAIL]),
                    "used_idx": int(c[K.C_USED_IDX]),
                    "broken": bool(c[K.C_BROKEN]),
                }
            )
        return {
            "status": self.status,
            "features": self._machine.negotiated,
            "diagnostics": len(self._diags),
            "diagnostics_lost": self._lost,
            "queues": qs,
        }

    # --- config space ----------------------------------------------------------
    def _config_bytes(self) -> bytes:
        c = bytearray(S.BLK_CFG_SIZE)
        struct.pack_into("<Q", c, S.BLK_CFG_CAPACITY, self.backend.capacity)
        struct.pack_into("<I", c, S.BLK_CFG_SIZE_MAX, self.size_max)
        struct.pack_into("<I", c, S.BLK_CFG_SEG_MAX, self.seg_max)
        struct.pack_into("<I", c, S.BLK_CFG_BLK_SIZE, S.VIRTIO_BLK_SECTOR_SIZE)
        c[S.BLK_CFG_PHYSICAL_BLOCK_EXP] = 3  # 4 KiB physical blocks (page-cache granularity)
        c[S.BLK_CFG_ALIGNMENT_OFFSET] = 0
        struct.pack_into("<H", c, S.BLK_CFG_MIN_IO_SIZE, 1)
        struct.pack_into("<I", c, S.BLK_CFG_OPT_IO_SIZE, 8)
        c[S.BLK_CFG_WRITEBACK] = self._writeback
        struct.pack_into("<H", c, S.BLK_CFG_NUM_QUEUES, self.num_queues)
        struct.pack_into("<I", c, S.BLK_CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS)
        struct.pack_into("<I", c, S.BLK_CFG_MAX_DISCARD_SEG, MAX_DISCARD_SEG)
        struct.pack_into("<I", c, S.BLK_CFG_DISCARD_SECTOR_ALIGNMENT, 1)
        struct.pack_into("<I", c, S.BLK_CFG_MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SECTORS)
        struct.pack_into("<I", c, S.BLK_CFG_MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SEG)
        c[S.BLK_CFG_WRITE_ZEROES_MAY_UNMAP] = 1
        return bytes(c)

    def read_config(self, off: int, size: int) -> bytes:
        """``size`` bytes of ``struct virtio_blk_config`` from ``off`` (bytes past the struct read as 0)."""
        if off < 0 or size < 0:
            raise ValueError("negative config offset or size")
        return self._config_bytes()[off : off + size].ljust(size, b"\0")

    def write_config(self, off: int, data: bytes) -> None:
        """Config writes: only ``writeback`` (offset 32, one byte), and only with CONFIG_WCE (§5.2.5)."""
        with self._lock:
            if off != S.BLK_CFG_WRITEBACK or len(data) != 1:
                self._refuse(
                    D_CONFIG_WRITE_REFUSED,
                    f"config write of {len(data)} bytes at offset {off}: only the writeback byte "
                    f"(offset 32) is writable; ignored",
                )
                return
            if not self.device_features >> S.VIRTIO_BLK_F_CONFIG_WCE & 1:
                self._refuse(D_CONFIG_WRITE_REFUSED, "writeback written, but CONFIG_WCE is not offered")
                return
            if data[0] > 1:
                self._refuse(D_CONFIG_WRITE_REFUSED, f"writeback must be 0 or 1, got {data[0]}; ignored")
                return
            self._writeback = data[0]
            for q in self._queues:
                if q.params is not None:
                    q.params[K.P_FLAGS] = self._kernel_flags()

    # --- registers ---------------------------------------------------------------
    def read32(self, off: int) -> int:
        """Read the 32-bit register at ``off`` (§4.2.2); config space from 0x100."""
        with self._lock:
            return self._read32(off) & 0xFFFF_FFFF

    def _read32(self, off: int) -> int:
        if off >= S.VIRTIO_MMIO_CONFIG:
            return int.from_bytes(self.read_config(off - S.VIRTIO_MMIO_CONFIG, 4), "little")
        q = self._queues[self._queue_sel] if self._queue_sel < self.num_queues else None
        if off == S.VIRTIO_MMIO_MAGIC_VALUE:
            return S.VIRTIO_MMIO_MAGIC
        if off == S.VIRTIO_MMIO_VERSION:
            return S.VIRTIO_MMIO_VERSION_2
        if off == S.VIRTIO_MMIO_DEVICE_ID:
            return S.VIRTIO_ID_BLOCK
        if off == S.VIRTIO_MMIO_VENDOR_ID:
            return VENDOR_ID
        if off == S.VIRTIO_MMIO_DEVICE_FEATURES:
            return self.device_features >> (32 * self._dev_feat_sel) if self._dev_feat_sel < 2 else 0
        if off == S.VIRTIO_MMIO_QUEUE_NUM_MAX:
            return self.queue_num_max if q is not None else 0  # §4.2.2.1: 0 = queue not available
        if off == S.VIRTIO_MMIO_QUEUE_READY:
            return q.ready if q is not None else 0
        if off == S.VIRTIO_MMIO_INTERRUPT_STATUS:
            return int(self._shared[1])
        if off == S.VIRTIO_MMIO_STATUS:
            return self.status
        if off == S.VIRTIO_MMIO_CONFIG_GENERATION:
            return 0
        if off in (S.VIRTIO_MMIO_SHM_LEN_LOW, S.VIRTIO_MMIO_SHM_LEN_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        if off == S.VIRTIO_MMIO_QUEUE_RESET:
            return 0
        self._refuse(D_BAD_REGISTER, f"read of register {off:#05x}, which is not readable; returned 0")
        return 0

    def write32(self, off: int, val: int) -> None:
        """Write the 32-bit register at ``off`` (§4.2.2).  Refused writes leave a diagnostic."""
        val &= 0xFFFF_FFFF
        with self._lock:
            if self._closed:
                raise RuntimeError("device is closed")
            self._write32(off, val)

    def _write32(self, off: int, val: int) -> None:
        m = self._machine
        if off >= S.VIRTIO_MMIO_CONFIG:
            coff = off - S.VIRTIO_MMIO_CONFIG
            if coff == S.BLK_CFG_WRITEBACK:
                self.write_config(coff, bytes([val & 0xFF]))
            else:
                self.write_config(coff, val.to_bytes(4, "little"))
            return
        if off == S.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self._dev_feat_sel = val
        elif off == S.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self._drv_feat_sel = val
        elif off == S.VIRTIO_MMIO_DRIVER_FEATURES:
            for code, text in m.write_driver_features(self._drv_feat_sel, val):
                self._refuse(code, text)
        elif off == S.VIRTIO_MMIO_QUEUE_SEL:
            self._queue_sel = val
        elif off == S.VIRTIO_MMIO_QUEUE_NOTIFY:
            self._notify(val)
        elif off == S.VIRTIO_MMIO_INTERRUPT_ACK:
            K.isr_ack(self._shared, val)
        elif off == S.VIRTIO_MMIO_STATUS:
            self._write_status(val)
        elif off in _QUEUE_REGS:
            self._write_queue_reg(off, val)
        else:
            self._refuse(D_BAD_REGISTER, f"write of {val:#x} to register {off:#05x}, which is not writable")

    def _write_queue_reg(self, off: int, val: int) -> None:
        name = _QUEUE_REGS[off]
        if self._queue_sel >= self.num_queues:
            self._refuse(
                D_QUEUE_SETUP_LOCKED,
                f"{name} written for queue {self._queue_sel}, which does not exist "
                f"(QueueNumMax reads 0); ignored",
            )
            return
        q = self._queues[self._queue_sel]
        if self._machine.live:
            self._refuse(
                D_QUEUE_SETUP_LOCKED,
                f"queue {q.index}: {name} written after DRIVER_OK; queue set-up is only allowed "
                f"before DRIVER_OK (§3.1.1); ignored",
                q.index,
            )
            return
        if off == S.VIRTIO_MMIO_QUEUE_READY:
            if val & 1 and (q.num == 0 or q.num > self.queue_num_max or q.num & (q.num - 1)):
                self._refuse(
                    D_QUEUE_NUM_INVALID,
                    f"queue {q.index}: QueueReady set with QueueNum {q.num}, which is not a power of "
                    f"two between 1 and QueueNumMax {self.queue_num_max}; queue stays not ready",
                    q.index,
                )
                return
            q.ready = val & 1
            return
        if q.ready:
            self._refuse(
                D_QUEUE_SETUP_LOCKED,
                f"queue {q.index}: {name} written while QueueReady is 1 (clear QueueReady first); ignored",
                q.index,
            )
            return
        if off == S.VIRTIO_MMIO_QUEUE_NUM:
            if val == 0 or val > self.queue_num_max or val & (val - 1):
                self._refuse(
                    D_QUEUE_NUM_INVALID,
                    f"queue {q.index}: QueueNum {val} is not a power of two between 1 and QueueNumMax "
                    f"{self.queue_num_max} (split rings need a power of two, §2.7); ignored",
                    q.index,
                )
                return
            q.num = val
        elif off == S.VIRTIO_MMIO_QUEUE_DESC_LOW:
            q.desc = (q.desc & ~0xFFFF_FFFF) | val
        elif off == S.VIRTIO_MMIO_QUEUE_DESC_HIGH:
            q.desc = (q.desc & 0xFFFF_FFFF) | val << 32
        elif off == S.VIRTIO_MMIO_QUEUE_DRIVER_LOW:
            q.driver = (q.driver & ~0xFFFF_FFFF) | val
        elif off == S.VIRTIO_MMIO_QUEUE_DRIVER_HIGH:
            q.driver = (q.driver & 0xFFFF_FFFF) | val << 32
        elif off == S.VIRTIO_MMIO_QUEUE_DEVICE_LOW:
            q.device = (q.device & ~0xFFFF_FFFF) | val
        elif off == S.VIRTIO_MMIO_QUEUE_DEVICE_HIGH:
            q.device = (q.device & 0xFFFF_FFFF) | val << 32

    def _notify(self, qi: int) -> None:
        """QueueNotify: wake the worker, after checking the device may consume buffers."""
        status = self.status
        if not status & S.VIRTIO_CONFIG_S_DRIVER_OK:
            self._refuse(
                D_NOTIFY_REFUSED,
                f"QueueNotify({qi}) before DRIVER_OK; the device MUST NOT consume buffers before "
                f"DRIVER_OK (§3.1.1); ignored",
                qi,
            )
            return
        if status & S.VIRTIO_CONFIG_S_NEEDS_RESET:
            self._refuse(D_NOTIFY_REFUSED, f"QueueNotify({qi}) while DEVICE_NEEDS_RESET is set; ignored", qi)
            return
        if qi >= self.num_queues or not self._queues[qi].ready:
            self._refuse(D_NOTIFY_REFUSED, f"QueueNotify({qi}) for a queue that is not ready; ignored", qi)
            return
        if self.trapped[qi]:
            self.run_queue_once(qi)
        else:
            os.eventfd_write(self._queues[qi].kick_fd, 1)

    def trap_target(self, qi: int) -> tuple[npt.NDArray[np.int64], tuple[Any, ...]] | None:
        """What a driver needs to serve a trapped notify of queue ``qi`` in its own kernel call.

        Returns ``(gate, serve_queue arguments)``, or None unless ``qi`` is a trapped queue that a
        notify would serve now.  ``ledger._trap_kernel.run_trapped`` calls ``serve_queue`` only
        while ``gate[0]`` is 1 and DEVICE_NEEDS_RESET is clear - the checks of a QueueNotify
        write - and otherwise hands the notify back to the register path.  The gate shuts for
        good on reset and close (a later DRIVER_OK opens a new one, with new arguments).  Like
        every trapped notify, the call must come from the thread that drives the device, never
        concurrently with its reset or close.
        """
        with self._lock:
            if self._closed or not 0 <= qi < self.num_queues or not self.trapped[qi]:
                return None
            q = self._queues[qi]
            if not (q.gate[0] and self._serves_trapped(qi)):
                return None
            return q.gate, self.kernel_args(qi)

    def _serves_trapped(self, qi: int) -> bool:
        """Would a notify of queue ``qi`` be served on the notifier's thread now?  (The gate's rule.)"""
        q = self._queues[qi]
        return bool(self._machine.live and self.trapped[qi] and q.ready and q.params is not None)

    # --- status and workers ------------------------------------------------------
    def _write_status(self, val: int) -> None:
        m = self._machine
        if val == 0:
            self.reset()
            return
        out = m.write_status(val)
        for code, text in out.refusals:
            self._refuse(code, text)
        if out.start:
            self._start_workers()
        for i, q in enumerate(self._queues):
            q.gate[0] = 1 if self._serves_trapped(i) else 0

    def reset(self) -> None:
        """Device reset (Status <- 0): drain and stop workers, forget rings, features and interrupts."""
        with self._lock:
            self._stop_workers()
            self.collect_diagnostics()
            self._machine.reset()
            self._shared[:] = 0
            self._dev_feat_sel = self._drv_feat_sel = self._queue_sel = 0
            self._writeback = 1
            for q in self._queues:
                q.forget()
                _drain(q.kick_fd)

    def _kernel_flags(self) -> int:
        f = 0
        if self._feature(S.VIRTIO_RING_F_EVENT_IDX):
            f |= K.K_EVENT_IDX
        if self._feature(S.VIRTIO_RING_F_INDIRECT_DESC):
            f |= K.K_INDIRECT
        if self.backend.read_only:
            f |= K.K_RO
        if self._feature(S.VIRTIO_BLK_F_DISCARD):
            f |= K.K_DISCARD
        if self._feature(S.VIRTIO_BLK_F_WRITE_ZEROES):
            f |= K.K_WRITE_ZEROES
        wce = self._feature(S.VIRTIO_BLK_F_CONFIG_WCE)
        flush = self._feature(S.VIRTIO_BLK_F_FLUSH)
        # §5.2.6.2: without FLUSH/CONFIG_WCE, or with writeback 0, writes must be stable on completion
        if (not wce and not flush) or (wce and self._writeback == 0):
            f |= K.K_WRITETHROUGH
        return f

    def queue_params(self, q: _Queue) -> npt.NDArray[np.int64]:
        """The kernel's parameter array for queue ``q`` (from the registers as they are now)."""
        p = np.zeros(K.P_SIZE, np.int64)
        p[K.P_GBASE] = self.memory.base
        p[K.P_GSIZE] = self.memory.size
        p[K.P_QUEUE] = q.index
        p[K.P_QNUM] = q.num
        # ring addresses are 64-bit guest values: keep the bit pattern (>= 2^63 reads negative,
        # which the kernel's range check refuses)
        for slot, v in ((K.P_DESC, q.desc), (K.P_AVAIL, q.driver), (K.P_USED, q.device)):
            p[slot] = v - (1 << 64) if v >= 1 << 63 else v
        p[K.P_FLAGS] = self._kernel_flags()
        p[K.P_KICK_FD] = q.kick_fd
        p[K.P_CALL_FD] = q.call_fd
        p[K.P_CONFIG_FD] = self._config_fd
        p[K.P_IMAGE_FD] = self.backend.image_fd
        p[K.P_DIRECT_FD] = self.backend.direct_fd
        p[K.P_DIRECT_MIN] = self.backend.direct_min
        p[K.P_DIRECT_WRITES] = int(self.backend.direct_writes)
        p[K.P_WRITE_BEHIND_MIN] = self.backend.write_behind_min
        p[K.P_CAPACITY] = self.backend.capacity
        p[K.P_MAX_DISCARD_SECTORS] = MAX_DISCARD_SECTORS
        p[K.P_MAX_DISCARD_SEG] = MAX_DISCARD_SEG
        p[K.P_MAX_WZ_SECTORS] = MAX_WRITE_ZEROES_SECTORS
        p[K.P_MAX_WZ_SEG] = MAX_WRITE_ZEROES_SEG
        p[K.P_ORDER] = _ORDERS[self.completion_order]
        p[K.P_SPIN_NS] = self.spin_us * 1000
        # a trapped notify serves the queue on the notifier's thread: the kernel's single-pass mode
        p[K.P_SINGLE_PASS] = 1 if self.single_pass or self.trapped[q.index] else 0
        p[K.P_INDIRECT_MAX] = INDIRECT_MAX
        return p

    def kernel_args(self, qi: int) -> tuple[Any, ...]:
        """Arguments of ``serve_queue`` for queue ``qi`` (the twin takes the same)."""
        q = self._queues[qi]
        if q.params is None:
            q.params = self.queue_params(q)
        return (
            self.memory.array,
            q.params,
            q.ctl,
            self._shared,
            self._call_fds,
            q.diag,
            self.backend.ram,
            self.serial,
            self._zeros,
            self.backend.wc,
            self.backend.wc_data,
            self.backend.durable,
        )

    def _start_workers(self) -> None:
        for q in self._queues:
            if not q.ready:
                continue
            q.ctl[K.C_RNG] = (self.seed + q.index) & 0x7FFFFFFF
            args = self.kernel_args(q.index)
            if self.single_pass or self.trapped[q.index]:
                continue
            t = threading.Thread(target=K.serve_queue, args=args, name=f"ledger-q{q.index}", daemon=True)
            q.thread = t
            t.start()

    def run_queue_once(self, qi: int) -> int:
        """Single-pass mode: serve what queue ``qi`` has available, on this thread; returns completions."""
        q = self._queues[qi]
        if not (self._machine.live and q.ready and q.params is not None):
            return 0
        return int(K.serve_queue(*self.kernel_args(qi)))

    def _stop_workers(self) -> None:
        for q in self._queues:
            if q.thread is None:
                continue
            # The stop flag is read with an acquire load by the kernel; the eventfd write
            # (a syscall, a full barrier) wakes it if it sleeps in read(kick_fd).
            q.ctl[K.C_STOP] = 1
            os.eventfd_write(q.kick_fd, 1)
            q.thread.join()
            q.thread = None


_QUEUE_REGS: Final = {
    S.VIRTIO_MMIO_QUEUE_NUM: "QueueNum",
    S.VIRTIO_MMIO_QUEUE_READY: "QueueReady",
    S.VIRTIO_MMIO_QUEUE_DESC_LOW: "QueueDescLow",
    S.VIRTIO_MMIO_QUEUE_DESC_HIGH: "QueueDescHigh",
    S.VIRTIO_MMIO_QUEUE_DRIVER_LOW: "QueueDriverLow",
    S.VIRTIO_MMIO_QUEUE_DRIVER_HIGH: "QueueDriverHigh",
    S.VIRTIO_MMIO_QUEUE_DEVICE_LOW: "QueueDeviceLow",
    S.VIRTIO_MMIO_QUEUE_DEVICE_HIGH: "QueueDeviceHigh",
}


def _drain(fd: int) -> None:
    """Consume a pending eventfd count without blocking (poll(2): no FD_SETSIZE limit, unlike select)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while poller.poll(0):
        os.read(fd, 8)
