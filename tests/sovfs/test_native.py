"""When the compiled core is used (sovfs/_native.py): only a build that matches the sources now; and
that it behaves as the Python source does."""

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


def test_the_compiled_core_behaves_as_the_source_on_damaged_images(tmp_path: Path) -> None:
    """Differential: the same images, whose metadata blocks had bits flipped and were then resealed
    (so that their checksums pass and the damage reaches the code behind them), walked by the
    compiled core and by the Python one, give the same result for every operation; and no
    operation fails with anything but a SovError."""
    import json
    import os
    import random

    from mkfs import mkfs as cli
    from sovfs import format as F

    if not _native.STATE.startswith("compiled"):
        pytest.skip(f"no compiled core to compare: {_native.STATE}")
    src = tmp_path / "src"
    rnd = random.Random(5)
    for i in range(6):
        (src / f"d{i}").mkdir(parents=True)
        for j in range(rnd.randint(0, 20)):
            (src / f"d{i}" / f"f{j}").write_bytes(rnd.randbytes(rnd.choice([0, 100, 5000, 70_000])))
        os.symlink(f"../d{(i + 1) % 6}/f0", src / f"d{i}" / "ln")
    for j in range(150):
        (src / f"flat{j:04d}").write_bytes(b"x" * j)
    base = tmp_path / "base.img"
    assert cli.main(["-q", "-s", "16M", "-d", str(src), str(base)]) == 0
    img = base.read_bytes()
    sb = F.Superblock.unpack(img[1024:2048])
    bs, seed = sb.block_size, F.uuid_seed(sb.uuid)
    meta = [b for b in range(sb.data_start, sb.backup_sb_block) if img[b * bs : b * bs + 4] == b"SOVB"]
    candidates = [*range(1, sb.inode_table_start + 3), *meta]
    images = []
    for _ in range(40):
        data = bytearray(img)
        for _ in range(rnd.randint(1, 6)):
            b = rnd.choice(candidates)
            for _ in range(rnd.randint(1, 12)):
                data[b * bs + 8 + rnd.randrange(bs - 8)] ^= 1 << rnd.randrange(8)  # past magic and type
            block = data[b * bs : (b + 1) * bs]
            if block[:4] == b"SOVB":
                F.seal_block(block, seed)
                data[b * bs : (b + 1) * bs] = block
        images.append(data)

    def walk(pure: bool) -> list[object]:
        paths = []
        for k, data in enumerate(images):
            p = tmp_path / f"{'pure' if pure else 'compiled'}{k}.img"
            p.write_bytes(data)
            paths.append(str(p))
        env = {k: v for k, v in os.environ.items() if k != "SOVFS_PURE"}
        if pure:
            env["SOVFS_PURE"] = "1"
        r = subprocess.run(
            [sys.executable, "-m", "tests.sovfs.native_walk", *paths],
            env=env, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[2], timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return list(json.loads(r.stdout.splitlines()[-1]))

    pure, compiled = walk(True), walk(False)
    for k, (a, b) in enumerate(zip(pure, compiled, strict=True)):
        first = [(x, y) for x, y in zip(a, b, strict=False) if x != y][:1]
        assert a == b, f"image {k}: first difference {first}, {len(a)} against {len(b)} operations"
        assert not [op for op in a if op[1].startswith("OTHER")], a
    outcomes = {op[1] for t in pure for op in t}
    assert "Corrupt" in outcomes and "ok" in outcomes  # the damage was reached, and so was the rest
