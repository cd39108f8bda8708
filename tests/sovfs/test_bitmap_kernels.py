"""The bitmap kernels (sovfs._bitmap) against a per-bit reference written the obvious way."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from sovfs import _bitmap


def _bit(bits: bytes, r: int) -> int:
    return bits[r // 8] >> (r % 8) & 1


def _reference_find_run(bits: bytes, pending: bytes, r0: int, nbits: int, want: int) -> tuple[int, int]:
    best = (-1, 0)
    r = r0
    while r < nbits:
        used = _bit(bits, r) or (pending and _bit(pending, r))
        if used:
            r += 1
            continue
        start = r
        while r < nbits and r - start < want and not (_bit(bits, r) or (pending and _bit(pending, r))):
            r += 1
        if r - start >= want:
            return start, want
        if r - start > best[1]:
            best = (start, r - start)
    return best


# Sparse, dense and mixed bitmaps: bytes drawn mostly from 0x00 / 0xFF so that long runs and the
# byte-skipping paths are exercised, with arbitrary bytes in between.
_byte = st.one_of(st.just(0), st.just(0xFF), st.integers(0, 255))
_bitmaps = st.lists(_byte, min_size=1, max_size=64).map(bytes)


@given(_bitmaps, st.data())
def test_find_run_matches_reference(bits: bytes, data: st.DataObject) -> None:
    nbits = len(bits) * 8
    with_pending = data.draw(st.booleans())
    same_size = st.lists(_byte, min_size=len(bits), max_size=len(bits)).map(bytes)
    pending = data.draw(same_size) if with_pending else b""
    r0 = data.draw(st.integers(0, nbits))
    want = data.draw(st.integers(1, nbits + 3))
    got = _bitmap.find_run(np.frombuffer(bits, np.uint8), np.frombuffer(pending, np.uint8), r0, nbits, want)
    assert tuple(got) == _reference_find_run(bits, pending, r0, nbits, want)


@given(_bitmaps, st.data())
def test_set_range_sets_exactly_the_range_or_refuses(bits: bytes, data: st.DataObject) -> None:
    nbits = len(bits) * 8
    r = data.draw(st.integers(0, nbits - 1))
    n = data.draw(st.integers(1, nbits - r))
    value = data.draw(st.booleans())
    arr = np.frombuffer(bytearray(bits), np.uint8)
    ok = _bitmap.set_range(arr, r, n, value)
    assert ok == all(_bit(bits, i) != value for i in range(r, r + n))
    after = arr.tobytes()
    for i in range(nbits):
        expect = int(value) if ok and r <= i < r + n else _bit(bits, i)
        assert _bit(after, i) == expect
    assert _bitmap.count_set(arr) == sum(_bit(after, i) for i in range(nbits))
