from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

from sovfs.fs import FileSystem
from sovfs.mkfs_core import MkfsParams, make_filesystem
from tests.sovfs.fakedev import FakeBlockDevice

settings.register_profile("sovfs", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("sovfs")


def fresh(size: int = 64 << 20, **kw: object) -> tuple[FakeBlockDevice, FileSystem]:
    dev = FakeBlockDevice(size)
    make_filesystem(dev, MkfsParams(**kw))  # type: ignore[arg-type]
    return dev, FileSystem.mount(dev)


@pytest.fixture
def dev_fs() -> Iterator[tuple[FakeBlockDevice, FileSystem]]:
    dev, fs = fresh()
    yield dev, fs
    fs.close()


@pytest.fixture
def fs(dev_fs: tuple[FakeBlockDevice, FileSystem]) -> FileSystem:
    return dev_fs[1]
