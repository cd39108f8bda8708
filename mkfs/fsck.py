"""fsck.sovfs: check and repair a SovFS image.

Thin front end: argument parsing, messages, progress bar and exit codes.  The checking is
:mod:`sovfs.fsck_core`.

Usage: ``fsck.sovfs [-n | -y | -p] [-f] [-v] storage.img``

* ``-n`` report only; the image is opened read-only and never written (the default without a mode).
* ``-y`` repair everything repairable.  ``-p`` (preen) repair only what is safe without asking (counts,
  bitmaps, orphans, size/blocks fields, the backup superblock); if anything else is wrong, nothing is
  written and the exit code is 4.
* ``-f`` check even if the filesystem is marked clean (without it a clean filesystem gets only the
  superblock and journal checks, as e2fsck).
* ``-v`` list every problem (also hint-level ones) and show the progress bar even when stderr is not a
  terminal.  The bar (tqdm, stderr) is shown by default only when stderr is a terminal.

Exit codes (fsck(8)): 0 clean, 1 errors corrected, 4 errors left uncorrected, 8 operational error (missing,
foreign or truncated image, I/O error), 16 usage error.  Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sovfs.blockdev import BlockDevice, open_block_device
from sovfs.errors import SovError
from sovfs.fsck_core import EXIT_OPERATIONAL, EXIT_USAGE, Mode, Progress, check

EPILOG = """exit codes: 0 clean, 1 errors corrected, 4 errors left uncorrected, 8 operational error,
16 usage error"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fsck.sovfs", description="Check and repair a SovFS filesystem image.", epilog=EPILOG)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-n", dest="mode", action="store_const", const=Mode.NO, help="check only, never write")
    g.add_argument("-y", dest="mode", action="store_const", const=Mode.YES, help="repair everything")
    g.add_argument("-p", "-a", dest="mode", action="store_const", const=Mode.PREEN,
                   help="repair what is safe without asking")
    p.add_argument("-f", dest="force", action="store_true", help="check even if marked clean")
    p.add_argument("-v", dest="verbose", action="store_true", help="verbose: all problems, progress bar")
    p.add_argument("image", help="image file (storage.img)")
    return p


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(
    argv: Sequence[str] | None = None, open_device: Callable[..., BlockDevice] = open_block_device
) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        a = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"fsck.sovfs: {e}", file=err)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return EXIT_USAGE if e.code else 0
    mode: Mode = a.mode or Mode.NO
    try:
        dev = open_device(a.image, read_only=mode is Mode.NO)
    except Exception as e:  # missing file, not a multiple of 512, device start-up failure
        print(f"fsck.sovfs: {a.image}: cannot open: {_error_text(e)}", file=err)
        return EXIT_OPERATIONAL
    bar: Any = None
    try:
        progress: Progress | None = None
        if a.verbose or err.isatty():
            from tqdm import tqdm

            bar = tqdm(total=0, desc="checking", file=err, leave=False, unit="")

            def progress(phase: str, done: int, total: int) -> None:
                if bar.desc != phase or bar.total != total:
                    bar.set_description(phase)
                    bar.reset(total=total)
                bar.n = done
                bar.refresh()

        report = check(dev, mode, force=a.force, progress=progress)
    except SovError as e:
        print(f"fsck.sovfs: {a.image}: {_error_text(e)}", file=err)
        return EXIT_OPERATIONAL
    except Exception as e:  # I/O from the device layer: one line, never a traceback
        print(f"fsck.sovfs: {a.image}: {type(e).__name__}: {_error_text(e)}", file=err)
        return EXIT_OPERATIONAL
    finally:
        if bar is not None:
            bar.close()
        dev.close()
    for p in report.problems:
        if a.verbose or not p.hint:
            print(f"{a.image}: {p}", file=out)
    code = report.exit_code
    if code and not report.written and report.errors:
        why = "run fsck.sovfs -y" if mode is not Mode.YES else "repair impossible"
        print(f"{a.image}: UNEXPECTED INCONSISTENCY; {why}"
              if mode is Mode.PREEN else f"{a.image}: errors left uncorrected ({why})", file=out)
    elif report.written and report.errors:
        print(f"{a.image}: ***** FILE SYSTEM WAS MODIFIED *****", file=out)
    print(report.summary(a.image), file=out)
    return code


if __name__ == "__main__":
    sys.exit(main())
