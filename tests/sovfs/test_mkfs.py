"""mkfs: geometry sweep with a structural self-check, CLI errors/exit codes, and -d round trips."""

from __future__ import annotations

import os
import shutil
import stat
import sysconfig
from pathlib import Path

import pytest

from mkfs import mkfs as cli
from sovfs import format as F
from sovfs.blockdev import open_block_device
from sovfs.errors import SovError
from sovfs.fs import FileSystem
from sovfs.mkfs_core import MkfsParams, make_filesystem, probe_signatures
from tests.sovfs.ramdev import RamLedgerDevice


def self_check(fs: FileSystem) -> None:
    """Structural check through the API: bitmaps agree with what the root tree reaches."""
    used_inodes = {0, 1, 2}
    used_blocks = 0
    stack = [F.ROOT_INO]
    while stack:
        d = stack.pop()
        for item in fs.readdir(d):
            if item.name in (b".", b".."):
                continue
            if item.ino not in used_inodes:
                used_inodes.add(item.ino)
                used_blocks += fs.getattr(item.ino).blocks * 512 // fs.bs
            if item.ftype == 4:
                stack.append(item.ino)
    used_blocks += 2  # root and lost+found
    assert fs.ialloc.free == fs.sb.inode_count - len(used_inodes)
    assert fs.balloc.free == fs.sb.backup_sb_block - fs.sb.data_start - used_blocks


@pytest.mark.parametrize(
    ("size", "bs", "inodes"),
    [
        (1 << 20, 1024, None),
        (4 << 20, 2048, 64),
        (16 << 20, 4096, None),
        (64 << 20, 4096, 100000),
        (33 << 20, 8192, 500),
        (256 << 20, 65536, None),
        (300 << 20, 1024, None),
    ],
)
def test_mkfs_sweep(size: int, bs: int, inodes: int | None) -> None:
    dev = RamLedgerDevice(size)
    sb = make_filesystem(dev, MkfsParams(block_size=bs, inode_count=inodes))
    assert probe_signatures(dev) == ["SovFS"]
    with FileSystem.mount(dev) as fs:
        assert fs.sb.uuid == sb.uuid
        self_check(fs)
        d = fs.mkdir(F.ROOT_INO, b"d").ino
        f = fs.create(d, b"f").ino
        fs.write(f, 0, os.urandom(3 * bs + 7))
        self_check(fs)
    with FileSystem.mount(dev) as fs:
        self_check(fs)


@pytest.mark.parametrize(
    ("size", "params", "match"),
    [
        (64 << 10, MkfsParams(), "too small"),
        (256 << 10, MkfsParams(block_size=1024, inode_count=5000), "too small"),
        (1 << 20, MkfsParams(block_size=3000), "power of two"),
        (1 << 20, MkfsParams(inode_count=1), "inode count"),
        (1 << 20, MkfsParams(label=b"x" * 65), "label"),
    ],
)
def test_mkfs_bad_input(size: int, params: MkfsParams, match: str) -> None:
    with pytest.raises(SovError, match=match):
        make_filesystem(RamLedgerDevice(size), params)


def run_cli(tmp_path: Path, args: list[str], dev: RamLedgerDevice) -> int:
    def opener(path: str, read_only: bool = False) -> RamLedgerDevice:
        dev.closed = False
        return dev

    return cli.main([*args, str(tmp_path / "img")], open_device=opener)


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = RamLedgerDevice(8 << 20)
    (tmp_path / "img").write_bytes(b"")
    for args in (["-b", "12x"], ["-s", "lots"], ["--bogus"], ["-N", "1", "-i", "4096"], ["-U", "nope"]):
        assert run_cli(tmp_path, args, dev) == cli.EXIT_USAGE
        e = capsys.readouterr().err
        assert e.startswith("mkfs.sovfs: ")
        assert e.count("\n") == 1
        assert "Traceback" not in e
    assert run_cli(tmp_path, ["-b", "3072"], dev) == cli.EXIT_ERROR
    assert "power of two" in capsys.readouterr().err
    assert run_cli(tmp_path, ["-q"], RamLedgerDevice(32 << 10)) == cli.EXIT_ERROR
    assert "too small" in capsys.readouterr().err


def test_cli_refuses_signatures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").write_bytes(b"")
    dev = RamLedgerDevice(8 << 20)
    dev.data[1080:1082] = b"\x53\xef"
    assert run_cli(tmp_path, [], dev) == cli.EXIT_REFUSED
    assert "ext2/ext3/ext4" in capsys.readouterr().err
    assert run_cli(tmp_path, ["-F", "-L", "vol", "-U", "12345678-1234-5678-1234-567812345678"], dev) == 0
    out = capsys.readouterr().out
    assert "UUID 12345678-1234-5678-1234-567812345678" in out
    assert run_cli(tmp_path, ["-q"], dev) == cli.EXIT_REFUSED  # now it is a SovFS
    assert run_cli(tmp_path, ["-q", "-F", "-b", "1024", "-J", "256K", "-N", "200"], dev) == 0
    with FileSystem.mount(dev) as fs:
        assert fs.sb.journal_blocks == 256
        assert fs.sb.inode_count == 200


def test_cli_creates_file(tmp_path: Path) -> None:
    dev = RamLedgerDevice(4 << 20)
    assert run_cli(tmp_path, ["-q", "-s", "4M"], dev) == 0
    assert (tmp_path / "img").stat().st_size == 4 << 20


def test_open_block_device_missing_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        open_block_device(str(tmp_path / "x"))


def test_cli_on_real_image_file(tmp_path: Path) -> None:
    assert cli.main(["-q", "-s", "16M", str(tmp_path / "img")]) == 0


# ------------------------------------------------------------------------------------ -d round trip
def crafted_tree(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file.txt").write_bytes(b"hello\n" * 1000)
    with open(root / "sparse", "wb") as f:
        f.seek(50 << 20)
        f.write(b"tail")
        f.seek(1 << 20)
        f.write(b"middle")
    (root / "hard1").write_bytes(b"linked")
    os.link(root / "hard1", root / "dir" / "hard2")
    os.symlink("dir/file.txt", root / "sym")
    os.symlink("x" * 200, root / "longsym")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "nulldev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / os.fsdecode(b"odd \x01 name \xe2\x98\x83 \xff")).write_bytes(b"odd")
    os.setxattr(root / "dir" / "file.txt", "user.color", b"blue")
    os.setxattr(root / "dir" / "file.txt", "user.big", b"B" * 1000)
    os.chmod(root / "dir" / "sub", 0o1750)
    os.chown(root / "hard1", 1234, 5678)
    os.utime(root / "dir" / "file.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


def compare(fs: FileSystem, host: Path) -> int:
    count = 0
    seen: dict[tuple[int, int], int] = {}
    for dirpath, dirnames, filenames in os.walk(host):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.fsencode(p.relative_to(host))
            st = p.lstat()
            a = fs.lookup_path(b"/" + rel)
            assert a.mode == st.st_mode, p
            assert (a.uid, a.gid) == (st.st_uid, st.st_gid), p
            assert a.mtime_ns == st.st_mtime_ns, p
            if stat.S_ISREG(st.st_mode):
                assert a.size == st.st_size
                assert fs.read(a.ino, 0, st.st_size) == p.read_bytes(), p
                assert a.blocks <= st.st_blocks + 8, p  # sparse stays sparse
            elif stat.S_ISLNK(st.st_mode):
                assert fs.readlink(a.ino) == os.fsencode(os.readlink(p))
            elif stat.S_ISCHR(st.st_mode):
                assert a.rdev == st.st_rdev
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                assert seen.setdefault(key, a.ino) == a.ino
                assert a.nlink == st.st_nlink
            if not stat.S_ISLNK(st.st_mode):
                for x in os.listxattr(p):
                    assert fs.getxattr(a.ino, x.encode()) == os.getxattr(p, x)
            count += 1
    return count


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and chown need root")
def test_mkfs_d_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    crafted_tree(src)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(stdlib / "json", src / "py" / "json", symlinks=True)
    shutil.copytree(stdlib / "email", src / "py" / "email", symlinks=True)
    dev = RamLedgerDevice(128 << 20)
    (tmp_path / "img").write_bytes(b"")
    assert run_cli(tmp_path, ["-q", "-d", str(src)], dev) == 0
    with FileSystem.mount(dev) as fs:
        n = compare(fs, src)
        assert n > 50
        self_check(fs)


def test_mkfs_d_reports_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"1")
    (src / ("n" * 300)[:255]).write_bytes(b"2")
    dev = RamLedgerDevice(8 << 20)
    (tmp_path / "img").write_bytes(b"")
    (src / "huge").write_bytes(b"h" * (12 << 20))  # does not fit an 8 MiB image: ENOSPC, reported
    assert run_cli(tmp_path, ["-q", "-d", str(src)], dev) == cli.EXIT_PARTIAL
    e = capsys.readouterr().err
    assert "not copied" in e
    assert "huge" in e
    with FileSystem.mount(dev) as fs:
        assert fs.read(fs.lookup_path("/ok").ino, 0, 1) == b"1"


def test_cli_size_option_never_shrinks_a_filesystem_it_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-s` on an existing image with a signature: refused before the file is resized."""
    img = tmp_path / "ext4.img"
    data = bytearray(os.urandom(4 << 20))
    data[1080:1082] = b"\x53\xef"  # the ext2/3/4 magic
    img.write_bytes(bytes(data))
    assert cli.main(["-s", "1M", str(img)]) == cli.EXIT_REFUSED
    assert "use -F" in capsys.readouterr().err
    assert img.read_bytes() == bytes(data)  # same size, same bytes


def test_cli_failure_leaves_no_new_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "tiny.img"
    assert cli.main(["-s", "1K", str(img)]) == cli.EXIT_ERROR
    assert "too small" in capsys.readouterr().err
    assert not img.exists()
