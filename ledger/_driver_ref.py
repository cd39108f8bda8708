"""Pure-Python twins of ``ledger._driver_kernels``, for differential tests.

Each function here does what its Numba namesake does, statement for statement
where the order of memory effects matters, but with plain Python integers and
``struct``-free byte arithmetic.  Tests run both on copies of the same state and
require identical memory and state afterwards.  The twins never spin and never
write eventfds: ``kick`` decisions are returned through ``q[Q_KICKS]`` alone.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ._driver_kernels import (
    E_NO_STATUS,
    E_USED_ID_RANGE,
    E_USED_IDX_JUMP,
    E_USED_NOT_HEAD,
    F_EVENT_IDX,
    F_INDIRECT,
    Q_AVAIL,
    Q_AVAIL_IDX,
    Q_COMPLETED,
    Q_DESC,
    Q_ERROR,
    Q_ERROR_ARG,
    Q_FLAGS,
    Q_FREE_HEAD,
    Q_HDR_GPA,
    Q_HDR_OFF,
    Q_IND_GPA,
    Q_IND_OFF,
    Q_IND_STRIDE,
    Q_INFLIGHT,
    Q_INTR_ENABLED,
    Q_KICK_IDX,
    Q_KICKS,
    Q_LAST_USED,
    Q_N,
    Q_NUM_FREE,
    Q_SEG_BYTES,
    Q_STATUS_GPA,
    Q_STATUS_OFF,
    Q_SUBMITTED,
    Q_USED,
    STATUS_UNSET,
)

Arr = npt.NDArray[np.int64]
Mem = npt.NDArray[np.uint8]


def _put(mem: Mem, off: int, value: int, size: int) -> None:
    mem[off : off + size] = np.frombuffer(int(value).to_bytes(size, "little"), dtype=np.uint8)


def _get(mem: Mem, off: int, size: int) -> int:
    return int.from_bytes(mem[off : off + size].tobytes(), "little")


def _need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def _put_desc(mem: Mem, off: int, addr: int, length: int, flags: int, nxt: int) -> None:
    _put(mem, off, addr, 8)
    _put(mem, off + 8, length, 4)
    _put(mem, off + 12, flags, 2)
    _put(mem, off + 14, nxt & 0xFFFF, 2)


def submit_requests(
    mem: Mem,
    q: Arr,
    free_next: npt.NDArray[np.int32],
    chain_next: npt.NDArray[np.int32],
    head_ndesc: npt.NDArray[np.int32],
    head_group: npt.NDArray[np.int32],
    head_gidx: npt.NDArray[np.int32],
    rtype: npt.NDArray[np.uint32],
    sector: npt.NDArray[np.uint64],
    buf: npt.NDArray[np.uint64],
    nbytes: npt.NDArray[np.int64],
    group: npt.NDArray[np.int32],
    gidx: npt.NDArray[np.int32],
    start: int,
    count: int,
    kick_fd: int,
    kick_buf: Mem,
) -> int:
    n = int(q[Q_N])
    indirect = bool(q[Q_FLAGS] & F_INDIRECT)
    seg_bytes = int(q[Q_SEG_BYTES])
    avail_idx = int(q[Q_AVAIL_IDX])
    done = 0
    for r in range(start, start + count):
        length = int(nbytes[r])
        nseg = -(-length // seg_bytes)
        need = 1 if indirect else nseg + 2
        if q[Q_NUM_FREE] < need:
            break
        t = int(rtype[r])
        data_flags = 2 if t in (0, 8) else 0
        head = int(q[Q_FREE_HEAD])
        taken = [head]
        for _ in range(need - 1):
            taken.append(int(free_next[taken[-1]]))
        q[Q_FREE_HEAD] = free_next[taken[-1]]
        q[Q_NUM_FREE] -= need
        hdr_off = int(q[Q_HDR_OFF]) + 16 * head
        _put(mem, hdr_off, t, 4)
        _put(mem, hdr_off + 4, 0, 4)
        _put(mem, hdr_off + 8, int(sector[r]), 8)
        mem[int(q[Q_STATUS_OFF]) + head] = STATUS_UNSET
        hdr_gpa = int(q[Q_HDR_GPA]) + 16 * head
        status_gpa = int(q[Q_STATUS_GPA]) + head
        segs = [(int(buf[r]) + k * seg_bytes, min(seg_bytes, length - k * seg_bytes)) for k in range(nseg)]
        if indirect:
            stride = int(q[Q_IND_STRIDE])
            tbl = int(q[Q_IND_OFF]) + 16 * stride * head
            _put_desc(mem, tbl, hdr_gpa, 16, 1, 1)
            for k, (a, ln) in enumerate(segs):
                _put_desc(mem, tbl + 16 * (k + 1), a, ln, data_flags | 1, k + 2)
            _put_desc(mem, tbl + 16 * (nseg + 1), status_gpa, 1, 2, 0)
            _put_desc(
                mem, int(q[Q_DESC]) + 16 * head, int(q[Q_IND_GPA]) + 16 * stride * head, 16 * (nseg + 2), 4, 0
            )
            chain_next[head] = -1
        else:
            desc = int(q[Q_DESC])
            for k, d in enumerate(taken):
                nxt = taken[k + 1] if k < need - 1 else -1
                if k == 0:
                    _put_desc(mem, desc + 16 * d, hdr_gpa, 16, 1, nxt)
                elif k == need - 1:
                    _put_desc(mem, desc + 16 * d, status_gpa, 1, 2, 0)
                else:
                    a, ln = segs[k - 1]
                    _put_desc(mem, desc + 16 * d, a, ln, data_flags | 1, nxt)
                chain_next[d] = nxt
        head_ndesc[head] = need
        head_group[head] = group[r]
        head_gidx[head] = gidx[r]
        _put(mem, int(q[Q_AVAIL]) + 4 + 2 * (avail_idx % n), head, 2)
        avail_idx = (avail_idx + 1) & 0xFFFF
        done += 1
    if done == 0:
        return 0
    q[Q_AVAIL_IDX] = avail_idx
    q[Q_INFLIGHT] += done
    q[Q_SUBMITTED] += done
    _put(mem, int(q[Q_AVAIL]) + 2, avail_idx, 2)
    old = int(q[Q_KICK_IDX])
    if q[Q_FLAGS] & F_EVENT_IDX:
        kick = _need_event(_get(mem, int(q[Q_USED]) + 4 + 8 * n, 2), avail_idx, old)
    else:
        kick = _get(mem, int(q[Q_USED]), 2) & 1 == 0
    q[Q_KICK_IDX] = avail_idx
    if kick:  # counted with or without a kick fd: without one the caller writes QueueNotify
        q[Q_KICKS] += 1
    return done


def harvest(
    mem: Mem,
    q: Arr,
    free_next: npt.NDArray[np.int32],
    chain_next: npt.NDArray[np.int32],
    head_ndesc: npt.NDArray[np.int32],
    head_group: npt.NDArray[np.int32],
    head_gidx: npt.NDArray[np.int32],
    grp_remaining: npt.NDArray[np.int32],
    grp_err_status: npt.NDArray[np.int32],
    grp_err_idx: npt.NDArray[np.int32],
    grp_bytes: npt.NDArray[np.int64],
    out_groups: npt.NDArray[np.int32],
) -> int:
    n = int(q[Q_N])
    used = int(q[Q_USED])
    last = int(q[Q_LAST_USED])
    used_idx = _get(mem, used + 2, 2)
    pending = (used_idx - last) & 0xFFFF
    if pending > q[Q_INFLIGHT]:
        q[Q_ERROR] = E_USED_IDX_JUMP
        q[Q_ERROR_ARG] = used_idx
        return -1
    nout = 0
    for _ in range(pending):
        e = used + 4 + 8 * (last % n)
        hid = _get(mem, e, 4)
        ln = _get(mem, e + 4, 4)
        if hid >= n:
            q[Q_ERROR], q[Q_ERROR_ARG] = E_USED_ID_RANGE, hid
            break
        if head_ndesc[hid] == 0:
            q[Q_ERROR], q[Q_ERROR_ARG] = E_USED_NOT_HEAD, hid
            break
        st = int(mem[int(q[Q_STATUS_OFF]) + hid])
        if st == STATUS_UNSET:
            if q[Q_ERROR] == 0:
                q[Q_ERROR], q[Q_ERROR_ARG] = E_NO_STATUS, hid
            st = 1
        nd = int(head_ndesc[hid])
        d = hid
        for _k in range(nd - 1):
            d = int(chain_next[d])
        free_next[d] = q[Q_FREE_HEAD]
        q[Q_FREE_HEAD] = hid
        q[Q_NUM_FREE] += nd
        head_ndesc[hid] = 0
        g = int(head_group[hid])
        if st != 0 and (grp_err_status[g] == 0 or head_gidx[hid] < grp_err_idx[g]):
            grp_err_status[g] = st
            grp_err_idx[g] = head_gidx[hid]
        grp_bytes[g] += ln
        grp_remaining[g] -= 1
        if grp_remaining[g] == 0:
            out_groups[nout] = g
            nout += 1
        last = (last + 1) & 0xFFFF
        q[Q_INFLIGHT] -= 1
        q[Q_COMPLETED] += 1
    q[Q_LAST_USED] = last
    if q[Q_ERROR] not in (0, E_NO_STATUS):
        return -1
    return nout


def set_interrupts(mem: Mem, q: Arr, enable: bool) -> bool:
    n = int(q[Q_N])
    avail = int(q[Q_AVAIL])
    last = int(q[Q_LAST_USED])
    if q[Q_FLAGS] & F_EVENT_IDX:
        if enable:
            _put(mem, avail + 4 + 2 * n, last, 2)
    else:
        flags = _get(mem, avail, 2) & 0xFFFE
        _put(mem, avail, flags if enable else flags | 1, 2)
    q[Q_INTR_ENABLED] = 1 if enable else 0
    if not enable:
        return False
    return _get(mem, int(q[Q_USED]) + 2, 2) != last
