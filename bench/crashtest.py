"""Crash-consistency run: ``python bench/crashtest.py --points N --seed S`` (or ``--replay SEED:POINT``).

Each point runs the sovfs.crashtest workload on the power-cut simulator, cuts the power at a seeded
request, applies a seeded loss pattern, then mounts (replay), checks the oracle and runs fsck -n.
Failures print their id; the last line is ``crashtest points=<n> violations=<v> fsck_errors=<f>``.
Exit status: 0 clean, 1 violations or fsck errors, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import time

from sovfs.crashtest import PointResult, Simulator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first", type=int, default=0, help="first point number")
    ap.add_argument("--replay", metavar="SEED:POINT", help="run one point and describe it")
    a = ap.parse_args(argv)
    sim = Simulator()
    t0 = time.perf_counter()
    n = v = f = 0

    def show(r: PointResult) -> None:
        print(f"FAIL {r.id}: ops {r.ops}, cut after {r.requests} requests, {r.loss}; "
              f"replayed {r.replayed}", flush=True)
        for x in r.violations:
            print(f"  violation: {x}")
        for x in r.fsck_errors:
            print(f"  fsck: {x}")

    try:
        if a.replay:
            try:
                seed, point = (int(x) for x in a.replay.split(":"))
            except ValueError:
                print(f"crashtest: bad id {a.replay!r} (want SEED:POINT)", file=sys.stderr)
                return 2
            points = [(seed, point)]
        else:
            points = [(a.seed, p) for p in range(a.first, a.first + a.points)]
        for seed, p in points:
            r = sim.point(seed, p)
            n += 1
            v += len(r.violations)
            f += len(r.fsck_errors)
            if not r.ok:
                show(r)
            elif a.replay:
                print(f"ok {r.id}: ops {r.ops}, cut after {r.requests} requests, {r.loss}; "
                      f"replayed {r.replayed}")
            if n % 1000 == 0:
                print(f"... {n} points, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        sim.close()
    print(f"time {time.perf_counter() - t0:.1f} s")
    print(f"crashtest points={n} violations={v} fsck_errors={f}")
    return 1 if v or f else 0


if __name__ == "__main__":
    sys.exit(main())
