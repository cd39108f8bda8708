"""SovOps called directly (no kernel): errno mapping, lookup counts, handles, failsafe on surprises."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

import pytest

pyfuse3 = pytest.importorskip("pyfuse3")

from sovfs._dirent_reply import LayoutUnknown, NameOnlyEntry  # noqa: E402
from sovfs.errors import Corrupt  # noqa: E402
from sovfs.format import ROOT_INO  # noqa: E402
from sovfs.fs import FileSystem  # noqa: E402
from sovfs.fuse_ops import Handle, SovOps  # noqa: E402
from tests.sovfs.conftest import fresh  # noqa: E402
from tests.sovfs.ramdev import LIVE  # noqa: E402

R = ROOT_INO


class Ctx:
    uid = 0
    gid = 0
    pid = os.getpid()
    umask = 0o022


@pytest.fixture
def ops() -> Iterator[SovOps]:
    _, fs = fresh(16 << 20)
    yield SovOps(fs)
    fs.close()
    while LIVE:
        LIVE.pop().shutdown()


async def fuse_errno(coro: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await coro  # type: ignore[misc]
    return int(ei.value.errno)


async def test_errno_mapping(ops: SovOps) -> None:
    assert await fuse_errno(ops.lookup(R, b"nope", Ctx())) == errno.ENOENT
    await ops.mkdir(R, b"d", 0o755, Ctx())
    assert await fuse_errno(ops.mkdir(R, b"d", 0o755, Ctx())) == errno.EEXIST
    assert await fuse_errno(ops.lookup(R, b"x" * 256, Ctx())) == errno.ENAMETOOLONG
    assert await fuse_errno(ops.getxattr(R, b"user.none", Ctx())) == errno.ENODATA
    assert await fuse_errno(ops.setxattr(R, b"system.posix_acl_access", b"", Ctx())) == errno.EOPNOTSUPP
    assert await fuse_errno(ops.read(12345, 0, 10)) == errno.EBADF


async def test_create_open_trunc_append_and_counts(ops: SovOps) -> None:
    fi, entry = await ops.create(R, b"f", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    ino = entry.st_ino
    assert ops.fs._lookups[ino] == 1 and fi.keep_cache
    assert await ops.write(fi.fh, 0, b"hello") == 5
    await ops.release(fi.fh)
    fi2, e2 = await ops.create(R, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, Ctx())
    assert e2.st_ino == ino and e2.st_size == 0  # lost race: opened and truncated
    assert await fuse_errno(ops.create(R, b"f", 0o644, os.O_CREAT | os.O_EXCL, Ctx())) == errno.EEXIST
    await ops.write(fi2.fh, 0, b"abc")
    await ops.release(fi2.fh)
    fi3 = await ops.open(ino, os.O_WRONLY | os.O_APPEND, Ctx())
    await ops.write(fi3.fh, 0, b"def")  # O_APPEND: at EOF whatever the offset
    await ops.fsync(fi3.fh, False)
    await ops.release(fi3.fh)
    fi4 = await ops.open(ino, os.O_RDONLY, Ctx())
    assert await ops.read(fi4.fh, 0, 100) == b"abcdef"
    await ops.unlink(R, b"f", Ctx())
    assert ops.fs.is_orphan(ino)
    await ops.release(fi4.fh)
    assert ops.fs.is_orphan(ino)  # the kernel still knows it
    await ops.forget([(ino, 2)])
    assert not ops.fs.is_orphan(ino)


async def test_corruption_is_eio_logged_once_and_failsafe(
    ops: SovOps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def bad(*a: object) -> None:
        raise Corrupt("block 99: checksum mismatch (inode 7)")

    monkeypatch.setattr(FileSystem, "getattr", bad)  # on the class: the compiled core's too
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            assert await fuse_errno(ops.getattr(7, Ctx())) == errno.EIO
    assert sum("block 99" in r.getMessage() for r in caplog.records) == 1
    assert ops.fs.failed and ops.errors == 3
    assert await fuse_errno(ops.mkdir(R, b"d", 0o755, Ctx())) == errno.EROFS


async def test_unexpected_exception_is_eio_with_traceback(
    ops: SovOps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*a: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(FileSystem, "statfs", boom)
    with caplog.at_level(logging.ERROR):
        assert await fuse_errno(ops.statfs(Ctx())) == errno.EIO
    assert any(r.exc_info for r in caplog.records)
    assert ops.fs.read_only


async def test_setattr_fields(ops: SovOps) -> None:
    _, e = await ops.create(R, b"f", 0o644, os.O_WRONLY, Ctx())
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 4096
    attr.st_mode = 0o100600
    attr.st_mtime_ns = 123
    fields = pyfuse3.SetattrFields()  # read-only flags, all False: only ctime changes
    a = await ops.setattr(e.st_ino, attr, fields, None, Ctx())  # no fields: only ctime
    assert a.st_size == 0
    st = await ops.statfs(Ctx())
    assert st.f_bsize == st.f_frsize and st.f_bfree <= st.f_blocks


async def test_readdirplus_counts_only_entries_the_kernel_got(
    ops: SovOps, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = (await ops.mkdir(R, b"d", 0o755, Ctx())).st_ino
    made = {}
    for i in range(10):
        made[f"f{i}".encode()] = (await ops.mknod(d, f"f{i}".encode(), 0o100644, 0, Ctx())).st_ino
    base = dict(ops.fs._lookups)
    got: list[tuple[bytes, int, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, cookie: int) -> bool:
        if len(got) == 6:  # the kernel's buffer is full: . .. and four entries
            return False
        got.append((name, attr.st_ino, cookie))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(d, Ctx())
    await ops.readdir(fh, 0, None)
    assert [n for n, _, _ in got[:2]] == [b".", b".."] and got[0][1] == d and got[1][1] == R
    counted = {ino: n - base.get(ino, 0) for ino, n in ops.fs._lookups.items() if n != base.get(ino, 0)}
    assert counted == {made[n]: 1 for n, _, _ in got[2:]}  # not . and .., not the refused fifth
    first = got[:]
    got.clear()
    await ops.readdir(fh, first[-1][2], None)  # resume: the rest, none twice
    assert {n for n, _, _ in first[2:] + got} <= set(made) and not {n for n, _, _ in got} & {
        n for n, _, _ in first
    }

    real = ops.fs.readdir_plus

    def failing(_fs: object, ino: int, cookie: int = 0) -> Iterator[object]:
        yield from real(ino, cookie)
        raise Corrupt("directory leaf: checksum mismatch")

    before = dict(ops.fs._lookups)
    monkeypatch.setattr(FileSystem, "readdir_plus", failing)
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *a: True)
    assert await fuse_errno(ops.readdir(fh, 0, None)) == errno.EIO
    assert ops.fs._lookups == before  # the failed reply reached no one: no lookups counted
    await ops.releasedir(fh)


def _listing(monkeypatch: pytest.MonkeyPatch, room: int) -> list[tuple[bytes, int, int, int]]:
    """Capture readdir replies as (name, node id, file type, cookie); ``room`` entries fit a reply."""
    got: list[tuple[bytes, int, int, int]] = []

    def reply(token: list[int], name: bytes, attr: pyfuse3.EntryAttributes, cookie: int) -> bool:
        if token[0] == room:
            return False
        token[0] += 1
        got.append((name, attr.st_ino, attr.st_mode >> 12, cookie))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    return got


async def test_readdirplus_auto_lists_names_only_after_the_first_reply_unless_advised(
    ops: SovOps, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = (await ops.mkdir(R, b"d", 0o755, Ctx())).st_ino
    made = {}
    for i in range(20):
        made[f"f{i:02d}".encode()] = (await ops.mknod(d, f"f{i:02d}".encode(), 0o100644, 0, Ctx())).st_ino
    made[b"sub"] = (await ops.mkdir(d, b"sub", 0o755, Ctx())).st_ino
    base = dict(ops.fs._lookups)
    got = _listing(monkeypatch, room=4)

    async def reply_from(fh: int, cookie: int) -> list[tuple[bytes, int, int, int]]:
        start = len(got)
        await ops.readdir(fh, cookie, [0])
        return got[start:]

    def full(entries: list[tuple[bytes, int, int, int]]) -> bool:
        return bool(entries) and all(node == made.get(n, node) != 0 for n, node, _, _ in entries)

    def names_only(entries: list[tuple[bytes, int, int, int]]) -> bool:
        return bool(entries) and all(node == 0 for _, node, _, _ in entries)

    fh = await ops.opendir(d, Ctx())
    first = await reply_from(fh, 0)  # a listing's first reply: full entries, lookups counted
    assert [n for n, *_ in first[:2]] == [b".", b".."] and full(first)
    second = await reply_from(fh, first[-1][3])  # later replies: names only, nothing counted
    assert names_only(second)
    counted = {i: n - base.get(i, 0) for i, n in ops.fs._lookups.items() if n != base.get(i, 0)}
    assert counted == {made[n]: 1 for n, *_ in first[2:]}
    assert await fuse_errno(ops.lookup(d, b"absent", Ctx())) == errno.ENOENT  # advises nothing
    third = await reply_from(fh, second[-1][3])
    assert names_only(third)
    await ops.lookup(d, b"f00", Ctx())  # the reader looks names up as it lists (ls -l) ...
    fourth = await reply_from(fh, third[-1][3])
    fifth = await reply_from(fh, fourth[-1][3])  # ... so the rest of this listing stays full
    assert full(fourth) and full(fifth)
    while rest := await reply_from(fh, got[-1][3]):  # to the end of the directory
        assert full(rest)
    listed = [n for n, *_ in got[2:]]
    assert sorted(listed) == sorted(made)  # every name once
    types = {n: t for n, _, t, _ in got}
    assert types[b"sub"] == 4 and types[b"f00"] == 8 and types[b"."] == types[b".."] == 4
    await ops.releasedir(fh)

    # Another listing starts over, and takes the advice left before it with its first reply.
    await ops.lookup(d, b"f01", Ctx())
    fh = await ops.opendir(d, Ctx())
    again = await reply_from(fh, 0)
    assert full(again) and names_only(await reply_from(fh, again[-1][3]))
    await ops.releasedir(fh)


@pytest.mark.parametrize("mode", ["no", "yes"])
async def test_readdirplus_no_and_yes(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, fs = fresh(16 << 20)
    try:
        ops = SovOps(fs, readdirplus=mode)
        d = (await ops.mkdir(R, b"d", 0o755, Ctx())).st_ino
        for i in range(10):
            await ops.mknod(d, f"f{i}".encode(), 0o100644, 0, Ctx())
        await ops.lookup(d, b"f0", Ctx())
        base = dict(fs._lookups)
        got = _listing(monkeypatch, room=100)
        fh = await ops.opendir(d, Ctx())
        await ops.readdir(fh, 0, [0])
        await ops.releasedir(fh)
        assert len(got) == 12
        children = [node for n, node, _, _ in got if n not in (b".", b"..")]
        if mode == "no":
            assert all(node == 0 for _, node, _, _ in got) and fs._lookups == base
        else:
            assert all(children) and all(fs._lookups[i] == base.get(i, 0) + 1 for i in children)
    finally:
        fs.close()
        while LIVE:
            LIVE.pop().shutdown()
    with pytest.raises(ValueError):
        SovOps(fs, readdirplus="sometimes")


def test_an_unrecognised_entry_layout_means_full_entries(
    ops: SovOps, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class PlainEntry:  # attributes in a __dict__: the probe finds no marks in the object
        st_ino = generation = st_mode = 0

    monkeypatch.setattr(pyfuse3, "EntryAttributes", PlainEntry)
    with pytest.raises(LayoutUnknown):
        NameOnlyEntry()
    with caplog.at_level(logging.WARNING, logger="sovfs.fuse"):
        fallback = SovOps(ops.fs)
    assert "readdirplus=yes" in caplog.text
    h = Handle(R, os.O_RDONLY | os.O_DIRECTORY)
    assert fallback._plus(h, 0) and fallback._plus(h, 12345)  # every reply full, never wrong


async def test_replies_are_reused_while_the_inode_is_unchanged_and_rebuilt_after_any_change(
    ops: SovOps,
) -> None:
    fs = ops.fs
    fi, entry = await ops.create(R, b"f", 0o644, os.O_WRONLY | os.O_CREAT, Ctx())
    ino = entry.st_ino
    a = fs.getattr(ino)
    assert fs.getattr(ino) is a and await ops.getattr(ino, Ctx()) is await ops.getattr(ino, Ctx())
    assert next(x for n, x, _ in fs.readdir_plus(R) if n == b"f") is a  # readdirplus: the same object
    before = await ops.getattr(ino, Ctx())
    changes = [
        lambda: ops.write(fi.fh, 0, b"data"),  # size, blocks, mtime
        lambda: ops.link(ino, R, b"g", Ctx()),  # nlink, ctime
        lambda: ops.unlink(R, b"g", Ctx()),
        lambda: ops.rename(R, b"f", R, b"h", 0, Ctx()),  # ctime
    ]
    for change in changes:
        await change()
        after = await ops.getattr(ino, Ctx())
        assert after is not before
        assert after.st_size == fs.getattr(ino).size and after.st_nlink == fs.getattr(ino).nlink
        assert after.st_ctime_ns == fs.getattr(ino).ctime_ns
        before = after
    fs.setattr(ino, mode=0o600)
    assert (await ops.getattr(ino, Ctx())).st_mode & 0o777 == 0o600
    await ops.release(fi.fh)
