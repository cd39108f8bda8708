"""Smoke test: bench/fuse_floor.py mounts its trivial pyfuse3 filesystems, SovFS and (where installed)
fuse2fs, measures, prints its ceiling and summary lines, and leaves no mount behind (marked bench:
needs root, /dev/fuse and fio)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.conftest import fuse_mounts

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bench


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
@pytest.mark.skipif(not shutil.which("fio"), reason="needs fio")
def test_floor_run(tmp_path: Path) -> None:
    before = fuse_mounts()
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuse_floor.py"), "--seconds", "1", "--dir", str(tmp_path),
         "--files", "1000"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    rows = [line for line in lines if " IOPS " in line or " ops/s " in line]
    with_fuse2fs = shutil.which("fuse2fs") is not None and shutil.which("mkfs.ext4") is not None
    # 5 pyfuse3 filesystems (4 trivial variants, SovFS) and fuse2fs, each x (5 fio jobs + create,
    # readdir and unlink, flat and tree + getxattr)
    assert len(rows) == (6 if with_fuse2fs else 5) * 12
    for row in rows:
        rate = float(re.search(r"([\d,]+) (IOPS|ops/s)", row).group(1).replace(",", ""))  # type: ignore[union-attr]
        assert rate > 0
    if with_fuse2fs:
        jobs = ["randread-nj1-warm", "randread-nj1", "randread-nj4-warm", "randwrite-direct",
                "randwrite-buf", "create-flat", "create-tree", "readdir-flat", "readdir-tree", "unlink-flat",
                "unlink-tree"]  # fmt: skip
        for line, label in ((lines[-3], "fuse-floor-ceiling"), (lines[-2], "fuse-floor-ceiling-noxattrs")):
            ceiling = line.split()
            assert ceiling[0] == label
            assert [c.split("=")[0] for c in ceiling[1:]] == jobs
            for c in ceiling[1:]:
                m = re.fullmatch(r"[a-z0-9-]+=([\d.]+)/([\d.]+)(!?)", c)
                assert m is not None, c
                assert (float(m.group(1)) < float(m.group(2))) == (m.group(3) == "!")
    summary = (r"fuse-floor sovfs_vs_floor_randread=[\d.]+ sovfs_vs_floor_randwrite=[\d.]+"
               r" sovfs_vs_floor_create=[\d.]+ sovfs_vs_floor_getxattr=[\d.]+"
               r" fastwait_gain_randread_nj4=[\d.]+")
    assert re.fullmatch(summary, lines[-1])
    assert fuse_mounts() == before
