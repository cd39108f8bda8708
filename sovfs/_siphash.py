"""SipHash-2-4 as a Numba kernel: the directory hash of every lookup, create and unlink (FORMAT.md §6.2).

:func:`sovfs.format.siphash24` is the readable reference in pure Python (~10 µs per short name on this
project's machines); this kernel computes the same function in well under a microsecond.  The test suite
checks the two against each other and against the published test vectors.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["siphash24_fast"]

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _rotl(x: np.uint64, b: int) -> np.uint64:
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


@njit(cache=True, nogil=True, inline="always")
def _le64(data: np.ndarray, off: int, n: int) -> np.uint64:
    v = np.uint64(0)
    for i in range(n):
        v |= np.uint64(data[off + i]) << np.uint64(8 * i)
    return v


@njit(cache=True, nogil=True, inline="always")
def _sipround(
    v0: np.uint64, v1: np.uint64, v2: np.uint64, v3: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    v0 += v1
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16) ^ v2
    v0 += v3
    v3 = _rotl(v3, 21) ^ v0
    v2 += v1
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@njit(cache=True, nogil=True)
def _siphash24(key: np.ndarray, data: np.ndarray) -> np.uint64:
    k0 = _le64(key, 0, 8)
    k1 = _le64(key, 8, 8)
    v0 = k0 ^ np.uint64(0x736F6D6570736575)
    v1 = k1 ^ np.uint64(0x646F72616E646F6D)
    v2 = k0 ^ np.uint64(0x6C7967656E657261)
    v3 = k1 ^ np.uint64(0x7465646279746573)
    n = data.size
    nwords = n // 8
    for w in range(nwords + 1):
        if w < nwords:
            m = _le64(data, 8 * w, 8)
        else:  # the last word: remaining bytes, length in the top byte
            m = _le64(data, 8 * w, n - 8 * w) | (np.uint64(n & 0xFF) << np.uint64(56))
        v3 ^= m
        for _ in range(2):  # the 2 of SipHash-2-4
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= np.uint64(0xFF)
    for _ in range(4):  # the 4
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def siphash24_fast(key: bytes, data: bytes) -> int:
    """SipHash-2-4 of ``data`` under the 16-byte ``key`` (same result as :func:`sovfs.format.siphash24`)."""
    return int(_siphash24(np.frombuffer(key, np.uint8), np.frombuffer(data, np.uint8)))
