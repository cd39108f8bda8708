"""Block backends: where the device's sectors live.

Theory of operation
-------------------
A backend is data, not behaviour: the device's Numba kernel does all the I/O
itself, so a backend only has to hand it two things, an ``image_fd`` (an open
file descriptor, or -1) and a ``ram`` array (the bytes of an in-memory disk, or
an empty array).  One cached kernel serves both kinds:

* :class:`FileBackend` - a raw image file.  Reads/writes are ``pread``/
  ``pwrite`` straight between the file and guest memory; with
  ``direct_reads``, a large read (``DIRECT_MIN`` bytes or more, 4 KiB-aligned)
  goes through a second, ``O_DIRECT`` descriptor (``direct_fd``), so it lands
  in guest memory by DMA instead of through the host page cache (QEMU's
  ``cache=none``, for reads only); with ``write_behind`` (the default), a
  worker thread that completed a large write (``WRITE_BEHIND_MIN`` bytes or
  more) then starts the host's write-back of it (``sync_file_range``), so the
  disk writes while the guest goes on and a later FLUSH has little left to do;
  FLUSH is ``fdatasync``; DISCARD punches a hole; WRITE_ZEROES uses
  ``FALLOC_FL_ZERO_RANGE`` (punch hole with UNMAP), falling back to writing
  zeros where the filesystem lacks those modes.  A read-only backend opens the
  image ``O_RDONLY`` and the device then offers VIRTIO_BLK_F_RO.
* :class:`RamBackend` - a numpy array; the same semantics, no syscalls.  For
  tests and benchmarks.
* :class:`CrashBackend` - a RAM disk with a volatile write cache (CONFIG_WCE) and
  a power switch: completed writes stay in the cache until a FLUSH, and
  :meth:`CrashBackend.power_cut` builds the image a power loss would leave
  (unflushed writes lost, applied in any order, or torn at 512-byte sectors),
  deterministically from a seed.  The data path stays in the kernel (a log
  appended with memcpy); see ``_device_kernel`` "Power-cut simulation".

The device is the only code that opens an image for I/O (creating/sizing an
image is :func:`create_image`'s job).  The owner of a backend closes it,
after closing the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ledger import _device_kernel as K
from ledger._spec import VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_SECTOR_SIZE

__all__ = [
    "Backend", "BackendError", "CrashBackend", "FileBackend", "ImageSizeError", "LossPattern", "RamBackend",
    "create_image",
]

_EMPTY = np.zeros(0, dtype=np.uint8)
_SECTOR = VIRTIO_BLK_SECTOR_SIZE


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
    #: an ``O_DIRECT`` descriptor of the same image for large aligned reads (and writes), or -1
    direct_fd: int = -1
    #: reads of at least this many bytes (4 KiB-aligned) go through ``direct_fd``
    direct_min: int = K.DIRECT_MIN
    #: writes of ``direct_min`` bytes or more (aligned) go through ``direct_fd`` too
    direct_writes: bool = False
    #: a worker starts the write-back of image writes at least this large (0: never; file backends)
    write_behind_min: int = 0
    ram: npt.NDArray[np.uint8] = _EMPTY
    nbytes: int = 0
    read_only: bool = False
    name: str = "disk"
    #: volatile write cache state for the kernel (``wc[W_ON] = 0``: none; see CrashBackend)
    wc: npt.NDArray[np.int64] = np.zeros(K.W_HDR, np.int64)
    wc_data: npt.NDArray[np.uint8] = _EMPTY
    durable: npt.NDArray[np.uint8] = _EMPTY

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


@dataclass(frozen=True)
class LossPattern:
    """What :meth:`CrashBackend.power_cut` did to the unflushed writes (for failure reports)."""

    seed: int
    unflushed: int  # writes in the volatile cache at the cut
    kept: int  # applied whole
    torn: int  # applied in part (a random subset of their sectors)
    lost: int
    reordered: bool  # applied in a random order rather than completion order

    def __str__(self) -> str:
        order = "shuffled" if self.reordered else "in order"
        return (f"seed {self.seed}: {self.unflushed} unflushed writes -> {self.kept} kept, {self.torn} torn, "
                f"{self.lost} lost, {order}")


class CrashBackend(RamBackend):
    """A RAM disk with a volatile write cache and a power switch (for crash-consistency testing).

    Reads see every completed write (``ram``).  Writes reach ``durable`` only at a FLUSH (or at once in
    writethrough mode, i.e. config ``writeback = 0``).  :meth:`cut_after` makes the device fail every
    request from the N-th on (the power is off: nothing more reaches the disk); :meth:`power_cut` then
    returns the image a power loss leaves.  Serve it with ONE queue (``Ledger.crash``): the log has a
    single writer.

    Args:
        nbytes: capacity (multiple of 512), zero-filled; or ``image``: initial contents (both the
            readable and the durable image).
        log_bytes / log_entries: capacity of the volatile cache; when full it is written back on its
            own, as a real disk's cache may be at any time (counted in ``stats()["destages"]``).

    Example:
        >>> b = CrashBackend(4096)
        >>> b.power_cut(1).shape
        (4096,)
    """

    def __init__(
        self, nbytes: int = 0, *, image: npt.NDArray[np.uint8] | bytes | None = None,
        log_bytes: int = 16 << 20, log_entries: int = 1 << 16, name: str = "crash",
    ) -> None:
        if image is not None:
            nbytes = len(image)
        super().__init__(nbytes, name=name)
        if image is not None:
            self.ram[:] = np.frombuffer(image, np.uint8) if isinstance(image, bytes) else image
        self.durable = self.ram.copy()
        self.wc_data = np.zeros(log_bytes, np.uint8)
        self.wc = np.zeros(K.W_HDR + K.W_ENTRY * log_entries, np.int64)
        self.wc[K.W_ON] = 1
        self.wc[K.W_CUT_AT] = -1
        self.wc[K.W_MAXENT] = log_entries

    # -- power switch -----------------------------------------------------------------------------
    @property
    def requests(self) -> int:
        """Requests the device admitted so far (the clock of :meth:`cut_after`)."""
        return int(self.wc[K.W_COUNT])

    @property
    def powered(self) -> bool:
        return bool(self.wc[K.W_DEAD] == 0)

    def cut_after(self, n: int) -> None:
        """Cut the power once ``n`` more requests have been admitted (``n = 0``: now)."""
        self.wc[K.W_CUT_AT] = self.requests + max(n, 0)

    def unflushed(self) -> list[tuple[int, int]]:
        """(byte offset, length) of every write still in the volatile cache, oldest first."""
        n = int(self.wc[K.W_NENT])
        e = self.wc[K.W_HDR : K.W_HDR + K.W_ENTRY * n].reshape(n, K.W_ENTRY)
        return [(int(a), int(b)) for a, b, _ in e]

    def stats(self) -> dict[str, int]:
        w = self.wc
        return {"requests": int(w[K.W_COUNT]), "unflushed": int(w[K.W_NENT]), "flushes": int(w[K.W_FLUSHES]),
                "destages": int(w[K.W_DESTAGES]), "dead": int(w[K.W_DEAD])}

    def power_cut(self, seed: int) -> npt.NDArray[np.uint8]:
        """The image left by a power loss now (stop the device first); also switches the power off.

        A seeded, legal loss pattern for a disk with a volatile cache: each unflushed write is lost,
        kept, or torn (a random subset of its 512-byte sectors reaches the platter); the survivors are
        applied in completion order or, half the time, in a random order.  Flushed data always
        survives.  Same state + same seed = same image; :attr:`last_loss` describes what was done.
        """
        self.wc[K.W_DEAD] = 1
        rng = np.random.default_rng(seed)
        img = self.durable.copy()
        n = int(self.wc[K.W_NENT])
        ent = self.wc[K.W_HDR : K.W_HDR + K.W_ENTRY * n].reshape(n, K.W_ENTRY)
        p_lose, p_tear = rng.random(), rng.random() * 0.5
        fate = rng.random(n)
        reordered = bool(rng.random() < 0.5)
        order = rng.permutation(n) if reordered else np.arange(n)
        kept = torn = lost = 0
        for i in order:
            off, ln, at = (int(x) for x in ent[i])
            if fate[i] < p_lose:
                lost += 1
                continue
            src = self.wc_data[at : at + ln]
            if fate[i] < p_lose + p_tear * (1 - p_lose) and ln > _SECTOR:
                torn += 1
                keep = rng.random(ln // _SECTOR) < 0.5
                dst = img[off : off + ln].reshape(-1, _SECTOR)
                dst[keep] = src.reshape(-1, _SECTOR)[keep]
            else:
                kept += 1
                img[off : off + ln] = src
        self.last_loss = LossPattern(seed, n, kept, torn, lost, reordered)
        return img


class FileBackend(Backend):
    """A raw image file, used through pread/pwrite/fdatasync/fallocate by the kernel.

    Args:
        path: an existing image whose size is a positive multiple of 512.
        read_only: open ``O_RDONLY``; the device then offers VIRTIO_BLK_F_RO.
        direct_reads: also open the image ``O_DIRECT`` for large aligned reads (ignored where the
            filesystem refuses ``O_DIRECT``, e.g. tmpfs).  Writes go through the page cache unless
            ``direct_writes`` (a FLUSH makes them durable either way); the kernel writes dirty
            cached pages of a range back before a direct read of it, so such a read sees every
            completed write.
        direct_min: with ``direct_reads``, the smallest read that goes around the page cache (a
            multiple of 4096; default ``DIRECT_MIN``, 128 KiB).
        direct_writes: with ``direct_reads``, writes of ``direct_min`` bytes or more (aligned) that
            a worker queue serves go around the page cache too (a trapped queue's would make the
            notifier wait for the disk): the O_DIRECT descriptor is opened read-write (read-only,
            and no direct writes, where that fails).  They are no
            more durable for it (the disk may cache them): a FLUSH (``fdatasync``) still is what
            makes them so.  The kernel drops the range's cached pages after such a write, so a
            later read through the page cache sees it.
        write_behind: after a worker queue completes a write of ``WRITE_BEHIND_MIN`` bytes or
            more, it asks the host to start writing those pages back (``SYNC_FILE_RANGE_WRITE``,
            which does not wait), instead of leaving them dirty until a FLUSH or the host's
            flusher.  A FLUSH after a bulk write then finds them written or on their way (256 MiB
            written, then FLUSH: 95 -> 1 ms).  Trapped queues skip it (the notifier would wait).

    Raises:
        ImageSizeError: the size is not a positive multiple of 512 (the fd is closed again).
        OSError: the file cannot be opened.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        direct_reads: bool = False,
        direct_min: int = K.DIRECT_MIN,
        direct_writes: bool = False,
        write_behind: bool = True,
    ) -> None:
        if direct_min < K.DIRECT_ALIGN or direct_min % K.DIRECT_ALIGN:
            raise ValueError(f"direct_min {direct_min} is not a positive multiple of {K.DIRECT_ALIGN}")
        self.direct_min = direct_min
        self.direct_writes = direct_reads and direct_writes and not read_only
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
        self.write_behind_min = K.WRITE_BEHIND_MIN if write_behind and not read_only else 0
        if direct_reads:
            self.direct_fd = -1
            for mode in (os.O_RDWR, os.O_RDONLY) if self.direct_writes else (os.O_RDONLY,):
                try:
                    self.direct_fd = os.open(self.path, mode | os.O_DIRECT | os.O_CLOEXEC)
                    break
                except OSError:
                    self.direct_writes = False  # reads only, or (tmpfs, some FUSE filesystems) none

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self.image_fd >= 0:
            os.close(self.image_fd)
            self.image_fd = -1


def create_image(path: str | os.PathLike[str], nbytes: int) -> None:
    """Create (or resize) a sparse image file of ``nbytes`` (a multiple of 512)."""
    if nbytes <= 0 or nbytes % VIRTIO_BLK_SECTOR_SIZE:
        raise ImageSizeError(f"image size {nbytes} is not a positive multiple of 512 bytes")
    with open(path, "ab") as f:
        f.truncate(nbytes)
