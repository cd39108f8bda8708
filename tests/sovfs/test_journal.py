"""Journal, replay, orphan list, power-cut simulator and the crash harness (≥ 200 cut points)."""

from __future__ import annotations

import numpy as np
import pytest

from ledger._machine import Ledger
from ledger.backend import CrashBackend
from sovfs import fsck_core
from sovfs.blockdev import LedgerBlockDevice, ram_block_device
from sovfs.crashtest import Simulator
from sovfs.fs import FileSystem
from sovfs.journal import journal_state
from sovfs.mkfs_core import MkfsParams, make_filesystem

SEED = 20240601
POINTS = 240


@pytest.fixture(scope="module")
def sim() -> Simulator:
    s = Simulator()
    yield s
    s.close()


def test_power_cut_loses_only_unflushed_writes() -> None:
    b = CrashBackend(1 << 20)
    with Ledger.crash(b) as led:
        blk = led.sync()
        blk.write(0, b"a" * 4096)
        blk.flush()
        blk.write(8, b"b" * 4096)
        assert blk.read(8, 8) == b"b" * 4096  # reads see the cache
        assert b.unflushed() == [(4096, 4096)]
    imgs = {bytes(b.power_cut(s)[4096:8192]) for s in range(40)}
    assert all(bytes(b.durable[:4096]) == b"a" * 4096 for _ in range(1))
    assert b"b" * 4096 in imgs and bytes(4096) in imgs and len(imgs) > 2  # kept, lost, torn
    assert np.array_equal(b.power_cut(7), b.power_cut(7))  # deterministic


def test_cut_after_fails_later_requests() -> None:
    b = CrashBackend(1 << 20)
    with Ledger.crash(b) as led:
        blk = led.sync()
        b.cut_after(1)
        blk.write(0, b"x" * 512)
        with pytest.raises(Exception, match="IOERR"):
            blk.write(1, b"y" * 512)
    assert not b.powered
    assert bytes(b.ram[512:1024]) == bytes(512)


def _fs_on(b: CrashBackend) -> tuple[Ledger, LedgerBlockDevice]:
    led = Ledger.crash(b, pool_bytes=4 << 20)
    return led, LedgerBlockDevice(led, own=False)


def _fresh() -> CrashBackend:
    dev = ram_block_device(4 << 20)
    make_filesystem(dev, MkfsParams(block_size=1024))
    img = np.frombuffer(dev.pread(0, 4 << 20), np.uint8).copy()
    dev.close()
    return CrashBackend(image=img)


def test_fsync_survives_losing_everything_unflushed_and_orphans_are_reclaimed() -> None:
    b = _fresh()
    led, dev = _fs_on(b)
    fs = FileSystem.mount(dev)
    a = fs.create(1, b"kept")
    fs.write(a.ino, 0, b"K" * 5000)
    o = fs.create(1, b"orphan")
    fs.write(o.ino, 0, b"O" * 3000)
    fs.open(o.ino)
    fs.unlink(1, b"orphan")
    fs.fsync(a.ino)
    commits = fs.journal.tx_commits
    fs.fsync(a.ino)  # nothing new: shares the previous commit
    assert fs.journal.tx_commits == commits
    fs.create(1, b"lost")  # never committed
    led.close()
    img = b.power_cut(0)  # flushed data only... plus a seeded subset of the rest
    b2 = CrashBackend(image=img)
    led2, dev2 = _fs_on(b2)
    fs2 = FileSystem.mount(dev2)
    assert fs2.recovery is not None and fs2.recovery.transactions >= 1
    assert fs2.read(fs2.lookup(1, b"kept").ino, 0, 9000) == b"K" * 5000
    assert fs2.sb.orphan_head == 0
    fs2.close()
    assert journal_state(dev2, fs2.sb).head == 0  # clean unmount: empty journal
    assert not fsck_core.check(dev2, fsck_core.Mode.NO).errors
    led2.close()


def test_fsck_replays_and_n_reports() -> None:
    b = _fresh()
    led, dev = _fs_on(b)
    fs = FileSystem.mount(dev)
    fs.mkdir(1, b"d")
    fs.sync()
    led.close()
    b2 = CrashBackend(image=b.power_cut(1))
    led2, dev2 = _fs_on(b2)
    codes = [p.code for p in fsck_core.check(dev2, fsck_core.Mode.NO).problems]
    assert "JOURNAL_RECOVER" in codes
    rep = fsck_core.check(dev2, fsck_core.Mode.YES)
    assert "JOURNAL_REPLAYED" in [p.code for p in rep.problems] and not rep.errors
    with FileSystem.mount(dev2) as fs2:
        assert fs2.lookup(1, b"d").ino > 2
    led2.close()


def test_journal_off_switch_writes_in_place() -> None:
    dev = ram_block_device(4 << 20)
    make_filesystem(dev, MkfsParams(block_size=1024))
    with FileSystem.mount(dev, journaling=False) as fs:
        fs.mkdir(1, b"x")
        assert fs.journal.tx_commits == 0
    with FileSystem.mount(dev) as fs:
        assert fs.lookup(1, b"x")
    dev.close()


@pytest.mark.parametrize("chunk", range(4))
def test_crash_points(sim: Simulator, chunk: int) -> None:
    """POINTS cut points in all (littlefs style: every failure names the id that replays it)."""
    bad = []
    n = POINTS // 4
    for p in range(chunk * n, (chunk + 1) * n):
        r = sim.point(SEED, p)
        if not r.ok:
            bad.append(f"{r.id} ({r.loss}): {r.violations[:3]} {r.fsck_errors[:3]}")
    assert not bad, "replay with: python bench/crashtest.py --replay ID\n" + "\n".join(bad)


# Regression ids found by the harness (replayed exactly): crc32c blind to whole-inode-slot tears.
@pytest.mark.parametrize("pid", ["1:101", "1:86", "1:190"])
def test_replay_ids(sim: Simulator, pid: str) -> None:
    seed, point = (int(x) for x in pid.split(":"))
    r = sim.point(seed, point)
    assert r.ok, f"{pid}: {r.violations} {r.fsck_errors}"
