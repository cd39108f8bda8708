"""The device status state machine of virtio 1.2 §2.1 and §3.1, sans-I/O (h11 style).

Theory of operation
-------------------
The driver moves the device through its life by writing the Status register;
the device may refuse a step.  This module decides, and does nothing else: no
threads, no fds, no guest memory.  :meth:`StatusMachine.write_status` takes the
value the driver wrote and returns an :class:`Outcome` listing what the device
front end must do (start the workers, reset everything) and what it refused,
each refusal with a diagnostic code and a sentence.

::

        write 0 (from any state) ------------------------------------+
                                                                      v
     RESET --ACK--> ACKNOWLEDGE --DRIVER--> DRIVER --FEATURES_OK--> FEATURES_OK --DRIVER_OK--> LIVE
                                              |   (kept only if accepted ⊆ offered
                                              |    and VERSION_1 accepted; else the
                                              |    bit reads back clear)
     any state --FAILED(128)--> (bit set; the device stays where it is)
     device error --> DEVICE_NEEDS_RESET(64) set by the device (never by the driver)

Rules (each refusal leaves the status unchanged and is reported):

* a bit may only be set when the bits before it are set (or set in the same
  write): DRIVER needs ACKNOWLEDGE, FEATURES_OK needs DRIVER, DRIVER_OK needs
  FEATURES_OK - an out-of-order write is refused whole;
* bits are never cleared except by writing 0 (reset);
* DEVICE_NEEDS_RESET is the device's to set: the driver writing it back is
  ignored, reserved bits are refused;
* DriverFeatures may only be written before FEATURES_OK; queue registers only
  before DRIVER_OK (§3.1.1, §4.2.3.2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ledger._spec import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    feature_names,
)
from ledger.diagnostics import (
    D_FEATURES_LOCKED,
    D_FEATURES_NO_VERSION_1,
    D_FEATURES_UNOFFERED,
    D_STATUS_OUT_OF_ORDER,
)

ACK = VIRTIO_CONFIG_S_ACKNOWLEDGE
DRIVER = VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = VIRTIO_CONFIG_S_DRIVER_OK
FAILED = VIRTIO_CONFIG_S_FAILED
NEEDS_RESET = VIRTIO_CONFIG_S_NEEDS_RESET
_KNOWN = ACK | DRIVER | FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET
# bit -> the bit that must already be set (or set in the same write)
_PREREQ = {DRIVER: ACK, FEATURES_OK: DRIVER, DRIVER_OK: FEATURES_OK}
_NAMES = {ACK: "ACKNOWLEDGE", DRIVER: "DRIVER", FEATURES_OK: "FEATURES_OK", DRIVER_OK: "DRIVER_OK"}


class Phase(enum.Enum):
    """Where the driver is in the initialisation sequence of §3.1.1."""

    RESET = "reset"
    ACKNOWLEDGED = "acknowledged"
    DRIVER = "driver"
    FEATURES_OK = "features_ok"
    LIVE = "live"
    FAILED = "failed"


@dataclass
class Outcome:
    """What a status write means for the device front end."""

    reset: bool = False
    start: bool = False
    refusals: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class StatusMachine:
    """Status and feature negotiation of one device.

    Example:
        >>> m = StatusMachine(offered=1 << 32)
        >>> m.write_status(ACK | DRIVER).refusals
        []
        >>> m.write_driver_features(0, 0); m.write_driver_features(1, 1)
        []
        []
        >>> m.write_status(ACK | DRIVER | FEATURES_OK).refusals, m.status
        ([], 11)
        >>> m.write_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK).start
        True
    """

    offered: int
    status: int = 0
    accepted: int = 0

    @property
    def phase(self) -> Phase:
        s = self.status
        if s & FAILED:
            return Phase.FAILED
        if s & DRIVER_OK:
            return Phase.LIVE
        if s & FEATURES_OK:
            return Phase.FEATURES_OK
        if s & DRIVER:
            return Phase.DRIVER
        if s & ACK:
            return Phase.ACKNOWLEDGED
        return Phase.RESET

    @property
    def live(self) -> bool:
        return bool(self.status & DRIVER_OK)

    @property
    def negotiated(self) -> int:
        """The accepted features, once FEATURES_OK was kept; 0 before."""
        return self.accepted if self.status & FEATURES_OK else 0

    def reset(self) -> None:
        self.status = 0
        self.accepted = 0

    def write_driver_features(self, sel: int, value: int) -> list[tuple[int, str]]:
        """DriverFeatures write for word ``sel``; refused once FEATURES_OK is set (§3.1.1)."""
        if self.status & FEATURES_OK:
            return [
                (
                    D_FEATURES_LOCKED,
                    f"DriverFeatures (word {sel}) written after FEATURES_OK; features are only "
                    f"renegotiated by a reset, so the write was ignored",
                )
            ]
        if sel > 1:
            return [] if value == 0 else [(D_FEATURES_UNOFFERED, f"DriverFeatures word {sel} is beyond the "
                                           f"64 feature bits this device has; {value:#x} ignored")]
        shift = 32 * sel
        self.accepted = (self.accepted & ~(0xFFFF_FFFF << shift)) | ((value & 0xFFFF_FFFF) << shift)
        return []

    def write_status(self, value: int) -> Outcome:
        """Apply a driver write of the Status register."""
        out = Outcome()
        value &= 0xFFFF_FFFF
        if value == 0:
            self.reset()
            out.reset = True
            return out
        value &= ~NEEDS_RESET  # the device's bit: a driver writing it back changes nothing
        if value & ~_KNOWN:
            out.refusals.append(
                (D_STATUS_OUT_OF_ORDER, f"status write {value:#x} sets reserved bits {value & ~_KNOWN:#x}"),
            )
            return out
        cur = self.status & ~NEEDS_RESET
        if cur & ~value:
            out.refusals.append(
                (
                    D_STATUS_OUT_OF_ORDER,
                    f"status write {value:#x} clears bits {cur & ~value:#x} of {cur:#x}; status bits are "
                    f"only cleared by writing 0 (reset), so the write was refused",
                )
            )
            return out
        new_bits = value & ~cur
        for bit, pre in _PREREQ.items():
            if new_bits & bit and not value & pre:
                out.refusals.append(
                    (
                        D_STATUS_OUT_OF_ORDER,
                        f"status write {value:#x} sets {_NAMES[bit]} before {_NAMES[pre]} (§3.1.1 order: "
                        f"ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK); refused",
                    )
                )
                return out
        if new_bits & FEATURES_OK:
            unoffered = self.accepted & ~self.offered
            if unoffered:
                out.refusals.append(
                    (
                        D_FEATURES_UNOFFERED,
                        f"the driver accepted features that were not offered: {feature_names(unoffered)}; "
                        f"FEATURES_OK not kept (§2.2.2: the driver MUST NOT accept a feature the device "
                        f"did not offer)",
                    )
                )
                value &= ~FEATURES_OK
            elif not self.accepted >> VIRTIO_F_VERSION_1 & 1:
                out.refusals.append(
                    (
                        D_FEATURES_NO_VERSION_1,
                        "the driver did not accept VIRTIO_F_VERSION_1; this device has no legacy "
                        "interface, so FEATURES_OK was not kept",
                    )
                )
                value &= ~FEATURES_OK
            if not value & FEATURES_OK and value & DRIVER_OK:
                value &= ~DRIVER_OK
        self.status = value | (self.status & NEEDS_RESET)
        if new_bits & DRIVER_OK and value & DRIVER_OK:
            out.start = True
        return out
