"""Block backends: where the device's sectors live.

Theory of operation
-------------------
A backend is data, not behaviour: the device's Numba kernel does all the I/O
itself, so a backend only has to hand it two things, an ``image_fd`` (an open
file descriptor, or -1) and a ``ram`` array (the bytes of an in-memory disk, or
an empty array).  One cached kernel serves both kinds:

* :class:`FileBackend` - a raw image file.  Reads/writes are ``pread``/
  ``pwrite`` straight between the file and guest memory; FLUSH is
  ``fdatasync``; DISCARD punches a hole; WRITE_ZEROES uses
  ``FALLOC_FL_ZERO_RANGE`` (punch hole with UNMAP), falling back to writing
  zeros where the filesystem lacks those modes.  A read-only backend opens the
  image ``O_RDONLY`` and the device then offers VIRTIO_BLK_F_RO.
* :class:`RamBackend` - a numpy array; the same semantics, no syscalls.  For
  tests and benchmarks.

The device is the only code that opens an image for I/O (creating/sizing an
image is :func:`create_image`'s job).  The owner of a backend closes it,
after closing the device.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from ledger._spec import VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_SECTOR_SIZE

__all__ = ["Backend", "BackendError", "FileBackend", "ImageSizeError", "RamBackend", "create_image"]

_EMPTY = np.zeros(0, dtype=np.uint8)


class BackendError(ValueError):
    """A backend that cannot be used as a virtio-blk disk."""


class ImageSizeError(BackendError):
    """The image size is not a positive multiple of 512 bytes (virtio-blk sectors)."""


def _serial_bytes(serial: str | bytes) -> bytes:
    raw = serial.encode() if isinstance(serial, str) else bytes(serial)
    return raw[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")


class Backend:
    """What the device needs from a backend (see the module docstring)."""

    image_fd: int = -1
    ram: npt.NDArray[np.uint8] = _EMPTY
    nbytes: int = 0
    read_only: bool = False
    name: str = "disk"

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors."""
        return self.nbytes // VIRTIO_BLK_SECTOR_SIZE

    def default_serial(self) -> bytes:
        """GET_ID answer when the device is not given one: derived from the name, NUL-padded to 20."""
        return _serial_bytes(self.name)

    def close(self) -> None:
        """Release the backend (after the device using it is closed)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RamBackend(Backend):
    """An in-memory disk of ``nbytes`` (a multiple of 512), zero-filled.

    Example:
        >>> b = RamBackend(4096)
        >>> b.capacity, b.ram.size
        (8, 4096)
    """

    def __init__(self, nbytes: int, *, read_only: bool = False, name: str = "ram") -> None:
        if nbytes <= 0 or nbytes % VIRTIO_BLK_SECTOR_SIZE:
            raise ImageSizeError(f"RAM disk size {nbytes} is not a positive multiple of 512 bytes")
        self.ram = np.zeros(nbytes, dtype=np.uint8)
        self.nbytes = nbytes
        self.read_only = read_only
        self.name = name


class FileBackend(Backend):
    """A raw image file, used through pread/pwrite/fdatasync/fallocate by the kernel.

    Args:
        path: an existing image whose size is a positive multiple of 512.
        read_only: open ``O_RDONLY``; the device then offers VIRTIO_BLK_F_RO.

    Raises:
        ImageSizeError: the size is not a positive multiple of 512 (the fd is closed again).
        OSError: the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.name = os.path.basename(self.path) or "image"
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(self.path, flags)
        try:
            size = os.fstat(fd).st_size
            if size <= 0 or size % VIRTIO_BLK_SECTOR_SIZE:
                raise ImageSizeError(
                    f"image {self.path!r} is {size} bytes, not a positive multiple of 512 "
                    f"(virtio-blk counts in 512-byte sectors)"
                )
        except BaseException:
            os.close(fd)
            raise
        self.image_fd = fd
        self.nbytes = size

    def close(self) -> None:
        if self.image_fd >= 0:
            os.close(self.image_fd)
            self.image_fd = -1


def create_image(path: str | os.PathLike[str], nbytes: int) -> None:
    """Create (or resize) a sparse image file of ``nbytes`` (a multiple of 512)."""
    if nbytes <= 0 or nbytes % VIRTIO_BLK_SECTOR_SIZE:
        raise ImageSizeError(f"image size {nbytes} is not a positive multiple of 512 bytes")
    with open(path, "ab") as f:
        f.truncate(nbytes)
