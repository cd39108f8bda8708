"""Allocator tuning: 1 MiB buffers are reused from the heap instead of faulted in as fresh mmaps."""

from __future__ import annotations

import subprocess
import sys

# 100 vectored reads of two 1 MiB ranges through the ledger (RAM disk; several large buffers alive
# at once, as in the daemon), counting minor page faults.
_PROBE = r"""
import resource, sys
from sovfs._malloc import tune_malloc
from ledger import Ledger
if sys.argv[1] == "1":
    assert tune_malloc()
led = Ledger.ram(64 << 20)
blk = led.sync()
for i in range(5):
    blk.readv([(0, 2048), (4096, 2048)])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(100):
    blk.readv([((i % 30) * 2048, 2048), ((i % 30 + 30) * 2048, 2048)])
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
led.close()
"""


def _faults(tuned: bool) -> int:
    argv = [sys.executable, "-c", _PROBE, "1" if tuned else "0"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_tuned_allocator_reuses_large_buffers() -> None:
    # Untuned (measured): ~1,000 faults per call, i.e. 4 MiB of fresh zeroed pages for every
    # 2 MiB read.  Tuned: a few hundred faults in all.
    untuned, tuned = _faults(False), _faults(True)
    assert untuned > 100 * 200
    assert tuned < untuned / 20
