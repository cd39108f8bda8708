"""Smoke test: the whole fio benchmark in --quick mode on all three targets (marked bench: not in the
default run; needs root, /dev/fuse, fio, fuse2fs).  Leaves no mount behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.conftest import fuse_mounts

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bench


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
@pytest.mark.skipif(not (shutil.which("fio") and shutil.which("fuse2fs")), reason="needs fio and fuse2fs")
def test_quick_run(tmp_path: Path) -> None:
    before = fuse_mounts()
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n<!-- ledger:begin -->\nkeep me\n<!-- ledger:end -->\n")
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fio_bench.py"), "--quick", "--files", "200", "--size", "32M",
         "--out", str(out), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("fio-vs-fuse2fs min_ratio=")
    assert sum(" rep 1/1 " in line for line in lines) == 19 * 3
    text = out.read_text()
    assert "keep me" in text and "<!-- fio:begin -->" in text and lines[-1] in text
    assert len(list((tmp_path / "bench").glob("fio_*.png"))) == 4
    assert fuse_mounts() == before
