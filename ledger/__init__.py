"""The ledger: a virtio-blk driver/device pair that every SovFS sector goes through.

Start with :class:`Ledger`, which wires guest memory, a device serving an
image (or RAM), and the driver that probes it::

    with Ledger.open("storage.img") as led:
        blk = led.sync()                 # blocking front end
        blk.write(0, b"x" * 512)
        blk.flush()

    async with led.trio() as blk:        # trio front end, many requests in flight
        data = await blk.read(0, 8)

docs/LEDGER.md explains the design; the submodules hold the parts: ``device``
(register file, workers), ``driver`` (handshake, queues), ``client`` (front
ends, batches), ``backend`` (image file, RAM), ``memory`` (guest memory),
``diagnostics`` (refusals in plain words), ``testing`` (a raw, hostile-capable
driver for tests).
"""

from ._machine import Ledger
from .backend import BackendError, FileBackend, RamBackend
from .client import Batch, SyncBlk, TrioBlk
from .device import VirtioBlkDevice
from .diagnostics import Diagnostic
from .driver import VirtioBlkDriver
from .errors import DeviceError, DriverError, IOFailure, LedgerError
from .memory import GuestMemory

__all__ = [
    "BackendError",
    "Batch",
    "DeviceError",
    "Diagnostic",
    "DriverError",
    "FileBackend",
    "GuestMemory",
    "IOFailure",
    "Ledger",
    "LedgerError",
    "RamBackend",
    "SyncBlk",
    "TrioBlk",
    "VirtioBlkDevice",
    "VirtioBlkDriver",
]
