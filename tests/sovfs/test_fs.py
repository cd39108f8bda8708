"""FileSystem façade semantics: errno per operation, rename corner cases, sparse and large files."""

from __future__ import annotations

import errno
import os

import pytest

from sovfs import format as F
from sovfs.errors import SovError
from sovfs.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, FileSystem
from tests.sovfs.conftest import fresh
from tests.sovfs.ramdev import RamLedgerDevice

R = F.ROOT_INO


def err(e: pytest.ExceptionInfo[SovError]) -> str:
    return errno.errorcode[e.value.errno]


def remount(dev: RamLedgerDevice, fs: FileSystem) -> FileSystem:
    fs.close()
    return FileSystem.mount(dev)


def names(fs: FileSystem, ino: int) -> list[bytes]:
    return sorted(d.name for d in fs.readdir(ino))


def test_fresh_root(fs: FileSystem) -> None:
    a = fs.getattr(R)
    assert a.mode == F.S_IFDIR | 0o755
    assert a.nlink == 3
    assert names(fs, R) == [b".", b"..", b"lost+found"]
    st = fs.statfs()
    assert st.free_files == fs.sb.inode_count - 3


@pytest.mark.parametrize(
    ("op", "code"),
    [
        (lambda fs: fs.lookup(R, b"nope"), "ENOENT"),
        (lambda fs: fs.create(R, b"lost+found"), "EEXIST"),
        (lambda fs: fs.create(R, b"x" * 256), "ENAMETOOLONG"),
        (lambda fs: fs.create(R, b"a/b"), "EINVAL"),
        (lambda fs: fs.create(R, b""), "EINVAL"),
        (lambda fs: fs.rmdir(R, b"nope"), "ENOENT"),
        (lambda fs: fs.unlink(R, b"lost+found"), "EISDIR"),
        (lambda fs: fs.getxattr(R, b"user.none"), "ENODATA"),
        (lambda fs: fs.setxattr(R, b"bogus.x", b"1"), "ENOTSUP"),  # == EOPNOTSUPP on Linux
        (lambda fs: fs.read(R, 0, 10), "EISDIR"),
        (lambda fs: fs.readlink(R), "EINVAL"),
        (lambda fs: fs.getattr(999), "ENOENT"),
    ],
)
def test_errnos(fs: FileSystem, op: object, code: str) -> None:
    with pytest.raises(SovError) as e:
        op(fs)  # type: ignore[operator]
    assert err(e) == code


def test_notdir_enotempty(fs: FileSystem) -> None:
    f = fs.create(R, b"f").ino
    with pytest.raises(SovError) as e:
        fs.create(f, b"x")
    assert err(e) == "ENOTDIR"
    d = fs.mkdir(R, b"d").ino
    fs.create(d, b"x")
    with pytest.raises(SovError) as e:
        fs.rmdir(R, b"d")
    assert err(e) == "ENOTEMPTY"
    with pytest.raises(SovError) as e:
        fs.rmdir(R, b"f")
    assert err(e) == "ENOTDIR"


def test_create_write_read_remount(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    a = fs.create(R, b"hello", 0o640, uid=5, gid=6)
    data = os.urandom(10000)
    assert fs.write(a.ino, 0, data) == 10000
    assert fs.write(a.ino, 5000, b"XYZ") == 3
    expect = data[:5000] + b"XYZ" + data[5003:]
    assert fs.read(a.ino, 0, 20000) == expect
    fs2 = remount(dev, fs)
    b = fs2.lookup(R, b"hello")
    assert (b.ino, b.mode, b.uid, b.gid, b.size) == (a.ino, F.S_IFREG | 0o640, 5, 6, 10000)
    assert fs2.read(b.ino, 0, 20000) == expect
    assert fs2.read(b.ino, 9999, 10) == expect[9999:]
    fs2.close()


def test_sparse_file(fs: FileSystem) -> None:
    a = fs.create(R, b"sparse").ino
    fs.write(a, 10 << 20, b"end")
    at = fs.getattr(a)
    assert at.size == (10 << 20) + 3
    assert at.blocks == fs.bs // 512  # one block stored
    assert fs.read(a, 4096 * 7, 100) == bytes(100)
    fs.truncate(a, 100 << 20)
    assert fs.getattr(a).blocks == fs.bs // 512
    assert fs.read(a, (100 << 20) - 10, 100) == bytes(10)


def test_truncate_shrink_zeroes_tail(fs: FileSystem) -> None:
    a = fs.create(R, b"t").ino
    fs.write(a, 0, b"\xff" * 10000)
    fs.truncate(a, 5000)
    fs.truncate(a, 10000)
    assert fs.read(a, 0, 10000) == b"\xff" * 5000 + bytes(5000)
    fs.truncate(a, 0)
    assert fs.getattr(a).blocks == 0


def test_large_file_few_extents_and_batched_io(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    a = fs.create(R, b"big").ino
    data = os.urandom(8 << 20)
    dev.reset_counters()
    fs.write(a, 0, data)
    assert dev.write_calls <= 3  # data pwritev + metadata commit
    rec = fs.inodes.get(a)
    assert len(rec.extents) == 1
    dev.reset_counters()
    assert fs.read(a, 0, len(data)) == data
    assert dev.read_calls == 1


def test_fragmented_file_spills_into_extent_tree(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    a = fs.create(R, b"frag").ino
    bs = fs.bs
    # every other block -> one extent per block
    for i in range(0, 2000, 2):
        fs.write(a, i * bs, bytes([i % 251]) * 10)
    rec = fs.inodes.get(a)
    assert len(rec.extents) == 1000
    assert fs.getattr(a).blocks * 512 // bs == 1000 + len(rec.tree_blocks)
    assert rec.inode.ext_depth >= 1
    fs = remount(dev, fs)
    rec = fs.inodes.get(a)
    assert len(rec.extents) == 1000
    assert len(rec.tree_blocks) >= 4
    for i in (0, 2, 998, 1996):
        assert fs.read(a, i * bs, 10) == bytes([i % 251]) * 10
        assert fs.read(a, (i + 1) * bs, 10) == bytes(10)
    fs.truncate(a, 0)
    assert fs.inodes.get(a).inode.ext_depth == 0
    assert fs.getattr(a).blocks == 0
    fs.close()


def test_symlinks(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    s = fs.symlink(R, b"short", b"target/x")
    long_t = b"l" * 300
    lg = fs.symlink(R, b"long", long_t)
    assert fs.getattr(s.ino).blocks == 0
    fs = remount(dev, fs)
    assert fs.readlink(s.ino) == b"target/x"
    assert fs.readlink(lg.ino) == long_t
    fs.close()


def test_mknod_and_link(fs: FileSystem) -> None:
    n = fs.mknod(R, b"null", F.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    assert fs.getattr(n.ino).rdev == os.makedev(1, 3)
    p = fs.mknod(R, b"fifo", F.S_IFIFO | 0o600)
    assert fs.getattr(p.ino).mode == F.S_IFIFO | 0o600
    f = fs.create(R, b"f")
    fs.write(f.ino, 0, b"abc")
    fs.link(f.ino, R, b"g")
    assert fs.getattr(f.ino).nlink == 2
    fs.unlink(R, b"f")
    assert fs.read(fs.lookup(R, b"g").ino, 0, 3) == b"abc"
    with pytest.raises(SovError) as e:
        fs.link(R, R, b"rootlink")
    assert err(e) == "EPERM"


def test_unlink_open_file_defers_free(fs: FileSystem) -> None:
    free0 = fs.statfs().free_blocks
    f = fs.create(R, b"f").ino
    fs.write(f, 0, b"x" * 100000)
    fs.open(f)
    fs.unlink(R, b"f")
    assert fs.read(f, 0, 3) == b"xxx"
    fs.release(f)
    with pytest.raises(SovError):
        fs.getattr(f)
    assert fs.statfs().free_blocks == free0


def test_rename_semantics(fs: FileSystem) -> None:
    a = fs.mkdir(R, b"a").ino
    b = fs.mkdir(a, b"b").ino
    f = fs.create(R, b"f").ino
    g = fs.create(R, b"g").ino
    with pytest.raises(SovError) as e:
        fs.rename(R, b"a", b, b"loop")
    assert err(e) == "EINVAL"
    with pytest.raises(SovError) as e:
        fs.rename(R, b"f", R, b"g", RENAME_NOREPLACE)
    assert err(e) == "EEXIST"
    with pytest.raises(SovError) as e:
        fs.rename(R, b"f", R, b"a")
    assert err(e) == "EISDIR"
    with pytest.raises(SovError) as e:
        fs.rename(R, b"a", R, b"f")
    assert err(e) == "ENOTDIR"
    with pytest.raises(SovError) as e:
        fs.rename(R, b"f", R, b"none", RENAME_EXCHANGE)
    assert err(e) == "ENOENT"
    fs.rename(R, b"f", R, b"g")  # replace: g's inode freed
    assert fs.lookup(R, b"g").ino == f
    with pytest.raises(SovError):
        fs.getattr(g)
    fs.rename(R, b"g", R, b"a", RENAME_EXCHANGE)  # file <-> dir
    assert fs.lookup(R, b"a").ino == f
    assert fs.lookup(R, b"g").ino == a
    fs.rename(a, b"b", R, b"b2")  # move a dir up: link counts and parent follow
    assert fs.getattr(a).nlink == 2
    assert fs.lookup(b, b"..").ino == R
    e_dir = fs.mkdir(R, b"e").ino
    fs.create(e_dir, b"x")
    with pytest.raises(SovError) as e:
        fs.rename(R, b"b2", R, b"e")
    assert err(e) == "ENOTEMPTY"
    fs.rename(R, b"g", R, b"g")  # same entry: no-op
    assert fs.getattr(R).nlink == 2 + 4  # lost+found, g(a), b2, e


def test_readdir_cookies_stable(fs: FileSystem) -> None:
    d = fs.mkdir(R, b"d").ino
    for i in range(300):
        fs.create(d, f"f{i:04}".encode())
    seen: list[bytes] = []
    it = fs.readdir(d, 0)
    cookie = 0
    for n, item in enumerate(it):
        seen.append(item.name)
        cookie = item.next_cookie
        if n == 100:
            break
    for i in range(300, 600):
        fs.create(d, f"f{i:04}".encode())
    for i in range(0, 300, 3):
        name = f"f{i:04}".encode()
        if name not in seen:
            fs.unlink(d, name)
    rest = [x.name for x in fs.readdir(d, cookie)]
    assert not set(seen) & set(rest)
    survivors = {f"f{i:04}".encode() for i in range(300) if i % 3}
    assert survivors <= set(seen) | set(rest)
    assert len(seen + rest) == len(set(seen + rest))


def test_xattrs_inline_then_block(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    f = fs.create(R, b"x").ino
    fs.setxattr(f, b"user.a", b"1")
    assert fs.inodes.get(f).inode.xattr_block == 0
    fs.setxattr(f, b"user.big", b"v" * 500)
    assert fs.inodes.get(f).inode.xattr_block != 0
    acl = bytes.fromhex("02000000010006000000000004000400ffffffff10000600ffffffff20000400ffffffff")
    fs.setxattr(f, b"system.posix_acl_access", acl)
    fs = remount(dev, fs)
    assert fs.listxattr(f) == [b"system.posix_acl_access", b"user.a", b"user.big"]
    assert fs.getxattr(f, b"system.posix_acl_access") == acl
    fs.removexattr(f, b"user.big")
    assert fs.inodes.get(f).inode.xattr_block == 0
    with pytest.raises(SovError) as e:
        fs.setxattr(f, b"user.a", b"2", 1)
    assert err(e) == "EEXIST"
    with pytest.raises(SovError) as e:
        fs.setxattr(f, b"user.huge", b"v" * 70000)
    assert err(e) == "ERANGE"
    with pytest.raises(SovError) as e:
        fs.setxattr(f, b"user.huge", b"v" * 5000)
    assert err(e) == "ENOSPC"
    fs.close()


def test_xattr_says_absent_with_none_wherever_the_xattrs_live(
    dev_fs: tuple[RamLedgerDevice, FileSystem],
) -> None:
    """``xattr`` (the FUSE layer's getxattr) answers None for a missing name, never NoData, on an
    inode without xattrs, with inline ones and with an xattr block; getxattr still raises ENODATA."""
    _dev, fs = dev_fs
    f = fs.create(R, b"x").ino
    assert fs.xattr(f, b"security.capability") is None
    fs.setxattr(f, b"user.a", b"1")
    assert fs.xattr(f, b"security.capability") is None
    assert fs.xattr(f, b"user.a") == b"1"
    fs.setxattr(f, b"user.big", b"v" * 500)
    assert fs.inodes.get(f).inode.xattr_block != 0
    assert fs.xattr(f, b"security.capability") is None
    assert fs.xattr(f, b"user.big") == b"v" * 500
    with pytest.raises(SovError) as e:
        fs.getxattr(f, b"security.capability")
    assert err(e) == "ENODATA"
    fs.unlink(R, b"x")
    with pytest.raises(SovError) as e:
        fs.xattr(f, b"user.a")
    assert err(e) == "ENOENT"


def test_enospc_leaves_fs_consistent() -> None:
    dev, fs = fresh(2 << 20, block_size=1024)
    f = fs.create(R, b"fill").ino
    free0 = fs.statfs().free_blocks
    with pytest.raises(SovError) as e:
        fs.write(f, 0, bytes(4 << 20))
    assert err(e) == "ENOSPC"
    assert fs.statfs().free_blocks == free0
    assert fs.getattr(f).size == 0
    fs.write(f, 0, b"ok")
    fs = remount(dev, fs)
    assert fs.read(f, 0, 2) == b"ok"
    fs.close()


def test_corruption_detected(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    d = fs.mkdir(R, b"d").ino
    fs.create(d, b"x")
    phys = fs.inodes.bmap(fs.inodes.get(d), 0)
    assert phys is not None
    fs.close()
    dev.data[phys * 4096 + 60] ^= 0xFF
    fs = FileSystem.mount(dev)
    with pytest.raises(SovError) as e:
        fs.lookup(d, b"x")
    assert err(e) == "EIO"


def test_backup_superblock_used(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    fs.create(R, b"f")
    fs.close()
    dev.data[1024:2048] = bytes(1024)
    fs = FileSystem.mount(dev)
    assert fs.lookup(R, b"f").ino > 2
    fs.close()


def test_readdir_plus_is_readdir_with_getattr(dev_fs: tuple[RamLedgerDevice, FileSystem]) -> None:
    dev, fs = dev_fs
    d = fs.mkdir(R, b"d").ino
    for i in range(400):
        if i % 7 == 0:
            fs.mkdir(d, f"sub{i:04}".encode())
        else:
            fs.create(d, f"f{i:04}".encode())
    fs = remount(dev, fs)
    dev.reset_counters()
    plus = list(fs.readdir_plus(d))
    leaves = sum(1 for _ in fs.dirs.leaves(fs.inodes.get(d)))
    assert leaves > 1 and dev.read_calls <= 3 * leaves + 4  # inode-table blocks: one preadv per leaf
    plain = list(fs.readdir(d))
    assert [(n, c) for n, _, c in plus] == [(x.name, x.next_cookie) for x in plain]
    assert [a for _, a, _ in plus] == [fs.getattr(x.ino) for x in plain]
    for start in (0, 1, 2, plain[2].next_cookie, plain[200].next_cookie, plain[-1].next_cookie):
        assert [(n, a.ino, c) for n, a, c in fs.readdir_plus(d, start)] == [
            (x.name, x.ino, x.next_cookie) for x in fs.readdir(d, start)
        ]
    with pytest.raises(SovError) as e:
        list(fs.readdir_plus(fs.create(R, b"file").ino))
    assert err(e) == "ENOTDIR"


def test_overwrites_of_written_blocks_match_a_model_and_allocate_nothing() -> None:
    """The overwrite fast path (every block already written): unaligned heads and tails, one
    block, many blocks, across extents - the bytes match a model and no block is allocated."""
    import random

    _dev, fs = fresh()
    ino = fs.create(R, b"f").ino
    bs = fs.bs
    model = bytearray(os.urandom(40 * bs))
    fs.write(ino, 0, bytes(model[: 20 * bs]))
    other = fs.create(R, b"g").ino
    fs.write(other, 0, b"x" * bs)  # so that the file is two extents, not one
    fs.write(ino, 20 * bs, bytes(model[20 * bs :]))
    assert len(fs._rec(ino).extents) == 2
    free = fs.statfs().free_blocks
    rnd = random.Random(5)
    for _ in range(300):
        off = rnd.randrange(0, 40 * bs - 1)
        n = rnd.choice([1, 7, bs - 1, bs, bs + 1, 3 * bs + 5, rnd.randrange(1, 40 * bs - off + 1)])
        n = min(n, 40 * bs - off)
        data = os.urandom(n)
        assert fs.write(ino, off, data) == n
        model[off : off + n] = data
    assert fs.read(ino, 0, 40 * bs) == bytes(model)
    assert fs.statfs().free_blocks == free
    fs.close()


@pytest.mark.pure_python  # patches what the compiled core calls directly (see tests/conftest.py)
def test_overwrites_within_one_clock_tick_change_no_metadata(
    dev_fs: tuple[RamLedgerDevice, FileSystem], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data writes stamp mtime/ctime with the kernel clock tick's granularity (as the Linux VFS does):
    an overwrite whose stamps were set during the current tick leaves the inode alone - nothing to
    journal - while a new block, a longer file, an earlier tick or stamps set by hand update them."""
    import sovfs.fs as fsmod

    dev, fs = dev_fs
    a = fs.create(R, b"f", 0o644)
    fs.write(a.ino, 0, os.urandom(3 * 4096))  # allocates: stamped now
    first = fs.getattr(a.ino)
    tick = first.mtime_ns  # the current tick began exactly at the stamp
    monkeypatch.setattr(fsmod, "_tick_ns", lambda: tick)
    fs.sync()
    assert not fs.journal.dirty
    fs.write(a.ino, 4096, b"x" * 4096)  # overwrite, same tick
    assert not fs.journal.dirty
    same = fs.getattr(a.ino)
    assert (same.mtime_ns, same.ctime_ns, same.size) == (first.mtime_ns, first.ctime_ns, 3 * 4096)
    assert fs.read(a.ino, 4096, 4096) == b"x" * 4096

    fs.write(a.ino, 3 * 4096, b"y" * 100)  # longer file, same tick: size and stamps are stored
    assert fs.journal.dirty and fs.getattr(a.ino).size == 3 * 4096 + 100

    tick += 10 * fsmod._TICK_NS  # a later tick: the next overwrite stamps the time now
    fs.sync()
    fs.write(a.ino, 0, b"z" * 4096)
    later = fs.getattr(a.ino)
    assert later.mtime_ns >= tick and later.ctime_ns == later.mtime_ns and fs.journal.dirty

    # stamps set by hand to another time are not "current", even if they lie in the future
    future = tick + 86400 * 10**9
    fs.setattr(a.ino, mtime_ns=future)
    fs.write(a.ino, 0, b"w" * 4096)
    assert fs.getattr(a.ino).mtime_ns < future

    fs2 = remount(dev, fs)
    b = fs2.lookup(R, b"f")
    assert fs2.read(b.ino, 0, 2 * 4096) == b"w" * 4096 + b"x" * 4096
    assert b.mtime_ns < future and b.size == 3 * 4096 + 100
    fs2.close()


@pytest.mark.pure_python  # patches what the compiled core calls directly (see tests/conftest.py)
def test_a_write_never_moves_ctime_backwards(fs: FileSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick check looks at both stamps as stored: after a chmod (exact ctime), a write in the
    same tick leaves them; one whose mtime is older than the tick stamps the time now, never
    earlier than the chmod's ctime."""
    import sovfs.fs as fsmod

    monkeypatch.setattr(fsmod, "_TICK_NS", 60 * 10**9)  # a long tick: no race with a slow machine
    a = fs.create(R, b"g", 0o644)
    m = fs.write(a.ino, 0, b"a" * 4096) and fs.getattr(a.ino).mtime_ns
    c = fs.setattr(a.ino, mode=0o600).ctime_ns
    assert m <= c < m + fsmod._TICK_NS
    monkeypatch.setattr(fsmod, "_tick_ns", lambda: m)  # both stamps in the current tick
    fs.write(a.ino, 0, b"b" * 4096)
    got = fs.getattr(a.ino)
    assert (got.mtime_ns, got.ctime_ns) == (m, c)
    monkeypatch.setattr(fsmod, "_tick_ns", lambda: m + 1)  # mtime is from before this tick
    fs.write(a.ino, 0, b"c" * 4096)
    got = fs.getattr(a.ino)
    assert got.ctime_ns >= c and got.mtime_ns == got.ctime_ns
