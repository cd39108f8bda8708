"""``ledger``: talk to a disk image through the virtio-blk driver/device pair.

Every command below builds a :class:`~ledger.Ledger` on the image - guest
memory, a virtio-blk device serving the file, and the driver that probes it
through its registers - and goes through the rings like a guest kernel would.

Exit status:
  0  success
  1  the request failed (the device answered IOERR/UNSUPP, or broke the protocol)
  2  bad usage or input: unknown option, missing image, image size not a
     multiple of 512, sector out of range, text that does not fit
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _spec as S
from . import units
from ._machine import Ledger
from .backend import BackendError
from .errors import DeviceError, DriverError, IOFailure, LedgerError

EXIT_OK = 0
EXIT_IO = 1
EXIT_USAGE = 2

DEFAULT_IMAGE = "storage.img"


class UsageError(Exception):
    """Bad input from the user: a one-line message and exit status 2."""


def parse_size(text: str) -> int:
    """``64M`` -> 67108864 (see :func:`ledger.units.parse_size`); bad input is a usage error."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def hexdump(data: bytes, base: int = 0) -> str:
    """``hexdump -C`` style: offset, 16 bytes in hex, the printable characters; repeats as ``*``."""
    lines: list[str] = []
    prev: bytes | None = None
    starred = False
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        if row == prev:
            if not starred:
                lines.append("*")
                starred = True
            continue
        starred = False
        prev = row
        hx = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        txt = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + off:08x}  {hx:<49} |{txt}|")
    lines.append(f"{base + len(data):08x}")
    return "\n".join(lines)


def _open(path: str, read_only: bool) -> Ledger:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such image (create one with `ledger create {path} --size 64M`)")
    if not p.is_file() and not p.is_block_device():
        raise UsageError(f"{path}: not a regular file or block device")
    try:
        return Ledger.open(
            p,
            read_only=read_only,
            num_queues=1,
            device_queues=2,
            pool_bytes=16 << 20,
            diag_log=diag_log_path(path),
        )
    except BackendError as e:
        raise UsageError(str(e)) from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None


def diag_log_path(image: str | os.PathLike[str]) -> Path:
    """Where the device's diagnostics for ``image`` are kept: ``IMAGE.ledger-diag.log``."""
    return Path(f"{os.fspath(image)}.ledger-diag.log")


def _check_sectors(ledger: Ledger, sector: int, count: int) -> None:
    cap = ledger.capacity_sectors
    if sector < 0 or count <= 0 or sector + count > cap:
        last = f"{sector + count - 1}" if count > 1 else f"{sector}"
        raise UsageError(f"sector {last} is out of range: the image has {cap} sectors (0..{cap - 1})")


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if size % 512:
        raise UsageError(f"size {size} is not a multiple of 512 bytes")
    p = Path(args.image)
    if p.exists() and not args.force:
        raise UsageError(f"{p}: already exists (use --force to resize it)")
    with open(p, "wb") as f:
        f.truncate(size)
    print(f"{p}: {size} bytes ({size // 512} sectors), sparse")
    return EXIT_OK


def cmd_dd_read(args: argparse.Namespace) -> int:
    with _open(args.image, read_only=True) as ledger:
        _check_sectors(ledger, args.sector, args.count)
        data = ledger.sync().read(args.sector, args.count)
    if args.raw:
        sys.stdout.buffer.write(data)
    else:
        print(hexdump(data, args.sector * 512))
    return EXIT_OK


def cmd_dd_write(args: argparse.Namespace) -> int:
    if args.file is not None:
        try:
            payload = Path(args.file).read_bytes()
        except OSError as e:
            raise UsageError(f"{args.file}: {e.strerror}") from None
    elif args.text is not None:
        payload = args.text.encode()
    else:
        raise UsageError("give the TEXT to write or --file F")
    if not payload:
        raise UsageError("nothing to write")
    nsect = -(-len(payload) // 512)
    data = payload + bytes(nsect * 512 - len(payload))
    with _open(args.image, read_only=False) as ledger:
        _check_sectors(ledger, args.sector, nsect)
        blk = ledger.sync()
        blk.write(args.sector, data)
        blk.flush()
    print(f"wrote {len(payload)} bytes ({nsect} sector{'s' if nsect > 1 else ''}) at sector {args.sector}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with _open(args.image, read_only=args.read_only) as ledger:
        drv = ledger.driver
        cfg = drv.config
        serial = ledger.sync().get_id().decode(errors="replace")
        print(f"image:        {args.image}")
        print(f"capacity:     {cfg.capacity} sectors ({cfg.capacity * 512} bytes)")
        print(f"serial:       {serial}")
        print(f"block size:   {cfg.blk_size} (physical 2^{cfg.physical_block_exp} blocks, "
              f"min io {cfg.min_io_size}, opt io {cfg.opt_io_size})")  # fmt: skip
        print(f"cache:        {'writeback' if cfg.writeback else 'writethrough'}")
        print(f"segments:     up to {cfg.seg_max} of {cfg.size_max} bytes")
        print(f"discard:      {cfg.max_discard_sectors} sectors x {cfg.max_discard_seg} segments")
        print(f"write zeroes: {cfg.max_write_zeroes_sectors} sectors x {cfg.max_write_zeroes_seg} segments"
              f"{', may unmap' if cfg.write_zeroes_may_unmap else ''}")  # fmt: skip
        print(f"device queues: {cfg.num_queues}")
        print("offered:      " + " ".join(S.feature_names(drv.device_features)))
        print("negotiated:   " + " ".join(S.feature_names(drv.features)))
        for q in drv.queues:
            print(f"queue {q.index}:      {q.size} entries, desc {q.state.desc_gpa:#x} "
                  f"avail {q.state.avail_gpa:#x} used {q.state.used_gpa:#x}")  # fmt: skip
    return EXIT_OK


def cmd_diag(args: argparse.Namespace) -> int:
    if args.selftest:
        from .selftest import MISTAKES

        for m in MISTAKES:
            out = m.run()
            print(f"== {m.name}: {m.what}")
            for d in out.diagnostics:
                print(f"   device: {d}")
            if not out.diagnostics:
                print("   device: (nothing recorded)")
            if out.status_byte is not None:
                print(f"   the driver finds status byte {out.status_byte:#04x} "
                      f"({S.STATUS_NAMES.get(out.status_byte, 'never written by the device')})")  # fmt: skip
            print()
        return EXIT_OK
    log = diag_log_path(args.image)
    if not Path(args.image).exists():
        raise UsageError(f"{args.image}: no such image")
    if not log.exists() or log.stat().st_size == 0:
        print(f"{args.image}: no driver errors recorded")
        return EXIT_OK
    text = log.read_text(encoding="utf-8", errors="replace")
    sys.stdout.write(text)
    if args.clear:
        log.unlink()
    return EXIT_OK


def _parse_trace(path: str) -> list[tuple[str, int, bytes]]:
    """Read a power-cut trace: ``write SECTOR TEXT``, ``writefile SECTOR PATH``,
    ``fill SECTOR COUNT BYTE``, ``flush``; ``#`` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    ops: list[tuple[str, int, bytes]] = []
    for no, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split(None, 2)
        if not words:
            continue
        try:
            if words[0] == "flush" and len(words) == 1:
                ops.append(("flush", 0, b""))
            elif words[0] == "write" and len(words) == 3:
                ops.append(("write", int(words[1]), _pad(words[2].encode())))
            elif words[0] == "writefile" and len(words) == 3:
                ops.append(("write", int(words[1]), _pad(Path(words[2]).read_bytes())))
            elif words[0] == "fill" and len(words) == 3:
                count, byte = words[2].split()
                ops.append(("write", int(words[1]), bytes([int(byte, 0)]) * (512 * int(count))))
            else:
                raise ValueError("unknown operation")
        except (ValueError, OSError) as e:
            raise UsageError(f"{path}:{no}: cannot read {line.strip()!r} ({e})") from None
    return ops


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512) if data else bytes(512)


def cmd_powercut(args: argparse.Namespace) -> int:
    from .backend import CrashBackend

    src = Path(args.image)
    if not src.exists():
        raise UsageError(f"{args.image}: no such image")
    size = src.stat().st_size
    if size <= 0 or size % 512:
        raise UsageError(f"image {args.image!r} is {size} bytes, not a positive multiple of 512")
    ops = _parse_trace(args.trace)
    backend = CrashBackend(image=src.read_bytes())
    done = 0
    with Ledger.crash(backend) as ledger:
        start = backend.requests  # the ledger's own start-up request is not part of the trace
        if args.cut_after is not None:
            backend.cut_after(args.cut_after)
        blk = ledger.sync()
        for op, sector, data in ops:
            try:
                if op == "flush":
                    blk.flush()
                else:
                    _check_sectors(ledger, sector, len(data) // 512)
                    blk.write(sector, data)
            except IOFailure:
                break  # the power is off: nothing after this reaches the disk
            done += 1
    image = backend.power_cut(args.seed)
    Path(args.out).write_bytes(image.tobytes())
    used = backend.requests - start
    cut = used if args.cut_after is None else args.cut_after
    print(f"{done} of {len(ops)} operations completed before the power cut ({used} requests)")
    print(f"loss: {backend.last_loss}")
    print(f"wrote {args.out}; replay with --seed {args.seed} --cut-after {cut}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ledger",
        description="Read and write a disk image through a virtio-blk driver/device pair.",
        epilog="Exit status: 0 success, 1 the device failed the request, 2 bad usage or input.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def image_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--image", default=DEFAULT_IMAGE, help=f"disk image (default: ./{DEFAULT_IMAGE})")

    c = sub.add_parser("create", help="create a sparse image file")
    c.add_argument("image", nargs="?", default=DEFAULT_IMAGE)
    c.add_argument("--size", "-s", required=True, help="size with K/M/G/T suffix, e.g. 64M")
    c.add_argument("--force", "-f", action="store_true", help="resize an existing file")
    c.set_defaults(func=cmd_create)

    dd = sub.add_parser("dd", help="read or write sectors (the Rumpk shell's dd syntax)")
    ddsub = dd.add_subparsers(dest="dd_command", required=True)
    r = ddsub.add_parser("read", help="hexdump sectors")
    r.add_argument("sector", type=int)
    r.add_argument("--count", "-n", type=int, default=1, help="sectors to read (default 1)")
    r.add_argument("--raw", action="store_true", help="write the bytes to stdout instead of a hexdump")
    image_opt(r)
    r.set_defaults(func=cmd_dd_read)
    w = ddsub.add_parser("write", help="write TEXT (or --file F), zero-padded to whole sectors")
    w.add_argument("sector", type=int)
    w.add_argument("text", nargs="?")
    w.add_argument("--file", "-f")
    image_opt(w)
    w.set_defaults(func=cmd_dd_write)

    i = sub.add_parser("info", help="capacity, features offered and negotiated, queues")
    image_opt(i)
    i.add_argument("--read-only", action="store_true", help="open the image read-only (the device offers RO)")
    i.set_defaults(func=cmd_info)
    pc = sub.add_parser(
        "powercut",
        help="run a write trace on a simulated disk with a volatile cache, cut the power, save the result",
        description="Loads IMAGE onto a simulated disk with a volatile write cache (CONFIG_WCE), runs the "
        "trace through the driver, cuts the power after N requests (or at the end), and writes the image "
        "a power loss leaves: flushed writes always survive; each unflushed one is lost, kept or torn at "
        "512-byte sectors, in order or shuffled, all decided by --seed. Trace lines: `write SECTOR TEXT`, "
        "`writefile SECTOR PATH`, `fill SECTOR COUNT BYTE`, `flush`; `#` comments. The whole image is "
        "held in memory.",
    )
    image_opt(pc)
    pc.add_argument("--trace", required=True, help="the operations to run")
    pc.add_argument("--cut-after", type=int, default=None, help="requests admitted before the power goes")
    pc.add_argument("--seed", type=int, default=0, help="decides the loss pattern (default 0)")
    pc.add_argument("--out", required=True, help="where to write the post-crash image")
    pc.set_defaults(func=cmd_powercut)

    dg = sub.add_parser(
        "diag",
        help="print the driver errors the device recorded for an image (or --selftest)",
        description="Every request the device refuses is recorded in plain words, naming the request "
        "and the descriptor. Commands that use an image append them to IMAGE.ledger-diag.log; "
        "this prints that file. --selftest makes the classic driver mistakes on purpose "
        "against a RAM disk and shows what the device says about each.",
    )
    image_opt(dg)
    dg.add_argument("--selftest", action="store_true", help="show the diagnostics for common driver mistakes")
    dg.add_argument("--clear", action="store_true", help="delete the log after printing it")
    dg.set_defaults(func=cmd_diag)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Diagnostics are printed or saved by the commands themselves; the device's
    # log records would only repeat them on stderr.
    device_log = logging.getLogger("ledger.device")
    device_log.propagate = False
    device_log.addHandler(logging.NullHandler())
    try:
        rc: int = args.func(args)
        return rc
    except UsageError as e:
        print(f"ledger: {e}", file=sys.stderr)
        return EXIT_USAGE
    except IOFailure as e:
        print(f"ledger: {e}", file=sys.stderr)
        return EXIT_IO
    except (DeviceError, DriverError, LedgerError) as e:
        print(f"ledger: {e}", file=sys.stderr)
        return EXIT_IO
    except OSError as e:
        print(f"ledger: {e.filename or args.image}: {e.strerror}", file=sys.stderr)
        return (
            EXIT_USAGE if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError) else EXIT_IO
        )
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (`ledger dd read 0 --count 100 | head`): not an error.
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return EXIT_OK
    except Exception as e:  # a bug of ours: still one line, the traceback only on request
        if os.environ.get("LEDGER_DEBUG"):
            raise
        print(
            f"ledger: internal error: {type(e).__name__}: {e} (set LEDGER_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
