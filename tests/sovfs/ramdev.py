"""RamLedgerDevice: the filesystem tests' block device — the real ledger over a RAM disk.

Every test I/O goes through the same virtio-blk driver and device as production
(``LedgerBlockDevice`` over ``RamBackend``); this subclass only counts requests,
so tests can assert on I/O patterns (blocks read per lookup, batching), and
exposes the RAM disk's bytes as ``data`` so a test can corrupt the "platter"
the way a harness pokes a VM's backing store.
"""

from __future__ import annotations

from collections.abc import Sequence

from ledger import Ledger, RamBackend
from sovfs.blockdev import Buffer, LedgerBlockDevice

#: Devices created by the running test; the conftest shuts them down afterwards.
LIVE: list[RamLedgerDevice] = []


class RamLedgerDevice(LedgerBlockDevice):
    def __init__(self, size: int, *, read_only: bool = False) -> None:
        super().__init__(Ledger(RamBackend(size, read_only=read_only), pool_bytes=8 << 20), own=False)
        backend = self.ledger.backend
        assert isinstance(backend, RamBackend)
        self.data = memoryview(backend.ram)
        self.closed = False
        self.reset_counters()
        LIVE.append(self)

    def reset_counters(self) -> None:
        self.reads = self.read_bytes = self.read_calls = 0  # reads: requests; read_calls: method calls
        self.writes = self.write_bytes = self.write_calls = self.flushes = 0

    def pread(self, offset: int, length: int) -> bytes:
        self.read_calls += 1
        self.reads += 1
        self.read_bytes += length
        return super().pread(offset, length)

    def preadv(self, requests: Sequence[tuple[int, int]]) -> list[bytes]:
        self.read_calls += 1
        self.reads += len(requests)
        self.read_bytes += sum(n for _, n in requests)
        return super().preadv(requests)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self.pwritev([(offset, data)])

    def pwritev(self, requests: Sequence[tuple[int, Buffer]]) -> None:
        self.write_calls += 1
        self.writes += len(requests)
        self.write_bytes += sum(len(memoryview(d).cast("B")) for _, d in requests)
        super().pwritev(requests)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()

    def close(self) -> None:
        """Like closing a disk's file handle: the disk (and its contents) stays for the test to inspect."""
        self.closed = True

    def shutdown(self) -> None:
        self.ledger.close()
