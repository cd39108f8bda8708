"""One request through a trapped queue in one kernel call: publish, serve, harvest.

Theory of operation
-------------------
A *trapped* queue (``VirtioBlkDevice(notify="trap")``) has no worker thread: the driver's
``QueueNotify`` register write serves the queue on the driver's own thread before it returns,
as a hypervisor serves a queue in the vCPU thread when the guest's MMIO write exits to it.
Done register by register, a lone 4 KiB request costs three kernel calls (``submit_requests``,
the device's ``serve_queue``, ``harvest``) and the Python of the register file between them:
~20 µs, of which the image's ``pwrite`` is under 2 (docs/LEDGER.md "Trapped notifications").

:func:`run_trapped` is the same sequence, fused: it stages the request, publishes it with
``submit_requests`` and, if the driver decided to kick (it always does on an idle trapped
queue), calls ``serve_queue`` directly - the register file's ``QueueNotify`` does nothing more
for a trapped queue than check that the device may consume buffers and call it.  That check
is the **gate**: a one-element array the device keeps at 1 exactly while a notify on this
queue would be served (DRIVER_OK set, the queue ready, the device not closed; see
``VirtioBlkDevice.trap_target``), and DEVICE_NEEDS_RESET in the device's shared status word.
When either says no, the kernel stops after publishing and returns :data:`RT_NOTIFY`: the
caller writes the register, whose refusal leaves the diagnostic a driver author reads.

This module is the one place where the driver's and the device's kernels meet, as
``ledger._machine`` is the one place where their objects do: the driver never imports the
device.  ``Ledger`` hands this kernel to the driver's engine (``Engine(trap_binder=bind)``),
and the device hands out the gate and its arguments (``trap_target``).

Nothing is trusted more than on the register path: ``serve_queue`` checks every
guest-supplied value as it always does, and ``harvest`` checks the device's answer.

**Binding** (:func:`bind`).  Called from Python, ``run_trapped`` costs more to enter than to run:
the dispatcher types and unboxes its 38 arguments on every call, 32 of them arrays that never
change for a queue (5.5 µs a call in process against 2.1 for the same work entered through a
table; every array object touched is a cache line the FUSE daemon's request path loses).  So the
engine binds them once per gate: :func:`bind` puts each array's address and length in one int64
table, and :func:`run_trapped_packed` rebuilds the arrays from it inside compiled code
(``numba.carray``), so a call passes one array and six integers.  The callable :func:`bind`
returns holds the arrays themselves, so the addresses stay valid while it lives; arrays of any
other dtype or layout than :data:`TRAP_ARRAY_DTYPES` get the plain call instead.

Return values: ``>= 0`` - groups completed by the harvest (listed in ``out_groups``; on a
queue that had nothing in flight, 1 means the request is done); :data:`RT_DEVICE_ERROR` -
the harvest found the device breaking the protocol (``q[Q_ERROR]``); :data:`RT_NOTIFY` -
published, the caller must write QueueNotify; :data:`RT_NO_KICK` - published, the device
asked for no notification (the request completes the usual way); :data:`RT_NO_ROOM` - nothing
was published (no free descriptors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

from . import _device_kernel as D
from . import _driver_kernels as K
from ._native import address_table, table_array

RT_DEVICE_ERROR = K.RT_DEVICE_ERROR
RT_NOTIFY = K.RT_NOTIFY
RT_NO_ROOM = K.RT_NO_ROOM
RT_NO_KICK = K.RT_NO_KICK


@numba.njit(cache=True, nogil=True)
def run_trapped(  # type: ignore[no-untyped-def]
    mem,
    q,
    free_next,
    chain_next,
    head_ndesc,
    head_group,
    head_gidx,
    kick_buf,
    st_rtype,
    st_sector,
    st_buf,
    st_nbytes,
    st_group,
    st_gidx,
    slot,
    rtype,
    sector,
    buf,
    nbytes,
    group,
    grp_remaining,
    grp_err_status,
    grp_err_idx,
    grp_bytes,
    out_groups,
    gate,
    dev_mem,
    p,
    ctl,
    shared,
    call_fds,
    diag,
    ram,
    serial,
    zeros,
    wc,
    wc_data,
    durable,
):
    """Publish request (rtype, sector, buf, nbytes) of ``group`` and serve it now; see the module."""
    st_rtype[slot] = rtype
    st_sector[slot] = sector
    st_buf[slot] = buf
    st_nbytes[slot] = nbytes
    st_group[slot] = group
    st_gidx[slot] = 0
    kicks = q[K.Q_KICKS]
    if K.submit_requests(
        mem, q, free_next, chain_next, head_ndesc, head_group, head_gidx,
        st_rtype, st_sector, st_buf, st_nbytes, st_group, st_gidx, slot, 1, -1, kick_buf,
    ) == 0:  # fmt: skip
        return RT_NO_ROOM
    if q[K.Q_KICKS] == kicks:
        return RT_NO_KICK
    if gate[0] == 0 or (shared[0] & D.NEEDS_RESET) != 0:
        return RT_NOTIFY
    D.serve_queue(dev_mem, p, ctl, shared, call_fds, diag, ram, serial, zeros, wc, wc_data, durable)
    return K.harvest(
        mem, q, free_next, chain_next, head_ndesc, head_group, head_gidx,
        grp_remaining, grp_err_status, grp_err_idx, grp_bytes, out_groups,
    )  # fmt: skip


#: run_trapped's array parameters, in order (``slot`` and the request left out), with the dtype
#: each has: the driver's queue state and staging arrays, then the group arrays, the gate and the
#: device's ``serve_queue`` arguments.
TRAP_ARRAY_DTYPES: tuple[type[np.generic], ...] = (
    np.uint8, np.int64, np.int32, np.int32, np.int32, np.int32, np.int32, np.uint8,  # mem, q, ...
    np.uint32, np.uint64, np.uint64, np.int64, np.int32, np.int32,  # st_rtype ... st_gidx
    np.int32, np.int32, np.int32, np.int64, np.int32, np.int64,  # grp_remaining ... gate
    np.uint8, np.int64, np.int64, np.uint32, np.int64, np.int64,  # dev_mem, p, ctl, shared, ...
    np.uint8, np.uint8, np.uint8, np.int64, np.uint8, np.uint8,  # ram ... durable
)  # fmt: skip
_HEAD = 14  # arrays before ``slot``


_arr = table_array


@numba.njit(cache=True, nogil=True)
def run_trapped_packed(tab, slot, rtype, sector, buf, nbytes, group):  # type: ignore[no-untyped-def]
    """:func:`run_trapped` with its arrays given as ``tab`` rows of (address, length): see :func:`bind`."""
    u8, u32, u64, i32, i64 = numba.uint8, numba.uint32, numba.uint64, numba.int32, numba.int64
    return run_trapped(
        _arr(tab, 0, u8), _arr(tab, 1, i64), _arr(tab, 2, i32), _arr(tab, 3, i32), _arr(tab, 4, i32),
        _arr(tab, 5, i32), _arr(tab, 6, i32), _arr(tab, 7, u8),
        _arr(tab, 8, u32), _arr(tab, 9, u64), _arr(tab, 10, u64), _arr(tab, 11, i64), _arr(tab, 12, i32),
        _arr(tab, 13, i32),
        slot, rtype, sector, buf, nbytes, group,
        _arr(tab, 14, i32), _arr(tab, 15, i32), _arr(tab, 16, i32), _arr(tab, 17, i64), _arr(tab, 18, i32),
        _arr(tab, 19, i64),
        _arr(tab, 20, u8), _arr(tab, 21, i64), _arr(tab, 22, i64), _arr(tab, 23, u32), _arr(tab, 24, i64),
        _arr(tab, 25, i64),
        _arr(tab, 26, u8), _arr(tab, 27, u8), _arr(tab, 28, u8), _arr(tab, 29, i64), _arr(tab, 30, u8),
        _arr(tab, 31, u8),
    )  # fmt: skip


def bind(
    head: Sequence[Any], tail: Sequence[Any], *, packed: bool = True
) -> Callable[[int, int, int, int, int], int]:
    """:func:`run_trapped` with all but the request bound: ``call(rtype, sector, buf, nbytes, group)``.

    ``head`` and ``tail`` are its arguments before and after the request (``head`` ends with
    ``slot``).  The result holds every array, so the table's addresses stay valid while it lives.
    ``packed=False`` (or arrays that do not match :data:`TRAP_ARRAY_DTYPES`): the plain call.
    """
    arrays = (*head[:_HEAD], *tail)
    slot = int(head[_HEAD])
    tab = address_table(arrays, TRAP_ARRAY_DTYPES) if packed and len(head) == _HEAD + 1 else None
    if tab is None:

        def call_plain(rtype: int, sector: int, buf: int, nbytes: int, group: int) -> int:
            return int(run_trapped(*head, rtype, sector, buf, nbytes, group, *tail))  # type: ignore[call-arg]

        return call_plain
    call = functools.partial(run_trapped_packed, tab, slot)
    call.arrays = arrays  # type: ignore[attr-defined]  # keeps the addresses in tab valid
    return call
