"""mkfs.sovfs: create a SovFS in an image file.

Thin front end: argument parsing, messages and exit codes. The formatting is sovfs.mkfs_core, the tree
copy sovfs.populate.

Exit codes: 0 success; 1 operational error (I/O, image too small, cannot open); 2 usage error (bad option
or value); 3 filesystem created but some files of -d could not be copied (listed on stderr); 4 refused:
the image holds a recognisable filesystem or partition table and -F was not given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import uuid as uuidlib
from collections.abc import Callable, Sequence
from typing import TextIO

from ledger import units
from sovfs.blockdev import BlockDevice, open_block_device
from sovfs.errors import SovError
from sovfs.mkfs_core import MkfsParams, make_filesystem, plan_for_device, probe_signatures

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_REFUSED = 0, 1, 2, 3, 4

EPILOG = """exit codes: 0 success, 1 operational error (I/O, too small), 2 usage error,
3 created but some -d files could not be copied, 4 refused to overwrite an existing signature (use -F)"""


class UsageError(Exception):
    pass


def parse_size(text: str) -> int:
    """'64M' -> 67108864 (:func:`ledger.units.parse_size`); bad input is a usage error."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mkfs.sovfs", description="Create a SovFS filesystem in an image file.", epilog=EPILOG)
    p.add_argument("-b", dest="block_size", default="4096", help="block size: 1024..65536, power of two")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-N", dest="inodes", help="number of inodes")
    g.add_argument("-i", dest="bytes_per_inode", help="bytes per inode (default 16384)")
    p.add_argument("-L", dest="label", default="", help="volume label (≤ 64 bytes)")
    p.add_argument("-U", dest="uuid", help="filesystem UUID")
    p.add_argument("-J", dest="journal", help="journal size (K/M/G suffix)")
    p.add_argument("-d", dest="root_dir", help="copy this host directory into the new filesystem")
    p.add_argument("-s", dest="size", help="create/resize the image to SIZE (K/M/G/T suffix)")
    p.add_argument("-F", dest="force", action="store_true", help="overwrite an existing filesystem signature")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: no summary, no progress bar")
    p.add_argument("image", help="image file (storage.img)")
    return p


def _params(a: argparse.Namespace) -> MkfsParams:
    try:
        bs = parse_size(a.block_size)
        inodes = int(a.inodes) if a.inodes is not None else None
        bpi = parse_size(a.bytes_per_inode) if a.bytes_per_inode is not None else 16384
        uid = uuidlib.UUID(a.uuid).bytes if a.uuid else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    return MkfsParams(
        block_size=bs,
        inode_count=inodes,
        bytes_per_inode=bpi,
        label=a.label.encode(),
        uuid=uid,
        journal_bytes=parse_size(a.journal) if a.journal else None,
    )


def main(
    argv: Sequence[str] | None = None, open_device: Callable[..., BlockDevice] = open_block_device
) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        a = build_parser().parse_args(argv)
        params = _params(a)
        if a.root_dir is not None and not os.path.isdir(a.root_dir):
            raise UsageError(f"-d {a.root_dir}: not a directory")
    except UsageError as e:
        print(f"mkfs.sovfs: {e}", file=err)
        return EXIT_USAGE
    existed = os.path.exists(a.image)
    try:
        if a.size is not None:
            size = parse_size(a.size) // 512 * 512
            if existed and not a.force and os.path.getsize(a.image) not in (0, size):
                # Resizing comes after the signature check: look at what is there first.
                refused = _refuse_existing(a.image, open_device, err)
                if refused is not None:
                    return refused
            with open(a.image, "ab") as f:
                f.truncate(size)
        elif not existed:
            print(f"mkfs.sovfs: {a.image}: no such file (give -s SIZE to create it)", file=err)
            return EXIT_ERROR
        dev = open_device(a.image)
    except UsageError as e:
        print(f"mkfs.sovfs: {e}", file=err)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"mkfs.sovfs: {a.image}: cannot open: {e}", file=err)
        _remove_if_created(a.image, existed)
        return EXIT_ERROR
    rc = EXIT_ERROR
    try:
        rc = _format(a, params, dev, out, err)
        return rc
    except SovError as e:
        print(f"mkfs.sovfs: {e}", file=err)
        return EXIT_ERROR
    except OSError as e:
        print(f"mkfs.sovfs: I/O error: {e}", file=err)
        return EXIT_ERROR
    finally:
        dev.close()
        if rc not in (EXIT_OK, EXIT_PARTIAL):
            _remove_if_created(a.image, existed)


def _refuse_existing(image: str, open_device: Callable[..., BlockDevice], err: TextIO) -> int | None:
    """Before ``-s`` resizes an existing file: refuse if it holds a filesystem (or cannot be read)."""
    try:
        dev = open_device(image, read_only=True)
    except (OSError, ValueError):
        print(f"mkfs.sovfs: {image} exists and cannot be checked for a filesystem; use -F to overwrite",
              file=err)  # fmt: skip
        return EXIT_REFUSED
    try:
        found = probe_signatures(dev)
    finally:
        dev.close()
    if found:
        print(f"mkfs.sovfs: {image} contains {', '.join(found)}; use -F to overwrite", file=err)
        return EXIT_REFUSED
    return None


def _remove_if_created(image: str, existed: bool) -> None:
    """A failed mkfs leaves no new file behind (an existing one is left as it is)."""
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(image)


def _format(a: argparse.Namespace, params: MkfsParams, dev: BlockDevice, out: TextIO, err: TextIO) -> int:
    geo = plan_for_device(dev.size, params)  # validate before touching anything
    found = probe_signatures(dev)
    if found and not a.force:
        what = ", ".join(found)
        print(f"mkfs.sovfs: {a.image} contains {what}; use -F to overwrite", file=err)
        return EXIT_REFUSED
    sb = make_filesystem(dev, params)
    problems: list[str] = []
    if a.root_dir is not None:
        from tqdm import tqdm

        from sovfs.fs import FileSystem
        from sovfs.populate import copy_tree

        with (
            FileSystem.mount(dev) as fs,
            tqdm(
                unit="B",
                unit_scale=True,
                desc="copying",
                disable=a.quiet,
                file=err,
            ) as bar,
        ):
            problems = copy_tree(fs, a.root_dir, bar.update)
    if not a.quiet:
        print(
            f"SovFS {sb.version_major}.{sb.version_minor}: {geo.block_count} blocks of {geo.block_size} B, "
            f"{geo.inode_count} inodes, journal {geo.journal_blocks} blocks, "
            f"data blocks {geo.data_blocks}\nUUID {uuidlib.UUID(bytes=sb.uuid)}"
            + (f"  label {a.label!r}" if a.label else ""),
            file=out,
        )
    for p in problems:
        print(f"mkfs.sovfs: not copied: {p}", file=err)
    return EXIT_PARTIAL if problems else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
