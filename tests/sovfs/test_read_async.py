"""FileSystem.read_async: file data in flight while other trio tasks run, never stale."""

from __future__ import annotations

import functools
import random

import pytest
import trio
import trio.testing

from sovfs.format import ROOT_INO
from tests.sovfs.conftest import fresh
from tests.sovfs.ramdev import RamLedgerDevice


async def test_concurrent_async_reads_return_the_file_data() -> None:
    dev, fs = fresh()
    files = {}
    for k in range(8):
        ino = fs.create(ROOT_INO, f"f{k}".encode()).ino
        data = bytes([k + 1]) * (100_000 + k * 4096)
        fs.write(ino, 0, data)
        files[ino] = data
    got: dict[int, bytes] = {}
    async with dev.serving():

        async def reader(ino: int) -> None:
            got[ino] = await fs.read_async(ino, 1000, 90_000)

        async with trio.open_nursery() as n:
            for ino in files:
                n.start_soon(reader, ino)
    assert got == {ino: data[1000:91_000] for ino, data in files.items()}
    assert await fs.read_async(next(iter(files)), 10**9, 10) == b""  # past EOF, no I/O
    fs.close()


class GatedDevice(RamLedgerDevice):
    """Holds every async read at a gate until the test opens it."""

    gate: trio.Event

    async def preadv_async(self, requests):  # type: ignore[no-untyped-def]
        await self.gate.wait()
        return await super().preadv_async(requests)


async def test_a_read_whose_blocks_were_freed_meanwhile_is_redone() -> None:
    """Truncate + reuse of the blocks while the data is in flight: the stale bytes never escape."""
    dev = GatedDevice(64 << 20)
    from sovfs.fs import FileSystem
    from sovfs.mkfs_core import MkfsParams, make_filesystem

    make_filesystem(dev, MkfsParams())
    fs = FileSystem.mount(dev)
    a = fs.create(ROOT_INO, b"a").ino
    fs.write(a, 0, b"A" * 65536)
    dev.gate = trio.Event()
    result: list[bytes] = []
    async with dev.serving():

        async def reader() -> None:
            result.append(await fs.read_async(a, 0, 65536))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()  # the read is mapped and parked at the gate
            fs.truncate(a, 0)  # frees A's blocks ...
            b = fs.create(ROOT_INO, b"b").ino
            fs.write(b, 0, b"B" * 65536)  # ... which b now reuses
            dev.gate.set()
    assert result == [b""]  # redone against the file as it is now: empty, never b's bytes
    assert fs.read(b, 0, 65536) == b"B" * 65536
    fs.close()


async def test_large_async_reads_across_extents_holes_and_eof() -> None:
    """Reads big enough to be cut over the ledger's queues return what the synchronous read does."""
    dev, fs = fresh()
    ino = fs.create(ROOT_INO, b"big").ino
    rnd = random.Random(7)
    pieces = [(0, 700_000), (900_000, 300_000), (1_500_000, 1_100_000), (3_000_000, 123_457)]
    for off, n in pieces:  # extents with holes between them; EOF in the middle of a block
        fs.write(ino, off, rnd.randbytes(n))
    size = fs.getattr(ino).size
    async with dev.serving():
        for off, n in [(0, 1 << 20), (4096, 1 << 20), (777, 1_000_000), (2_500_000, 1 << 20), (0, 4 << 20),
                       (size - 5000, 1 << 20), (800_000, 256 << 10), (size, 1 << 20)]:  # fmt: skip
            got = await fs.read_async(ino, off, n)
            assert bytes(got) == fs.read(ino, off, n), (off, n)
    fs.close()


async def test_async_read_never_returns_data_from_before_a_write() -> None:
    dev, fs = fresh()
    ino = fs.create(ROOT_INO, b"f").ino
    fs.write(ino, 0, b"a" * (2 << 20))
    async with dev.serving():
        assert bytes(await fs.read_async(ino, 0, 1 << 20)) == b"a" * (1 << 20)
        fs.write(ino, 4096, b"b" * (1 << 20))
        assert bytes(await fs.read_async(ino, 0, 1 << 20)) == b"a" * 4096 + b"b" * ((1 << 20) - 4096)
        fs.truncate(ino, 10_000)
        assert bytes(await fs.read_async(ino, 0, 1 << 20)) == b"a" * 4096 + b"b" * (10_000 - 4096)
    fs.close()


async def _seq(fs, ino: int, start: int, end: int, step: int = 256 << 10) -> bytes:  # type: ignore[no-untyped-def]
    """Read [start, end) the way the kernel's read-ahead does: sequential page-cache reads."""
    out = bytearray()
    for off in range(start, end, step):
        out += await fs.read_async(ino, off, step, readahead=True)
    return bytes(out)


async def test_readahead_serves_sequential_reads_from_one_device_read_per_chunk() -> None:
    from sovfs.fs import READAHEAD_CHUNK

    dev, fs = fresh()
    ino = fs.create(ROOT_INO, b"f").ino
    data = random.Random(1).randbytes(3 * READAHEAD_CHUNK + 12345)  # EOF inside the last chunk
    fs.write(ino, 0, data)
    async with dev.serving():
        calls = _count_async_reads(dev)
        assert await _seq(fs, ino, 0, len(data) + 300_000) == data
        assert calls[0] == 4  # one per chunk, not one per 256 KiB read
        # Concurrent readers of one chunk share its device read.
        calls[0] = 0
        fs._ra.clear()
        got: dict[int, bytes] = {}

        async def reader(off: int) -> None:
            got[off] = bytes(await fs.read_async(ino, off, 256 << 10, readahead=True))

        async with trio.open_nursery() as n:
            n.start_soon(reader, 0)
            await trio.testing.wait_all_tasks_blocked()  # its chunk is in flight ...
            for off in (256 << 10, 512 << 10):  # ... when the next reads arrive
                n.start_soon(reader, off)
        assert got == {off: data[off : off + (256 << 10)] for off in got}
        assert calls[0] == 1
    fs.close()


def _count_async_reads(dev: RamLedgerDevice) -> list[int]:
    calls = [0]
    orig = dev.preadv_async

    async def counting(requests):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return await orig(requests)

    dev.preadv_async = counting  # type: ignore[method-assign]
    return calls


async def test_readahead_data_is_never_stale_after_write_truncate_or_free() -> None:
    dev, fs = fresh()
    a = fs.create(ROOT_INO, b"a").ino
    fs.write(a, 0, b"a" * (2 << 20))
    async with dev.serving():
        assert await fs.read_async(a, 0, 4096, readahead=True) == b"a" * 4096  # chunk [0, 1 MiB) cached
        fs.write(a, 8192, b"W" * 4096)  # overwrite in place: no block freed
        assert await fs.read_async(a, 4096, 8192, readahead=True) == b"a" * 4096 + b"W" * 4096
        assert await _seq(fs, a, 0, 1 << 20, 65536) == b"a" * 8192 + b"W" * 4096 + b"a" * ((1 << 20) - 12288)
        fs.truncate(a, 100_000)  # shrink: the chunk's tail is gone, EOF moved
        assert await fs.read_async(a, 65536, 65536, readahead=True) == b"a" * (100_000 - 65536)
        fs.truncate(a, 200_000)  # grow: zeros, not the old bytes, past the old EOF
        got = await fs.read_async(a, 0, 262144, readahead=True)
        assert bytes(got) == b"a" * 8192 + b"W" * 4096 + b"a" * (100_000 - 12288) + bytes(100_000)
        # The blocks of a truncated file reused by another file: a's chunk never shows b's bytes.
        assert await fs.read_async(a, 0, 4096, readahead=True) == b"a" * 4096
        fs.truncate(a, 0)
        b = fs.create(ROOT_INO, b"b").ino
        fs.write(b, 0, b"B" * (1 << 20))
        assert await fs.read_async(a, 0, 4096, readahead=True) == b""
        fs.write(a, 0, b"c" * 5000)
        assert await fs.read_async(a, 0, 8192, readahead=True) == b"c" * 5000
        assert await _seq(fs, b, 0, 1 << 20) == b"B" * (1 << 20)
    fs.close()


async def test_readahead_fill_racing_a_write_is_not_kept() -> None:
    """A write while the chunk is in flight: the read may see either, the next read sees the write."""
    dev = GatedDevice(64 << 20)
    from sovfs.fs import FileSystem
    from sovfs.mkfs_core import MkfsParams, make_filesystem

    make_filesystem(dev, MkfsParams())
    fs = FileSystem.mount(dev)
    a = fs.create(ROOT_INO, b"a").ino
    fs.write(a, 0, b"A" * (1 << 20))
    dev.gate = trio.Event()
    async with dev.serving():
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(fs.read_async, a, 0, 65536, readahead=True))
            await trio.testing.wait_all_tasks_blocked()  # the chunk is mapped and parked at the gate
            fs.write(a, 65536, b"N" * 65536)
            dev.gate.set()
        assert not fs._ra  # dropped, not stored
        assert await fs.read_async(a, 65536, 65536, readahead=True) == b"N" * 65536
    fs.close()


class RecordingGate(RamLedgerDevice):
    """Parks every async read at a gate and records the ranges asked for."""

    gate: trio.Event
    asked: list[tuple[int, int]]

    async def preadv_async(self, requests):  # type: ignore[no-untyped-def]
        self.asked.extend(requests)
        await self.gate.wait()
        return await super().preadv_async(requests)


def _gated_fs(size: int) -> tuple[RecordingGate, object, int, bytes]:
    from sovfs.fs import FileSystem
    from sovfs.mkfs_core import MkfsParams, make_filesystem

    dev = RecordingGate(64 << 20)
    make_filesystem(dev, MkfsParams())
    fs = FileSystem.mount(dev)
    ino = fs.create(ROOT_INO, b"f").ino
    data = random.Random(3).randbytes(size)
    fs.write(ino, 0, data)
    dev.gate, dev.asked = trio.Event(), []
    return dev, fs, ino, data


async def test_fetch_ahead_reads_the_next_chunks_while_a_sequential_read_is_in_flight() -> None:
    """O_DIRECT-style 1 MiB reads (no page-cache fill): the first read's own device request and the
    fetches of the next FETCH_AHEAD bytes are all in flight together; later reads are served from
    the fetched chunks and keep the fetches going, and the bytes are the file's."""
    from sovfs.fs import FETCH_AHEAD, READAHEAD_CHUNK

    dev, fs, ino, data = _gated_fs(5 * READAHEAD_CHUNK + 4321)
    async with dev.serving(), trio.open_nursery() as n:
        fs.background = n.start_soon  # type: ignore[attr-defined]
        # got[0] is the first read's: its task may finish after the reads below start (it waits
        # for a device worker thread, which wait_all_tasks_blocked does not wait for).
        got: list[bytes] = [b""]
        first_done = trio.Event()

        async def first() -> None:
            got[0] = bytes(await fs.read_async(ino, 0, READAHEAD_CHUNK))  # type: ignore[attr-defined]
            first_done.set()

        n.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        assert len(dev.asked) == 1 + FETCH_AHEAD // READAHEAD_CHUNK  # the read and the chunks after it
        dev.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        asked = len(dev.asked)
        off = READAHEAD_CHUNK
        while off < len(data) + READAHEAD_CHUNK:
            got.append(bytes(await fs.read_async(ino, off, READAHEAD_CHUNK)))  # type: ignore[attr-defined]
            off += READAHEAD_CHUNK
        await first_done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert b"".join(got) == data
        # Each device request was one whole chunk, never a range read twice.
        ranges = dev.asked[1:]
        assert len(ranges) == len(set(ranges)) == 5 and asked == 3
        # A second pass from the start, with the last pass's chunks still held: the same again (the
        # chunks it passed make room for the new ones, not the other way round).
        dev.asked.clear()
        off, again = 0, []
        while off < len(data):
            again.append(bytes(await fs.read_async(ino, off, READAHEAD_CHUNK)))  # type: ignore[attr-defined]
            off += READAHEAD_CHUNK
        await trio.testing.wait_all_tasks_blocked()
        assert b"".join(again) == data
        assert len(dev.asked) == len(set(dev.asked)) <= 6  # the first read, and each chunk after it once
        fs.background = None  # type: ignore[attr-defined]
    fs.close()  # type: ignore[attr-defined]


async def test_fetched_chunks_never_hide_a_later_write_and_random_reads_fetch_nothing() -> None:
    from sovfs.fs import READAHEAD_CHUNK

    dev, fs, ino, data = _gated_fs(4 * READAHEAD_CHUNK)
    dev.gate.set()
    async with dev.serving(), trio.open_nursery() as n:
        fs.background = n.start_soon  # type: ignore[attr-defined]
        assert bytes(await fs.read_async(ino, 0, 65536)) == data[:65536]  # type: ignore[attr-defined]
        await trio.testing.wait_all_tasks_blocked()  # [64 KiB, 2 MiB + 64 KiB) fetched
        fs.write(ino, 65536 + 4096, b"W" * 4096)  # type: ignore[attr-defined]
        got = bytes(await fs.read_async(ino, 65536, 65536))  # type: ignore[attr-defined]
        assert got == data[65536 : 65536 + 4096] + b"W" * 4096 + data[65536 + 8192 : 131072]
        await trio.testing.wait_all_tasks_blocked()  # (it went on fetching ahead)
        fs._ra.clear()  # type: ignore[attr-defined]
        dev.asked.clear()
        for off in (3 << 20, 12288, 1 << 20, 777 * 4096):  # no read continues the one before it
            assert bytes(await fs.read_async(ino, off, 4096)) == data[off : off + 4096]  # type: ignore[attr-defined]
        await trio.testing.wait_all_tasks_blocked()
        assert len(dev.asked) == 4  # the reads themselves, nothing fetched ahead
        fs.background = None  # type: ignore[attr-defined]
    fs.close()  # type: ignore[attr-defined]


async def test_a_failed_fetch_drops_its_chunk_and_the_read_reports_the_error_itself() -> None:
    from sovfs.fs import READAHEAD_CHUNK

    class FailingAfter(RamLedgerDevice):
        limit = 1 << 62

        async def preadv_async(self, requests):  # type: ignore[no-untyped-def]
            if any(off + n > self.limit for off, n in requests):
                raise OSError(5, "injected media error")
            return await super().preadv_async(requests)

    from sovfs.fs import FileSystem
    from sovfs.mkfs_core import MkfsParams, make_filesystem

    dev = FailingAfter(64 << 20)
    make_filesystem(dev, MkfsParams())
    fs = FileSystem.mount(dev)
    ino = fs.create(ROOT_INO, b"f").ino
    fs.write(ino, 0, b"x" * (3 * READAHEAD_CHUNK))
    first = fs.read_plan(ino, 0, READAHEAD_CHUNK).requests[0][0]
    dev.limit = first + READAHEAD_CHUNK  # the file's first chunk reads; the rest fails
    async with dev.serving(), trio.open_nursery() as n:
        fs.background = n.start_soon
        assert bytes(await fs.read_async(ino, 0, READAHEAD_CHUNK)) == b"x" * READAHEAD_CHUNK
        await trio.testing.wait_all_tasks_blocked()  # the fetches failed: the nursery lives on
        assert not fs._ra
        with pytest.raises(OSError, match="injected media error"):
            await fs.read_async(ino, READAHEAD_CHUNK, READAHEAD_CHUNK)
        fs.background = None
    fs.close()


async def test_page_cache_reads_fetch_nothing_ahead_of_the_kernel() -> None:
    """The kernel's own read-ahead keeps page-cache reads in flight: with a background runner, they
    still cost one device read per chunk, and nothing beyond what they read."""
    from sovfs.fs import READAHEAD_CHUNK

    dev, fs = fresh()
    ino = fs.create(ROOT_INO, b"f").ino
    data = random.Random(2).randbytes(3 * READAHEAD_CHUNK)
    fs.write(ino, 0, data)
    async with dev.serving(), trio.open_nursery() as n:
        fs.background = n.start_soon
        calls = _count_async_reads(dev)
        assert await _seq(fs, ino, 0, 2 * READAHEAD_CHUNK) == data[: 2 * READAHEAD_CHUNK]
        await trio.testing.wait_all_tasks_blocked()
        assert calls[0] == 2
        fs.background = None
    fs.close()


async def test_chunks_survive_writes_to_other_files_and_not_to_their_own() -> None:
    """Coherence is per file: another file's writes, truncates and frees leave a chunk in use (no
    second device read); a write to the chunk's own file drops it."""
    from sovfs.fs import READAHEAD_CHUNK

    dev, fs = fresh()
    a = fs.create(ROOT_INO, b"a").ino
    b = fs.create(ROOT_INO, b"b").ino
    data = random.Random(4).randbytes(READAHEAD_CHUNK)
    fs.write(a, 0, data)
    fs.write(b, 0, b"b" * 300_000)
    async with dev.serving():
        calls = _count_async_reads(dev)
        assert bytes(await fs.read_async(a, 0, 65536, readahead=True)) == data[:65536]
        assert calls[0] == 1
        fs.write(b, 4096, b"B" * 8192)
        fs.truncate(b, 100_000)  # frees blocks of b
        c = fs.create(ROOT_INO, b"c").ino
        fs.write(c, 0, b"c" * 200_000)  # may reuse them
        assert bytes(await fs.read_async(a, 65536, 65536, readahead=True)) == data[65536:131072]
        assert calls[0] == 1  # still the chunk
        fs.write(a, 200_000, b"A" * 10)
        got = bytes(await fs.read_async(a, 131072, 131072, readahead=True))
        assert got == data[131072:200_000] + b"A" * 10 + data[200_010:262144]
        assert calls[0] == 2  # its own file changed: read again
    fs.close()
