"""FakeBlockDevice: bytearray-backed BlockDevice for tests (test scaffolding, not product code).

Counts requests and bytes so tests can assert on I/O patterns (blocks read per lookup, batching).
"""

from __future__ import annotations

from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview


class FakeBlockDevice:
    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size % 512:
            raise ValueError("size must be a multiple of 512")
        self.size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.reads = 0  # requests (each element of a preadv counts)
        self.read_bytes = 0
        self.read_calls = 0  # pread/preadv calls
        self.writes = 0
        self.write_bytes = 0
        self.write_calls = 0
        self.flushes = 0
        self.closed = False

    def _check(self, offset: int, length: int) -> None:
        if offset % 512 or length % 512 or offset < 0 or offset + length > self.size:
            raise ValueError(f"bad request offset={offset} length={length} size={self.size}")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self.read_calls += 1
        self.reads += 1
        self.read_bytes += length
        return bytes(self.data[offset : offset + length])

    def preadv(self, requests: Sequence[tuple[int, int]]) -> list[bytes]:
        self.read_calls += 1
        out = []
        for off, ln in requests:
            self._check(off, ln)
            self.reads += 1
            self.read_bytes += ln
            out.append(bytes(self.data[off : off + ln]))
        return out

    def pwrite(self, offset: int, data: Buffer) -> None:
        self.pwritev([(offset, data)])

    def pwritev(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        if self.read_only:
            raise PermissionError("read-only device")
        self.write_calls += 1
        for off, d in requests:
            n = len(memoryview(d).cast("B"))
            self._check(off, n)
            self.writes += 1
            self.write_bytes += n
            self.data[off : off + n] = d

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.data[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self.closed = True

    def reset_counters(self) -> None:
        self.reads = self.read_bytes = self.read_calls = 0
        self.writes = self.write_bytes = self.write_calls = self.flushes = 0
