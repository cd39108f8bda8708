"""The device's worker kernel: pop chains, check them, do the I/O, publish used entries.

Theory of operation
-------------------
One call of :func:`serve_queue` owns one virtqueue for as long as it runs.  It
is compiled with ``@njit(nogil=True, cache=True)`` and runs on its own thread,
so several queues are served in parallel while Python keeps the GIL.  It takes
only numpy arrays and integers:

``mem``       guest RAM (``uint8``), the one region shared with the driver;
``p``         ``int64`` parameters (``P_*`` below: ring addresses, fds, limits);
``ctl``       ``int64`` queue state that outlives a call (``C_*``: stop flag,
              last_avail_idx, used idx, request counter, statistics);
``shared``    ``uint32[2]`` = [device status bits set by the device
              (DEVICE_NEEDS_RESET), InterruptStatus], shared with ``read32``;
``call_fds``  every queue's call eventfd (a config change wakes them all);
``diag``      this queue's diagnostic records (see :mod:`ledger.diagnostics`);
``ram``       the RAM backend's bytes (empty when the image is a file);
``serial``    the 20 GET_ID bytes;  ``zeros`` a zero buffer for WRITE_ZEROES;
``wc``        ``int64`` volatile-write-cache state (``W_*``; ``wc[W_ON] = 0``: no cache);
``wc_data``   the cache's log buffer;  ``durable`` the image as it is on the "platter".

Power-cut simulation (``wc[W_ON] = 1``, RAM backends only, one queue): ``ram`` is what
the disk *reads back* (its cache), ``durable`` what survives power loss.  A completed
OUT/WRITE_ZEROES/DISCARD is appended to the log (``wc`` entries + a memcpy of the
written bytes into ``wc_data``); FLUSH copies the log to ``durable`` in order and
empties it; in writethrough mode each write goes to ``durable`` at once.  A full log
is written back on its own (a real cache may destage at any time).  After
``wc[W_CUT_AT]`` admitted requests the power is off: every later request completes
with IOERR and moves no data (a real disk would never complete it; failing it lets
the driver stop).  :meth:`ledger.backend.CrashBackend.power_cut` builds the
post-crash image from ``durable`` and a seeded choice of the logged writes.

Each pass of the loop:

1. acquire-load ``avail->idx``; ``(idx - last_avail) & 0xFFFF`` chains are new.
   More than the queue size is ring corruption.
2. pop them all (a *batch*, at most N heads: a driver that keeps adding cannot
   keep us here forever), refusing heads >= N and heads already in flight.
3. for each head: walk and check the chain (:func:`walk_chain`), parse the
   header, check the request, do the I/O straight between the image (pread/
   pwrite on ``image_fd``, or slices of ``ram``) and guest memory.  Nothing is
   read or written before every check passed.
4. complete the batch in the configured order (fifo / reverse / seeded
   shuffle): status bytes and used elements, then one release-store of
   ``used->idx``, then the interrupt decision.
5. when there is no work: spin on ``avail->idx`` for an adaptive window (4 µs
   to ``spin_ns``: doubled after a sleep shorter than ``spin_ns``, halved
   after a longer one, as QEMU's aio-poll), then re-arm
   kicks, fence, re-check, and block in ``read(kick_fd)``.

In single-pass mode (``p[P_SINGLE_PASS]``) step 5 returns instead, which makes
the kernel a deterministic function of memory - the hypothesis tests rely on it.

Ring corruption (head >= N, an avail idx jump > N, a duplicated in-flight
head, rings outside guest memory) sets DEVICE_NEEDS_RESET, raises a config
change interrupt, completes what was already popped and stops the queue.  A bad
*chain* only costs its own request: IOERR, used entry published.

The pure-Python twin (:mod:`ledger._device_ref`) executes this very source with
Python stand-ins for the intrinsics, so every function here must also be valid,
overflow-free Python: values read from guest memory are widened to int64 by
:func:`ld_le` and all 16-bit index arithmetic is masked explicitly.
"""

# Numba kernels are written in Numba's typed dialect of Python; mypy cannot see the
# intrinsics' signatures, so only these checks are switched off for this file.
# mypy: disable-error-code="no-untyped-def,call-overload,call-arg,var-annotated"
from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ledger._native import (
    address_of,
    c_fallocate,
    c_fdatasync,
    c_memcpy,
    c_pread,
    c_pwrite,
    c_read,
    c_sched_yield,
    c_sync_file_range,
    c_write,
    errno,
    fence_seq_cst,
    fetch_or_u32,
    load_acquire_u16,
    load_acquire_u64,
    monotonic_ns,
    store_release_u16,
    store_release_u64,
)
from ledger.diagnostics import (
    D_AVAIL_IDX_JUMP,
    D_CHAIN_TOO_LONG,
    D_DATA_NOT_SECTOR_MULTIPLE,
    D_DESC_OUTSIDE_MEMORY,
    D_DISCARD_UNMAP,
    D_DUPLICATE_HEAD,
    D_FEATURE_NOT_NEGOTIATED,
    D_GET_ID_SHORT,
    D_HEAD_OUT_OF_RANGE,
    D_HEADER_SHORT,
    D_IN_DATA_NOT_WRITABLE,
    D_INDIRECT_BAD_LEN,
    D_INDIRECT_NOT_NEGOTIATED,
    D_INDIRECT_WITH_NEXT,
    D_IO_ERROR,
    D_NESTED_INDIRECT,
    D_NEXT_OUT_OF_RANGE,
    D_NO_STATUS,
    D_OUT_DATA_NOT_READABLE,
    D_READABLE_AFTER_WRITABLE,
    D_RING_MISALIGNED,
    D_RING_OUTSIDE_MEMORY,
    D_SECTOR_OUT_OF_RANGE,
    D_SEGMENT_BAD_FLAGS,
    D_SEGMENT_TOO_LARGE,
    D_SEGMENTS_BAD_LEN,
    D_TOO_MANY_SEGMENTS,
    D_UNSUPPORTED_TYPE,
    D_WRITE_READ_ONLY,
    DIAG_HDR,
    DIAG_REC,
    OP_FALLOCATE,
    OP_FDATASYNC,
    OP_PREAD,
    OP_PWRITE,
)


@intrinsic
def fetch_and_u32(typingctx: Any, mem: Any, off: Any, val: Any) -> Any:
    """Atomic ``*(u32*)(mem+off) &= val`` (seq_cst), returning the old value (InterruptACK)."""
    sig = types.uint32(mem, off, val)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arrty, offty, valty = signature.args
        ary = context.make_array(arrty)(context, builder, args[0])
        base = builder.ptrtoint(ary.data, ir.IntType(64))
        addr = builder.add(base, context.cast(builder, args[1], offty, types.int64))
        ptr = builder.inttoptr(addr, ir.PointerType(ir.IntType(32)))
        v = context.cast(builder, args[2], valty, types.uint32)
        return builder.atomic_rmw("and", ptr, v, "seq_cst")

    return sig, codegen


# --- p[]: parameters ---------------------------------------------------------
P_GBASE = 0
P_GSIZE = 1
P_QUEUE = 2
P_QNUM = 3
P_DESC = 4
P_AVAIL = 5
P_USED = 6
P_FLAGS = 7
P_KICK_FD = 8
P_CALL_FD = 9
P_CONFIG_FD = 10
P_IMAGE_FD = 11
P_CAPACITY = 12
P_MAX_DISCARD_SECTORS = 13
P_MAX_DISCARD_SEG = 14
P_MAX_WZ_SECTORS = 15
P_MAX_WZ_SEG = 16
P_ORDER = 17
P_SPIN_NS = 18
SPIN_MIN_NS = 4_000  # the polling window never shrinks below this
P_SINGLE_PASS = 19
P_INDIRECT_MAX = 20
P_DIRECT_FD = 21  # O_DIRECT descriptor of the image for large aligned reads (and writes), or -1
P_WRITE_BEHIND_MIN = 22  # a worker starts write-back of written image ranges this large (0: never)
P_DIRECT_MIN = 23  # reads (and direct writes) of at least this many bytes (4 KiB-aligned) use P_DIRECT_FD
P_DIRECT_WRITES = 24  # 1: worker queues' writes of P_DIRECT_MIN bytes or more (aligned) use P_DIRECT_FD
P_SIZE = 25
#: P_DIRECT_MIN of a file backend with direct reads, unless it asks for another: reads of at least
#: this many bytes (4 KiB-aligned in guest memory and on the image) use P_DIRECT_FD
DIRECT_MIN = 128 * 1024
DIRECT_ALIGN = 4096
#: P_WRITE_BEHIND_MIN of a file backend with write-behind on
WRITE_BEHIND_MIN = 256 * 1024
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back of the range, do not wait for it

# p[P_FLAGS] bits: what was negotiated / how the backend is opened
K_EVENT_IDX = 1
K_INDIRECT = 2
K_RO = 4
K_DISCARD = 8
K_WRITE_ZEROES = 16
K_WRITETHROUGH = 32  # writeback == 0 (or neither FLUSH nor CONFIG_WCE negotiated): sync each write

ORDER_FIFO = 0
ORDER_REVERSE = 1
ORDER_SHUFFLE = 2

# --- ctl[]: queue state (int64 slots) -----------------------------------------
C_STOP = 0
C_LAST_AVAIL = 1
C_USED_IDX = 2
C_SEQ = 3
C_REQUESTS = 4
C_BYTES_READ = 5
C_BYTES_WRITTEN = 6
C_BROKEN = 7
C_RNG = 8
C_ERRORS = 9
C_INTERRUPTS = 10
C_SLEEPS = 11
C_DIRECT_BYTES = 12  # bytes read through P_DIRECT_FD
C_WB_LO = 13  # image byte range [C_WB_LO, C_WB_HI) written by this pass, for write-behind
C_WB_HI = 14
C_WB_BYTES = 15  # bytes whose write-back a worker started early (write-behind)
C_DIRECT_WRITTEN = 16  # bytes written through P_DIRECT_FD
C_SIZE = 17

# --- wc[]: volatile write cache (power-cut simulation) -------------------------
W_ON = 0  # 1: writes go through the volatile cache
W_COUNT = 1  # requests admitted so far
W_CUT_AT = 2  # power is cut once W_COUNT reaches this (-1: never)
W_DEAD = 3  # 1 once the power is off
W_NENT = 4  # log entries
W_USED = 5  # bytes of wc_data in use
W_MAXENT = 6  # entry capacity
W_DESTAGES = 7  # times a full log was written back on its own
W_FLUSHES = 8
W_HDR = 16  # entries from here, 3 slots each: image byte offset, length, offset in wc_data
W_ENTRY = 3

# --- shared[] (uint32) byte offsets -------------------------------------------
SH_STATUS = 0
SH_ISR = 4

# --- spec numbers used here (ledger._spec names; repeated as plain ints so
# that Numba folds them) -------------------------------------------------------
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
NEEDS_RESET = 64
INT_VRING = 1
INT_CONFIG = 2
WZ_UNMAP = 1
EINTR = 4
EINVAL = 22
FALLOC_KEEP_SIZE = 1
FALLOC_PUNCH_HOLE = 2
FALLOC_ZERO_RANGE = 0x10

# seg[] columns: one row per descriptor that carries data
S_OFF = 0  # offset in mem
S_LEN = 1
S_FLAGS = 2
S_DESC = 3  # descriptor index (in its table)
S_WHERE = 4  # 0: main table, 1: indirect table


@njit(cache=True)
def ld_le(mem, off, n):
    """Little-endian ``n``-byte load from ``mem[off:]``, widened to int64 (8 bytes wrap to negative)."""
    v = np.int64(0)
    for i in range(n):
        v |= np.int64(mem[off + i]) << np.int64(8 * i)
    return v


@njit(cache=True)
def st_le(mem, off, n, v):
    """Little-endian ``n``-byte store (plain; ordering comes from a later release store)."""
    for i in range(n):
        mem[off + i] = (v >> np.int64(8 * i)) & 0xFF


@njit(cache=True)
def in_guest(gbase, gsize, addr, length):
    """Overflow-safe: is ``[addr, addr+length)`` inside guest memory?  (addr may be 'negative' = >= 2^63.)"""
    if addr < gbase or length < 0:
        return False
    off = addr - gbase
    return off <= gsize and length <= gsize - off


@njit(cache=True)
def ld16(mem, off):
    return np.int64(load_acquire_u16(mem, off))


@njit(cache=True)
def diag_put(diag, code, q, seq, head, desc, rtype, sector, v1, v2, where):
    """Append one record; the release store of the count publishes it (single writer per array)."""
    n = np.int64(load_acquire_u64(diag, 0))
    cap = diag[1]
    b = DIAG_HDR + (n % cap) * DIAG_REC
    diag[b + 0] = code
    diag[b + 1] = q
    diag[b + 2] = seq
    diag[b + 3] = head
    diag[b + 4] = desc
    diag[b + 5] = rtype
    diag[b + 6] = sector
    diag[b + 7] = v1
    diag[b + 8] = v2
    diag[b + 9] = where
    # release: the record's fields are visible before the new count
    store_release_u64(diag, 0, n + 1)


@njit(cache=True)
def signal_fd(fd):
    """Add 1 to an eventfd (errors - a closed or -1 fd - are ignored)."""
    if fd < 0:
        return
    buf = np.zeros(8, np.uint8)
    buf[0] = 1
    c_write(np.int32(fd), address_of(buf, 0), np.uint64(8))


@njit(cache=True)
def needs_reset(p, ctl, shared, call_fds):
    """§2.1.2: set DEVICE_NEEDS_RESET, then send a configuration change notification.

    The config-change interrupt also goes to every queue's call eventfd, so a
    driver sleeping on completions wakes up and looks at Status.
    """
    ctl[C_BROKEN] = 1
    fetch_or_u32(shared, SH_STATUS, NEEDS_RESET)
    fetch_or_u32(shared, SH_ISR, INT_CONFIG)  # seq_cst RMW: ordered before the eventfd writes
    signal_fd(p[P_CONFIG_FD])
    for i in range(call_fds.size):
        signal_fd(call_fds[i])


@njit(cache=True)
def walk_chain(mem, p, head, segs, err):
    """Walk the chain at ``head`` into ``segs``; return the segment count, or -code.

    On error ``err`` = [desc index, where (0 main / 1 indirect), v1, v2].
    Bounds: the main table walk is limited to N steps (a longer chain loops,
    §2.7.5.2 "MUST NOT create a chain longer than the queue size"); an indirect
    table walk to len/16 steps; ``next`` must be below the table size.  Every
    address range is checked to lie inside guest memory before anything else
    uses it.  Nothing is read from a data buffer here.
    """
    gbase = p[P_GBASE]
    gsize = p[P_GSIZE]
    qn = p[P_QNUM]
    table = p[P_DESC] - gbase
    limit = qn
    ttl = qn
    where = 0
    idx = head
    nseg = 0
    seen_write = False
    while True:
        if ttl == 0:
            err[0] = idx
            err[1] = where
            err[2] = limit
            return -D_CHAIN_TOO_LONG
        ttl -= 1
        d = table + idx * 16
        addr = ld_le(mem, d, 8)
        ln = ld_le(mem, d + 8, 4)
        fl = ld_le(mem, d + 12, 2)
        nx = ld_le(mem, d + 14, 2)
        err[0] = idx
        err[1] = where
        if fl & F_INDIRECT:
            if (p[P_FLAGS] & K_INDIRECT) == 0:
                return -D_INDIRECT_NOT_NEGOTIATED
            if where == 1:
                return -D_NESTED_INDIRECT
            if fl & F_NEXT:
                return -D_INDIRECT_WITH_NEXT
            if ln == 0 or ln % 16 != 0 or ln // 16 > p[P_INDIRECT_MAX]:
                err[2] = ln
                err[3] = p[P_INDIRECT_MAX] * 16
                return -D_INDIRECT_BAD_LEN
            if not in_guest(gbase, gsize, addr, ln):
                err[2] = addr
                err[3] = ln
                return -D_DESC_OUTSIDE_MEMORY
            # §2.7.5.3.2: the WRITE flag of the descriptor naming the table is ignored
            table = addr - gbase
            limit = ln // 16
            ttl = limit
            where = 1
            idx = 0
            continue
        if not in_guest(gbase, gsize, addr, ln):
            err[2] = addr
            err[3] = ln
            return -D_DESC_OUTSIDE_MEMORY
        if fl & F_WRITE:
            seen_write = True
        elif seen_write:
            return -D_READABLE_AFTER_WRITABLE
        segs[nseg, S_OFF] = addr - gbase
        segs[nseg, S_LEN] = ln
        segs[nseg, S_FLAGS] = fl
        segs[nseg, S_DESC] = idx
        segs[nseg, S_WHERE] = where
        nseg += 1
        if (fl & F_NEXT) == 0:
            return nseg
        if nx >= limit:
            err[2] = nx
            err[3] = limit
            return -D_NEXT_OUT_OF_RANGE
        idx = nx


@njit(cache=True)
def gather(mem, segs, nseg, pos, n, dst):
    """Copy ``n`` bytes at logical position ``pos`` of the readable stream into ``dst``."""
    got = 0
    at = 0
    for i in range(nseg):
        if got >= n:
            break
        if segs[i, S_FLAGS] & F_WRITE:
            break
        ln = segs[i, S_LEN]
        if pos + got < at + ln:
            start = pos + got - at
            k = min(ln - start, n - got)
            o = segs[i, S_OFF] + start
            for j in range(k):
                dst[got + j] = mem[o + j]
            got += k
        at += ln
    return got


@njit(cache=True)
def first_seg_at(segs, nseg, want_write, pos):
    """Index of the segment holding byte ``pos`` of the readable (or writable) stream, or -1."""
    at = 0
    for i in range(nseg):
        w = (segs[i, S_FLAGS] & F_WRITE) != 0
        if w != want_write:
            continue
        ln = segs[i, S_LEN]
        if pos < at + ln:
            return i
        at += ln
    return -1


@njit(cache=True)
def image_io(
    mem, segs, nseg, want_write, skip, total, img, image_fd, ram, is_write, direct_fd, direct_min, ctl
):
    """Move ``total`` bytes between image byte ``img`` and the readable (or writable) stream.

    The stream is the concatenation of the readable (``want_write`` False) or
    writable segments; the first ``skip`` bytes of it are passed over (the
    request header).  ``is_write``: image <- guest (pwrite), else guest <- image
    (pread).  A segment of ``direct_min`` bytes or more whose guest address,
    image offset and length are ``DIRECT_ALIGN``-aligned moves through
    ``direct_fd`` when there is one (counted in ``ctl[C_DIRECT_BYTES]`` or
    ``ctl[C_DIRECT_WRITTEN]``); if the kernel refuses it (EINVAL: a stricter
    alignment), through ``image_fd``.  Callers pass ``direct_fd`` -1 for writes
    unless the backend asked for direct writes.
    Returns 0 or an errno.
    """
    at = 0
    done = 0
    for i in range(nseg):
        if done >= total:
            break
        w = (segs[i, S_FLAGS] & F_WRITE) != 0
        if w != want_write:
            continue
        ln = segs[i, S_LEN]
        if skip >= at + ln:
            at += ln
            continue
        start = max(skip - at, 0)
        k = min(ln - start, total - done)
        o = segs[i, S_OFF] + start
        at += ln
        if image_fd < 0:
            # memcpy, not a slice assignment: Numba compiles the latter to a
            # byte loop that is several times slower for 4 KiB+ copies.
            if is_write:
                c_memcpy(address_of(ram, img + done), address_of(mem, o), np.uint64(k))
            else:
                c_memcpy(address_of(mem, o), address_of(ram, img + done), np.uint64(k))
        else:
            e = EINVAL  # "use the page cache": the direct read was not tried, or was refused
            if (
                direct_fd >= 0
                and k >= direct_min
                and (k | (img + done)) % DIRECT_ALIGN == 0
                and address_of(mem, o) % DIRECT_ALIGN == 0
            ):
                e = rw_file(direct_fd, mem, o, k, img + done, is_write)
                if e == 0:
                    ctl[C_DIRECT_WRITTEN if is_write else C_DIRECT_BYTES] += k
            if e == EINVAL:
                e = rw_file(image_fd, mem, o, k, img + done, is_write)
            if e != 0:
                return e
        done += k
    return 0


@njit(cache=True)
def rw_file(fd, mem, o, k, img, is_write):
    """pread/pwrite ``k`` bytes at guest offset ``o`` / image byte ``img``; returns 0 or errno."""
    moved = 0
    while moved < k:
        if is_write:
            r = c_pwrite(np.int32(fd), address_of(mem, o + moved), np.uint64(k - moved), img + moved)
        else:
            r = c_pread(np.int32(fd), address_of(mem, o + moved), np.uint64(k - moved), img + moved)
        if r < 0:
            e = np.int64(errno())
            if e == EINTR:
                continue
            return e
        if r == 0:
            return 5  # EIO: image shorter than it was
        moved += r
    return 0


@njit(cache=True)
def zero_range(image_fd, ram, zeros, img, n, punch):
    """Make image bytes ``[img, img+n)`` read as zeros; returns 0 or errno.

    Files: ``punch`` tries FALLOC_FL_PUNCH_HOLE first (DISCARD, WRITE_ZEROES
    with UNMAP), otherwise FALLOC_FL_ZERO_RANGE first; either falls back to the
    other and finally to writing zeros, for filesystems without fallocate modes.
    """
    if n == 0:
        return 0
    if image_fd < 0:
        ram[img : img + n] = 0
        return 0
    fd = np.int32(image_fd)
    first = FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE if punch else FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE
    second = FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE if punch else FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE
    if c_fallocate(fd, np.int32(first), img, n) == 0:
        return 0
    if c_fallocate(fd, np.int32(second), img, n) == 0:
        return 0
    done = 0
    while done < n:
        k = min(n - done, zeros.size)
        r = c_pwrite(fd, address_of(zeros, 0), np.uint64(k), img + done)
        if r < 0:
            e = np.int64(errno())
            if e == EINTR:
                continue
            return e
        done += r
    return 0


@njit(cache=True)
def wc_destage(wc, wc_data, durable):
    """FLUSH: apply the logged writes to ``durable`` in the order they completed; empty the log."""
    for i in range(wc[W_NENT]):
        b = W_HDR + W_ENTRY * i
        c_memcpy(address_of(durable, wc[b]), address_of(wc_data, wc[b + 2]), np.uint64(wc[b + 1]))
    wc[W_NENT] = 0
    wc[W_USED] = 0


@njit(cache=True)
def wc_write(wc, wc_data, durable, ram, img, n, through):
    """A completed write of image bytes ``[img, img+n)`` (already in ``ram``): log it, or write through."""
    if n <= 0:
        return
    if not through and (wc[W_NENT] >= wc[W_MAXENT] or wc[W_USED] + n > wc_data.size):
        wc_destage(wc, wc_data, durable)
        wc[W_DESTAGES] += 1
    if through or n > wc_data.size:
        c_memcpy(address_of(durable, img), address_of(ram, img), np.uint64(n))
        return
    b = W_HDR + W_ENTRY * wc[W_NENT]
    wc[b] = img
    wc[b + 1] = n
    wc[b + 2] = wc[W_USED]
    c_memcpy(address_of(wc_data, wc[W_USED]), address_of(ram, img), np.uint64(n))
    wc[W_USED] += n
    wc[W_NENT] += 1


@njit(cache=True)
def wc_admit(wc):
    """Count one request; False once the power is cut (the request must move no data)."""
    if wc[W_DEAD] != 0:
        return False
    if wc[W_CUT_AT] >= 0 and wc[W_COUNT] >= wc[W_CUT_AT]:
        wc[W_DEAD] = 1
        return False
    wc[W_COUNT] += 1
    return True


@njit(cache=True)
def handle_request(
    mem, p, ctl, diag, head, seq, segs, err, hdr, ram, serial, zeros, res, wc, wc_data, durable
):
    """Check and execute one chain.  ``res`` <- [status, used len, status byte offset or -1].

    Order of business: walk (structure), header, status byte, then per-type
    checks, and only then any I/O.  Every refusal writes one diagnostic record.
    """
    q = p[P_QUEUE]
    image_fd = p[P_IMAGE_FD]
    cap = p[P_CAPACITY]
    # acquire load: the front end may flip K_WRITETHROUGH (config writeback) while we run
    kflags = np.int64(load_acquire_u64(p, P_FLAGS * 8))
    res[0] = S_IOERR
    res[1] = 0
    res[2] = -1
    for i in range(4):
        err[i] = 0
    nseg = walk_chain(mem, p, head, segs, err)
    if nseg < 0:
        # A broken chain: its status byte cannot be located reliably, so
        # nothing is written; the used entry (len 0) still completes the head.
        diag_put(diag, -nseg, q, seq, head, err[0], -1, -1, err[2], err[3], err[1])
        return
    rd = 0
    wr = 0
    last_w = -1
    for i in range(nseg):
        if segs[i, S_FLAGS] & F_WRITE:
            wr += segs[i, S_LEN]
            if segs[i, S_LEN] > 0:
                last_w = i
        else:
            rd += segs[i, S_LEN]
    # §5.2.6: the status is the last byte of the last device-writable buffer
    if last_w >= 0:
        res[2] = segs[last_w, S_OFF] + segs[last_w, S_LEN] - 1
        res[1] = 1
    if rd < 16:
        diag_put(diag, D_HEADER_SHORT, q, seq, head, segs[0, S_DESC] if nseg > 0 else head, -1, -1, rd, 16, 0)
        return
    gather(mem, segs, nseg, 0, 16, hdr)
    rtype = ld_le(hdr, 0, 4)
    sector = ld_le(hdr, 8, 8)
    if last_w < 0:
        diag_put(diag, D_NO_STATUS, q, seq, head, segs[nseg - 1, S_DESC], rtype, sector, 0, 0,
                 segs[nseg - 1, S_WHERE])
        return
    if wc[W_ON] != 0 and not wc_admit(wc):
        return  # power is off: IOERR, nothing moved
    cached = wc[W_ON] != 0
    through = (kflags & K_WRITETHROUGH) != 0
    out_len = rd - 16
    in_len = wr - 1
    ro = (kflags & K_RO) != 0
    if rtype == T_IN or rtype == T_OUT:  # noqa: SIM109 - Numba-friendly
        if rtype == T_IN and out_len > 0:
            i = first_seg_at(segs, nseg, False, 16)
            diag_put(diag, D_IN_DATA_NOT_WRITABLE, q, seq, head, segs[i, S_DESC], rtype, sector, out_len, 0,
                     segs[i, S_WHERE])
            return
        if rtype == T_OUT and in_len > 0:
            i = first_seg_at(segs, nseg, True, 0)
            diag_put(diag, D_OUT_DATA_NOT_READABLE, q, seq, head, segs[i, S_DESC], rtype, sector, in_len, 0,
                     segs[i, S_WHERE])
            return
        n = in_len if rtype == T_IN else out_len
        if n % 512 != 0:
            diag_put(diag, D_DATA_NOT_SECTOR_MULTIPLE, q, seq, head, head, rtype, sector, n, 0, 0)
            return
        nsect = n // 512
        if sector < 0 or sector > cap or nsect > cap - sector:
            diag_put(diag, D_SECTOR_OUT_OF_RANGE, q, seq, head, head, rtype, sector, nsect, cap, 0)
            return
        if rtype == T_OUT and ro:
            # §5.2.6.1: IOERR for a write on a read-only device, and no data written
            diag_put(diag, D_WRITE_READ_ONLY, q, seq, head, head, rtype, sector, 0, 0, 0)
            return
        if rtype == T_IN:
            e = image_io(
                mem, segs, nseg, True, 0, n, sector * 512, image_fd, ram, False,
                p[P_DIRECT_FD], p[P_DIRECT_MIN], ctl,
            )  # fmt: skip
            if e != 0:
                diag_put(diag, D_IO_ERROR, q, seq, head, head, rtype, sector, e, OP_PREAD, 0)
                return
            ctl[C_BYTES_READ] += n
            res[1] = n + 1
        else:
            # Direct writes only from a worker: a trapped queue serves on the notifier's thread,
            # which would wait for the disk instead of a page-cache copy.
            direct = p[P_DIRECT_WRITES] != 0 and p[P_SINGLE_PASS] == 0
            before = ctl[C_DIRECT_WRITTEN]
            e = image_io(
                mem, segs, nseg, False, 16, n, sector * 512, image_fd, ram, True,
                p[P_DIRECT_FD] if direct else -1, p[P_DIRECT_MIN], ctl,
            )  # fmt: skip
            if e != 0:
                diag_put(diag, D_IO_ERROR, q, seq, head, head, rtype, sector, e, OP_PWRITE, 0)
                return
            ctl[C_BYTES_WRITTEN] += n
            wb_min = p[P_WRITE_BEHIND_MIN]
            if (
                wb_min > 0
                and n >= wb_min
                and image_fd >= 0
                and not cached
                and not through
                and ctl[C_DIRECT_WRITTEN] - before < n  # some of it is in the page cache
            ):
                lo = sector * 512
                if ctl[C_WB_HI] <= ctl[C_WB_LO]:
                    ctl[C_WB_LO] = lo
                    ctl[C_WB_HI] = lo + n
                elif lo <= ctl[C_WB_HI] + wb_min and lo + n >= ctl[C_WB_LO] - wb_min:
                    # Near the range already recorded (a sequential stream): one range.  A distant
                    # write is left to the host: the span between would take every dirty page in
                    # the gap (other requests' small, hot blocks) along.
                    ctl[C_WB_LO] = min(ctl[C_WB_LO], lo)
                    ctl[C_WB_HI] = max(ctl[C_WB_HI], lo + n)
            if cached:
                wc_write(wc, wc_data, durable, ram, sector * 512, n, through)
            if kflags & K_WRITETHROUGH and image_fd >= 0 and c_fdatasync(np.int32(image_fd)) != 0:
                e = np.int64(errno())
                diag_put(diag, D_IO_ERROR, q, seq, head, head, rtype, sector, e, OP_FDATASYNC, 0)
                return
        res[0] = S_OK
        return
    if rtype == T_FLUSH:
        if cached:
            wc_destage(wc, wc_data, durable)
            wc[W_FLUSHES] += 1
        if image_fd >= 0 and c_fdatasync(np.int32(image_fd)) != 0:
            e = np.int64(errno())
            diag_put(diag, D_IO_ERROR, q, seq, head, head, rtype, sector, e, OP_FDATASYNC, 0)
            return
        res[0] = S_OK
        return
    if rtype == T_GET_ID:
        if in_len < 20:
            diag_put(diag, D_GET_ID_SHORT, q, seq, head, head, rtype, sector, in_len, 20, 0)
            return
        # write the 20 serial bytes through the writable stream
        done = 0
        for i in range(nseg):
            if done >= 20:
                break
            if (segs[i, S_FLAGS] & F_WRITE) == 0:
                continue
            k = min(segs[i, S_LEN], 20 - done)
            o = segs[i, S_OFF]
            for j in range(k):
                mem[o + j] = serial[done + j]
            done += k
        res[0] = S_OK
        res[1] = 21
        return
    if rtype == T_DISCARD or rtype == T_WRITE_ZEROES:  # noqa: SIM109
        is_discard = rtype == T_DISCARD
        feat = K_DISCARD if is_discard else K_WRITE_ZEROES
        if (kflags & feat) == 0:
            diag_put(diag, D_FEATURE_NOT_NEGOTIATED, q, seq, head, head, rtype, sector, rtype, 0, 0)
            res[0] = S_UNSUPP
            return
        if out_len == 0 or out_len % 16 != 0:
            diag_put(diag, D_SEGMENTS_BAD_LEN, q, seq, head, head, rtype, sector, out_len, 16, 0)
            return
        nrange = out_len // 16
        max_seg = p[P_MAX_DISCARD_SEG] if is_discard else p[P_MAX_WZ_SEG]
        max_sec = p[P_MAX_DISCARD_SECTORS] if is_discard else p[P_MAX_WZ_SECTORS]
        if nrange > max_seg:
            diag_put(diag, D_TOO_MANY_SEGMENTS, q, seq, head, head, rtype, sector, nrange, max_seg, 0)
            res[0] = S_UNSUPP
            return
        one = np.zeros(16, np.uint8)
        # check every segment before touching the image
        for r in range(nrange):
            gather(mem, segs, nseg, 16 + 16 * r, 16, one)
            s_sec = ld_le(one, 0, 8)
            s_num = ld_le(one, 8, 4)
            s_fl = ld_le(one, 12, 4)
            if s_fl & ~WZ_UNMAP:
                diag_put(diag, D_SEGMENT_BAD_FLAGS, q, seq, head, head, rtype, s_sec, s_fl, r, 0)
                res[0] = S_UNSUPP
                return
            if is_discard and (s_fl & WZ_UNMAP):
                diag_put(diag, D_DISCARD_UNMAP, q, seq, head, head, rtype, s_sec, s_fl, r, 0)
                res[0] = S_UNSUPP
                return
            if s_num > max_sec:
                diag_put(diag, D_SEGMENT_TOO_LARGE, q, seq, head, head, rtype, s_sec, s_num, max_sec, 0)
                return
            if s_sec < 0 or s_sec > cap or s_num > cap - s_sec:
                diag_put(diag, D_SECTOR_OUT_OF_RANGE, q, seq, head, head, rtype, s_sec, s_num, cap, 0)
                return
        if ro:
            diag_put(diag, D_WRITE_READ_ONLY, q, seq, head, head, rtype, sector, 0, 0, 0)
            return
        for r in range(nrange):
            gather(mem, segs, nseg, 16 + 16 * r, 16, one)
            s_sec = ld_le(one, 0, 8)
            s_num = ld_le(one, 8, 4)
            s_fl = ld_le(one, 12, 4)
            punch = is_discard or (s_fl & WZ_UNMAP) != 0
            e = zero_range(image_fd, ram, zeros, s_sec * 512, s_num * 512, punch)
            if e != 0:
                diag_put(diag, D_IO_ERROR, q, seq, head, head, rtype, s_sec, e, OP_FALLOCATE, 0)
                return
            if cached:
                wc_write(wc, wc_data, durable, ram, s_sec * 512, s_num * 512, through)
        if kflags & K_WRITETHROUGH and image_fd >= 0 and c_fdatasync(np.int32(image_fd)) != 0:
            e = np.int64(errno())
            diag_put(diag, D_IO_ERROR, q, seq, head, head, rtype, sector, e, OP_FDATASYNC, 0)
            return
        res[0] = S_OK
        return
    diag_put(diag, D_UNSUPPORTED_TYPE, q, seq, head, head, rtype, sector, rtype, 0, 0)
    res[0] = S_UNSUPP


@njit(cache=True)
def ring_check(p, q, diag, ctl, shared, call_fds):
    """Defence in depth: the rings must lie inside guest memory and be aligned (§2.7)."""
    qn = p[P_QNUM]
    gbase = p[P_GBASE]
    gsize = p[P_GSIZE]
    addrs = (p[P_DESC], p[P_AVAIL], p[P_USED])
    sizes = (16 * qn, 6 + 2 * qn, 6 + 8 * qn)
    aligns = (16, 2, 4)
    for k in range(3):
        a = addrs[k]
        if not in_guest(gbase, gsize, a, sizes[k]):
            diag_put(diag, D_RING_OUTSIDE_MEMORY, q, -1, -1, -1, -1, -1, a, sizes[k], 0)
            needs_reset(p, ctl, shared, call_fds)
            return False
        if (a - gbase) % aligns[k] != 0:
            diag_put(diag, D_RING_MISALIGNED, q, -1, -1, -1, -1, -1, a, aligns[k], 0)
            needs_reset(p, ctl, shared, call_fds)
            return False
    return True


@njit(cache=True)
def publish(mem, p, ctl, shared, heads, stat, ulen, soff, n, order):
    """Complete ``n`` popped requests in ``order``; then decide on the interrupt."""
    qn = p[P_QNUM]
    used = p[P_USED] - p[P_GBASE]
    avail = p[P_AVAIL] - p[P_GBASE]
    old = ctl[C_USED_IDX]
    for k in range(n):
        i = order[k]
        if soff[i] >= 0:
            mem[soff[i]] = stat[i]
        e = used + 4 + 8 * ((old + k) & (qn - 1))
        st_le(mem, e, 4, heads[i])
        st_le(mem, e + 4, 4, ulen[i])  # §2.7.8.2: len is set before used->idx moves
    new = (old + n) & 0xFFFF
    # release: used elements, data and status bytes are visible before the new used->idx
    store_release_u16(mem, used + 2, new)
    ctl[C_USED_IDX] = new
    # seq_cst: the used->idx store must be ordered before the used_event / avail->flags
    # loads (store->load); otherwise the driver may re-arm after we read a stale
    # used_event and neither side signals (lost interrupt)
    fence_seq_cst()
    if p[P_FLAGS] & K_EVENT_IDX:
        ue = ld16(mem, avail + 4 + 2 * qn)
        need = ((new - ue - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
    else:
        need = (ld16(mem, avail) & 1) == 0
    if need:
        fetch_or_u32(shared, SH_ISR, INT_VRING)
        ctl[C_INTERRUPTS] += 1
        signal_fd(p[P_CALL_FD])


@njit(cache=True)
def make_order(ctl, n, mode, order):
    for k in range(n):
        order[k] = k
    if mode == ORDER_REVERSE:
        for k in range(n):
            order[k] = n - 1 - k
    elif mode == ORDER_SHUFFLE:
        # Fisher-Yates with a 31-bit LCG kept in ctl, so the twin reproduces it
        x = ctl[C_RNG]
        for k in range(n - 1, 0, -1):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            j = x % (k + 1)
            t = order[k]
            order[k] = order[j]
            order[j] = t
        ctl[C_RNG] = x


@njit(nogil=True, cache=True)
def serve_queue(
    mem, p, ctl, shared, call_fds, diag, ram, serial, zeros, wc, wc_data, durable
):
    """Serve one virtqueue until stopped (or, in single-pass mode, until it is empty).

    Returns the number of requests completed by this call.
    """
    q = p[P_QUEUE]
    qn = p[P_QNUM]
    if qn <= 0 or qn > 32768 or (qn & (qn - 1)) != 0:
        return 0
    if ctl[C_BROKEN] != 0:
        return 0
    if not ring_check(p, q, diag, ctl, shared, call_fds):
        return 0
    gbase = p[P_GBASE]
    avail = p[P_AVAIL] - gbase
    used = p[P_USED] - gbase
    event_idx = (p[P_FLAGS] & K_EVENT_IDX) != 0
    single = p[P_SINGLE_PASS] != 0
    spin_ns = p[P_SPIN_NS]
    inflight = np.zeros(qn, np.uint8)
    # Written before they are read (entries < n, segments < nseg): left unzeroed, because a
    # trapped queue calls this once per notify and zeroing them (~60 KiB with 256 entries) cost
    # more than the request itself and evicted the caller's working set from the CPU cache.
    heads = np.empty(qn, np.int64)
    stat = np.empty(qn, np.int64)
    ulen = np.empty(qn, np.int64)
    soff = np.empty(qn, np.int64)
    order = np.empty(qn, np.int64)
    segs = np.empty((qn + p[P_INDIRECT_MAX], 5), np.int64)
    err = np.zeros(4, np.int64)
    hdr = np.zeros(16, np.uint8)
    res = np.zeros(3, np.int64)
    kbuf = np.zeros(8, np.uint8)
    completed = 0
    no_notify = False
    idle_since = monotonic_ns()
    spins = 0
    # Adaptive polling, as QEMU's aio-poll does it: after each sleep, look at how
    # long it lasted.  Work that came less than `spin_ns` after we gave up would
    # have been caught by a longer poll: double the window.  A sleep longer than
    # `spin_ns` means polling there would only have burnt CPU: halve it.  A busy
    # queue stays hot; a trickle of requests costs no CPU.
    window = spin_ns // 4
    while True:
        if load_acquire_u64(ctl, C_STOP * 8) != 0:
            break
        last = ctl[C_LAST_AVAIL]
        # acquire: ring entries and descriptors are read only after avail->idx
        aidx = ld16(mem, avail + 2)
        pending = (aidx - last) & 0xFFFF
        if pending > qn:
            diag_put(diag, D_AVAIL_IDX_JUMP, q, ctl[C_SEQ], -1, -1, -1, -1, aidx, last, 0)
            needs_reset(p, ctl, shared, call_fds)
            break
        if pending == 0:
            if single:
                # The next notification is the only way back in: ask for it for the very next
                # request (a polling worker does the same just before it sleeps).
                if event_idx:
                    store_release_u16(mem, used + 4 + 8 * qn, last)
                break
            now = monotonic_ns()
            if now - idle_since < window:
                spins += 1
                if (spins & 7) == 0:
                    # More busy threads than cores: the driver we wait for (and the
                    # threads it serves) may be runnable on this very core, so give
                    # them the CPU often - every 8 probes, well under a microsecond of
                    # spinning.  (Every 64: 4-job FUSE random reads 5-10 % fewer IOPS on
                    # 2 vCPUs, alternated runs; where nothing else is runnable the
                    # yield returns at once.)
                    c_sched_yield()
                if not event_idx and not no_notify:
                    # polling: tell the driver not to kick (VIRTQ_USED_F_NO_NOTIFY)
                    store_release_u16(mem, used, 1)
                    no_notify = True
                continue
            # about to sleep: re-enable kicks
            if event_idx:
                store_release_u16(mem, used + 4 + 8 * qn, last)  # avail_event = last_avail_idx
            else:
                store_release_u16(mem, used, 0)  # clear VIRTQ_USED_F_NO_NOTIFY
                no_notify = False
            # seq_cst: the re-arm store must be ordered before re-reading avail->idx
            # (store->load, pairs with the driver's mb between avail->idx and the
            # kick decision); without it a kick can be lost and the queue hangs
            fence_seq_cst()
            if ld16(mem, avail + 2) != last or load_acquire_u64(ctl, C_STOP * 8) != 0:
                idle_since = now
                continue
            ctl[C_SLEEPS] += 1
            r = c_read(np.int32(p[P_KICK_FD]), address_of(kbuf, 0), np.uint64(8))
            if r < 0 and np.int64(errno()) != EINTR:
                break  # kick fd closed: nothing can wake us any more
            idle_since = monotonic_ns()
            if idle_since - now <= spin_ns:
                window = min(spin_ns, window * 2)
            else:
                window = max(SPIN_MIN_NS, window // 2)
            continue
        # pop the batch
        n = 0
        broken = False
        while n < pending:
            slot = (last + n) & (qn - 1)
            head = ld_le(mem, avail + 4 + 2 * slot, 2)
            if head >= qn:
                diag_put(diag, D_HEAD_OUT_OF_RANGE, q, ctl[C_SEQ] + n, head, head, -1, -1, head,
                         (last + n) & 0xFFFF, 0)
                broken = True
                break
            if inflight[head] != 0:
                diag_put(diag, D_DUPLICATE_HEAD, q, ctl[C_SEQ] + n, head, head, -1, -1, head, 0, 0)
                broken = True
                break
            inflight[head] = 1
            heads[n] = head
            n += 1
        ctl[C_LAST_AVAIL] = (last + n) & 0xFFFF
        for i in range(n):
            seq = ctl[C_SEQ]
            ctl[C_SEQ] = seq + 1
            handle_request(mem, p, ctl, diag, heads[i], seq, segs, err, hdr, ram, serial, zeros, res,
                           wc, wc_data, durable)
            stat[i] = res[0]
            ulen[i] = res[1]
            soff[i] = res[2]
            if res[0] != S_OK:
                ctl[C_ERRORS] += 1
        make_order(ctl, n, p[P_ORDER], order)
        # Count before publishing: the release store of used->idx then makes the
        # statistics at least as new as the completions a driver can see.
        ctl[C_REQUESTS] += n
        if n > 0:
            publish(mem, p, ctl, shared, heads, stat, ulen, soff, n, order)
        for i in range(n):
            inflight[heads[i]] = 0
        write_behind(p, ctl, single)
        completed += n
        if broken:
            needs_reset(p, ctl, shared, call_fds)
            break
        idle_since = monotonic_ns()
    return completed


@njit(cache=True)
def write_behind(p, ctl, single):
    """Start the host's write-back of the large writes this pass completed (``C_WB_LO/HI``).

    After the completions are published, so the driver does not wait for it: the pages go
    to the disk while the guest goes on, and a later FLUSH (``fdatasync``) has less left to
    write.  ``SYNC_FILE_RANGE_WRITE`` only queues the write-back; it is a hint, its errors
    are fdatasync's to report.  A trapped queue (``single``) skips it: there the caller's
    own thread would pay for it.
    """
    lo = ctl[C_WB_LO]
    hi = ctl[C_WB_HI]
    if hi <= lo:
        return
    ctl[C_WB_LO] = 0
    ctl[C_WB_HI] = 0
    if single:
        return
    c_sync_file_range(np.int32(p[P_IMAGE_FD]), lo, hi - lo, np.uint32(SYNC_FILE_RANGE_WRITE))
    ctl[C_WB_BYTES] += hi - lo


@njit(cache=True)
def isr_ack(shared, bits):
    """InterruptACK: atomically clear ``bits`` of InterruptStatus (a kernel may be setting others)."""
    return fetch_and_u32(shared, SH_ISR, np.uint32(~bits & 0xFFFFFFFF))


@njit(cache=True)
def isr_set(shared, off, bits):
    """Atomically OR ``bits`` into shared word at byte ``off``."""
    return fetch_or_u32(shared, off, np.uint32(bits))
