"""POSIX semantics of the mounted filesystem: every operation and the errno a kernel filesystem returns."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuse


def err(fn: object, *a: object) -> int:
    try:
        fn(*a)  # type: ignore[operator]
    except OSError as e:
        return e.errno  # type: ignore[return-value]
    raise AssertionError(f"{fn} did not fail")


def test_create_read_write_append_trunc(d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    assert os.write(fd, b"hello world") == 11
    assert os.pread(fd, 5, 6) == b"world"
    os.close(fd)
    assert err(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!!")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"?")
    os.close(fd)
    assert f.read_bytes() == b"hello world!!?"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert f.read_bytes() == b"" and os.stat(f).st_size == 0
    assert err(os.open, d / "missing", os.O_RDONLY) == errno.ENOENT
    assert err(os.open, d / "f" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert err(os.open, d, os.O_WRONLY) == errno.EISDIR


def test_large_sparse_and_truncate(d: Path) -> None:
    f = d / "sparse"
    data = os.urandom(3 << 20)
    with open(f, "wb") as fh:
        fh.write(data)
        fh.seek(100 << 20)
        fh.write(b"tail")
    st = os.stat(f)
    assert st.st_size == (100 << 20) + 4
    assert st.st_blocks * 512 < 8 << 20  # the hole stores nothing
    with open(f, "rb") as fh:
        assert fh.read(3 << 20) == data
        fh.seek(50 << 20)
        assert fh.read(4096) == bytes(4096)
    os.truncate(f, 1000)
    assert f.read_bytes() == data[:1000]
    os.truncate(f, 5000)
    assert f.read_bytes() == data[:1000] + bytes(4000)
    fd = os.open(f, os.O_RDWR)
    os.ftruncate(fd, 10)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert f.read_bytes() == data[:10]


def test_open_unlinked_file_stays_usable(d: Path, shared_mount: object) -> None:
    f = d / "tmp"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"x" * 100000)
    os.unlink(f)
    assert not f.exists()
    os.pwrite(fd, b"more", 100000)
    assert os.pread(fd, 4, 100000) == b"more"
    assert os.fstat(fd).st_nlink == 0
    os.ftruncate(fd, 10)
    os.fchmod(fd, 0o644)
    assert os.fstat(fd).st_size == 10
    free_before = os.statvfs(d).f_bfree
    os.close(fd)
    deadline = time.monotonic() + 5
    while os.statvfs(d).f_bfree <= free_before and time.monotonic() < deadline:
        time.sleep(0.05)  # release/forget are asynchronous
    assert os.statvfs(d).f_bfree >= free_before


def test_mkdir_rmdir(d: Path) -> None:
    (d / "a").mkdir(0o750)
    assert stat.S_ISDIR(os.stat(d / "a").st_mode)
    assert os.stat(d).st_nlink == 3
    assert err(os.mkdir, d / "a") == errno.EEXIST
    (d / "a" / "f").write_bytes(b"")
    assert err(os.rmdir, d / "a") == errno.ENOTEMPTY
    assert err(os.rmdir, d / "a" / "f") == errno.ENOTDIR
    assert err(os.unlink, d / "a") == errno.EISDIR
    os.unlink(d / "a" / "f")
    os.rmdir(d / "a")
    assert err(os.rmdir, d / "a") == errno.ENOENT
    assert os.stat(d).st_nlink == 2
    assert err(os.mkdir, d / ("n" * 256)) == errno.ENAMETOOLONG
    assert err(os.open, d / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    os.mkdir(d / ("n" * 255))


def test_rename_corner_cases(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    os.rename(d / "a", d / "b")  # replace
    assert (d / "b").read_bytes() == b"A" and not (d / "a").exists()
    (d / "x").mkdir()
    (d / "y").mkdir()
    (d / "x" / "sub").mkdir()
    os.rename(d / "x" / "sub", d / "y" / "sub")  # across directories, '..' fixed
    assert os.stat(d / "y" / "sub" / "..").st_ino == os.stat(d / "y").st_ino
    assert os.stat(d / "x").st_nlink == 2 and os.stat(d / "y").st_nlink == 3
    assert err(os.rename, d / "y", d / "y" / "sub" / "loop") == errno.EINVAL
    (d / "y" / "sub" / "f").write_bytes(b"")
    assert err(os.rename, d / "x", d / "y" / "sub") == errno.ENOTEMPTY  # target dir not empty
    assert err(os.rename, d / "b", d / "x") == errno.EISDIR
    assert err(os.rename, d / "x", d / "b") == errno.ENOTDIR
    os.rename(d / "x", d / "y" / "empty_target") if False else None
    (d / "e").mkdir()
    os.rename(d / "x", d / "e")  # dir over empty dir
    assert not (d / "x").exists() and (d / "e").is_dir()
    assert err(os.rename, d / "nothing", d / "z") == errno.ENOENT
    os.rename(d / "b", d / "b")  # same name: nothing
    assert (d / "b").read_bytes() == b"A"


def _renameat2(old: Path, new: Path, flags: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.renameat2(-100, bytes(old), -100, bytes(new), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_noreplace_exchange(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    assert err(_renameat2, d / "a", d / "b", 1) == errno.EEXIST
    _renameat2(d / "a", d / "c", 1)
    (d / "dir").mkdir()
    _renameat2(d / "c", d / "dir", 2)  # exchange a file and a directory
    assert (d / "c").is_dir() and (d / "dir").read_bytes() == b"A"
    assert err(_renameat2, d / "b", d / "missing", 2) == errno.ENOENT
    (d / "c" / "in").mkdir()
    assert err(_renameat2, d / "c", d / "c" / "in", 2) == errno.EINVAL


def test_hard_links_across_directories(d: Path) -> None:
    (d / "p").mkdir()
    (d / "q").mkdir()
    (d / "p" / "f").write_bytes(b"data")
    os.link(d / "p" / "f", d / "q" / "g")
    assert os.stat(d / "p" / "f").st_nlink == 2
    assert os.stat(d / "q" / "g").st_ino == os.stat(d / "p" / "f").st_ino
    os.unlink(d / "p" / "f")
    assert (d / "q" / "g").read_bytes() == b"data" and os.stat(d / "q" / "g").st_nlink == 1
    assert err(os.link, d / "q", d / "p" / "dirlink") == errno.EPERM
    assert err(os.link, d / "q" / "g", d / "q" / "g") == errno.EEXIST
    assert err(os.link, d / "missing", d / "q" / "h") == errno.ENOENT


def test_symlink_readlink(d: Path) -> None:
    os.symlink("target/of/link", d / "l")
    assert os.readlink(d / "l") == "target/of/link"
    long_target = "x/" * 1000
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    assert stat.S_ISLNK(os.lstat(d / "l").st_mode)
    (d / "real").write_bytes(b"r")
    os.symlink("real", d / "rl")
    assert (d / "rl").read_bytes() == b"r"
    assert err(os.readlink, d / "real") == errno.EINVAL
    assert err(os.symlink, "t", d / "l") == errno.EEXIST


def test_mknod_special_files(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    os.mknod(d / "sock", 0o600 | stat.S_IFSOCK)
    assert stat.S_ISSOCK(os.stat(d / "sock").st_mode)
    os.mknod(d / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(d / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(d / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    assert stat.S_ISBLK(os.stat(d / "blk").st_mode)


def test_setattr_chmod_chown_utimes(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"abc")
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert not st.st_mode & stat.S_ISUID  # chown clears set-user-ID
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    before = time.time_ns()
    os.utime(f, ns=(5_000_000_000, 6_000_000_000))
    os.utime(f)  # UTIME_NOW for both
    st = os.stat(f)
    assert st.st_mtime_ns >= before - 10**9 and st.st_atime_ns >= before - 10**9
    os.utime(f, ns=(7_000_000_000, 8_000_000_000))
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    libc = ctypes.CDLL(None, use_errno=True)
    utime_omit, utime_now = (1 << 30) - 2, (1 << 30) - 1
    ts = (Timespec * 2)(Timespec(0, utime_omit), Timespec(0, utime_now))
    assert libc.utimensat(-100, bytes(f), ts, 0) == 0
    st = os.stat(f)
    assert st.st_atime_ns == 7_000_000_000 and st.st_mtime_ns >= before - 10**9
    c0 = st.st_ctime_ns
    time.sleep(0.01)
    os.chmod(f, 0o600)
    assert os.stat(f).st_ctime_ns > c0


def test_readdir_offsets_stable_while_changing(d: Path) -> None:
    names = {f"entry-{i:04d}" for i in range(600)}
    for n in names:
        (d / n).write_bytes(b"")
    assert set(os.listdir(d)) == names
    seen: set[str] = set()
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.add(e.name)
            if i % 3 == 0:
                os.unlink(d / e.name)  # remove what we already listed
                (d / ("new-" + e.name)).write_bytes(b"")
    assert names <= seen  # nothing that stayed was skipped
    assert len(seen) == len(set(seen))


def test_statfs_counts(d: Path) -> None:
    s0 = os.statvfs(d)
    assert s0.f_bsize == s0.f_frsize == 4096 and s0.f_namemax == 255
    assert 0 < s0.f_bfree <= s0.f_blocks and 0 < s0.f_ffree <= s0.f_files
    (d / "big").write_bytes(os.urandom(1 << 20))
    (d / "x").mkdir()
    s1 = os.statvfs(d)
    assert s0.f_bfree - s1.f_bfree >= 256 and s0.f_ffree - s1.f_ffree == 2


def test_enospc_efbig(d: Path) -> None:
    free = os.statvfs(d).f_bavail * 4096
    f = d / "fill"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY)
    try:
        chunk = b"\xaa" * (1 << 20)
        code = 0
        try:
            for _ in range(free // len(chunk) + 4):
                os.write(fd, chunk)
        except OSError as e:
            code = e.errno
        assert code == errno.ENOSPC
    finally:
        os.close(fd)
        os.unlink(f)
    fd = os.open(d / "huge", os.O_CREAT | os.O_WRONLY)
    try:
        assert err(os.pwrite, fd, b"x", 1 << 45) == errno.EFBIG
    finally:
        os.close(fd)


def test_xattrs(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.a", b"1")
    assert os.getxattr(f, "user.a") == b"1"
    assert err(os.setxattr, f, "user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert err(os.setxattr, f, "user.b", b"2", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(f, "user.a", b"3", os.XATTR_REPLACE)
    os.setxattr(f, "user.big", b"v" * 3000)
    assert sorted(os.listxattr(f)) == ["user.a", "user.big"]
    assert os.getxattr(f, "user.big") == b"v" * 3000
    assert err(os.getxattr, f, "user.none") == errno.ENODATA
    os.removexattr(f, "user.a")
    assert err(os.removexattr, f, "user.a") == errno.ENODATA
    assert os.listxattr(f) == ["user.big"]
    assert err(os.setxattr, f, "bogus.ns", b"") == errno.EOPNOTSUPP
    (d / "dir").mkdir()
    os.setxattr(d / "dir", "trusted.t", b"t")
    assert os.getxattr(d / "dir", "trusted.t") == b"t"


def test_access_and_permissions(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"")
    os.chmod(f, 0o600)
    assert os.access(f, os.R_OK | os.W_OK)
    assert not os.access(f, os.X_OK)
    os.chmod(f, 0o700)
    assert os.access(f, os.X_OK)
    os.chmod(d, 0o777)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # the pytest tmp path above is 0700 for others
    pid = os.fork()
    if pid == 0:  # an unprivileged user: the kernel's default_permissions checks apply
        code = 0
        try:
            os.setgid(4242)
            os.setuid(4242)
            try:
                os.close(os.open("f", os.O_RDONLY, dir_fd=dfd))
                code = 1
            except PermissionError:
                pass
            if os.access("f", os.R_OK, dir_fd=dfd):
                code = 2
            os.close(os.open("mine", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
            if os.stat("mine", dir_fd=dfd).st_uid != 4242:
                code = 3
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.close(dfd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_setgid_directory_inheritance(d: Path) -> None:
    os.chown(d, 0, 777)
    os.chmod(d, 0o2775)
    (d / "f").write_bytes(b"")
    (d / "sub").mkdir()
    assert os.stat(d / "f").st_gid == 777
    st = os.stat(d / "sub")
    assert st.st_gid == 777 and st.st_mode & stat.S_ISGID


def test_concurrent_writers(d: Path) -> None:
    import threading

    def work(i: int) -> None:
        p = d / f"t{i}"
        p.mkdir()
        for j in range(20):
            (p / f"f{j}").write_bytes(bytes([i]) * (j * 1000 + 1))
        for j in range(0, 20, 2):
            os.rename(p / f"f{j}", d / f"moved-{i}-{j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        for j in range(20):
            p = d / f"moved-{i}-{j}" if j % 2 == 0 else d / f"t{i}" / f"f{j}"
            assert p.read_bytes() == bytes([i]) * (j * 1000 + 1)


def test_listings_report_inode_numbers_and_types_in_every_readdirplus_mode(mount: object) -> None:
    """Names-only entries (node id 0) must still carry the right d_ino and d_type, across replies."""
    top = mount.mnt / "big"  # type: ignore[attr-defined]
    top.mkdir()
    for i in range(1500):  # ~10 READDIRPLUS replies
        (top / f"file-{i:05d}").write_bytes(b"")
    for i in range(5):
        (top / f"dir-{i}").mkdir()
        os.symlink(f"file-{i:05d}", top / f"link-{i}")
        os.mkfifo(top / f"fifo-{i}")
    truth = {n: os.lstat(top / n) for n in os.listdir(top)}
    for mode in ("auto", "no", "yes"):
        mount.remount(f"readdirplus={mode}")  # type: ignore[attr-defined]
        with os.scandir(top) as it:
            listed = {
                e.name: (e.inode(), e.is_dir(follow_symlinks=False), e.is_symlink(),
                         e.is_file(follow_symlinks=False))
                for e in it
            }
        assert listed == {
            n: (st.st_ino, stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode), stat.S_ISREG(st.st_mode))
            for n, st in truth.items()
        }, mode
        for n, st in truth.items():  # every listed name stays usable (a LOOKUP when names only)
            assert os.lstat(top / n).st_ino == st.st_ino
        os.unlink(top / "file-00007")
        (top / "file-00007").write_bytes(b"again")
        truth["file-00007"] = os.lstat(top / "file-00007")
