"""FUSE test harness: a real ``mount.sovfs`` daemon per test, in a subprocess, always unmounted.

* ``template`` (session): one mkfs'd 64 MiB image; each test copies it (cheap, sparse).
* ``Mount``: runs ``python -m sovfs.mount IMG DIR -o log=…,pidfile=…`` (daemon mode: returns once the mount
  works), ``unmount()`` waits until the daemon released the image lock (= image closed and clean).
* Cleanup in ``finally``: ``fusermount3 -u -z``, SIGKILL of a leftover daemon, log printed on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovfs.mount import wait_image_released

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "FUSE tests mount as root"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed"
    return None


_WHY = fuse_unavailable()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("fuse") and _WHY:
            item.add_marker(pytest.mark.skip(reason=_WHY))


def run_tool(
    *args: str, check: bool = True, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        list(args), capture_output=True, text=True, env=ENV, timeout=timeout, check=check, **kw
    )


def mkfs(img: Path, size: str = "64M", *extra: str) -> None:
    run_tool(PY, "-m", "mkfs.mkfs", "-q", "-F", "-s", size, *extra, str(img))


def fsck(img: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_tool(PY, "-m", "mkfs.fsck", *flags, str(img), check=False)


def image_idle(img: Path, timeout: float = 30) -> bool:
    """Wait until no daemon holds the image lock (it releases it after closing the image clean)."""
    return wait_image_released(img, timeout)


class Mount:
    def __init__(self, img: Path, mnt: Path, work: Path) -> None:
        self.img, self.mnt, self.work = img, mnt, work
        self.log = work / "mount.log"
        self.pidfile = work / "mount.pid"
        self.mounted = False

    def mount(
        self, *opts: str, expect_ok: bool = True, flags: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess:
        o = ",".join([f"log={self.log}", f"pidfile={self.pidfile}", *opts])
        r = run_tool(
            PY, "-m", "sovfs.mount", str(self.img), str(self.mnt), *flags, "-o", o, check=False, timeout=60
        )
        if expect_ok:
            assert r.returncode == 0, f"mount failed: {r.stderr}\n{self.log_text()}"
            assert os.path.ismount(self.mnt)
            self.mounted = True
        return r

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def unmount(self) -> None:
        """Clean unmount; returns once the daemon has closed the image."""
        r = run_tool("fusermount3", "-u", str(self.mnt), check=False)
        assert r.returncode == 0, r.stderr
        self.mounted = False
        assert image_idle(self.img), "daemon did not finish after unmount"

    def remount(self, *opts: str) -> None:
        self.unmount()
        self.mount(*opts)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def cleanup(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, check=False)
        pid = self.pid
        if pid is not None and not image_idle(self.img, 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            image_idle(self.img, 10)
        self.mounted = False


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if _WHY:
        pytest.skip(_WHY)
    img = tmp_path_factory.mktemp("template") / "template.img"
    mkfs(img)
    return img


@pytest.fixture
def image(template: Path, tmp_path: Path) -> Path:
    img = tmp_path / "storage.img"
    shutil.copyfile(template, img)
    return img


@pytest.fixture
def mnt_factory(tmp_path: Path) -> Iterator[object]:
    made: list[Mount] = []

    def make(img: Path, name: str = "mnt") -> Mount:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        m = Mount(img, d, tmp_path)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.cleanup()


@pytest.fixture
def mount(image: Path, mnt_factory: object, request: pytest.FixtureRequest) -> Iterator[Mount]:
    m: Mount = mnt_factory(image)  # type: ignore[operator]
    m.mount()
    try:
        yield m
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            print(m.log_text())
        if m.mounted:
            try:
                m.unmount()
            except AssertionError:
                m.cleanup()
                raise
            r = fsck(image, "-n", "-f")
            assert r.returncode == 0, f"fsck after unmount: {r.stdout}{r.stderr}"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="module")
def shared_mount(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for a whole module (each test works in its own directory); fsck'd at the end."""
    work = tmp_path_factory.mktemp("shared")
    img = work / "storage.img"
    shutil.copyfile(template, img)
    (work / "mnt").mkdir()
    m = Mount(img, work / "mnt", work)
    m.mount("allow_other")
    try:
        yield m
        m.unmount()
        r = fsck(img, "-n", "-f")
        assert r.returncode == 0, f"fsck after unmount: {r.stdout}{r.stderr}\n{m.log_text()}"
    finally:
        m.cleanup()


@pytest.fixture
def d(shared_mount: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the shared mount, named after the test."""
    p = shared_mount.mnt / request.node.name.replace("[", "_").replace("]", "").replace("/", "_")
    p.mkdir()
    return p
