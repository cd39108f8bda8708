"""FileSystem.read_async: file data in flight while other trio tasks run, never stale."""

from __future__ import annotations

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
