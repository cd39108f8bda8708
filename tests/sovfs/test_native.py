"""When the compiled core is used (sovfs/_native.py): only a build that matches the sources now."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovfs import _native


@pytest.fixture
def restore_state() -> Iterator[None]:
    state, path = _native.STATE, list(sys.path)
    yield
    _native.STATE = state
    sys.path[:] = path
    sys.modules.pop("sovfs_test_fake_runtime", None)


def _fake_build(root: Path, *, runtime: bool = True, sources: Path | None = None) -> None:
    """A build directory whose runtime module is a harmless Python module (no compiler needed)."""
    (root / "sovfs").mkdir(parents=True)
    if runtime:
        (root / "sovfs_test_fake_runtime.py").write_text("LOADED = True\n")
    (root / "MANIFEST").write_text(_native.manifest_text("sovfs_test_fake_runtime", sources))


@pytest.mark.usefixtures("restore_state")
def test_a_build_matching_the_sources_goes_in_front_of_the_package_path(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    path = ["/the/package"]
    assert _native.activate(path, tmp_path) == "compiled (mypyc)" == _native.STATE
    assert path == [str(tmp_path / "sovfs"), "/the/package"]


@pytest.mark.usefixtures("restore_state")
def test_a_build_of_other_sources_is_not_used(tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    edited.mkdir()
    for src in _native.source_paths():
        (edited / src.name).write_bytes(src.read_bytes())
    (edited / "fs.py").write_bytes(b"# one line more\n" + (edited / "fs.py").read_bytes())
    _fake_build(tmp_path / "build", sources=edited)  # built from sources that differ from ours
    path = ["/the/package"]
    assert "older than the sources" in _native.activate(path, tmp_path / "build")
    assert path == ["/the/package"] and _native.STATE.startswith("pure Python")


@pytest.mark.usefixtures("restore_state")
def test_no_build_or_one_that_does_not_load_leaves_the_sources(tmp_path: Path) -> None:
    path = ["/the/package"]
    assert "no compiled build" in _native.activate(path, tmp_path / "absent")
    _fake_build(tmp_path / "broken", runtime=False)
    before = list(sys.path)
    assert "does not load" in _native.activate(path, tmp_path / "broken")
    assert path == ["/the/package"] and sys.path == before
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "MANIFEST").write_text("not a manifest")
    assert "unreadable" in _native.activate(path, tmp_path / "garbled")


@pytest.mark.usefixtures("restore_state")
def test_sovfs_pure_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_build(tmp_path)
    monkeypatch.setenv("SOVFS_PURE", "1")
    path: list[str] = []
    assert _native.activate(path, tmp_path) == "pure Python (SOVFS_PURE is set)" and path == []
    out = subprocess.run(
        [sys.executable, "-c", "import sovfs._native as n, sovfs.fs as f; print(n.STATE); print(f.__file__)"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out == ["pure Python (SOVFS_PURE is set)", str(Path(_native.__file__).with_name("fs.py"))]


@pytest.mark.usefixtures("restore_state")
def test_a_build_for_another_python_says_so(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    text = (tmp_path / "MANIFEST").read_text().replace(f"python {sys.version.split()[0]}\n", "python 3.0.1\n")
    (tmp_path / "MANIFEST").write_text(text)
    path: list[str] = []
    state = _native.activate(path, tmp_path)
    assert state == "pure Python (build/native is for Python 3.0.1: run scripts/setup.sh)" and path == []
