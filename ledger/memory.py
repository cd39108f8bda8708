"""Guest memory: the one region that the driver and the device share.

Theory of operation
-------------------
A guest kernel and its hypervisor share nothing but guest RAM: the driver puts
descriptor tables, rings, request headers, data buffers and status bytes there,
and names them by *guest-physical address* (GPA).  :class:`GuestMemory` is that
RAM: a ``memfd`` mapped into this process (so it could be handed to another
process, as vhost-user does), seen as one flat ``numpy.uint8`` array, and
placed at a configurable guest-physical base address (0x8000_0000 by default,
where RISC-V ``virt`` machines put DRAM).  Address 0 is therefore *not* guest
memory, which turns the classic "buffer address left at 0" driver bug into a
diagnosed error instead of a silent read of the wrong bytes.

Translation is the only service this module offers: ``offset(gpa, length)``
checks that ``[gpa, gpa+length)`` lies entirely inside guest memory (with
overflow-safe arithmetic: a guest may hand us 0xFFFF_FFFF_FFFF_FFF0) and
returns the offset into :attr:`array`.  The Numba kernels do the same check
inline, against the same two numbers (``base``, ``size``).
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np
import numpy.typing as npt

DEFAULT_GUEST_BASE = 0x8000_0000
PAGE_SIZE = 4096


class GuestMemoryError(ValueError):
    """A guest-physical range that is not (entirely) inside guest memory."""


class GuestMemory:
    """A contiguous, shareable guest RAM region at guest-physical ``base``.

    Args:
        size: bytes of guest RAM; rounded up to a whole page.
        base: guest-physical address of the first byte (page aligned).

    Example:
        >>> mem = GuestMemory(1 << 20)
        >>> mem.write(mem.base + 16, b"abc")
        >>> bytes(mem.read(mem.base + 16, 3))
        b'abc'
    """

    def __init__(self, size: int, base: int = DEFAULT_GUEST_BASE) -> None:
        if size <= 0:
            raise ValueError("guest memory size must be positive")
        if base % PAGE_SIZE or base < 0 or base + size > 1 << 64:
            raise ValueError(f"guest memory base {base:#x} must be page aligned and fit in 64 bits")
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        self.base = base
        self.size = size
        self.fd = os.memfd_create("ledger-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.array: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)

    def contains(self, gpa: int, length: int) -> bool:
        """True if ``[gpa, gpa+length)`` is inside guest memory (``length`` may be 0)."""
        if gpa < self.base or length < 0:
            return False
        off = gpa - self.base
        return off <= self.size and length <= self.size - off

    def offset(self, gpa: int, length: int) -> int:
        """Offset of ``gpa`` in :attr:`array`, after checking the whole range."""
        if not self.contains(gpa, length):
            raise GuestMemoryError(
                f"guest range {gpa:#x}+{length:#x} is outside guest memory "
                f"[{self.base:#x}, {self.base + self.size:#x})"
            )
        return gpa - self.base

    def view(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """A writable numpy view of ``length`` bytes at ``gpa`` (no copy)."""
        off = self.offset(gpa, length)
        return self.array[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return self.view(gpa, length).tobytes()

    def write(self, gpa: int, data: bytes | bytearray | memoryview | npt.NDArray[np.uint8]) -> None:
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        self.view(gpa, len(src))[:] = src

    def close(self) -> None:
        """Unmap and close.  Views taken earlier must not be used afterwards."""
        if self.fd >= 0:
            del self.array
            # A numpy view may still reference the mapping; then the kernel
            # reclaims it with the last reference.
            with contextlib.suppress(BufferError):
                self._map.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GuestAllocator:
    """A bump allocator that carves aligned regions out of guest memory.

    The driver uses it once, at set-up, for rings, header/status areas,
    indirect tables and the data-buffer pool, the way a guest kernel reserves
    DMA memory at probe time.  Nothing is ever freed individually; ``reset``
    forgets everything (device reset).
    """

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self._next = mem.base

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the GPA of ``size`` fresh, zeroed bytes aligned to ``align``."""
        gpa = -(-self._next // align) * align
        if not self.mem.contains(gpa, size):
            raise MemoryError(
                f"guest memory exhausted: need {size} bytes at {gpa:#x}, "
                f"have up to {self.mem.base + self.mem.size:#x}"
            )
        self._next = gpa + size
        self.mem.view(gpa, size)[:] = 0
        return gpa

    @property
    def used(self) -> int:
        return self._next - self.mem.base

    def reset(self) -> None:
        self._next = self.mem.base
