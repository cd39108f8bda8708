"""FileSystem.read_async: file data in flight while other trio tasks run, never stale."""

from __future__ import annotations

import random

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
