"""Diagnostics: why the device refused something, in plain words.

Theory of operation
-------------------
A driver author whose reads "come back as zeros" needs one sentence that names
the request, the descriptor and the rule it broke.  The device produces those
sentences in two places:

* the Numba worker kernels, which cannot build strings (and must not allocate
  per request), append fixed-size integer *records* to a preallocated
  ``int64`` array owned by their queue.  The array starts with a two-word
  header ``[count, capacity]``; record ``i`` lives at slot ``i % capacity``.
  The kernel is the only writer of its array: it fills the record, then
  publishes it by storing ``count + 1`` with release ordering, so a reader that
  loads ``count`` with acquire ordering sees complete records.
* the MMIO register front end (plain Python), which records refusals of
  register writes directly as :class:`Diagnostic` objects.

:func:`harvest` turns new records into :class:`Diagnostic` objects; the
message text is only formatted when somebody asks for it (``.message`` /
``str()``).  The codes are plain integers so the kernels can use them as
compile-time constants; :data:`CODE_NAMES` spells them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ledger._spec import REQUEST_TYPE_NAMES

# --- record layout (shared with the kernels) --------------------------------
DIAG_HDR = 2  # [count, capacity]
DIAG_REC = 10  # code, queue, seq, head, desc, rtype, sector, v1, v2, where
R_CODE, R_QUEUE, R_SEQ, R_HEAD, R_DESC, R_TYPE, R_SECTOR, R_V1, R_V2, R_WHERE = range(DIAG_REC)

# --- ring corruption: the queue stops and DEVICE_NEEDS_RESET is set ----------
D_HEAD_OUT_OF_RANGE = 1
D_AVAIL_IDX_JUMP = 2
D_DUPLICATE_HEAD = 3
D_RING_OUTSIDE_MEMORY = 4
D_RING_MISALIGNED = 5
# --- malformed chains: the request completes with IOERR ---------------------
D_NEXT_OUT_OF_RANGE = 10
D_CHAIN_TOO_LONG = 11
D_DESC_OUTSIDE_MEMORY = 12
D_INDIRECT_NOT_NEGOTIATED = 13
D_NESTED_INDIRECT = 14
D_INDIRECT_WITH_NEXT = 15
D_INDIRECT_BAD_LEN = 16
D_READABLE_AFTER_WRITABLE = 17
D_HEADER_SHORT = 18
D_NO_STATUS = 19
D_IN_DATA_NOT_WRITABLE = 20
D_OUT_DATA_NOT_READABLE = 21
D_DATA_NOT_SECTOR_MULTIPLE = 22
D_SECTOR_OUT_OF_RANGE = 23
D_WRITE_READ_ONLY = 24
D_IO_ERROR = 25
D_GET_ID_SHORT = 26
D_SEGMENTS_BAD_LEN = 27
D_SEGMENT_TOO_LARGE = 28
# --- requests the device does not support: UNSUPP ----------------------------
D_UNSUPPORTED_TYPE = 40
D_TOO_MANY_SEGMENTS = 41
D_SEGMENT_BAD_FLAGS = 42
D_DISCARD_UNMAP = 43
D_FEATURE_NOT_NEGOTIATED = 44
# --- register interface (Python side) ----------------------------------------
D_STATUS_OUT_OF_ORDER = 100
D_FEATURES_UNOFFERED = 101
D_FEATURES_NO_VERSION_1 = 102
D_QUEUE_SETUP_LOCKED = 103
D_NOTIFY_REFUSED = 104
D_QUEUE_NUM_INVALID = 105
D_BAD_REGISTER = 106
D_FEATURES_LOCKED = 107
D_CONFIG_WRITE_REFUSED = 108

CODE_NAMES: dict[int, str] = {
    value: name[2:]
    for name, value in list(globals().items())
    if name.startswith("D_") and isinstance(value, int)
}

# ``op`` values carried in v2 of D_IO_ERROR
OP_PREAD, OP_PWRITE, OP_FDATASYNC, OP_FALLOCATE = 1, 2, 3, 4
_OP_NAMES = {OP_PREAD: "pread", OP_PWRITE: "pwrite", OP_FDATASYNC: "fdatasync", OP_FALLOCATE: "fallocate"}

RING_CODES = frozenset(
    {D_HEAD_OUT_OF_RANGE, D_AVAIL_IDX_JUMP, D_DUPLICATE_HEAD, D_RING_OUTSIDE_MEMORY, D_RING_MISALIGNED}
)
UNSUPP_CODES = frozenset(
    {D_UNSUPPORTED_TYPE, D_TOO_MANY_SEGMENTS, D_SEGMENT_BAD_FLAGS, D_DISCARD_UNMAP, D_FEATURE_NOT_NEGOTIATED}
)


def new_diag_array(capacity: int = 4096) -> npt.NDArray[np.int64]:
    """A fresh record array for one queue's kernel."""
    arr = np.zeros(DIAG_HDR + capacity * DIAG_REC, dtype=np.int64)
    arr[1] = capacity
    return arr


@dataclass(frozen=True)
class Diagnostic:
    """One refusal: what was refused, where, and why.

    ``seq`` is the running count of chains popped on the queue (request N),
    ``desc`` the descriptor index (inside the indirect table when ``where`` is
    1), ``rtype``/``sector`` come from the request header (-1 when the header
    could not be read).  ``v1``/``v2`` carry the offending values.
    """

    code: int
    queue: int = -1
    seq: int = -1
    head: int = -1
    desc: int = -1
    rtype: int = -1
    sector: int = -1
    v1: int = 0
    v2: int = 0
    where: int = 0
    detail: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return CODE_NAMES.get(self.code, f"code{self.code}")

    @property
    def is_ring_error(self) -> bool:
        return self.code in RING_CODES

    def _request(self) -> str:
        parts = []
        if self.rtype >= 0:
            parts.append(REQUEST_TYPE_NAMES.get(self.rtype, f"type {self.rtype}"))
            if self.sector >= 0:
                parts.append(f"sector {self.sector}")
        parts.append(f"head {self.head}")
        return f"queue {self.queue} request {self.seq} ({', '.join(parts)})"

    def _desc(self) -> str:
        return f"indirect descriptor {self.desc}" if self.where else f"descriptor {self.desc}"

    @property
    def message(self) -> str:
        c, v1, v2 = self.code, self.v1, self.v2
        if self.detail:
            return self.detail
        if c == D_HEAD_OUT_OF_RANGE:
            return (
                f"queue {self.queue}: available ring entry {v2} names head {v1}, which is not below the "
                f"queue size; the ring is corrupt, so the queue stopped and DEVICE_NEEDS_RESET is set"
            )
        if c == D_AVAIL_IDX_JUMP:
            return (
                f"queue {self.queue}: avail->idx moved from {v2} to {v1}, more than the queue size "
                f"ahead; the ring is corrupt, so the queue stopped and DEVICE_NEEDS_RESET is set"
            )
        if c == D_DUPLICATE_HEAD:
            return (
                f"queue {self.queue}: head {self.head} was made available again while still in flight; "
                f"the ring is corrupt, so the queue stopped and DEVICE_NEEDS_RESET is set"
            )
        if c == D_RING_OUTSIDE_MEMORY:
            return (
                f"queue {self.queue}: ring area {v1:#x}+{v2:#x} is not inside guest memory; "
                f"the queue was not started and DEVICE_NEEDS_RESET is set"
            )
        if c == D_RING_MISALIGNED:
            return (
                f"queue {self.queue}: ring area at {v1:#x} is not {v2}-byte aligned (§2.7); "
                f"the queue was not started and DEVICE_NEEDS_RESET is set"
            )
        req = self._request()
        d = self._desc()
        if c == D_NEXT_OUT_OF_RANGE:
            return f"{req}: {d} has next = {v1}, which is not below the table size {v2}; answered IOERR"
        if c == D_CHAIN_TOO_LONG:
            return (
                f"{req}: the chain is longer than its table ({v1} descriptors) at {d}, so it loops; "
                f"answered IOERR"
            )
        if c == D_DESC_OUTSIDE_MEMORY:
            return (
                f"{req}: {d} points at {v1 & 0xFFFF_FFFF_FFFF_FFFF:#x}+{v2:#x}, which is not inside guest "
                f"memory; answered IOERR"
            )
        if c == D_INDIRECT_NOT_NEGOTIATED:
            return f"{req}: {d} has VIRTQ_DESC_F_INDIRECT, but INDIRECT_DESC was not negotiated; IOERR"
        if c == D_NESTED_INDIRECT:
            return (
                f"{req}: {d} sets VIRTQ_DESC_F_INDIRECT inside an indirect table, which §2.7.5.3.1 "
                f"forbids; answered IOERR"
            )
        if c == D_INDIRECT_WITH_NEXT:
            return (
                f"{req}: {d} sets both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT, which §2.7.5.3.1 "
                f"forbids; answered IOERR"
            )
        if c == D_INDIRECT_BAD_LEN:
            return (
                f"{req}: {d} points at an indirect table of {v1} bytes; it must be a non-zero multiple "
                f"of 16 of at most {v2} bytes; answered IOERR"
            )
        if c == D_READABLE_AFTER_WRITABLE:
            return (
                f"{req}: {d} is device-readable but follows a device-writable one (§2.7.4.2: all "
                f"writable descriptors come last); answered IOERR"
            )
        if c == D_HEADER_SHORT:
            return (
                f"{req}: the device-readable part of the chain has {v1} bytes, fewer than the 16-byte "
                f"request header; answered IOERR"
            )
        if c == D_NO_STATUS:
            return (
                f"{req}: the chain has no device-writable byte for the status (the status descriptor "
                f"needs VIRTQ_DESC_F_WRITE and len >= 1), so no status could be written; used len 0"
            )
        if c == D_IN_DATA_NOT_WRITABLE:
            return (
                f"{req}: data {d} is not device-writable (VIRTQ_DESC_F_WRITE missing), so nothing "
                f"can be read into it; answered IOERR"
            )
        if c == D_OUT_DATA_NOT_READABLE:
            return (
                f"{req}: data {d} is device-writable, but the data of a write request must be "
                f"device-readable (VIRTQ_DESC_F_WRITE set by mistake?); answered IOERR"
            )
        if c == D_DATA_NOT_SECTOR_MULTIPLE:
            return f"{req}: data length {v1} is not a multiple of 512; answered IOERR"
        if c == D_SECTOR_OUT_OF_RANGE:
            return (
                f"{req}: {v1} sectors from sector {self.sector} go past the capacity of {v2} sectors; "
                f"answered IOERR"
            )
        if c == D_WRITE_READ_ONLY:
            return f"{req}: the device is read-only (VIRTIO_BLK_F_RO); nothing written, answered IOERR"
        if c == D_IO_ERROR:
            return f"{req}: {_OP_NAMES.get(v2, 'I/O')} on the image failed with errno {v1}; answered IOERR"
        if c == D_GET_ID_SHORT:
            return f"{req}: GET_ID needs 20 writable data bytes, the chain has {v1}; answered IOERR"
        if c == D_SEGMENTS_BAD_LEN:
            return f"{req}: segment data of {v1} bytes is not a non-zero multiple of 16; answered IOERR"
        if c == D_SEGMENT_TOO_LARGE:
            return f"{req}: a segment asks for {v1} sectors, more than the maximum {v2}; answered IOERR"
        if c == D_UNSUPPORTED_TYPE:
            return f"{req}: request type {v1} is not supported; answered UNSUPP"
        if c == D_TOO_MANY_SEGMENTS:
            return f"{req}: {v1} segments, more than the {v2} the config space allows; answered UNSUPP"
        if c == D_SEGMENT_BAD_FLAGS:
            return f"{req}: segment flags {v1:#x} have unknown bits; answered UNSUPP"
        if c == D_DISCARD_UNMAP:
            return f"{req}: DISCARD with the UNMAP flag (§5.2.6.2); answered UNSUPP"
        if c == D_FEATURE_NOT_NEGOTIATED:
            return f"{req}: the feature for this request type was not negotiated; answered UNSUPP"
        return f"{req}: refusal code {c} (v1={v1}, v2={v2})"

    def __str__(self) -> str:
        return self.message


def harvest(arr: npt.NDArray[np.int64], start: int) -> tuple[list[Diagnostic], int, int]:
    """Decode records ``start..count`` of one kernel's array.

    Returns ``(diagnostics, new_start, lost)``; ``lost`` counts records that
    were overwritten before they could be read (the array is a ring).
    """
    count = int(arr[0])
    cap = int(arr[1])
    lost = 0
    if count - start > cap:
        lost = count - start - cap
        start = count - cap
    out: list[Diagnostic] = []
    for i in range(start, count):
        b = DIAG_HDR + (i % cap) * DIAG_REC
        r = [int(x) for x in arr[b : b + DIAG_REC]]
        out.append(Diagnostic(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]))
    return out, count, lost
