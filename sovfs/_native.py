"""The compiled core: the filesystem's hot modules built with mypyc, used only while they match the sources.

Theory of operation
-------------------
The modules in :data:`NATIVE_MODULES` are ordinary, fully annotated Python.  ``scripts/setup.sh`` also
compiles them with mypyc (``scripts/build_native.py``) into ``build/native/`` beside the package: C
extensions with the same module names, which run the same code without the interpreter's dispatch
(a create with its 4 KiB write 167-180 -> 124-126 µs in process, a random overwrite 28 -> 19 µs;
docs/BENCHMARKS.md).  The build writes ``MANIFEST``: the Python version, the extension suffix and a
digest of the sources it compiled.

:func:`activate` runs when ``sovfs`` is imported.  If the manifest matches this interpreter and the
sources as they are *now*, it puts ``build/native/sovfs`` in front of the package's ``__path__``, so
that ``import sovfs.fs`` finds the extension; otherwise nothing changes and every module is the
Python source.  So an edited source is never shadowed by an older build: editing any one of them
turns the whole compiled set off (its modules call each other natively, so it is all or none) until
the next build.  ``SOVFS_PURE=1`` turns it off on purpose - for py-spy, which cannot see inside
compiled functions, and for the tests that patch module internals (compiled code binds its calls
when it is built, so a patch would not reach it).

:data:`STATE` says which form is in use and why (``mount.sovfs -v`` logs it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import os
import sys
from pathlib import Path

__all__ = ["NATIVE_MODULES", "STATE", "activate", "build_dir", "manifest_text", "mismatch", "source_paths"]

#: compiled together, in this order; each name is a module of the ``sovfs`` package
NATIVE_MODULES = ("cache", "journal", "alloc", "dir", "inode", "format", "fs")

#: "compiled (mypyc)" or "pure Python (<reason>)", set by :func:`activate`
STATE = "pure Python (not activated)"

_PKG = Path(__file__).resolve().parent


def build_dir() -> Path:
    """Where ``scripts/build_native.py`` puts the extensions: ``build/native`` in the checkout."""
    return _PKG.parent / "build" / "native"


def source_paths(package_dir: Path | None = None) -> list[Path]:
    return [(package_dir or _PKG) / f"{m}.py" for m in NATIVE_MODULES]


def manifest_text(shared_lib: str, package_dir: Path | None = None) -> str:
    """What a build of the sources in ``package_dir`` (default: this package's) for this interpreter
    records, and what :func:`activate` expects.

    ``shared_lib``: the name of mypyc's runtime module that the extensions import.
    """
    h = hashlib.sha256()
    for p in source_paths(package_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return f"python {sys.version.split()[0]}\nsuffix {suffix}\nsources {h.hexdigest()}\nshared {shared_lib}\n"


def activate(package_path: list[str], root: Path | None = None) -> str:
    """Use the compiled modules in ``root`` (default :func:`build_dir`) if they match: put them in
    front of ``package_path``.  Returns (and stores in :data:`STATE`) the form in use."""
    global STATE
    STATE = _activate(package_path, build_dir() if root is None else root)
    return STATE


def _fields(manifest: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in manifest.splitlines())


def mismatch(root: Path) -> tuple[str | None, str]:
    """Check the build in ``root`` against this interpreter and the sources now.

    Returns ``(None, runtime module)`` if it matches, else ``(why not, "")``."""
    try:
        recorded = (root / "MANIFEST").read_text()
        shared = _fields(recorded)["shared"]
        expected = manifest_text(shared)
    except FileNotFoundError:
        return "no compiled build: run scripts/setup.sh", ""
    except (OSError, ValueError, KeyError) as e:
        return f"build/native/MANIFEST unreadable: {e}", ""
    if recorded != expected:
        built, ours = _fields(recorded), _fields(expected)
        if (built.get("python"), built.get("suffix")) != (ours["python"], ours["suffix"]):
            return f"build/native is for Python {built.get('python')}: run scripts/setup.sh", ""
        return "build/native is older than the sources: run scripts/setup.sh", ""
    return None, shared


def _activate(package_path: list[str], root: Path) -> str:
    if os.environ.get("SOVFS_PURE", "") not in ("", "0"):
        return "pure Python (SOVFS_PURE is set)"
    why, shared = mismatch(root)
    if why is not None:
        return f"pure Python ({why})"
    added = str(root) not in sys.path
    if added:
        sys.path.append(str(root))
    try:
        importlib.import_module(shared)  # the runtime every extension imports first
    except ImportError as e:
        if added:
            sys.path.remove(str(root))
        return f"pure Python (the compiled build does not load: {e})"
    package_path.insert(0, str(root / "sovfs"))
    return "compiled (mypyc)"
