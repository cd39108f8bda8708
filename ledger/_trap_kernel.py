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
device.  ``Ledger`` hands this kernel to the driver's engine (``Engine(trap_runner=...)``),
and the device hands out the gate and its arguments (``trap_target``).

Nothing is trusted more than on the register path: ``serve_queue`` checks every
guest-supplied value as it always does, and ``harvest`` checks the device's answer.

Return values: ``>= 0`` - groups completed by the harvest (listed in ``out_groups``; on a
queue that had nothing in flight, 1 means the request is done); :data:`RT_DEVICE_ERROR` -
the harvest found the device breaking the protocol (``q[Q_ERROR]``); :data:`RT_NOTIFY` -
published, the caller must write QueueNotify; :data:`RT_NO_KICK` - published, the device
asked for no notification (the request completes the usual way); :data:`RT_NO_ROOM` - nothing
was published (no free descriptors).
"""

from __future__ import annotations

import numba

from . import _device_kernel as D
from . import _driver_kernels as K

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
