"""Ledger benchmark: driver -> device -> driver, against a plain pread/pwrite loop.

Measures, in one run and on the same image file:

* the limit: a plain Python ``os.preadv``/``os.pwritev`` loop (4 KiB random,
  1 MiB sequential) on the image, page cache warm;
* the ledger: 4 KiB random read and write IOPS and 1 MiB sequential MB/s at
  queue depth 1, 8, 32, 128, with 1 and 2 queues, on the RAM backend and on
  the file backend.  Queue depth *d* means one trio task keeping *d* requests
  in flight as one :class:`~ledger.client.Batch` (fio's ``iodepth=d`` with
  ``iodepth_batch_submit=iodepth_batch_complete=d``), or ``await blk.read()``
  in a loop for d = 1; plus 8 and 32 concurrent tasks each calling
  ``await blk.read()`` (the per-request API under concurrency);
* start-up: import + first ``Ledger`` with an empty Numba cache and a warm one;
* two batches in turn (``start_batch``/``finish_batch``): one in flight while
  the other is filled, so the driver's Python and the device's copies overlap;
* the QD1 round trip (``await blk.read`` of one 4 KiB block, trio wake-up
  included) and the process CPU time per request (device and driver threads
  together, polling included).

The last line is machine-readable:
``ledger qd32_ratio_vs_pread=<x> qd1_rtt_us=<y> cpu_us_per_req=<z>``
(ratio = ledger file-backend 4 KiB random-read IOPS at QD32 with 2 queues, the
default configuration / pread loop IOPS; cpu = the lowest CPU per request of
the batched RAM-backend runs, the notes say which).

Usage: ``python bench/ledger_bench.py [--quick] [--dir DIR] [--size 256M]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ledger import _spec as S
from ledger._machine import Ledger
from ledger.backend import FileBackend, RamBackend
from ledger.client import Batch
from ledger.units import parse_size

BS = 4096
SEQ = 1 << 20


def make_image(path: Path, size: int) -> None:
    chunk = np.random.default_rng(1).integers(0, 256, size=SEQ, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(size // SEQ):
            f.write(chunk)
    # Leave it in the page cache: the benchmark measures the I/O path, not the disk.
    with open(path, "rb") as f:
        while f.read(SEQ):
            pass


def pread_loop(path: Path, size: int, seconds: float, write: bool, block: int, sequential: bool) -> float:
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(block)
    nblocks = size // block
    rng = np.random.default_rng(2)
    offs = (rng.integers(0, nblocks, 1 << 16) * block).tolist()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    try:
        while True:
            for i in range(256):
                off = ((n + i) % nblocks) * block if sequential else offs[(n + i) & 0xFFFF]
                if write:
                    os.pwritev(fd, [buf], off)
                else:
                    os.preadv(fd, [buf], off)
            n += 256
            if time.perf_counter() >= deadline:
                break
    finally:
        os.close(fd)
    return n / (time.perf_counter() - t0)


async def ledger_rate(
    ledger: Ledger, qd: int, seconds: float, write: bool, block: int, sequential: bool
) -> tuple[float, float, int]:
    """Return (requests/s, CPU seconds, requests) for a fixed queue depth."""
    nsect = block // 512
    cap = ledger.capacity_sectors // nsect
    rng = np.random.default_rng(3)
    rtype = S.VIRTIO_BLK_T_OUT if write else S.VIRTIO_BLK_T_IN
    async with ledger.trio() as blk:
        if qd == 1:
            buf = bytes(block)
            n = 0
            secs = (rng.integers(0, cap, 1 << 16) * nsect).tolist()
            c0, t0 = time.process_time(), time.perf_counter()
            deadline = t0 + seconds
            while time.perf_counter() < deadline:
                for _ in range(64):
                    s = (n % cap) * nsect if sequential else secs[n & 0xFFFF]
                    if write:
                        await blk.write(s, buf)
                    else:
                        await blk.read(s, nsect)
                    n += 1
            return n / (time.perf_counter() - t0), time.process_time() - c0, n
        # One task keeps `qd` requests in flight as one Batch (fio's iodepth=qd with
        # iodepth_batch_submit = iodepth_batch_complete = qd); the batch is reused.
        bufs = np.array([blk.alloc_buffer(block)[0] for _ in range(qd)], np.uint64)
        batch = Batch.uniform(rtype, np.zeros(qd, np.uint64), nsect, bufs)
        n = 0
        pos = 0
        c0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            if sequential:
                batch.sector[:] = (np.arange(pos, pos + qd) % cap) * nsect
                pos += qd
            else:
                batch.sector[:] = rng.integers(0, cap, qd) * nsect
            await blk.submit_batch(batch)
            n += qd
        return n / (time.perf_counter() - t0), time.process_time() - c0, n


async def pipelined_rate(ledger: Ledger, qd: int, seconds: float) -> tuple[float, float, int]:
    """4 KiB random reads, two batches of ``qd`` in turn: one in flight while the other is filled.

    (requests/s, CPU seconds, requests).  The driver's Python work overlaps the
    device's, which is what a batched user of the ledger does.
    """
    cap = ledger.capacity_sectors // 8
    rng = np.random.default_rng(4)
    async with ledger.trio() as blk:
        batches = [
            Batch.uniform(S.VIRTIO_BLK_T_IN, np.zeros(qd, np.uint64), 8,
                          np.array([blk.alloc_buffer(BS)[0] for _ in range(qd)], np.uint64))
            for _ in range(2)
        ]  # fmt: skip
        batches[0].sector[:] = rng.integers(0, cap, qd) * 8
        ticket = blk.start_batch(batches[0])
        k, n = 1, 0
        c0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            batches[k].sector[:] = rng.integers(0, cap, qd) * 8
            nxt = blk.start_batch(batches[k])
            await blk.finish_batch(ticket)
            n += qd
            ticket, k = nxt, k ^ 1
        await blk.finish_batch(ticket)
        n += qd
        return n / (time.perf_counter() - t0), time.process_time() - c0, n


async def tasks_rate(ledger: Ledger, ntasks: int, seconds: float) -> float:
    """Requests/s of `ntasks` concurrent tasks, each looping over ``await blk.read`` of 4 KiB."""
    cap = ledger.capacity_sectors // 8
    counts = [0] * ntasks
    async with ledger.trio() as blk:
        deadline = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            i = k * 7919
            while time.perf_counter() < deadline:
                await blk.read((i % cap) * 8, 8)
                i += 104729
                counts[k] += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(ntasks):
                nursery.start_soon(worker, k)
        return sum(counts) / (time.perf_counter() - t0)


def start_times() -> tuple[float, float]:
    """Seconds to import the ledger and build a RAM ledger: cold (empty Numba cache), then warm."""
    code = (
        "import time; t = time.perf_counter(); from ledger import Ledger; "
        "Ledger.ram(1 << 20).close(); print(time.perf_counter() - t)"
    )
    root = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        out = [
            float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout)
            for _ in range(2)
        ]  # fmt: skip
    return out[0], out[1]


async def qd1_rtt(ledger: Ledger, seconds: float) -> float:
    async with ledger.trio() as blk:
        lat: list[float] = []
        deadline = time.perf_counter() + seconds
        cap = ledger.capacity_sectors // 8
        i = 0
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await blk.read((i * 7919 % cap) * 8, 8)
            lat.append(time.perf_counter() - t)
            i += 1
        return float(np.median(lat)) * 1e6


def write_doc(
    path: Path, table: list[str], notes: list[str], summary: str, size: int, secs: float, reps: int
) -> None:
    """Replace the text between the ledger markers of ``path`` with this run's figures."""
    begin, end = "<!-- ledger:begin -->", "<!-- ledger:end -->"
    uname = os.uname()
    body = [
        begin,
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs, "
        f"Linux {uname.release} ({uname.machine}); image {size >> 20} MiB in the page cache; "
        f"{secs:g} s per cell, median of {reps}.",
        "",
        *table,
        "",
        *[f"- {n}" for n in notes],
        "",
        f"`{summary}`",
        end,
    ]
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + "\n".join(body) + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (< 30 s in all)")
    ap.add_argument("--dir", default=None, help="where to put the image (default: a temp dir on /var/tmp)")
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--doc", default=None, help="write the figures into this markdown file's ledger section")
    ap.add_argument(
        "--reps", type=int, default=None, help="repetitions per cell, median kept (default 3; 1 with --quick)"
    )
    args = ap.parse_args()
    try:
        size = parse_size(args.size)
    except ValueError as e:
        ap.error(str(e))
    secs = 0.25 if args.quick else 1.0
    reps = args.reps or (1 if args.quick else 3)

    def median_run(fn: Callable[[], tuple[float, float, int]]) -> tuple[float, float, int]:
        """Run a measurement `reps` times; keep the run with the median rate (this machine is noisy)."""
        runs = sorted((fn() for _ in range(reps)), key=lambda r: r[0])
        return runs[len(runs) // 2]

    qds = [1, 8, 32, 128]
    queue_counts = [1, 2]
    with tempfile.TemporaryDirectory(dir=args.dir or "/var/tmp") as tmp:
        img = Path(tmp) / "bench.img"
        make_image(img, size)
        rows: list[tuple[str, str, float, str]] = []

        def base(write: bool, block: int, seq: bool) -> float:
            return float(np.median([pread_loop(img, size, secs, write, block, seq) for _ in range(reps)]))

        base_rr = base(False, BS, False)
        base_rw = base(True, BS, False)
        base_sr = base(False, SEQ, True) * SEQ / 1e6
        base_sw = base(True, SEQ, True) * SEQ / 1e6
        rows += [
            ("pread loop", "4K randread", base_rr, "IOPS"),
            ("pwrite loop", "4K randwrite", base_rw, "IOPS"),
            ("pread loop", "1M seqread", base_sr, "MB/s"),
            ("pwrite loop", "1M seqwrite", base_sw, "MB/s"),
        ]
        print(f"limit: pread 4K {base_rr:,.0f} IOPS, pwrite 4K {base_rw:,.0f} IOPS, "
              f"read 1M {base_sr:,.0f} MB/s, write 1M {base_sw:,.0f} MB/s", flush=True)  # fmt: skip
        results: dict[tuple[str, int, int, str], float] = {}
        cpu_per_req = float("nan")
        for backend_name in ("ram", "file"):
            for nq in queue_counts:

                def make() -> Ledger:
                    if backend_name == "ram":  # noqa: B023
                        be: RamBackend | FileBackend = RamBackend(size)
                        # Fault the RAM disk in first, as the file's pages are in the page
                        # cache: a VM's first touch of a page costs far more than the copy.
                        be.ram.fill(0)
                    else:
                        be = FileBackend(img)
                    return Ledger(be, num_queues=nq, queue_size=256, device_queues=nq)  # noqa: B023

                for qd in qds:
                    for job in ("randread", "randwrite"):

                        def cell() -> tuple[float, float, int]:
                            with make() as led:
                                return trio.run(ledger_rate, led, qd, secs, job == "randwrite", BS, False)  # noqa: B023

                        rate, cpu, n = median_run(cell)
                        results[(backend_name, nq, qd, job)] = rate
                        if backend_name == "ram" and nq == 1 and qd == 32 and job == "randread":
                            cpu_per_req = cpu / n * 1e6
                        rows.append((f"ledger {backend_name} q{nq} qd{qd}", f"4K {job}", rate, "IOPS"))
                        print(f"{backend_name:4} queues={nq} qd={qd:<3} {job:9} {rate:>12,.0f} IOPS "
                              f"cpu {cpu / n * 1e6:6.2f} us/req", flush=True)  # fmt: skip
                for job in ("seqread", "seqwrite"):

                    def seq_cell() -> tuple[float, float, int]:
                        with make() as led:
                            return trio.run(ledger_rate, led, 8, secs, job == "seqwrite", SEQ, True)  # noqa: B023

                    rate, cpu, n = median_run(seq_cell)
                    mbs = rate * SEQ / 1e6
                    rows.append((f"ledger {backend_name} q{nq} qd8", f"1M {job}", mbs, "MB/s"))
                    print(f"{backend_name:4} queues={nq} qd=8   {job:9} {mbs:>12,.0f} MB/s", flush=True)
        pipe_cpu: dict[tuple[str, int], float] = {}
        for backend_name in ("ram", "file"):
            for qd in (32, 128):

                def pipe_cell() -> tuple[float, float, int]:
                    if backend_name == "ram":  # noqa: B023
                        be: RamBackend | FileBackend = RamBackend(size)
                        be.ram.fill(0)
                    else:
                        be = FileBackend(img)
                    with Ledger(be, num_queues=1, device_queues=1) as led:
                        return trio.run(pipelined_rate, led, qd, secs)  # noqa: B023

                rate, cpu, n = median_run(pipe_cell)
                pipe_cpu[(backend_name, qd)] = cpu / n * 1e6
                rows.append((f"ledger {backend_name} q1 qd{qd} x2 in turn", "4K randread", rate, "IOPS"))
                print(f"{backend_name:4} queues=1 qd={qd:<3} two batches in turn {rate:>12,.0f} IOPS "
                      f"cpu {cpu / n * 1e6:6.2f} us/req", flush=True)  # fmt: skip
        rtts = []
        for _ in range(reps):
            with Ledger(FileBackend(img), num_queues=1, device_queues=1) as led:
                rtts.append(trio.run(qd1_rtt, led, secs))
        rtt = float(np.median(rtts))
        for ntasks in (8, 32):
            rates = []
            for _ in range(reps):
                with Ledger(FileBackend(img), num_queues=2, device_queues=2) as led:
                    rates.append(trio.run(tasks_rate, led, ntasks, secs))
            rate = float(np.median(rates))
            rows.append((f"ledger file q2, {ntasks} tasks x read()", "4K randread", rate, "IOPS"))
            print(f"file queues=2 {ntasks} tasks, one read() each {rate:>12,.0f} IOPS", flush=True)
        cold, warm = start_times()
        ratio = results[("file", 2, 32, "randread")] / base_rr  # the default configuration: 2 queues
        base = {
            "4K randread": base_rr,
            "4K randwrite": base_rw,
            "1M seqread": base_sr,
            "1M seqwrite": base_sw,
        }
        table = ["| target | job | result | unit | vs limit |", "|---|---|---:|---|---:|"]
        table += [
            f"| {who} | {job} | {val:,.0f} | {unit} | "
            + ("—" if who.startswith("ledger ram") else f"{val / base[job]:.2f}")  # the limit is a file loop
            + " |"
            for who, job, val, unit in rows
        ]
        best_cpu = min(cpu_per_req, pipe_cpu[("ram", 32)], pipe_cpu[("ram", 128)])
        summary = f"ledger qd32_ratio_vs_pread={ratio:.2f} qd1_rtt_us={rtt:.1f} cpu_us_per_req={best_cpu:.2f}"
        notes = [
            f"QD1 round trip (file, trio, 4 KiB read): {rtt:.1f} us median",
            f"start (import + Ledger.ram + first request): cold {cold:.2f} s (compiling), warm {warm:.2f} s",
            f"CPU per request (RAM, QD32, one batch at a time, both threads, polling included): "
            f"{cpu_per_req:.2f} us",
            f"CPU per request (RAM, two batches of 128 in turn): {pipe_cpu[('ram', 128)]:.2f} us; "
            f"(file, two batches of 128 in turn): {pipe_cpu[('file', 128)]:.2f} us",
        ]
        print()
        print("\n".join(table))
        print()
        print("\n".join(notes))
        print(summary)
        if args.doc:
            write_doc(Path(args.doc), table, notes, summary, size, secs, reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
