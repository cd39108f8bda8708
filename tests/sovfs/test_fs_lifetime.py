"""FileSystem additions for the FUSE mount: lookup-count lifetime, fsync, failsafe, clean check, access,
atime policy, set-group-ID directories."""

from __future__ import annotations

import pytest

from sovfs.errors import NeedsCheck, NotFound, PermissionDenied, ReadOnly
from sovfs.format import ROOT_INO, STATE_CLEAN, STATE_ERRORS, Superblock
from sovfs.fs import FileSystem
from tests.sovfs.conftest import fresh
from tests.sovfs.ramdev import RamLedgerDevice

R = ROOT_INO


def test_unlinked_inode_lives_until_lookups_and_handles_are_gone(fs: FileSystem) -> None:
    a = fs.create(R, b"f")
    fs.write(a.ino, 0, b"x" * 10000)
    fs.ref(a.ino, 2)
    fs.open(a.ino)
    free0 = fs.balloc.free
    fs.unlink(R, b"f")
    assert fs.is_orphan(a.ino) and fs.balloc.free == free0
    fs.write(a.ino, 10000, b"y")  # open-but-unlinked stays writable
    assert fs.read(a.ino, 9999, 2) == b"xy"
    fs.release(a.ino)
    assert fs.is_orphan(a.ino)
    fs.forget(a.ino, 1)
    assert fs.getattr(a.ino).nlink == 0
    fs.forget(a.ino, 1)
    assert not fs.is_orphan(a.ino) and fs.balloc.free > free0
    with pytest.raises(NotFound):
        fs.getattr(a.ino)


def test_rename_over_looked_up_and_close_frees_orphans(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    a, b = fs.create(R, b"a"), fs.create(R, b"b")
    fs.ref(b.ino)
    fs.rename(R, b"a", R, b"b")
    assert fs.is_orphan(b.ino) and fs.getattr(b.ino).nlink == 0
    fs.close()
    with FileSystem.mount(dev, require_clean=True) as fs2:
        with pytest.raises(NotFound):
            fs2.getattr(b.ino)
        assert fs2.lookup(R, b"b").ino == a.ino


def _orphan_list(fs: FileSystem) -> list[int]:
    """The on-disk orphan list, head first (§4.5)."""
    out, ino = [], fs.journal.orphan_head
    while ino:
        out.append(ino)
        ino = fs.inodes.get(ino).inode.parent
    return out


@pytest.mark.parametrize("order", ["unlinked", "reversed", "shuffled", "stale hints"])
def test_orphans_leave_the_list_from_anywhere_without_walking_it(fs: FileSystem, order: str) -> None:
    """Files unlinked while the kernel still holds them become orphans, pushed on the on-disk list;
    each leaves it when its last reference goes, in any order.  The list stays exactly the orphans
    still held, and with the predecessor hints intact no removal walks the list (releasing n orphans
    in the order they were unlinked used to walk it n times).  Stale hints (as an aborted transaction
    can leave) cost a walk, never a wrong link."""
    import random

    inos = []
    for i in range(200):
        a = fs.create(R, b"f%d" % i)
        fs.ref(a.ino)
        inos.append(a.ino)
    free0 = fs.ialloc.free
    for i in range(200):
        fs.unlink(R, b"f%d" % i)
    assert _orphan_list(fs) == inos[::-1]
    if order == "reversed":
        inos.reverse()
    elif order in ("shuffled", "stale hints"):
        random.Random(7).shuffle(inos)
    if order == "stale hints":
        hints = fs._orphan_prev
        for k in inos[:20]:  # the first ones released: a wrong predecessor, an orphan to the end
            hints[k] = inos[-1]
        del hints[inos[25]]
    walks0 = fs.orphan_walks
    held = list(_orphan_list(fs))
    for ino in inos:
        fs.forget(ino, 1)
        held.remove(ino)
        assert _orphan_list(fs) == held
    assert fs.journal.orphan_head == 0 and not any(fs.is_orphan(i) for i in inos)
    assert fs.ialloc.free == free0 + 200
    if order != "stale hints":
        assert fs.orphan_walks == walks0
    else:
        assert 0 < fs.orphan_walks - walks0 < 200


@pytest.mark.pure_python  # patches what the compiled core calls directly (see tests/conftest.py)
def test_an_aborted_operation_leaves_the_orphan_list_as_it_was(
    dev_fs: tuple[RamLedgerDevice, FileSystem], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operation that fails after pushing an orphan (a rename over a file the kernel still holds)
    or before finishing taking one off (the free at the last forget) is rolled back: the on-disk
    list, its head and the in-memory orphan set are what they were before it.  (Before, the head
    kept pointing at the pushed inode - still linked in its directory, freed at its next forget -
    and the older orphans fell off the list for good.)"""
    from sovfs.errors import NoSpace

    dev, fs = dev_fs
    a, b = fs.create(R, b"a"), fs.create(R, b"b")
    fs.create(R, b"c")
    fs.ref(a.ino)
    fs.ref(b.ino)
    fs.unlink(R, b"a")
    assert _orphan_list(fs) == [a.ino]

    def boom(*args: object, **kw: object) -> None:
        raise NoSpace("injected")

    with monkeypatch.context() as m:  # fails after b was pushed on the list
        m.setattr(fs.dirs, "remove", boom)
        with pytest.raises(NoSpace):
            fs.rename(R, b"c", R, b"b")
    assert _orphan_list(fs) == [a.ino] and fs.is_orphan(a.ino) and not fs.is_orphan(b.ino)
    assert fs.lookup(R, b"b").ino == b.ino and fs.getattr(b.ino).nlink == 1
    fs.forget(b.ino, 1)  # still linked: stays
    assert fs.lookup(R, b"b").ino == b.ino

    with monkeypatch.context() as m:  # the last forget of a: its free fails
        m.setattr(fs.inodes, "free", boom)
        with pytest.raises(NoSpace):
            fs.forget(a.ino, 1)
    assert _orphan_list(fs) == [a.ino] and fs.is_orphan(a.ino)
    fs.close()  # frees the orphan that is left
    with FileSystem.mount(dev, require_clean=True) as fs2:
        assert fs2.journal.orphan_head == 0
        with pytest.raises(NotFound):
            fs2.getattr(a.ino)
        assert fs2.lookup(R, b"b").ino == b.ino and fs2.lookup(R, b"c")


def test_fsync_flushes(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    a = fs.create(R, b"f")
    dev.reset_counters()
    fs.fsync(a.ino)
    fs.fsync(a.ino, datasync=True)
    assert dev.flushes == 2


def test_failsafe_makes_read_only_and_marks_errors(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    fs.create(R, b"f")
    assert fs.fail("block 7 bad") is True
    assert fs.fail("again") is False
    with pytest.raises(ReadOnly):
        fs.mkdir(R, b"d")
    assert fs.lookup(R, b"f")
    fs.close()
    sb = Superblock.unpack(dev.data[1024:2048])
    assert sb.state & STATE_ERRORS and not sb.state & STATE_CLEAN
    with pytest.raises(NeedsCheck):
        FileSystem.mount(dev, require_clean=True)


def test_require_clean_replays_a_journaled_crash_and_refuses_the_rest() -> None:
    dev, fs = fresh(8 << 20)
    a = fs.create(R, b"f").ino
    fs.write(a, 0, b"x" * 5000)
    fs.fsync(a)
    del fs  # the daemon dies here: no close(), the journal is live
    fs2 = FileSystem.mount(dev, require_clean=True)  # replayed and mounted, as ext4 does
    assert fs2.read(fs2.lookup(R, b"f").ino, 0, 5000) == b"x" * 5000
    fs2.close()
    # Without the journal (the debug switch) an unclean stop needs fsck; the refusal writes nothing.
    FileSystem.mount(dev, journaling=False)
    before = bytes(dev.data)
    with pytest.raises(NeedsCheck, match="no journal"):
        FileSystem.mount(dev, require_clean=True)
    assert bytes(dev.data) == before


def test_access(fs: FileSystem) -> None:
    a = fs.create(R, b"f", 0o640, uid=10, gid=20)
    fs.access(a.ino, 6, 10, {99})
    fs.access(a.ino, 4, 11, {20})
    with pytest.raises(PermissionDenied):
        fs.access(a.ino, 2, 11, {20})
    with pytest.raises(PermissionDenied):
        fs.access(a.ino, 4, 11, {21})
    fs.access(a.ino, 6, 0, set())
    with pytest.raises(PermissionDenied):
        fs.access(a.ino, 1, 0, set())  # root needs some x bit
    fs.access(a.ino, 0, 12, set())


def test_atime_policies(fs: FileSystem) -> None:
    a = fs.create(R, b"f")
    fs.setattr(a.ino, atime_ns=10**18, mtime_ns=10**17)  # atime newer than mtime
    fs.accessed(a.ino, "relatime")
    assert fs.getattr(a.ino).atime_ns == 10**18 or fs.getattr(a.ino).atime_ns > 10**18
    fs.setattr(a.ino, atime_ns=5, mtime_ns=10)
    fs.accessed(a.ino, "noatime")
    assert fs.getattr(a.ino).atime_ns == 5
    fs.accessed(a.ino, "relatime")
    assert fs.getattr(a.ino).atime_ns > 10


def test_setgid_directory(fs: FileSystem) -> None:
    d = fs.mkdir(R, b"d", 0o2775, uid=0, gid=50)
    f = fs.create(d.ino, b"f", 0o644, uid=1, gid=2)
    sub = fs.mkdir(d.ino, b"s", 0o755, uid=1, gid=2)
    assert f.gid == 50 and sub.gid == 50 and sub.mode & 0o2000
