"""Byte layout of a split virtqueue (virtio 1.2 §2.7), and its 16-bit index arithmetic.

::

    descriptor table (align 16)        16 * N bytes
      +0  le64 addr   +8 le32 len   +12 le16 flags   +14 le16 next
    available ring, "driver area" (align 2)   6 + 2 * N bytes
      +0  le16 flags  +2 le16 idx   +4 le16 ring[N]   +4+2N le16 used_event
    used ring, "device area" (align 4)        6 + 8 * N bytes
      +0  le16 flags  +2 le16 idx   +4 {le32 id, le32 len}[N]   +4+8N le16 avail_event

``idx`` fields are free-running 16-bit counters: slot = idx % N (N is a power
of two) and the number of entries between two indices is ``(a - b) & 0xFFFF``.
All index arithmetic in the ledger goes through :func:`u16` so that a missing
mask cannot hide until the 65,536th request.
"""

from __future__ import annotations

from typing import Final

DESC_ADDR: Final = 0
DESC_LEN: Final = 8
DESC_FLAGS: Final = 12
DESC_NEXT: Final = 14
DESC_SIZE: Final = 16
DESC_ALIGN: Final = 16

AVAIL_FLAGS: Final = 0
AVAIL_IDX: Final = 2
AVAIL_RING: Final = 4
AVAIL_ALIGN: Final = 2

USED_FLAGS: Final = 0
USED_IDX: Final = 2
USED_RING: Final = 4
USED_ELEM_SIZE: Final = 8
USED_ALIGN: Final = 4


def desc_table_size(n: int) -> int:
    return DESC_SIZE * n


def avail_ring_size(n: int) -> int:
    """Bytes of the driver area, including ``used_event`` (always reserved)."""
    return 6 + 2 * n


def used_ring_size(n: int) -> int:
    """Bytes of the device area, including ``avail_event`` (always reserved)."""
    return 6 + 8 * n


def used_event_offset(n: int) -> int:
    """Offset of ``used_event`` within the available ring."""
    return AVAIL_RING + 2 * n


def avail_event_offset(n: int) -> int:
    """Offset of ``avail_event`` within the used ring."""
    return USED_RING + USED_ELEM_SIZE * n


def u16(x: int) -> int:
    """Wrap to a 16-bit ring index."""
    return x & 0xFFFF


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10: notify iff ``event_idx`` lies in ``[old_idx, new_idx)`` (mod 2^16).

    >>> vring_need_event(5, 6, 5), vring_need_event(5, 5, 4), vring_need_event(0, 2, 0xFFFF)
    (True, False, True)
    """
    return u16(new_idx - event_idx - 1) < u16(new_idx - old_idx)
