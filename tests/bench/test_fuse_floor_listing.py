"""bench/fuse_floor.py refuses a listing that comes back short: a filesystem that listed fewer names
than the create phase made would look faster than it is (runs on a plain directory, no FUSE)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def floor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuse_floor", ROOT / "bench" / "fuse_floor.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuse_floor", mod)
    spec.loader.exec_module(mod)
    return mod


def test_a_full_listing_counts_every_name(floor: ModuleType, tmp_path: Path) -> None:
    floor.run_meta(tmp_path, "create-tree", 200)
    _, names = floor.run_meta(tmp_path, "readdir-tree", 200)
    assert names == 200 + 10 + 100  # the files, and the directories of both levels below the top


def test_a_short_listing_stops_the_run(floor: ModuleType, tmp_path: Path) -> None:
    floor.run_meta(tmp_path, "create-flat", 20)
    (tmp_path / "meta-flat" / "f000003").unlink()  # as if the filesystem had lost a name
    with pytest.raises(RuntimeError, match="readdir-flat: the listing named 19 entries, 20 expected"):
        floor.run_meta(tmp_path, "readdir-flat", 20)
