"""Numba kernels for the bitmap allocators (:mod:`sovfs.alloc`).

Why kernels: a bitmap block holds 32,704 bits (4 KiB blocks).  Unpacking it into one byte per bit
with numpy, diffing and repacking cost ~100 µs per allocation — most of a file create's CPU.  These
loops look at the packed bytes directly, skip full bytes (0xFF) eight bits at a time, and touch only
the bytes of the run they change: a few hundred nanoseconds for the common case.

Bit order is FORMAT.md §2.6: item ``r`` of a block is bit ``r % 8`` (LSB first) of byte ``r // 8``.
``pending`` (same layout, or empty) marks items freed by the running transaction: they count as used
for searching (see :class:`sovfs.alloc.BitmapAllocator`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["count_set", "find_run", "set_range"]


@njit(cache=True, nogil=True, inline="always")
def _byte(bits: np.ndarray, pending: np.ndarray, i: int) -> int:
    """Byte ``i`` of the bitmap as the search sees it: used or pending bits set."""
    b = bits[i]
    if pending.size:
        b |= pending[i]
    return int(b)


@njit(cache=True, nogil=True)
def _used(bits: np.ndarray, pending: np.ndarray, r: int) -> bool:
    return (_byte(bits, pending, r >> 3) >> (r & 7)) & 1 != 0


@njit(cache=True, nogil=True)
def find_run(bits: np.ndarray, pending: np.ndarray, r0: int, nbits: int, want: int) -> tuple[int, int]:
    """First free run of length ≥ ``want`` starting at or after bit ``r0`` (below ``nbits``).

    Returns ``(start, want)`` for the first run long enough; otherwise ``(start, length)`` of the
    longest run seen (the earliest of equal ones); ``(-1, 0)`` when every bit is used.
    """
    best_start = -1
    best_len = 0
    r = r0
    while r < nbits:
        # skip whole used bytes quickly
        if (r & 7) == 0 and r + 8 <= nbits and _byte(bits, pending, r >> 3) == 0xFF:
            r += 8
            continue
        if _used(bits, pending, r):
            r += 1
            continue
        start = r
        while r < nbits and r - start < want:
            whole_byte = (r & 7) == 0 and r + 8 <= nbits and r - start + 8 <= want
            if whole_byte and _byte(bits, pending, r >> 3) == 0:
                r += 8
                continue
            if _used(bits, pending, r):
                break
            r += 1
        length = r - start
        if length >= want:
            return start, want
        if length > best_len:
            best_start = start
            best_len = length
    return best_start, best_len


@njit(cache=True, nogil=True)
def set_range(bits: np.ndarray, r: int, n: int, value: bool) -> bool:
    """Set (``value``) or clear bits [r, r+n).  Every bit must hold the opposite value first:
    returns False, changing nothing, if one does not (a double allocation or double free)."""
    for i in range(r, r + n):
        if ((bits[i >> 3] >> (i & 7)) & 1 != 0) == value:
            return False
    for i in range(r, r + n):
        if value:
            bits[i >> 3] |= np.uint8(1 << (i & 7))
        else:
            bits[i >> 3] &= np.uint8(~(1 << (i & 7)) & 0xFF)
    return True


@njit(cache=True, nogil=True)
def count_set(bits: np.ndarray) -> int:
    """Number of set bits."""
    n = 0
    for b in bits:
        x = int(b)
        while x:
            x &= x - 1
            n += 1
    return n
