"""The ledger's exceptions.

Following h11, the split is by *whose fault* it is:

* :class:`DriverError` - the caller or our own driver did something wrong
  (a sector range past the end, a closed ledger, a request too large).
* :class:`DeviceError` - the peer broke the protocol (a used id that is not in
  flight, a refused handshake, DEVICE_NEEDS_RESET).  The queue is unusable
  until reset.
* :class:`IOFailure` - a well-formed request the device answered with a status
  other than VIRTIO_BLK_S_OK (IOERR, UNSUPP).  Carries the status and request.
"""

from __future__ import annotations

from ._spec import REQUEST_TYPE_NAMES, STATUS_NAMES


class LedgerError(Exception):
    """Base class of every ledger exception."""


class DriverError(LedgerError):
    """Misuse of the driver API, or a limit of the driver."""


class DeviceError(LedgerError):
    """The device broke the virtio protocol or needs a reset."""


class IOFailure(LedgerError):
    """The device completed a request with a non-OK status byte."""

    def __init__(self, status: int, rtype: int, sector: int, index: int = 0) -> None:
        self.status = status
        self.rtype = rtype
        self.sector = sector
        self.index = index
        st = STATUS_NAMES.get(status, f"status {status}")
        op = REQUEST_TYPE_NAMES.get(rtype, f"type {rtype}")
        super().__init__(f"{op} at sector {sector} failed: VIRTIO_BLK_S_{st}")
