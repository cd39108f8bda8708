"""Low-level primitives the Numba kernels are built from: atomics, fences, libc calls.

Theory of operation
-------------------
The driver and the device share guest memory and run on different threads, so
every publish/consume point of the split virtqueue needs the ordering the
virtio spec (§2.7.13, §2.7.14) asks for.  Numba has no atomics of its own, and a
plain array load inside a spin loop is hoisted out of the loop by LLVM (it can
prove nothing in the loop stores to it), so the loop never sees the other
thread's store.  The intrinsics below emit LLVM atomic loads/stores and fences
directly:

* ``load_acquire_u16/u32`` - an ``acquire`` load: later loads (ring entries,
  descriptors, status bytes) cannot be reordered before it.  This is the rmb of
  Linux's virtio_ring after reading ``avail->idx`` / ``used->idx``.
* ``store_release_u16/u32`` - a ``release`` store: earlier stores (descriptors,
  ring entries, data, status) become visible no later than it.  This is the
  wmb before bumping ``avail->idx`` / ``used->idx``.
* ``fence_seq_cst`` - a full barrier (``mfence`` on x86).  Needed for the four
  store->load pairs of the notification protocol (publish idx, then read the
  other side's event index / flags), where a missing barrier loses a kick or an
  interrupt and hangs the queue.

Every intrinsic takes a 1-D ``uint8`` array and a *byte offset*; the caller has
already checked the offset (guest-controlled values are checked once, at the
boundary, before they reach these functions).

libc functions are bound through ``numba.types.ExternalFunction`` so that the
kernels that call them stay cacheable (``cache=True``): binding them through a
ctypes object would make them "dynamic globals" and disable the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# --- atomics -----------------------------------------------------------------


def _load(bits: int, ordering: str) -> Any:
    @intrinsic
    def impl(typingctx: Any, mem: Any, off: Any) -> Any:
        ret = types.uint16 if bits == 16 else types.uint32 if bits == 32 else types.uint64
        sig = ret(mem, off)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrty, offty = signature.args
            ary = context.make_array(arrty)(context, builder, args[0])
            base = builder.ptrtoint(ary.data, ir.IntType(64))
            off64 = context.cast(builder, args[1], offty, types.int64)
            addr = builder.add(base, off64)
            ptr = builder.inttoptr(addr, ir.PointerType(ir.IntType(bits)))
            return builder.load_atomic(ptr, ordering, bits // 8)

        return sig, codegen

    return impl


def _store(bits: int, ordering: str) -> Any:
    @intrinsic
    def impl(typingctx: Any, mem: Any, off: Any, val: Any) -> Any:
        sig = types.void(mem, off, val)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrty, offty, _ = signature.args
            ary = context.make_array(arrty)(context, builder, args[0])
            base = builder.ptrtoint(ary.data, ir.IntType(64))
            off64 = context.cast(builder, args[1], offty, types.int64)
            addr = builder.add(base, off64)
            ptr = builder.inttoptr(addr, ir.PointerType(ir.IntType(bits)))
            v = args[2]
            if v.type.width > bits:
                v = builder.trunc(v, ir.IntType(bits))
            elif v.type.width < bits:
                v = builder.zext(v, ir.IntType(bits))
            builder.store_atomic(v, ptr, ordering, bits // 8)
            return context.get_dummy_value()

        return sig, codegen

    return impl


def _rmw_or(bits: int) -> Any:
    @intrinsic
    def impl(typingctx: Any, mem: Any, off: Any, val: Any) -> Any:
        ret = types.uint32 if bits == 32 else types.uint64
        sig = ret(mem, off, val)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrty, offty, _ = signature.args
            ary = context.make_array(arrty)(context, builder, args[0])
            base = builder.ptrtoint(ary.data, ir.IntType(64))
            off64 = context.cast(builder, args[1], offty, types.int64)
            addr = builder.add(base, off64)
            ptr = builder.inttoptr(addr, ir.PointerType(ir.IntType(bits)))
            v = args[2]
            if v.type.width > bits:
                v = builder.trunc(v, ir.IntType(bits))
            elif v.type.width < bits:
                v = builder.zext(v, ir.IntType(bits))
            return builder.atomic_rmw("or", ptr, v, "seq_cst")

        return sig, codegen

    return impl


load_acquire_u16 = _load(16, "acquire")
load_acquire_u32 = _load(32, "acquire")
load_acquire_u64 = _load(64, "acquire")
store_release_u16 = _store(16, "release")
store_release_u32 = _store(32, "release")
store_release_u64 = _store(64, "release")
fetch_or_u32 = _rmw_or(32)


@intrinsic
def as_pointer(typingctx: Any, address: Any, dtype: Any) -> Any:
    """``(T *) address``: an int64 address as a typed pointer, for ``numba.carray``.

    ``dtype`` is a Numba number class (``numba.uint8``), a compile-time constant.  Only for
    addresses of arrays that the caller keeps alive (``ledger._trap_kernel.bind``).
    """
    sig = types.CPointer(dtype.dtype)(address, dtype)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@numba.njit(cache=True, nogil=True, inline="always")
def table_array(tab, i, dtype):  # type: ignore[no-untyped-def]
    """Row ``i`` of an address table (see :func:`address_table`) as a 1-D array of ``dtype``."""
    return numba.carray(as_pointer(tab[i, 0], dtype), tab[i, 1])  # type: ignore[attr-defined,call-arg]


def address_table(arrays: Sequence[Any], dtypes: Sequence[type[np.generic]]) -> npt.NDArray[np.int64] | None:
    """One int64 row of (address, length) per array, for kernels that rebuild them (:func:`table_array`).

    Entering a Numba kernel costs a type check and an unboxing per argument; a kernel that takes a
    table instead of many arrays that never change is entered for the price of one.  Only arrays of
    exactly ``dtypes`` (1-D, C-contiguous, writeable) qualify; otherwise None (pass them as they are).
    The table holds addresses, not references: the caller keeps the arrays alive while it is used.
    """
    if len(arrays) != len(dtypes) or not all(
        isinstance(a, np.ndarray)
        and a.dtype == dt
        and a.ndim == 1
        and a.flags.c_contiguous
        and a.flags.writeable
        for a, dt in zip(arrays, dtypes, strict=True)
    ):
        return None
    return np.array([(a.ctypes.data, a.size) for a in arrays], dtype=np.int64)


@intrinsic
def fence_seq_cst(typingctx: Any) -> Any:
    """Full memory barrier (store->load ordering); ``mfence`` on x86-64."""
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence_acq_rel(typingctx: Any) -> Any:
    """Acquire+release barrier; on x86-64 (TSO) only a compiler barrier."""
    sig = types.void()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("acq_rel")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def address_of(typingctx: Any, mem: Any, off: Any) -> Any:
    """Host address of ``mem[off]`` as an int64, for passing buffers to libc."""
    sig = types.int64(mem, off)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        arrty, offty = signature.args
        ary = context.make_array(arrty)(context, builder, args[0])
        base = builder.ptrtoint(ary.data, ir.IntType(64))
        off64 = context.cast(builder, args[1], offty, types.int64)
        return builder.add(base, off64)

    return sig, codegen


@intrinsic
def errno(typingctx: Any) -> Any:
    """The calling thread's ``errno`` (read right after a failed libc call)."""
    sig = types.int32()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(ir.PointerType(ir.IntType(32)), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "__errno_location")
        return builder.load(builder.call(fn, []))

    return sig, codegen


@intrinsic
def monotonic_ns(typingctx: Any) -> Any:
    """``clock_gettime(CLOCK_MONOTONIC)`` in nanoseconds, callable without the GIL."""
    sig = types.int64()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        ts = cgutils.alloca_once(builder, ir.ArrayType(i64, 2))
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.PointerType(ir.ArrayType(i64, 2))])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(ir.IntType(32), 1), ts])
        sec = builder.load(builder.gep(ts, [ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 0)]))
        nsec = builder.load(builder.gep(ts, [ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return sig, codegen


# --- libc --------------------------------------------------------------------
# Buffer arguments are declared as int64 host addresses (from ``address_of``):
# on the SysV x86-64 and AAPCS64 ABIs a pointer and a 64-bit integer travel in
# the same register, and this keeps the kernels free of pointer casts.
_i64, _i32, _u64 = types.int64, types.int32, types.uint64
c_pread = types.ExternalFunction("pread", _i64(_i32, _i64, _u64, _i64))
c_pwrite = types.ExternalFunction("pwrite", _i64(_i32, _i64, _u64, _i64))
c_read = types.ExternalFunction("read", _i64(_i32, _i64, _u64))
c_write = types.ExternalFunction("write", _i64(_i32, _i64, _u64))
c_fdatasync = types.ExternalFunction("fdatasync", _i32(_i32))
c_fallocate = types.ExternalFunction("fallocate", _i32(_i32, _i32, _i64, _i64))
c_sync_file_range = types.ExternalFunction("sync_file_range", _i32(_i32, _i64, _i64, types.uint32))
c_memcpy = types.ExternalFunction("memcpy", _i64(_i64, _i64, _u64))
c_memset = types.ExternalFunction("memset", _i64(_i64, _i32, _u64))
# Spin loops call this now and then: on a machine with fewer cores than busy
# threads, the thread we are waiting for may be runnable on *this* core.
c_sched_yield = types.ExternalFunction("sched_yield", _i32())

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
