"""The mount.sovfs command: option parsing, refusals (one line, exit 32, image untouched), signals, ro."""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

import pytest

from sovfs import format as F
from sovfs.mount import EXIT_FAIL, EXIT_USAGE, UsageError, parse_args
from tests.fuse.conftest import PY, Mount, fsck, image_idle, run_tool


def test_parse_args_mount8_convention() -> None:
    o = parse_args(["img", "/mnt", "-o", "ro,allow_other,noatime,nodev,x-systemd.automount,_netdev",
                    "-n", "-s", "-oentry_timeout=2.5"])
    assert o.read_only and o.allow_other and o.atime == "noatime" and o.kernel_flags == ["nodev"]
    assert o.entry_timeout == 2.5 and o.default_permissions
    assert {"ro", "allow_other", "default_permissions", "subtype=sovfs", "nodev"} <= o.fuse_options()
    assert parse_args(["-f", "a", "b", "-o", "nodefault_permissions,rw"]).foreground
    assert parse_args(["a", "b", "-o", "iothreads"]).iothreads
    assert parse_args(["a", "b"]).readahead_kib == 1024
    assert parse_args(["a", "b", "-o", "readahead=0"]).readahead_kib == 0
    assert not parse_args(["a", "b", "-o", "iothreads,noiothreads"]).iothreads
    assert parse_args(["a", "b"]).lone_trap  # default: a trapped queue for lone requests + a worker
    o = parse_args(["a", "b", "-o", "iothreads=all"])
    assert o.iothreads and not o.lone_trap
    assert parse_args(["a", "b"]).direct_reads
    assert not parse_args(["a", "b", "-o", "nodirectread"]).direct_reads
    assert parse_args(["a", "b", "-o", "nodirectread,directread"]).direct_reads
    assert parse_args(["a", "b"]).direct_min_kib == 128
    assert parse_args(["a", "b"]).direct_writes
    assert not parse_args(["a", "b", "-o", "nodirectwrite"]).direct_writes
    o = parse_args(["a", "b", "-o", "nodirectread,directread=64"])
    assert o.direct_reads and o.direct_min_kib == 64
    assert parse_args(["a", "b"]).write_behind
    assert not parse_args(["a", "b", "-o", "nowritebehind"]).write_behind
    assert parse_args(["a", "b", "-o", "nowritebehind,writebehind"]).write_behind
    assert parse_args(["a", "b"]).fetch_ahead
    assert not parse_args(["a", "b", "-o", "nofetchahead"]).fetch_ahead
    assert parse_args(["a", "b"]).fastwait
    assert not parse_args(["a", "b", "-o", "nofastwait"]).fastwait
    assert parse_args(["a", "b"]).readdirplus == "auto"
    assert parse_args(["a", "b", "-o", "readdirplus=no,readdirplus=yes"]).readdirplus == "yes"
    assert parse_args(["a", "b"]).reqspin_us == 50
    assert parse_args(["a", "b", "-o", "reqspin=0"]).reqspin_us == 0
    assert "default_permissions" not in parse_args(["a", "b", "-o", "nodefault_permissions"]).fuse_options()
    assert "default_permissions" in parse_args(["a", "b"]).fuse_options()  # the kernel checks by default
    last = parse_args(["a", "b", "-o", "nodefault_permissions,default_permissions"])
    assert "default_permissions" in last.fuse_options()
    for bad in (["a"], ["a", "b", "-o", "frobnicate"], ["a", "b", "-o"], ["a", "b", "-o", "commit=x"],
                ["a", "b", "-o", "reqspin=x"], ["a", "b", "-q"], ["a", "b", "-o", "readdirplus"],
                ["a", "b", "-o", "readdirplus=maybe"], ["a", "b", "-o", "directread=6"],
                ["a", "b", "-o", "directread=0"], ["a", "b", "-o", "directread=x"],
                ["a", "b", "-o", "nodirectread=4"], ["a", "b", "-o", "directwrite=0"],
                ["a", "b", "-o", "fastwait=1"]):
        with pytest.raises(UsageError):
            parse_args(bad)


def _mount_cmd(img: Path, mnt: Path, *opts: str) -> tuple[int, str]:
    r = run_tool(PY, "-m", "sovfs.mount", str(img), str(mnt), *opts, check=False, timeout=60)
    return r.returncode, r.stderr


pytestmark = pytest.mark.fuse


def test_usage_and_help(tmp_path: Path) -> None:
    code, err = _mount_cmd(tmp_path / "x", tmp_path, "-o", "bogus")
    assert code == EXIT_USAGE and err.startswith("mount.sovfs: unknown mount option")
    r = run_tool(PY, "-m", "sovfs.mount", "--help", check=False)
    assert r.returncode == 0 and "exit codes" in r.stdout


def test_refusals_write_nothing(image: Path, tmp_path: Path, mnt_factory: object) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code, err = _mount_cmd(tmp_path / "missing.img", mnt)
    assert code == EXIT_FAIL and "no such image" in err and len(err.strip().splitlines()) == 1
    code, err = _mount_cmd(image, tmp_path / "nodir")
    assert code == EXIT_FAIL and "mount point" in err
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    before = junk.read_bytes()
    code, err = _mount_cmd(junk, mnt)
    assert code == EXIT_FAIL and "not a SovFS image" in err and junk.read_bytes() == before

    def patch_sb(**changes: int) -> Path:
        p = tmp_path / f"patched{len(changes)}{sorted(changes)}.img"
        data = bytearray(image.read_bytes())
        sb = F.Superblock.unpack(data[1024:2048])
        for k, v in changes.items():
            setattr(sb, k, v)
        data[1024:2048] = sb.pack()
        p.write_bytes(data)
        return p

    dirty = patch_sb(state=0)
    before = dirty.read_bytes()
    code, err = _mount_cmd(dirty, mnt)
    assert code == EXIT_FAIL and "fsck" in err and dirty.read_bytes() == before
    incompat = patch_sb(incompat=0x80)
    for opts in ((), ("-o", "ro")):
        code, err = _mount_cmd(incompat, mnt, *opts)
        assert code == EXIT_FAIL and "incompatible" in err
    ro_compat = patch_sb(ro_compat=0x40)
    code, err = _mount_cmd(ro_compat, mnt)
    assert code == EXIT_FAIL and "read-only-compatible" in err
    m: Mount = mnt_factory(ro_compat)  # type: ignore[operator]
    m.mount("ro")
    assert os.listdir(m.mnt) == ["lost+found"]
    with pytest.raises(OSError) as ei:
        (m.mnt / "new").write_bytes(b"")
    assert ei.value.errno == errno.EROFS
    m.unmount()
    assert not os.path.ismount(mnt)


def test_second_mount_refused_and_sigterm_unmounts(image: Path, mnt_factory: object) -> None:
    m: Mount = mnt_factory(image)  # type: ignore[operator]
    m2: Mount = mnt_factory(image, "mnt2")  # type: ignore[operator]
    m.mount()
    (m.mnt / "kept").write_bytes(b"data")
    r = m2.mount(expect_ok=False)
    assert r.returncode == EXIT_FAIL and "in use" in r.stderr
    code, _ = _mount_cmd(image, m.mnt)  # busy mountpoint of the same image: refused by the lock too
    assert code == EXIT_FAIL
    pid = m.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert image_idle(image)
    assert not os.path.ismount(m.mnt)
    m.mounted = False
    r2 = fsck(image, "-n")  # clean flag set: no -f needed for a quick check
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert F.Superblock.unpack(image.read_bytes()[1024:2048]).state & F.STATE_CLEAN
    m.mount()
    assert (m.mnt / "kept").read_bytes() == b"data"
    m.unmount()


def test_umount8_and_mount_helper(image: Path, mnt_factory: object) -> None:
    m: Mount = mnt_factory(image)  # type: ignore[operator]
    m.mount()
    (m.mnt / "x").write_bytes(b"1")
    r = run_tool("umount", str(m.mnt), check=False)
    assert r.returncode == 0, r.stderr
    m.mounted = False
    assert image_idle(image)
    assert fsck(image, "-n", "-f").returncode == 0
    helper = next((p for p in ("/sbin/mount.sovfs", "/usr/sbin/mount.sovfs") if os.path.exists(p)), None)
    if helper is None:
        pytest.skip("mount.sovfs helper not installed (scripts/setup.sh)")
    r = run_tool("mount", "-t", "sovfs", str(image), str(m.mnt), check=False)
    assert r.returncode == 0, r.stderr
    m.mounted = True
    assert (m.mnt / "x").read_bytes() == b"1"
    m.unmount()


def test_ledger_summary_reports_each_queue(tmp_path: Path) -> None:
    """The ledger lines of ``kill -USR1`` and of the unmount log: one per queue, with what it served."""
    from sovfs.blockdev import open_block_device
    from sovfs.mount import ledger_summary

    img = tmp_path / "img"
    img.write_bytes(bytes(1 << 20))
    dev = open_block_device(str(img), num_queues=2, notify=("trap", "eventfd"))
    try:
        dev.pwrite(0, b"x" * 8192)
        assert dev.pread(4096, 4096) == b"x" * 4096
        text = ledger_summary(dev)
    finally:
        dev.close()
    lines = text.splitlines()
    assert len(lines) == 2
    # the two requests above (and what opening the ledger itself asks), all lone: the trapped queue
    m = re.match(r"  queue 0 \(trapped\): (\d+) requests, 0 errors; read [\d.]+ KiB \(0 B direct\), "
                 r"written 8\.0 KiB \(0 B direct, 0 B write-behind\); \d+ interrupts, 0 sleeps$",
                 lines[0])  # fmt: skip
    assert m is not None and int(m.group(1)) >= 2, lines[0]
    assert lines[1].startswith("  queue 1 (worker): 0 requests")
    assert ledger_summary(object()) == "  (no ledger device in this process)"

    class Broken:
        def stats(self) -> dict[str, object]:
            raise RuntimeError("device closed\nmore")

    assert ledger_summary(Broken()) == "  (no ledger statistics: RuntimeError: device closed)"
