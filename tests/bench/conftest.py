"""Load bench/fio_bench.py as a module (bench/ is a directory of scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_fio_bench() -> ModuleType:
    name = "fio_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "fio_bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def fb() -> ModuleType:
    return load_fio_bench()


def fuse_mounts() -> list[str]:
    """The FUSE lines of /proc/mounts (a smoke test compares them before and after)."""
    with open("/proc/mounts") as f:
        return [line for line in f if " fuse" in line]

