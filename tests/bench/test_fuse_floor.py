"""Smoke test: bench/fuse_floor.py mounts its trivial pyfuse3 filesystems and SovFS, measures, and
leaves no mount behind (marked bench: needs root, /dev/fuse and fio)."""

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
        [sys.executable, str(ROOT / "bench" / "fuse_floor.py"), "--seconds", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    rows = [line for line in lines if " IOPS " in line or " ops/s " in line]
    assert len(rows) == 24  # 4 filesystems x (3 fio jobs + create + unlink + getxattr)
    for row in rows:
        rate = float(re.search(r"([\d,]+) (IOPS|ops/s)", row).group(1).replace(",", ""))  # type: ignore[union-attr]
        assert rate > 0
    summary = (r"fuse-floor sovfs_vs_floor_randread=[\d.]+ sovfs_vs_floor_randwrite=[\d.]+"
               r" sovfs_vs_floor_create=[\d.]+ sovfs_vs_floor_getxattr=[\d.]+"
               r" fastwait_gain_randread_nj4=[\d.]+")
    assert re.fullmatch(summary, lines[-1])
    assert fuse_mounts() == before
