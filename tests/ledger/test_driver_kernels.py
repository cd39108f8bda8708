"""The driver's Numba kernels against their pure-Python twins, on random traffic.

The test plays the device: it reads the chains the driver published, completes
a random subset of them in random order with random statuses (writing used
entries exactly as a device would), and lets both implementations harvest.
Memory and driver state must stay identical, and the chains must say what the
requests said.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import _driver_kernels as K
from ledger import _driver_ref as R
from ledger.driver import QueueState
from ledger.memory import GuestAllocator, GuestMemory

SEG = 4096


def make(n: int, indirect: bool, event_idx: bool, max_segs: int = 4) -> tuple[GuestMemory, QueueState, int]:
    mem = GuestMemory(1 << 20)
    alloc = GuestAllocator(mem)
    qs = QueueState.layout(
        mem, alloc, n, indirect=indirect, event_idx=event_idx, seg_bytes=SEG, max_segs=max_segs
    )
    data = alloc.alloc(64 * SEG, 4096)
    return mem, qs, data


def clone(qs: QueueState) -> QueueState:
    return QueueState(
        qs.desc_gpa,
        qs.avail_gpa,
        qs.used_gpa,
        qs.q.copy(),
        qs.free_next.copy(),
        qs.chain_next.copy(),
        qs.head_ndesc.copy(),
        qs.head_group.copy(),
        qs.head_gidx.copy(),
        qs.kick_buf.copy(),
    )


def state_arrays(qs: QueueState) -> list[np.ndarray]:
    return [qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx]


def walk_chain(mem: GuestMemory, qs: QueueState, head: int) -> list[tuple[int, int, int]]:
    """Follow a published chain the way a device does; return (addr, len, flags)."""
    n = int(qs.q[K.Q_N])
    a = mem.array
    d0 = mem.offset(qs.desc_gpa, 16 * n)

    def desc(off: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", a[off : off + 16].tobytes())

    addr, ln, flags, nxt = desc(d0 + 16 * head)
    out = []
    if flags & 4:
        base = mem.offset(addr, ln)
        i = 0
        while True:
            addr2, ln2, fl2, nxt2 = desc(base + 16 * i)
            out.append((addr2, ln2, fl2))
            if not fl2 & 1:
                return out
            i = nxt2
    while True:
        out.append((addr, ln, flags))
        if not flags & 1:
            return out
        addr, ln, flags, nxt = desc(d0 + 16 * nxt)


requests = st.lists(
    st.tuples(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 1 << 40), st.integers(0, 20)),
    min_size=1,
    max_size=40,
)


@given(
    n=st.sampled_from([4, 8, 16, 64]),
    indirect=st.booleans(),
    event_idx=st.booleans(),
    rounds=st.lists(st.tuples(requests, st.randoms(use_true_random=False)), min_size=1, max_size=6),
    start_idx=st.sampled_from([0, 0xFFF0, 0xFFFE]),
)
def test_kernels_match_twins(n, indirect, event_idx, rounds, start_idx) -> None:
    mem, qs, data = make(n, indirect, event_idx)
    mem2 = GuestMemory(mem.size)
    # Start the indices near the 16-bit wrap, as a long-running queue would be.
    for s in (qs,):
        s.q[K.Q_AVAIL_IDX] = s.q[K.Q_KICK_IDX] = s.q[K.Q_LAST_USED] = start_idx
    a = mem.array
    struct.pack_into("<H", a, mem.offset(qs.avail_gpa + 2, 2), start_idx)
    struct.pack_into("<H", a, mem.offset(qs.used_gpa + 2, 2), start_idx)
    mem2.array[:] = a
    ref = clone(qs)
    ngroups = 256
    grp = [
        np.zeros(ngroups, np.int32),
        np.zeros(ngroups, np.int32),
        np.zeros(ngroups, np.int32),
        np.zeros(ngroups, np.int64),
    ]
    grp_ref = [g.copy() for g in grp]
    out, out_ref = np.zeros(n, np.int32), np.zeros(n, np.int32)
    inflight: dict[int, tuple[int, int, int]] = {}  # head -> (type, sector, nbytes)
    used_idx = start_idx
    next_group = 0
    for reqs, rnd in rounds:
        k = len(reqs)
        rtype = np.array([r[0] for r in reqs], np.uint32)
        sector = np.array([r[1] for r in reqs], np.uint64)
        nbytes = np.array(
            [0 if r[0] == 4 else (20 if r[0] == 8 else 512 * r[2] + 512) for r in reqs], np.int64
        )
        buf = np.full(k, data, np.uint64)
        group = np.array([(next_group + i // 3) % ngroups for i in range(k)], np.int32)
        next_group = (next_group + k) % ngroups
        for g in set(group.tolist()):
            cnt = int((group == g).sum())
            grp[0][g] = grp_ref[0][g] = cnt
        gidx = np.arange(k, dtype=np.int32)
        before_heads = set(np.nonzero(qs.head_ndesc)[0].tolist())
        got = K.submit_requests(
            a,
            qs.q,
            qs.free_next,
            qs.chain_next,
            qs.head_ndesc,
            qs.head_group,
            qs.head_gidx,
            rtype,
            sector,
            buf,
            nbytes,
            group,
            gidx,
            0,
            k,
            -1,
            qs.kick_buf,
        )
        got_ref = R.submit_requests(
            mem2.array,
            ref.q,
            ref.free_next,
            ref.chain_next,
            ref.head_ndesc,
            ref.head_group,
            ref.head_gidx,
            rtype,
            sector,
            buf,
            nbytes,
            group,
            gidx,
            0,
            k,
            -1,
            ref.kick_buf,
        )
        assert got == got_ref
        np.testing.assert_array_equal(a, mem2.array)
        for x, y in zip(state_arrays(qs), state_arrays(ref), strict=True):
            np.testing.assert_array_equal(x, y)
        # Every newly published chain says what its request said.
        new_heads = sorted(set(np.nonzero(qs.head_ndesc)[0].tolist()) - before_heads)
        assert len(new_heads) == got
        for h in new_heads:
            r = int(qs.head_gidx[h])
            chain = walk_chain(mem, qs, h)
            hdr_addr, hdr_len, hdr_flags = chain[0]
            assert hdr_len == 16 and not hdr_flags & 2
            t, _, sec = struct.unpack("<IIQ", mem.read(hdr_addr, 16))
            assert (t, sec) == (int(rtype[r]), int(sector[r]))
            _, st_len, st_flags = chain[-1]
            assert st_len == 1 and st_flags & 2
            assert sum(ln for _, ln, _ in chain[1:-1]) == nbytes[r]
            writable = t in (0, 8)
            assert all(bool(fl & 2) == writable for _, _, fl in chain[1:-1])
            inflight[h] = (t, sec, int(nbytes[r]))
        # Play the device: complete a random subset, out of order.
        heads = list(inflight)
        rnd.shuffle(heads)
        done = heads[: rnd.randint(0, len(heads))]
        for h in done:
            status = rnd.choice([0, 0, 0, 1, 2])
            a[int(qs.q[K.Q_STATUS_OFF]) + h] = status
            slot = mem.offset(qs.used_gpa, 1) + 4 + 8 * (used_idx % n)
            struct.pack_into("<II", a, slot, h, rnd.randint(0, 5000))
            used_idx = (used_idx + 1) & 0xFFFF
            del inflight[h]
        struct.pack_into("<H", a, mem.offset(qs.used_gpa + 2, 2), used_idx)
        mem2.array[:] = a
        got = K.harvest(
            a, qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx, *grp, out
        )
        got_ref = R.harvest(
            mem2.array,
            ref.q,
            ref.free_next,
            ref.chain_next,
            ref.head_ndesc,
            ref.head_group,
            ref.head_gidx,
            *grp_ref,
            out_ref,
        )
        assert got == got_ref >= 0
        assert sorted(out[:got].tolist()) == sorted(out_ref[:got].tolist())
        for x, y in zip(state_arrays(qs) + grp, state_arrays(ref) + grp_ref, strict=True):
            np.testing.assert_array_equal(x, y)
        for enable in (True, False):
            assert K.set_interrupts(a, qs.q, enable) == R.set_interrupts(mem2.array, ref.q, enable)
            np.testing.assert_array_equal(a, mem2.array)
        # Descriptors are conserved: free + in flight = queue size.
        assert qs.q[K.Q_NUM_FREE] + qs.head_ndesc.sum() == n
        assert qs.q[K.Q_INFLIGHT] == len(inflight)


def submit_one_read(mem: GuestMemory, qs: QueueState, data: int, nbytes: int) -> int:
    """Publish one IN request of ``nbytes`` into ``data`` (group 0); return how many went (0 or 1)."""
    return int(K.submit_requests(
        mem.array, qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx,
        np.zeros(1, np.uint32), np.zeros(1, np.uint64), np.full(1, data, np.uint64),
        np.full(1, nbytes, np.int64), np.zeros(1, np.int32), np.zeros(1, np.int32), 0, 1, -1, qs.kick_buf,
    ))  # fmt: skip


def harvest_into(mem: GuestMemory, qs: QueueState, grp: list[np.ndarray], out: np.ndarray) -> int:
    return int(K.harvest(
        mem.array, qs.q, qs.free_next, qs.chain_next, qs.head_ndesc, qs.head_group, qs.head_gidx, *grp, out
    ))  # fmt: skip


@pytest.mark.parametrize("bad", ["range", "not_head", "jump"])
def test_harvest_refuses_a_lying_device(bad: str) -> None:
    mem, qs, data = make(8, True, True)
    a = mem.array
    one = np.ones(1, np.int32)
    sub = submit_one_read(mem, qs, data, 512)
    assert sub == 1
    used = mem.offset(qs.used_gpa, 1)
    head = int(np.nonzero(qs.head_ndesc)[0][0])
    if bad == "range":
        struct.pack_into("<IIH", a, used + 4, 99, 0, 0)
        struct.pack_into("<H", a, used + 2, 1)
    elif bad == "not_head":
        struct.pack_into("<II", a, used + 4, (head + 1) % 8, 0)
        struct.pack_into("<H", a, used + 2, 1)
    else:
        struct.pack_into("<H", a, used + 2, 5)
    grp = [one.copy(), np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int64)]
    got = harvest_into(mem, qs, grp, np.zeros(8, np.int32))
    assert got == -1
    expected = {"range": K.E_USED_ID_RANGE, "not_head": K.E_USED_NOT_HEAD, "jump": K.E_USED_IDX_JUMP}[bad]
    assert qs.q[K.Q_ERROR] == expected
    # The request is still in flight: nothing was freed on the device's word.
    assert qs.q[K.Q_INFLIGHT] == 1 and qs.head_ndesc[head] == 1


def test_missing_status_byte_is_an_error_not_success() -> None:
    mem, qs, data = make(8, False, False)
    a = mem.array
    assert submit_one_read(mem, qs, data, 4096) == 1
    head = int(np.nonzero(qs.head_ndesc)[0][0])
    used = mem.offset(qs.used_gpa, 1)
    struct.pack_into("<II", a, used + 4, head, 4097)
    struct.pack_into("<H", a, used + 2, 1)
    grp = [np.ones(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int64)]
    out = np.zeros(8, np.int32)
    got = harvest_into(mem, qs, grp, out)
    assert got == 1 and out[0] == 0
    assert grp[1][0] == 1  # IOERR recorded for the group
    assert qs.q[K.Q_ERROR] == K.E_NO_STATUS
    assert qs.q[K.Q_NUM_FREE] == 8  # the chain (3 descriptors) went back to the free list
