"""Compile SovFS's hot modules with mypyc into build/native (see sovfs/_native.py).

Usage: ``.venv/bin/python scripts/build_native.py [--force]``.  scripts/setup.sh runs it; it does
nothing when build/native already matches the sources and this interpreter.  The compiler runs on a
copy of the packages in a temporary directory, so the checkout only ever gains build/native.

Exit status: 0 built or up to date, 1 the build failed (SovFS then runs as pure Python; the reason is
printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sovfs import _native  # noqa: E402  (the checkout's package, not an installed one)


def up_to_date() -> bool:
    return _native.mismatch(_native.build_dir())[0] is None


def build() -> str:
    """Compile in a scratch copy; install into build/native; return the runtime module's name."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    with tempfile.TemporaryDirectory(prefix="sovfs-mypyc-") as tmp:
        work = Path(tmp)
        for pkg in ("sovfs", "ledger"):
            shutil.copytree(ROOT / pkg, work / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")  # the mypy settings
        files = [f"sovfs/{m}.py" for m in _native.NATIVE_MODULES]
        proc = subprocess.run(
            [sys.executable, "-m", "mypyc", *files], cwd=work, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError("mypyc failed:\n  " + "\n  ".join(tail))
        shared_libs = list(work.glob(f"*__mypyc{suffix}"))
        if len(shared_libs) != 1:
            raise RuntimeError(f"mypyc left {len(shared_libs)} runtime modules, expected one")
        shared = shared_libs[0].name[: -len(suffix)]
        out = _native.build_dir()
        staging = out.with_name(out.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "sovfs").mkdir(parents=True)
        shutil.copy2(shared_libs[0], staging / shared_libs[0].name)
        for m in _native.NATIVE_MODULES:
            shutil.copy2(work / "sovfs" / f"{m}{suffix}", staging / "sovfs" / f"{m}{suffix}")
        # the digest of the sources compiled (an edit made meanwhile leaves the build stale, as it should)
        (staging / "MANIFEST").write_text(_native.manifest_text(shared, work / "sovfs"))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return shared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile SovFS's hot modules with mypyc into build/native.")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    if not args.force and up_to_date():
        print("build_native: build/native is up to date")
        return 0
    t0 = time.monotonic()
    print(f"build_native: compiling {', '.join(_native.NATIVE_MODULES)} with mypyc (about a minute)")
    try:
        build()
    except (RuntimeError, OSError) as e:
        print(f"build_native: {e}\nbuild_native: SovFS will run as pure Python", file=sys.stderr)
        return 1
    check = subprocess.run(
        [sys.executable, "-c", "import sovfs._native as n; print(n.STATE)"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    state = check.stdout.strip() or (check.stderr.strip().splitlines() or ["no output"])[-1]
    if state != "compiled (mypyc)":
        print(f"build_native: the build does not load: {state}", file=sys.stderr)
        shutil.rmtree(_native.build_dir(), ignore_errors=True)
        return 1
    print(f"build_native: done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
