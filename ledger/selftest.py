"""Common virtio-blk driver mistakes, made on purpose, and what the device says about each.

Theory of operation
-------------------
Each :class:`Mistake` builds a fresh RAM-backed device in single-pass mode,
talks to it through :class:`~ledger.testing.RawDriver` - registers and raw
descriptors, as a hobby kernel's driver does - makes one classic mistake, runs
the queue once, and returns the diagnostics the device recorded.  ``ledger diag
--selftest`` prints them, so a driver author can recognise the words their own
driver would produce; the test suite checks that every mistake is diagnosed
and that the device named the right descriptor.

The list follows what the seed notes show people getting wrong: the missing
VIRTQ_DESC_F_WRITE flag behind "reads come back as zeros", a buffer address
left at 0, a status byte the device cannot write, a header of the wrong size,
a sector past the end, notifying before DRIVER_OK, a looping chain, accepting
features the device never offered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import _spec as S
from .backend import RamBackend
from .device import VirtioBlkDevice
from .diagnostics import Diagnostic
from .memory import GuestMemory
from .testing import RawDriver

R = 0  # device-readable
W = S.VIRTQ_DESC_F_WRITE
NEXT = S.VIRTQ_DESC_F_NEXT


@dataclass
class Outcome:
    diagnostics: list[Diagnostic]
    status_byte: int | None  # what the driver finds in its status byte afterwards (None: not applicable)
    device_status: int


@dataclass(frozen=True)
class Mistake:
    name: str
    what: str
    run: Callable[[], Outcome]


def _rig(features: int | None = None, handshake: bool = True) -> tuple[VirtioBlkDevice, RawDriver]:
    mem = GuestMemory(1 << 20)
    dev = VirtioBlkDevice(RamBackend(64 * 512, name="selftest"), mem, num_queues=1, single_pass=True)
    drv = RawDriver(dev, mem, queue_size=8, features=features)
    if handshake:
        drv.handshake()
    return dev, drv


def _chain(
    drv: RawDriver, elems: list[tuple[int, int, int]], *, sector: int = 0, rtype: int = 0, hdr_len: int = 16
) -> int:
    """Write a direct chain of (addr, len, flags) at descriptors 0.., with a header; return the status GPA."""
    q = drv.queues[0]
    hdr = drv.alloc.alloc(16, 16)
    status = drv.alloc.alloc(1, 1)
    drv.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    drv.mem.write(status, b"\xff")
    full = [(hdr, hdr_len, R), *elems, (status, 1, W)]
    for i, (addr, ln, fl) in enumerate(full):
        addr = status if addr == -1 else addr
        more = i + 1 < len(full)
        drv.write_desc(q.desc, i, addr, ln, fl | (NEXT if more else 0), i + 1 if more else 0)
    drv.put_avail(0, 0)
    return status


def _finish(dev: VirtioBlkDevice, drv: RawDriver, status: int | None) -> Outcome:
    dev.run_queue_once(0)
    st = drv.mem.read(status, 1)[0] if status is not None else None
    out = Outcome(dev.diagnostics(), st, dev.status)
    dev.close()
    drv.mem.close()
    return out


def _missing_write_flag() -> Outcome:
    dev, drv = _rig()
    buf = drv.alloc.alloc(512, 512)
    return _finish(dev, drv, _chain(drv, [(buf, 512, R)], rtype=S.VIRTIO_BLK_T_IN))


def _address_zero() -> Outcome:
    dev, drv = _rig()
    return _finish(dev, drv, _chain(drv, [(0, 512, W)], rtype=S.VIRTIO_BLK_T_IN))


def _status_read_only() -> Outcome:
    dev, drv = _rig()
    q = drv.queues[0]
    hdr = drv.alloc.alloc(16, 16)
    buf = drv.alloc.alloc(512, 512)
    status = drv.alloc.alloc(1, 1)
    drv.mem.write(hdr, struct.pack("<IIQ", S.VIRTIO_BLK_T_IN, 0, 0))
    drv.mem.write(status, b"\xff")
    drv.write_desc(q.desc, 0, hdr, 16, NEXT, 1)
    drv.write_desc(q.desc, 1, buf, 512, W | NEXT, 2)
    drv.write_desc(q.desc, 2, status, 1, R, 0)
    drv.put_avail(0, 0)
    return _finish(dev, drv, status)


def _short_header() -> Outcome:
    dev, drv = _rig()
    buf = drv.alloc.alloc(512, 512)
    return _finish(dev, drv, _chain(drv, [(buf, 512, W)], rtype=S.VIRTIO_BLK_T_IN, hdr_len=8))


def _sector_past_end() -> Outcome:
    dev, drv = _rig()
    buf = drv.alloc.alloc(512, 512)
    return _finish(dev, drv, _chain(drv, [(buf, 512, W)], rtype=S.VIRTIO_BLK_T_IN, sector=64))


def _odd_length() -> Outcome:
    dev, drv = _rig()
    buf = drv.alloc.alloc(512, 512)
    return _finish(dev, drv, _chain(drv, [(buf, 100, R)], rtype=S.VIRTIO_BLK_T_OUT))


def _looping_chain() -> Outcome:
    dev, drv = _rig()
    q = drv.queues[0]
    hdr = drv.alloc.alloc(16, 16)
    drv.mem.write(hdr, struct.pack("<IIQ", S.VIRTIO_BLK_T_OUT, 0, 0))
    drv.write_desc(q.desc, 0, hdr, 16, NEXT, 1)
    drv.write_desc(q.desc, 1, drv.alloc.alloc(512, 512), 512, NEXT, 0)  # ... and back to 0
    drv.put_avail(0, 0)
    return _finish(dev, drv, None)


def _notify_before_driver_ok() -> Outcome:
    dev, drv = _rig(handshake=False)
    drv.handshake(driver_ok=False)
    dev.write32(S.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    return _finish(dev, drv, None)


def _unoffered_feature() -> Outcome:
    dev, drv = _rig(handshake=False)
    drv.want_features = drv.device_features() | (1 << S.VIRTIO_F_RING_PACKED)
    drv.handshake(driver_ok=False)
    return _finish(dev, drv, None)


MISTAKES: list[Mistake] = [
    Mistake("missing-write-flag", "an IN (read) request whose data descriptor lacks VIRTQ_DESC_F_WRITE "
            "- the classic cause of 'reads come back as zeros'", _missing_write_flag),
    Mistake("address-zero", "a data descriptor whose address was left at 0", _address_zero),
    Mistake("status-read-only", "the status descriptor is not device-writable", _status_read_only),
    Mistake("short-header", "a request header of 8 bytes instead of 16", _short_header),
    Mistake("sector-past-end", "a read of sector 64 on a 64-sector disk", _sector_past_end),
    Mistake("odd-length", "a write of 100 bytes (not a multiple of 512)", _odd_length),
    Mistake("looping-chain", "a chain whose last descriptor points back to the first", _looping_chain),
    Mistake("notify-before-driver-ok", "QueueNotify written before DRIVER_OK", _notify_before_driver_ok),
    Mistake("unoffered-feature", "accepting VIRTIO_F_RING_PACKED, which the device did not offer",
            _unoffered_feature),
]  # fmt: skip
