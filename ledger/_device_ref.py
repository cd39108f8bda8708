"""The pure-Python twin of :mod:`ledger._device_kernel` (the differential-test oracle).

Theory of operation
-------------------
Numba compiles a *typed* dialect of Python: integers are fixed-width, mixed
signed/unsigned arithmetic silently changes type, and an out-of-range index is
not caught (``boundscheck`` is off).  The twin runs the **same algorithm**, the
kernel module's own source functions (``Dispatcher.py_func``), under the
CPython interpreter, with the Numba intrinsics replaced by plain-Python
equivalents (:func:`_py_load`, :func:`_py_store`, libc through ``ctypes``).
Numpy then raises ``IndexError`` where the compiled kernel would read out of
bounds, and Python's unbounded integers expose any arithmetic that only "works"
because it wraps in 64 bits.  A hypothesis test feeds both the same (often
malformed) rings and compares used entries, status bytes, memory and
diagnostic codes.

Each call of :func:`load_twin` builds a fresh namespace in which every kernel
function is rebound to the interpreted versions of the others, so the twin
never calls compiled code.
"""

from __future__ import annotations

import ctypes
import os
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ledger import _device_kernel

_libc = ctypes.CDLL(None, use_errno=True)
_libc.pread.restype = ctypes.c_ssize_t
_libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_libc.pwrite.restype = ctypes.c_ssize_t
_libc.pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_libc.read.restype = ctypes.c_ssize_t
_libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.write.restype = ctypes.c_ssize_t
_libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.restype = ctypes.c_int
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _bytes(arr: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    return arr.view(np.uint8).reshape(-1)


def _py_load(nbytes: int) -> Callable[[npt.NDArray[Any], int], int]:
    def load(arr: npt.NDArray[Any], off: int) -> int:
        return int.from_bytes(_bytes(arr)[off : off + nbytes].tobytes(), "little")

    return load


def _py_store(nbytes: int) -> Callable[[npt.NDArray[Any], int, int], None]:
    def store(arr: npt.NDArray[Any], off: int, val: int) -> None:
        v = int(val) & ((1 << (8 * nbytes)) - 1)
        _bytes(arr)[off : off + nbytes] = np.frombuffer(v.to_bytes(nbytes, "little"), np.uint8)

    return store


def _py_fetch_or_u32(arr: npt.NDArray[Any], off: int, val: int) -> int:
    old = _py_load(4)(arr, off)
    _py_store(4)(arr, off, old | int(val))
    return old


def _py_fetch_and_u32(arr: npt.NDArray[Any], off: int, val: int) -> int:
    old = _py_load(4)(arr, off)
    _py_store(4)(arr, off, old & int(val))
    return old


def _py_address_of(arr: npt.NDArray[Any], off: int) -> int:
    return int(arr.ctypes.data) + int(off)


def _noop() -> None:
    return None


def _sched_yield() -> int:
    os.sched_yield()
    return 0


def _fdatasync(fd: int) -> int:
    try:
        os.fdatasync(int(fd))
    except OSError as e:
        ctypes.set_errno(e.errno or 5)
        return -1
    return 0


INTRINSICS: dict[str, Any] = {
    "load_acquire_u16": _py_load(2),
    "load_acquire_u32": _py_load(4),
    "load_acquire_u64": _py_load(8),
    "store_release_u16": _py_store(2),
    "store_release_u32": _py_store(4),
    "store_release_u64": _py_store(8),
    "fetch_or_u32": _py_fetch_or_u32,
    "fetch_and_u32": _py_fetch_and_u32,
    "fence_seq_cst": _noop,
    "fence_acq_rel": _noop,
    "address_of": _py_address_of,
    "errno": ctypes.get_errno,
    "monotonic_ns": time.monotonic_ns,
    "c_pread": lambda fd, a, n, off: _libc.pread(int(fd), int(a), int(n), int(off)),
    "c_pwrite": lambda fd, a, n, off: _libc.pwrite(int(fd), int(a), int(n), int(off)),
    "c_read": lambda fd, a, n: _libc.read(int(fd), int(a), int(n)),
    "c_write": lambda fd, a, n: _libc.write(int(fd), int(a), int(n)),
    "c_fdatasync": _fdatasync,
    "c_memcpy": lambda dst, src, n: ctypes.memmove(int(dst), int(src), int(n)),
    "c_sched_yield": _sched_yield,
    "c_fallocate": lambda fd, mode, off, n: _libc.fallocate(int(fd), int(mode), int(off), int(n)),
    "c_sync_file_range": lambda fd, off, n, fl: _libc.sync_file_range(int(fd), int(off), int(n), int(fl)),
}


def load_twin() -> types.SimpleNamespace:
    """Interpreted copies of every kernel function, calling each other (never compiled code)."""
    ns: dict[str, Any] = dict(vars(_device_kernel))
    ns.update(INTRINSICS)
    for name, obj in list(vars(_device_kernel).items()):
        py_func = getattr(obj, "py_func", None)
        if py_func is not None:
            code, defaults, closure = py_func.__code__, py_func.__defaults__, py_func.__closure__
            ns[name] = types.FunctionType(code, ns, name, defaults, closure)
    return types.SimpleNamespace(**{k: v for k, v in ns.items() if not k.startswith("__")})


_TWIN = load_twin()
serve_queue_ref: Callable[..., int] = _TWIN.serve_queue
handle_request_ref: Callable[..., None] = _TWIN.handle_request
walk_chain_ref: Callable[..., int] = _TWIN.walk_chain
