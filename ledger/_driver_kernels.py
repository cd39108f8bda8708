"""Numba batch kernels of the driver side of a split virtqueue.

Theory of operation
-------------------
The driver owns the descriptor table and the available ring; the device owns
the used ring.  Three kernels move requests through them, each called once per
*batch*, never once per request, so that Python's per-call cost (~150 ns) and
the fences are paid per batch:

``submit_requests``
    Takes a slice of a request batch (parallel arrays: type, sector, buffer
    GPA, byte count, group, index in group), builds one chain per request —
    an indirect table when VIRTIO_RING_F_INDIRECT_DESC was negotiated, a
    direct chain from the free list otherwise — writes the request headers,
    publishes all heads with one release store of ``avail->idx``, then does
    the full fence and the kick decision (EVENT_IDX's ``avail_event`` or the
    ``NO_NOTIFY`` flag) and writes the kick eventfd at most once.  Returns how
    many requests fit; the caller waits for free descriptors for the rest.

``harvest``
    Consumes used entries (acquire load of ``used->idx``), checks each id is a
    head we have in flight (a device that lies is reported, never trusted),
    returns descriptors to the free list, and accounts completions per
    *group*: a group is one caller-visible operation (one ``read()``, or one
    whole batch), so Python wakes one waiter per group, not one per request.

``enable_interrupts`` / ``poll_used``
    Re-arm completion interrupts (write ``used_event`` or clear
    ``VIRTQ_AVAIL_F_NO_INTERRUPT``), full fence, re-check — the driver half of
    the lost-wakeup protocol — and spin on ``used->idx`` for a bounded time.

Driver-private state lives in numpy arrays that only these kernels and
``ledger.driver`` touch: the queue state vector ``q`` (indices ``Q_*``), the
free list ``free_next`` and per-head bookkeeping.  Nothing the device writes is
used to find our own descriptors: chain links are kept in a private copy, as
Linux keeps ``desc_extra``.  Every kernel has a pure-Python twin in
``ledger._driver_ref`` and a test checks that they agree.

Barriers (x86-64 notes in brackets; see docs/LEDGER.md):
  * descriptors, headers, ring slots -> store_release(avail->idx)   [compiler barrier]
  * store(avail->idx) -> load(avail_event / used->flags): fence_seq_cst   [mfence]
  * load_acquire(used->idx) -> read used elems and status bytes      [compiler barrier]
  * store(used_event) -> re-load(used->idx): fence_seq_cst           [mfence]
"""

from __future__ import annotations

import numba
import numpy as np

from ._native import (
    address_of,
    c_sched_yield,
    c_write,
    fence_seq_cst,
    load_acquire_u16,
    monotonic_ns,
    store_release_u16,
    table_array,
)

# --- queue state vector layout (int64 array) -----------------------------------
Q_N = 0  # queue size (power of two)
Q_DESC = 1  # offset of the descriptor table in the guest-memory array
Q_AVAIL = 2  # offset of the available ring
Q_USED = 3  # offset of the used ring
Q_HDR_OFF = 4  # per-head request headers: 16 bytes each, offset ...
Q_HDR_GPA = 5  # ... and guest-physical address
Q_STATUS_OFF = 6  # per-head status bytes
Q_STATUS_GPA = 7
Q_IND_OFF = 8  # per-head indirect tables, Q_IND_STRIDE entries each
Q_IND_GPA = 9
Q_IND_STRIDE = 10
Q_FLAGS = 11  # F_INDIRECT | F_EVENT_IDX
Q_SEG_BYTES = 12  # largest data segment (SIZE_MAX), bytes
Q_FREE_HEAD = 13  # first free descriptor, or -1
Q_NUM_FREE = 14
Q_AVAIL_IDX = 15  # our shadow of avail->idx (u16)
Q_KICK_IDX = 16  # avail idx at the last kick decision (u16)
Q_LAST_USED = 17  # next used idx to consume (u16)
Q_INFLIGHT = 18  # requests published and not yet harvested
Q_ERROR = 19  # first device misbehaviour seen (E_* code), 0 if none
Q_ERROR_ARG = 20  # the offending value
Q_KICKS = 21  # kick decisions (statistics); each was written to the kick fd when there is one
Q_SUBMITTED = 22  # requests submitted (statistics)
Q_COMPLETED = 23  # requests completed (statistics)
Q_INTR_ENABLED = 24  # 1 while completion interrupts are armed
Q_SEG_MAX = 25  # most data segments per request
Q_STATE_LEN = 32

F_INDIRECT = 1
F_EVENT_IDX = 2

# --- device-misbehaviour codes reported through q[Q_ERROR] ----------------------
E_USED_ID_RANGE = 1  # used id >= queue size
E_USED_NOT_HEAD = 2  # used id is not a head in flight
E_USED_IDX_JUMP = 3  # used idx moved by more than the requests in flight
E_NO_STATUS = 4  # device completed a request without writing its status byte

# --- what a trapped run returns (ledger._trap_kernel.run_trapped; Engine.run_trapped reads them)
RT_DEVICE_ERROR = -1  # the harvest found the device breaking the protocol (q[Q_ERROR])
RT_NOTIFY = -2  # published; the device may not serve now: write QueueNotify through the registers
RT_NO_ROOM = -3  # nothing published: no free descriptors
RT_NO_KICK = -4  # published; the device asked for no notification

STATUS_UNSET = 0xFF  # sentinel written before submission: a real status is 0, 1 or 2

NEXT = np.uint16(1)
WRITE = np.uint16(2)
INDIRECT = np.uint16(4)

# request types whose data buffers the device writes into
_T_IN = 0
_T_GET_ID = 8


@numba.njit(cache=True, nogil=True, inline="always")
def _put_desc(mem, off, addr, length, flags, nxt):  # type: ignore[no-untyped-def]
    """Write one 16-byte descriptor at mem[off] (little-endian, as the spec says)."""
    for i in range(8):
        mem[off + i] = (addr >> (8 * i)) & 0xFF
    for i in range(4):
        mem[off + 8 + i] = (length >> (8 * i)) & 0xFF
    mem[off + 12] = flags & 0xFF
    mem[off + 13] = (flags >> 8) & 0xFF
    mem[off + 14] = nxt & 0xFF
    mem[off + 15] = (nxt >> 8) & 0xFF


@numba.njit(cache=True, nogil=True, inline="always")
def _put_u16(mem, off, v):  # type: ignore[no-untyped-def]
    mem[off] = v & 0xFF
    mem[off + 1] = (v >> 8) & 0xFF


@numba.njit(cache=True, nogil=True, inline="always")
def _get_u32(mem, off):  # type: ignore[no-untyped-def]
    return (
        np.int64(mem[off])
        | (np.int64(mem[off + 1]) << 8)
        | (np.int64(mem[off + 2]) << 16)
        | (np.int64(mem[off + 3]) << 24)
    )


@numba.njit(cache=True, nogil=True, inline="always")
def _need_event(event_idx, new_idx, old_idx):  # type: ignore[no-untyped-def]
    """§2.7.10 vring_need_event on 16-bit indices."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@numba.njit(cache=True, nogil=True)
def submit_requests(  # type: ignore[no-untyped-def]
    mem,
    q,
    free_next,
    chain_next,
    head_ndesc,
    head_group,
    head_gidx,
    rtype,
    sector,
    buf,
    nbytes,
    group,
    gidx,
    start,
    count,
    kick_fd,
    kick_buf,
):
    """Publish requests ``start .. start+count-1`` of a batch; return how many fit.

    Buffers (``buf[i]``, ``nbytes[i]``) are guest-physical and were checked by
    the caller; ``nbytes[i]`` is already within ``Q_SEG_MAX * Q_SEG_BYTES``.
    """
    n = q[Q_N]
    desc = q[Q_DESC]
    avail = q[Q_AVAIL]
    indirect = (q[Q_FLAGS] & F_INDIRECT) != 0
    seg_bytes = q[Q_SEG_BYTES]
    avail_idx = q[Q_AVAIL_IDX]
    done = 0
    for r in range(start, start + count):
        length = nbytes[r]
        nseg = (length + seg_bytes - 1) // seg_bytes
        need = 1 if indirect else nseg + 2
        if q[Q_NUM_FREE] < need:
            break
        t = rtype[r]
        dev_writes = t in (_T_IN, _T_GET_ID)
        # Take `need` descriptors off the free list; the first is the head.
        head = q[Q_FREE_HEAD]
        d = head
        for _ in range(need - 1):
            d = free_next[d]
        q[Q_FREE_HEAD] = free_next[d]
        q[Q_NUM_FREE] -= need
        # The request header and the status sentinel live in per-head slots.
        hdr_off = q[Q_HDR_OFF] + 16 * head
        for i in range(4):
            mem[hdr_off + i] = (t >> (8 * i)) & 0xFF
            mem[hdr_off + 4 + i] = 0
        s = sector[r]
        for i in range(8):
            mem[hdr_off + 8 + i] = (s >> (8 * i)) & 0xFF
        mem[q[Q_STATUS_OFF] + head] = STATUS_UNSET
        hdr_gpa = q[Q_HDR_GPA] + 16 * head
        status_gpa = q[Q_STATUS_GPA] + head
        data_flags = WRITE if dev_writes else np.uint16(0)
        if indirect:
            stride = q[Q_IND_STRIDE]
            tbl_off = q[Q_IND_OFF] + 16 * stride * head
            _put_desc(mem, tbl_off, hdr_gpa, 16, NEXT, 1)
            for k in range(nseg):
                seg_len = min(seg_bytes, length - k * seg_bytes)
                _put_desc(
                    mem, tbl_off + 16 * (k + 1), buf[r] + k * seg_bytes, seg_len, data_flags | NEXT, k + 2
                )
            _put_desc(mem, tbl_off + 16 * (nseg + 1), status_gpa, 1, WRITE, 0)
            _put_desc(mem, desc + 16 * head, q[Q_IND_GPA] + 16 * stride * head, 16 * (nseg + 2), INDIRECT, 0)
            chain_next[head] = -1
        else:
            d = head
            for k in range(need):
                nxt = free_next[d] if k < need - 1 else -1
                if k == 0:
                    _put_desc(mem, desc + 16 * d, hdr_gpa, 16, NEXT, nxt)
                elif k == need - 1:
                    _put_desc(mem, desc + 16 * d, status_gpa, 1, WRITE, 0)
                else:
                    seg = k - 1
                    seg_len = min(seg_bytes, length - seg * seg_bytes)
                    _put_desc(mem, desc + 16 * d, buf[r] + seg * seg_bytes, seg_len, data_flags | NEXT, nxt)
                chain_next[d] = nxt
                d = nxt
        head_ndesc[head] = need
        head_group[head] = group[r]
        head_gidx[head] = gidx[r]
        _put_u16(mem, avail + 4 + 2 * (avail_idx % n), head)
        avail_idx = (avail_idx + 1) & 0xFFFF
        done += 1
    if done == 0:
        return 0
    q[Q_AVAIL_IDX] = avail_idx
    q[Q_INFLIGHT] += done
    q[Q_SUBMITTED] += done
    # Descriptors, headers and ring slots above are ordinary stores; the release
    # store makes them visible no later than the new index (§2.7.13.3.1).
    store_release_u16(mem, avail + 2, avail_idx)
    # Store(avail->idx) -> load(avail_event): without a full fence the device may
    # read the old idx just before we read its stale avail_event, and the kick is
    # lost (§2.7.13.4; SPDK #3178-class hangs).
    fence_seq_cst()
    old = q[Q_KICK_IDX]
    if q[Q_FLAGS] & F_EVENT_IDX:
        avail_event = load_acquire_u16(mem, q[Q_USED] + 4 + 8 * n)
        kick = _need_event(avail_event, avail_idx, old)
    else:
        kick = (load_acquire_u16(mem, q[Q_USED]) & 1) == 0  # VIRTQ_USED_F_NO_NOTIFY
    q[Q_KICK_IDX] = avail_idx
    if kick:
        # Without an ioeventfd (kick_fd < 0) the caller writes QueueNotify when Q_KICKS moved.
        if kick_fd >= 0:
            c_write(kick_fd, address_of(kick_buf, 0), 8)
        q[Q_KICKS] += 1
    return done


@numba.njit(cache=True, nogil=True)
def harvest(  # type: ignore[no-untyped-def]
    mem,
    q,
    free_next,
    chain_next,
    head_ndesc,
    head_group,
    head_gidx,
    grp_remaining,
    grp_err_status,
    grp_err_idx,
    grp_bytes,
    out_groups,
):
    """Consume used entries; return the number of groups completed (listed in
    ``out_groups``), or -1 if the device misbehaved (``q[Q_ERROR]`` says how)."""
    n = q[Q_N]
    used = q[Q_USED]
    last = q[Q_LAST_USED]
    used_idx = load_acquire_u16(mem, used + 2)  # acquire: ring entries after this
    pending = (used_idx - last) & 0xFFFF
    if pending > q[Q_INFLIGHT]:
        q[Q_ERROR] = E_USED_IDX_JUMP
        q[Q_ERROR_ARG] = used_idx
        return -1
    nout = 0
    for _ in range(pending):
        e = used + 4 + 8 * (last % n)
        hid = _get_u32(mem, e)
        ln = _get_u32(mem, e + 4)
        if hid >= n:
            q[Q_ERROR] = E_USED_ID_RANGE
            q[Q_ERROR_ARG] = hid
            break
        if head_ndesc[hid] == 0:
            q[Q_ERROR] = E_USED_NOT_HEAD
            q[Q_ERROR_ARG] = hid
            break
        st = np.int32(mem[q[Q_STATUS_OFF] + hid])
        if st == STATUS_UNSET:
            if q[Q_ERROR] == 0:
                q[Q_ERROR] = E_NO_STATUS
                q[Q_ERROR_ARG] = hid
            st = 1  # VIRTIO_BLK_S_IOERR: the request cannot be trusted to have happened
        # Return the chain's descriptors to the free list, from our private links.
        nd = head_ndesc[hid]
        d = hid
        for _k in range(nd - 1):
            d = chain_next[d]
        free_next[d] = q[Q_FREE_HEAD]
        q[Q_FREE_HEAD] = hid
        q[Q_NUM_FREE] += nd
        head_ndesc[hid] = 0
        g = head_group[hid]
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
    if q[Q_ERROR] != 0 and q[Q_ERROR] != E_NO_STATUS:
        return -1
    return nout


@numba.njit(cache=True, nogil=True)
def set_interrupts(mem, q, enable):  # type: ignore[no-untyped-def]
    """Arm (``enable``) or suppress completion interrupts.

    Returns True when, after arming, used entries are already pending: the
    caller must harvest instead of sleeping, or it would wait for an interrupt
    the device already decided not to send.
    """
    n = q[Q_N]
    avail = q[Q_AVAIL]
    last = q[Q_LAST_USED]
    if q[Q_FLAGS] & F_EVENT_IDX:
        # With EVENT_IDX the flags are ignored; an interrupt comes when used->idx
        # passes used_event.  Leaving used_event behind suppresses them.
        if enable:
            store_release_u16(mem, avail + 4 + 2 * n, last)
    else:
        flags = load_acquire_u16(mem, avail) & 0xFFFE
        store_release_u16(mem, avail, flags if enable else flags | 1)
    q[Q_INTR_ENABLED] = 1 if enable else 0
    if not enable:
        return False
    # Store(used_event) -> load(used->idx): full fence, or a completion that
    # raced with the store is neither seen nor interrupted (lost wakeup).
    fence_seq_cst()
    return load_acquire_u16(mem, q[Q_USED] + 2) != last


@numba.njit(cache=True, nogil=True)
def poll_used(mem, q, budget_ns):  # type: ignore[no-untyped-def]
    """Spin until ``used->idx`` moves or ``budget_ns`` pass; True if it moved.

    The acquire load is what keeps LLVM from hoisting the read out of the
    loop (a plain load would spin forever on a stale value).  The loop calls
    ``sched_yield`` every 64 probes: when the device's worker is runnable on
    this very core (more busy threads than cores), spinning without yielding
    would only delay the completion we are waiting for.
    """
    last = q[Q_LAST_USED]
    used_off = q[Q_USED] + 2
    if load_acquire_u16(mem, used_off) != last:
        return True
    if budget_ns <= 0:
        return False
    deadline = monotonic_ns() + budget_ns
    i = 0
    while True:
        if load_acquire_u16(mem, used_off) != last:
            return True
        i += 1
        if (i & 63) == 0:
            if monotonic_ns() >= deadline:
                return False
            c_sched_yield()


# --- the same kernels entered through an address table ----------------------------------------
#
# An engine calls submit_requests and harvest for every request it publishes or reaps, with 12-17
# arguments that never change for a queue.  It binds them once (ledger._native.address_table, in
# this order) and enters these instead: one table and the few integers that do change.

#: the arrays of one queue's table, in order, with the dtype each has: guest memory, the queue's
#: state, its kick buffer, the engine's staging arrays, its group arrays and ``out_groups``
DRIVER_ARRAY_DTYPES: tuple[type[np.generic], ...] = (
    np.uint8, np.int64, np.int32, np.int32, np.int32, np.int32, np.int32, np.uint8,  # mem ... kick_buf
    np.uint32, np.uint64, np.uint64, np.int64, np.int32, np.int32,  # st_rtype ... st_gidx
    np.int32, np.int32, np.int32, np.int64, np.int32,  # grp_remaining ... out_groups
)  # fmt: skip


@numba.njit(cache=True, nogil=True)
def submit_packed(tab, start, count, notify_fd):  # type: ignore[no-untyped-def]
    """:func:`submit_requests` of the queue whose arrays ``tab`` holds (:data:`DRIVER_ARRAY_DTYPES`)."""
    u8, u32, u64, i32, i64 = numba.uint8, numba.uint32, numba.uint64, numba.int32, numba.int64
    t = table_array
    return submit_requests(
        t(tab, 0, u8), t(tab, 1, i64), t(tab, 2, i32), t(tab, 3, i32), t(tab, 4, i32), t(tab, 5, i32),
        t(tab, 6, i32),
        t(tab, 8, u32), t(tab, 9, u64), t(tab, 10, u64), t(tab, 11, i64), t(tab, 12, i32), t(tab, 13, i32),
        start, count, notify_fd, t(tab, 7, u8),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def harvest_packed(tab):  # type: ignore[no-untyped-def]
    """:func:`harvest` of the queue whose arrays ``tab`` holds (:data:`DRIVER_ARRAY_DTYPES`)."""
    i32, i64 = numba.int32, numba.int64
    t = table_array
    return harvest(
        t(tab, 0, numba.uint8), t(tab, 1, i64), t(tab, 2, i32), t(tab, 3, i32), t(tab, 4, i32),
        t(tab, 5, i32), t(tab, 6, i32),
        t(tab, 14, i32), t(tab, 15, i32), t(tab, 16, i32), t(tab, 17, i64), t(tab, 18, i32),
    )  # fmt: skip
