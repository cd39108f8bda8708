from __future__ import annotations

from collections.abc import Iterator

import pytest

from sovfs.fs import FileSystem
from sovfs.mkfs_core import MkfsParams, make_filesystem
from tests.sovfs.ramdev import LIVE, RamLedgerDevice


@pytest.fixture(autouse=True)
def _shutdown_ledgers() -> Iterator[None]:
    """Stop the device threads of every RAM ledger a test created."""
    yield
    while LIVE:
        LIVE.pop().shutdown()


def fresh(size: int = 64 << 20, **kw: object) -> tuple[RamLedgerDevice, FileSystem]:
    dev = RamLedgerDevice(size)
    make_filesystem(dev, MkfsParams(**kw))  # type: ignore[arg-type]
    return dev, FileSystem.mount(dev)


@pytest.fixture
def dev_fs() -> Iterator[tuple[RamLedgerDevice, FileSystem]]:
    dev, fs = fresh()
    yield dev, fs
    fs.close()


@pytest.fixture
def fs(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> FileSystem:
    return dev_fs[1]
