"""A hostile driver against the worker kernel, and the kernel against its pure-Python twin.

Hypothesis writes random - mostly malformed - descriptor tables, indirect tables
and available rings into a small guest memory that sits between two guard
zones, then runs the compiled kernel in single-pass mode (so it must return).
Invariants (h11 style: for any input the device completes or refuses, nothing
else):

* no byte outside guest memory changes, and inside it only the used ring and
  the buffers of device-writable descriptors may change;
* without ring corruption every available head gets exactly one used entry;
  with it, DEVICE_NEEDS_RESET is set and a ring diagnostic says why;
* every refused request left exactly one diagnostic naming its head.

The differential test runs :mod:`ledger._device_ref` (the same algorithm,
interpreted) on a copy of the same state and requires identical results:
memory, used ring, status bytes, queue state, interrupt bits and diagnostics.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import _device_kernel as K
from ledger._device_ref import serve_queue_ref
from ledger.diagnostics import RING_CODES, harvest, new_diag_array

_NO_WC = (np.zeros(K.W_HDR, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint8))

BASE = 0x8000_0000
SIZE = 0x10000
GUARD = 0x1000
DESC, AVAIL, USED = 0x0, 0x400, 0x800
TABLES = 0x1000  # 4 indirect tables of 1 KiB
BUFS = 0x2000
CAP = 64
HDR_SLOTS = 32
TYPES = [0, 1, 4, 8, 11, 13, 10, 99]

u64 = st.integers(0, 2**64 - 1)
SPECIAL_ADDRS = [0, BASE - 16, BASE + SIZE, BASE + SIZE - 8, 2**64 - 16, 2**64 - 1, 2**63, BASE - 1]


@st.composite
def descriptor(draw: st.DrawFn, n_main: int) -> tuple[int, int, int, int]:
    flags = draw(st.one_of(st.integers(0, 7), st.sampled_from([1, 3, 2]), st.integers(0, 0xFFFF)))
    if flags & 4 and draw(st.booleans()):
        addr = BASE + TABLES + 1024 * draw(st.integers(0, 3))
        ln = draw(st.one_of(st.sampled_from([16, 32, 48, 64, 128]), st.integers(0, 2**32 - 1)))
    else:
        addr = draw(
            st.one_of(
                st.builds(lambda k, o: BASE + BUFS + 0x100 * k + o, st.integers(0, HDR_SLOTS - 1),
                          st.sampled_from([0, 0, 4, 16])),
                st.builds(lambda k: BASE + BUFS + 16 * k, st.integers(0, (SIZE - BUFS) // 16 - 1)),
                st.sampled_from(SPECIAL_ADDRS),
                u64,
            )
        )
        ln = draw(st.one_of(st.sampled_from([0, 1, 4, 12, 16, 17, 512, 1024, 1025, 4096]),
                            st.integers(0, 64), st.sampled_from([2**32 - 1, 2**31])))
    nxt = draw(st.one_of(st.integers(0, n_main + 1), st.integers(0, 0xFFFF)))
    return addr, ln, flags, nxt


@st.composite
def plausible(draw: st.DrawFn, i: int, n_main: int) -> tuple[int, int, int, int]:
    """Descriptor ``i`` of a plausible 3-descriptor chain (header, data, status), or a random one."""
    if draw(st.integers(0, 9)) == 0:
        return draw(descriptor(n_main))
    role = i % 3
    nxt = (i + 1) % max(n_main, 1)
    if role == 0:
        return BASE + BUFS + 0x100 * draw(st.integers(0, HDR_SLOTS - 1)), 16, 1, nxt
    if role == 1:
        ln = draw(st.sampled_from([16, 512, 1024, 20, 513]))
        addr = BASE + BUFS + 0x2000 + 0x800 * draw(st.integers(0, 8))
        return addr, ln, 1 | draw(st.sampled_from([0, 2])), nxt
    return BASE + BUFS + 0x100 * draw(st.integers(0, HDR_SLOTS - 1)) + 0xF0, 1, 2, 0


@dataclass
class Scenario:
    big: np.ndarray
    p: np.ndarray
    ctl: np.ndarray
    shared: np.ndarray
    diag: np.ndarray
    ram: np.ndarray
    n: int
    heads: list[int]
    broken_expected: bool

    @property
    def mem(self) -> np.ndarray:
        return self.big[GUARD : GUARD + SIZE]

    def copy(self) -> Scenario:
        return Scenario(self.big.copy(), self.p.copy(), self.ctl.copy(), self.shared.copy(), self.diag.copy(),
                        self.ram.copy(), self.n, list(self.heads), self.broken_expected)


@st.composite
def scenario(draw: st.DrawFn) -> Scenario:
    n = draw(st.sampled_from([1, 2, 4, 8, 16]))
    big = np.zeros(SIZE + 2 * GUARD, np.uint8)
    big[:GUARD] = 0xA5
    big[GUARD + SIZE :] = 0x5A
    mem = big[GUARD : GUARD + SIZE]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mem[BUFS:] = rng.integers(0, 256, SIZE - BUFS, dtype=np.uint8)
    for k in range(HDR_SLOTS):  # plausible request headers, some with valid segments after them
        t = draw(st.sampled_from(TYPES))
        sector = draw(st.one_of(st.integers(0, CAP + 2), st.sampled_from([2**63, 2**64 - 1])))
        o = BUFS + 0x100 * k
        mem[o : o + 16] = np.frombuffer(struct.pack("<IIQ", t, 0, sector), np.uint8)
        if draw(st.booleans()):
            seg = struct.pack("<QII", draw(st.integers(0, CAP)), draw(st.integers(0, 4)),
                              draw(st.sampled_from([0, 1, 2])))
            mem[o + 16 : o + 32] = np.frombuffer(seg, np.uint8)

    def put_desc(off: int, d: tuple[int, int, int, int]) -> None:
        mem[off : off + 16] = np.frombuffer(struct.pack("<QIHH", *d), np.uint8)

    style = draw(st.sampled_from(["plausible", "plausible", "indirect", "random"]))
    for i in range(n):
        if style == "plausible":
            put_desc(DESC + 16 * i, draw(plausible(i, n)))
        elif style == "indirect" and draw(st.integers(0, 5)):
            put_desc(DESC + 16 * i, (BASE + TABLES + 1024 * (i % 4), 48, 4, 0))
        else:
            put_desc(DESC + 16 * i, draw(descriptor(n)))
    for t in range(4):
        for i in range(draw(st.integers(0, 8))):
            put_desc(TABLES + 1024 * t + 16 * i, draw(plausible(i, 8)))
    start = draw(st.sampled_from([0, 0xFFFE, 0xFFF0, 7]))
    head = st.integers(0, n - 1)
    if style == "plausible":
        head = st.integers(0, (n - 1) // 3).map(lambda k: 3 * k)
    heads = draw(st.lists(head, min_size=0, max_size=n, unique=True))
    if draw(st.integers(0, 7)) == 0 and heads:  # ring corruption: a wild or duplicated head
        bad = draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from(heads)))
        heads[draw(st.integers(0, len(heads) - 1))] = bad
    for k, h in enumerate(heads):
        o = AVAIL + 4 + 2 * ((start + k) % n)
        mem[o : o + 2] = np.frombuffer(struct.pack("<H", h), np.uint8)
    count = len(heads)
    jump = draw(st.integers(0, 0xFFFF)) if draw(st.integers(0, 9)) == 0 else 0
    aidx = (start + count + jump) & 0xFFFF if jump else (start + count) & 0xFFFF
    mem[AVAIL + 2 : AVAIL + 4] = np.frombuffer(struct.pack("<H", aidx), np.uint8)
    mem[USED + 2 : USED + 4] = np.frombuffer(struct.pack("<H", start), np.uint8)  # as the device left it
    mem[AVAIL : AVAIL + 2] = draw(st.sampled_from([0, 1]))
    used_event = draw(st.integers(0, 0xFFFF))
    mem[AVAIL + 4 + 2 * n : AVAIL + 6 + 2 * n] = np.frombuffer(struct.pack("<H", used_event), np.uint8)

    p = np.zeros(K.P_SIZE, np.int64)
    p[K.P_GBASE], p[K.P_GSIZE], p[K.P_QUEUE], p[K.P_QNUM] = BASE, SIZE, 0, n
    p[K.P_DESC], p[K.P_AVAIL], p[K.P_USED] = BASE + DESC, BASE + AVAIL, BASE + USED
    p[K.P_FLAGS] = draw(st.integers(0, 63)) | (K.K_INDIRECT if style == "indirect" else 0)
    p[K.P_KICK_FD] = p[K.P_CALL_FD] = p[K.P_CONFIG_FD] = p[K.P_IMAGE_FD] = p[K.P_DIRECT_FD] = -1
    p[K.P_CAPACITY] = CAP
    p[K.P_MAX_DISCARD_SECTORS] = p[K.P_MAX_WZ_SECTORS] = 3
    p[K.P_MAX_DISCARD_SEG] = p[K.P_MAX_WZ_SEG] = 1
    p[K.P_ORDER] = draw(st.sampled_from([K.ORDER_FIFO, K.ORDER_REVERSE, K.ORDER_SHUFFLE]))
    p[K.P_SINGLE_PASS] = 1
    p[K.P_INDIRECT_MAX] = 16
    ctl = np.zeros(K.C_SIZE, np.int64)
    ctl[K.C_LAST_AVAIL] = ctl[K.C_USED_IDX] = start
    ctl[K.C_RNG] = draw(st.integers(0, 2**31 - 1))
    ram = np.arange(CAP * 512, dtype=np.int64).astype(np.uint8)
    pending = (aidx - start) & 0xFFFF
    broken = pending > n
    if not broken:  # what the ring really holds (a jump of <= n exposes older entries)
        slots = [AVAIL + 4 + 2 * ((start + k) % n) for k in range(pending)]
        heads = [int(mem[o]) | int(mem[o + 1]) << 8 for o in slots]
    return Scenario(big, p, ctl, np.zeros(2, np.uint32), new_diag_array(256), ram, n, heads, broken)


def run_compiled(s: Scenario) -> int:
    return int(K.serve_queue(s.mem, s.p, s.ctl, s.shared, np.full(1, -1, np.int64), s.diag, s.ram,
                             np.zeros(20, np.uint8), np.zeros(4096, np.uint8), *_NO_WC))


def run_twin(s: Scenario) -> int:
    return int(serve_queue_ref(s.mem, s.p, s.ctl, s.shared, np.full(1, -1, np.int64), s.diag, s.ram,
                               np.zeros(20, np.uint8), np.zeros(4096, np.uint8), *_NO_WC))


def writable_ranges(mem: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Offsets of every device-writable buffer reachable from the main table (and its indirect tables)."""
    out = [(USED, USED + 6 + 8 * n)]

    def scan(table: int, count: int, nested: bool) -> None:
        for i in range(count):
            addr, ln, fl, _ = struct.unpack("<QIHH", mem[table + 16 * i : table + 16 * i + 16].tobytes())
            if fl & 4 and not nested:
                if addr >= BASE and addr - BASE + ln <= SIZE and ln % 16 == 0:
                    scan(addr - BASE, min(ln // 16, (SIZE - (addr - BASE)) // 16), True)
            elif fl & 2 and BASE <= addr <= BASE + SIZE and addr - BASE + ln <= SIZE:
                out.append((addr - BASE, addr - BASE + ln))

    scan(DESC, n, False)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_hostile_driver_invariants(s: Scenario) -> None:
    before = s.big.copy()
    allowed = writable_ranges(before[GUARD : GUARD + SIZE], s.n)
    done = run_compiled(s)
    # 1. memory: guards intact; changes only in the used ring and writable buffers
    assert (s.big[:GUARD] == 0xA5).all()
    assert (s.big[GUARD + SIZE :] == 0x5A).all()
    changed = np.flatnonzero(s.mem != before[GUARD : GUARD + SIZE])
    mask = np.zeros(SIZE, bool)
    for a, b in allowed:
        mask[a:b] = True
    assert mask[changed].all(), f"device wrote outside writable buffers at offsets {changed[~mask[changed]]}"
    diags, _, lost = harvest(s.diag, 0)
    assert lost == 0
    ring = [d for d in diags if d.code in RING_CODES]
    broken = bool(s.shared[0] & 64)
    # 2. completion or NEEDS_RESET
    used_idx = struct.unpack("<H", s.mem[USED + 2 : USED + 4].tobytes())[0]
    start = int(s.ctl[K.C_USED_IDX] - done) & 0xFFFF
    used = [
        struct.unpack("<II", s.mem[USED + 4 + 8 * ((start + k) % s.n) :][:8].tobytes()) for k in range(done)
    ]
    assert used_idx == s.ctl[K.C_USED_IDX]
    if broken:
        assert ring, "NEEDS_RESET without a ring diagnostic"
        assert s.shared[1] & 2
        assert sorted(u[0] for u in used) == sorted(s.heads[:done])
    else:
        assert not ring
        assert not s.broken_expected
        assert done == len(s.heads)
        assert sorted(u[0] for u in used) == sorted(s.heads)
    # 3. one diagnostic per refused request, naming its head
    refusals = [d for d in diags if d.code not in RING_CODES]
    assert len(refusals) == s.ctl[K.C_ERRORS]
    for head, ln in used:
        if ln == 0:
            assert any(d.head == head for d in refusals)
    for d in refusals:
        assert d.message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_kernel_matches_python_twin(s: Scenario) -> None:
    t = s.copy()
    assert run_compiled(s) == run_twin(t)
    assert np.array_equal(s.big, t.big)
    assert np.array_equal(s.ctl, t.ctl)
    assert np.array_equal(s.shared, t.shared)
    assert np.array_equal(s.diag, t.diag)
    assert np.array_equal(s.ram, t.ram)


def test_the_twin_replaces_every_native_call_of_the_kernel() -> None:
    """Every libc function and intrinsic the kernel module binds has an interpreted stand-in, so the
    twin can run every path of the kernel (a new one without it would fail only when reached)."""
    from numba import types as nbtypes

    from ledger import _device_kernel, _native
    from ledger._device_ref import INTRINSICS

    native = {name for name, obj in vars(_native).items() if isinstance(obj, nbtypes.ExternalFunction)}
    used = native & set(vars(_device_kernel))
    assert "c_sync_file_range" in used and "c_pwrite" in used
    assert used <= set(INTRINSICS), sorted(used - set(INTRINSICS))
