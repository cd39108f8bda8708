"""Model-based test: random operation sequences (with remounts) on the mount and on a host tmp directory.

Both sides get the same call; results (value or errno) must agree, and after every step the two trees
must list the same names, types, sizes, contents and symlink targets.  The shared mount is fsck'd when
the module ends.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.fuse.conftest import Mount

pytestmark = pytest.mark.fuse

PATHS = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a", "e", "e/a"]
paths = st.sampled_from(PATHS)


def snapshot(top: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            s = os.lstat(p)
            if stat.S_ISREG(s.st_mode):
                body: object = p.read_bytes()
            elif stat.S_ISLNK(s.st_mode):
                body = os.readlink(p)
            else:
                body = None
            nlink = s.st_nlink if not stat.S_ISDIR(s.st_mode) else 0
            out[str(p.relative_to(top))] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), nlink, body)
    return out


def make_machine(mount: Mount, model_root: Path, fs_root: Path) -> type[RuleBasedStateMachine]:
    class FsModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            for root in (model_root, fs_root):
                if root.exists():
                    shutil.rmtree(root)
                root.mkdir()

        def both(self, fn: object, *args: object) -> None:
            out = []
            for root in (model_root, fs_root):
                try:
                    out.append(("ok", fn(root, *args)))  # type: ignore[operator]
                except OSError as e:
                    out.append(("err", e.errno))
            assert out[0] == out[1], (fn, args, out)

        @rule(p=paths, data=st.binary(max_size=3000), off=st.integers(0, 70000))
        def write(self, p: str, data: bytes, off: int) -> None:
            def f(root: Path, p: str, data: bytes, off: int) -> int:
                fd = os.open(root / p, os.O_CREAT | os.O_WRONLY, 0o644)
                try:
                    return os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
            self.both(f, p, data, off)

        @rule(p=paths, data=st.binary(max_size=100))
        def append(self, p: str, data: bytes) -> None:
            def f(root: Path, p: str, data: bytes) -> int:
                fd = os.open(root / p, os.O_WRONLY | os.O_APPEND)
                try:
                    return os.write(fd, data)
                finally:
                    os.close(fd)
            self.both(f, p, data)

        @rule(p=paths, size=st.integers(0, 100000))
        def truncate(self, p: str, size: int) -> None:
            self.both(lambda r, p, s: os.truncate(r / p, s), p, size)

        @rule(p=paths)
        def create_excl(self, p: str) -> None:
            self.both(lambda r, p: os.close(os.open(r / p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)), p)

        @rule(p=paths)
        def mkdir(self, p: str) -> None:
            self.both(lambda r, p: os.mkdir(r / p, 0o755), p)

        @rule(p=paths)
        def unlink(self, p: str) -> None:
            self.both(lambda r, p: os.unlink(r / p), p)

        @rule(p=paths)
        def rmdir(self, p: str) -> None:
            self.both(lambda r, p: os.rmdir(r / p), p)

        @rule(a=paths, b=paths)
        def rename(self, a: str, b: str) -> None:
            self.both(lambda r, a, b: os.rename(r / a, r / b), a, b)

        @rule(a=paths, b=paths)
        def link(self, a: str, b: str) -> None:
            self.both(lambda r, a, b: os.link(r / a, r / b), a, b)

        @rule(p=paths, dest=st.sampled_from(["a", "../b", "x" * 300]))
        def symlink(self, p: str, dest: str) -> None:
            self.both(lambda r, p, t: os.symlink(t, r / p), p, dest)

        @rule(p=paths, mode=st.sampled_from([0o600, 0o755, 0o4711]))
        def chmod(self, p: str, mode: int) -> None:
            self.both(lambda r, p, m: os.chmod(r / p, m, follow_symlinks=False)
                      if not os.path.islink(r / p) else None, p, mode)

        @rule(p=paths)
        def read(self, p: str) -> None:
            self.both(lambda r, p: (r / p).read_bytes(), p)

        @rule(p=paths)
        def listdir(self, p: str) -> None:
            self.both(lambda r, p: sorted(os.listdir(r / p)), p)

        @rule()
        def remount(self) -> None:
            mount.remount()

        @invariant()
        def same_tree(self) -> None:
            assert snapshot(model_root) == snapshot(fs_root)

    return FsModel


def _run(mount: Mount, tmp_path: Path, examples: int, steps: int) -> None:
    machine = make_machine(mount, tmp_path / "model", mount.mnt / "model")
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]),
    )


def test_model(shared_mount: Mount, tmp_path: Path) -> None:
    _run(shared_mount, tmp_path, int(os.environ.get("SOVFS_MODEL_EXAMPLES", "5")), 20)


@pytest.mark.slow
def test_model_long(shared_mount: Mount, tmp_path: Path) -> None:
    _run(shared_mount, tmp_path, 100, 50)
