"""The device's register interface: virtio-mmio v2 registers, config space, the status machine.

Everything here runs without worker threads (``single_pass=True``) except where
a test says otherwise; spec clauses are quoted in the docstrings (virtio 1.2).
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator

import pytest

from ledger import _spec as S
from ledger._status import StatusMachine
from ledger.backend import RamBackend
from ledger.device import DEFAULT_FEATURES, VENDOR_ID, VirtioBlkDevice
from ledger.diagnostics import (
    D_FEATURES_NO_VERSION_1,
    D_FEATURES_UNOFFERED,
    D_NOTIFY_REFUSED,
    D_QUEUE_NUM_INVALID,
    D_QUEUE_SETUP_LOCKED,
    D_STATUS_OUT_OF_ORDER,
)
from ledger.memory import GuestMemory
from ledger.testing import RawDriver

ACK = S.VIRTIO_CONFIG_S_ACKNOWLEDGE
DRV = S.VIRTIO_CONFIG_S_DRIVER
FOK = S.VIRTIO_CONFIG_S_FEATURES_OK
DOK = S.VIRTIO_CONFIG_S_DRIVER_OK


def bit(b: int) -> int:
    return 1 << b


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(1 << 20) as m:
        yield m


@pytest.fixture
def dev(mem: GuestMemory) -> Iterator[VirtioBlkDevice]:
    with VirtioBlkDevice(RamBackend(64 * 512), mem, single_pass=True) as d:
        yield d


def codes(dev: VirtioBlkDevice) -> list[int]:
    return [d.code for d in dev.diagnostics()]


def test_identity_registers(dev: VirtioBlkDevice) -> None:
    """§4.2.2.1: "The device MUST return 0x74726976 in MagicValue. The device MUST return value 0x2
    in Version." DeviceID 2 is a block device (§5)."""
    assert dev.read32(S.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
    assert dev.read32(S.VIRTIO_MMIO_VERSION) == 2
    assert dev.read32(S.VIRTIO_MMIO_DEVICE_ID) == S.VIRTIO_ID_BLOCK
    assert dev.read32(S.VIRTIO_MMIO_VENDOR_ID) == VENDOR_ID


def test_seed_handshake_runs_unchanged(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    """The hobby-OS handshake: reset, ACK, DRIVER, features, FEATURES_OK, re-read, queues, DRIVER_OK."""
    drv = RawDriver(dev, mem, queue_size=16, num_queues=2)
    status = drv.handshake()
    assert status == ACK | DRV | FOK | DOK
    assert dev.negotiated_features == dev.device_features
    assert dev.diagnostics() == []


def test_device_features_offered(mem: GuestMemory) -> None:
    with VirtioBlkDevice(RamBackend(512), mem) as d:
        feats = RawDriver(d, mem).device_features()
    for b in (
        S.VIRTIO_F_VERSION_1,
        S.VIRTIO_RING_F_INDIRECT_DESC,
        S.VIRTIO_RING_F_EVENT_IDX,
        S.VIRTIO_BLK_F_SIZE_MAX,
        S.VIRTIO_BLK_F_SEG_MAX,
        S.VIRTIO_BLK_F_BLK_SIZE,
        S.VIRTIO_BLK_F_FLUSH,
        S.VIRTIO_BLK_F_TOPOLOGY,
        S.VIRTIO_BLK_F_CONFIG_WCE,
        S.VIRTIO_BLK_F_MQ,
        S.VIRTIO_BLK_F_DISCARD,
        S.VIRTIO_BLK_F_WRITE_ZEROES,
    ):
        assert feats & bit(b), S.FEATURE_NAMES[b]
    assert not feats & bit(S.VIRTIO_BLK_F_RO)
    assert d.read32(S.VIRTIO_MMIO_DEVICE_FEATURES) is not None


def test_ro_offered_for_read_only_backend(mem: GuestMemory) -> None:
    """§5.2.3: VIRTIO_BLK_F_RO "Device is read-only" is offered when the image is opened read-only."""
    with VirtioBlkDevice(RamBackend(512, read_only=True), mem) as d:
        assert RawDriver(d, mem).device_features() & bit(S.VIRTIO_BLK_F_RO)


def test_offer_mask_switches_features_off_but_keeps_flush_with_wce(mem: GuestMemory) -> None:
    """§5.2.5.1 (paraphrased): a device offering VIRTIO_BLK_F_CONFIG_WCE MUST offer VIRTIO_BLK_F_FLUSH."""
    offer = DEFAULT_FEATURES & ~bit(S.VIRTIO_RING_F_EVENT_IDX) & ~bit(S.VIRTIO_BLK_F_FLUSH)
    with VirtioBlkDevice(RamBackend(512), mem, offer=offer) as d:
        feats = RawDriver(d, mem).device_features()
    assert not feats & bit(S.VIRTIO_RING_F_EVENT_IDX)
    assert feats & bit(S.VIRTIO_BLK_F_FLUSH)
    assert feats & bit(S.VIRTIO_F_VERSION_1)


def test_config_space_contents(mem: GuestMemory) -> None:
    with VirtioBlkDevice(RamBackend(1 << 20), mem, num_queues=3, seg_max=126, size_max=65536) as d:
        cfg = d.read_config(0, S.BLK_CFG_SIZE)
        assert struct.unpack_from("<Q", cfg, S.BLK_CFG_CAPACITY)[0] == 2048
        assert struct.unpack_from("<I", cfg, S.BLK_CFG_SIZE_MAX)[0] == 65536
        assert struct.unpack_from("<I", cfg, S.BLK_CFG_SEG_MAX)[0] == 126
        assert struct.unpack_from("<I", cfg, S.BLK_CFG_BLK_SIZE)[0] == 512
        assert struct.unpack_from("<H", cfg, S.BLK_CFG_NUM_QUEUES)[0] == 3
        assert struct.unpack_from("<I", cfg, S.BLK_CFG_MAX_DISCARD_SEG)[0] >= 1
        assert struct.unpack_from("<I", cfg, S.BLK_CFG_MAX_WRITE_ZEROES_SEG)[0] >= 1
        assert struct.unpack_from("<I", cfg, S.BLK_CFG_MAX_DISCARD_SECTORS)[0] > 0
        assert cfg[33] == 0
        assert cfg[57:60] == b"\0\0\0"
        # the same bytes through 32-bit MMIO reads at 0x100+
        lo = d.read32(S.VIRTIO_MMIO_CONFIG + S.BLK_CFG_CAPACITY)
        hi = d.read32(S.VIRTIO_MMIO_CONFIG + S.BLK_CFG_CAPACITY + 4)
        assert lo | hi << 32 == 2048
        assert d.read32(S.VIRTIO_MMIO_CONFIG + S.BLK_CFG_SEG_MAX) == 126


def test_writeback_is_writable_with_config_wce(dev: VirtioBlkDevice) -> None:
    """§5.2.5: with CONFIG_WCE the driver may switch the cache mode by writing ``writeback``."""
    assert dev.read_config(S.BLK_CFG_WRITEBACK, 1) == b"\x01"
    dev.write_config(S.BLK_CFG_WRITEBACK, b"\x00")
    assert dev.read_config(S.BLK_CFG_WRITEBACK, 1) == b"\x00"
    dev.write_config(S.BLK_CFG_CAPACITY, b"\x00" * 8)  # capacity is read-only
    assert struct.unpack("<Q", dev.read_config(0, 8))[0] == 64
    assert dev.diagnostics()[-1].code == 108


def test_features_ok_not_kept_for_unoffered_bits(mem: GuestMemory) -> None:
    """§2.2.1: "The device SHOULD accept any valid subset of features the driver accepts, otherwise it MUST
    fail to set the FEATURES_OK device status bit when the driver writes it." """
    offer = DEFAULT_FEATURES & ~bit(S.VIRTIO_BLK_F_MQ)
    with VirtioBlkDevice(RamBackend(512), mem, offer=offer, single_pass=True) as d:
        drv = RawDriver(d, mem, features=offer | bit(S.VIRTIO_BLK_F_MQ))
        st = drv.handshake()
        assert not st & FOK
        assert d.read32(S.VIRTIO_MMIO_STATUS) == ACK | DRV
        diag = d.diagnostics()[-1]
        assert diag.code == D_FEATURES_UNOFFERED
        assert "BLK_F_MQ" in diag.message


def test_features_ok_not_kept_without_version_1(mem: GuestMemory) -> None:
    """§6.1 / §3.1.1: a device without a legacy interface does not accept a driver that omits VERSION_1."""
    with VirtioBlkDevice(RamBackend(512), mem, single_pass=True) as d:
        drv = RawDriver(d, mem, features=DEFAULT_FEATURES & ~bit(S.VIRTIO_F_VERSION_1))
        assert not drv.handshake() & FOK
        assert D_FEATURES_NO_VERSION_1 in codes(d)
        # DRIVER_OK cannot follow a refused FEATURES_OK
        d.write32(S.VIRTIO_MMIO_STATUS, ACK | DRV | FOK | DOK)
        assert not d.status & DOK


@pytest.mark.parametrize(
    ("sequence", "final"),
    [
        ([DRV], 0),  # DRIVER before ACKNOWLEDGE
        ([ACK, ACK | FOK], ACK),  # FEATURES_OK before DRIVER
        ([ACK, ACK | DRV, ACK | DRV | DOK], ACK | DRV),  # DRIVER_OK before FEATURES_OK
        ([ACK, ACK | DRV, ACK], ACK | DRV),  # clearing a bit without reset
        ([ACK, ACK | 16], ACK),  # reserved bit
    ],
)
def test_out_of_order_status_writes_refused(dev: VirtioBlkDevice, sequence: list[int], final: int) -> None:
    """§3.1.1: the driver MUST follow the order ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; the device
    refuses a step out of order, keeps its status, and says why."""
    for v in sequence:
        dev.write32(S.VIRTIO_MMIO_STATUS, v)
    assert dev.read32(S.VIRTIO_MMIO_STATUS) == final
    diags = dev.diagnostics()
    assert diags
    assert diags[-1].code == D_STATUS_OUT_OF_ORDER
    assert "status write" in str(diags[-1])


def test_failed_bit_and_reset(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    drv = RawDriver(dev, mem)
    drv.handshake()
    dev.write32(S.VIRTIO_MMIO_STATUS, dev.status | S.VIRTIO_CONFIG_S_FAILED)
    assert dev.status & S.VIRTIO_CONFIG_S_FAILED
    dev.write32(S.VIRTIO_MMIO_STATUS, 0)
    assert dev.read32(S.VIRTIO_MMIO_STATUS) == 0


def test_reset_clears_interrupt_status_and_queue_ready(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    """§4.2.2.1: "Upon reset, the device MUST clear all bits in InterruptStatus and ready bits in the
    QueueReady register for all queues in the device." """
    drv = RawDriver(dev, mem, num_queues=2)
    drv.handshake()
    dev._shared[1] = 3  # pretend both interrupts are pending
    dev.write32(S.VIRTIO_MMIO_STATUS, 0)
    assert dev.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    for q in range(2):
        dev.write32(S.VIRTIO_MMIO_QUEUE_SEL, q)
        assert dev.read32(S.VIRTIO_MMIO_QUEUE_READY) == 0


def test_interrupt_ack_clears_only_acked_bits(dev: VirtioBlkDevice) -> None:
    dev._shared[1] = 3
    dev.write32(S.VIRTIO_MMIO_INTERRUPT_ACK, S.VIRTIO_MMIO_INT_VRING)
    assert dev.read32(S.VIRTIO_MMIO_INTERRUPT_STATUS) == S.VIRTIO_MMIO_INT_CONFIG


def test_queue_num_max_zero_for_unavailable_queue(dev: VirtioBlkDevice) -> None:
    """§4.2.3.2: "If the returned value [QueueNumMax] is zero (0x0) the queue is not available." """
    dev.write32(S.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert dev.read32(S.VIRTIO_MMIO_QUEUE_NUM_MAX) == 1024
    dev.write32(S.VIRTIO_MMIO_QUEUE_SEL, 2)  # the device has 2 queues
    assert dev.read32(S.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0
    dev.write32(S.VIRTIO_MMIO_QUEUE_NUM, 8)
    assert D_QUEUE_SETUP_LOCKED in codes(dev)


@pytest.mark.parametrize("num", [0, 3, 100, 2048])
def test_queue_num_must_be_power_of_two_within_max(dev: VirtioBlkDevice, num: int) -> None:
    """§2.7: split-ring queue size is a power of 2; §4.2.2: QueueNum ≤ QueueNumMax."""
    for v in (ACK, ACK | DRV):
        dev.write32(S.VIRTIO_MMIO_STATUS, v)
    dev.write32(S.VIRTIO_MMIO_QUEUE_SEL, 0)
    dev.write32(S.VIRTIO_MMIO_QUEUE_NUM, num)
    assert D_QUEUE_NUM_INVALID in codes(dev)
    dev.write32(S.VIRTIO_MMIO_QUEUE_READY, 1)
    assert dev.read32(S.VIRTIO_MMIO_QUEUE_READY) == 0


def test_queue_setup_after_driver_ok_refused(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    """§3.1.1: queues are set up before DRIVER_OK; later writes to queue registers are refused."""
    drv = RawDriver(dev, mem)
    drv.handshake()
    before = drv.queues[0].desc
    dev.write32(S.VIRTIO_MMIO_QUEUE_SEL, 0)
    dev.write32(S.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1234)
    dev.write32(S.VIRTIO_MMIO_QUEUE_NUM, 4)
    assert dev._queues[0].desc == before
    assert dev._queues[0].num == 8
    assert codes(dev).count(D_QUEUE_SETUP_LOCKED) == 2
    assert "after DRIVER_OK" in dev.diagnostics()[-1].message


def test_notify_before_driver_ok_refused(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    """§3.1.1/§2.1: the device MUST NOT consume buffers before DRIVER_OK; the notification is refused."""
    drv = RawDriver(dev, mem)
    drv.handshake(driver_ok=False)
    dev.write32(S.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert D_NOTIFY_REFUSED in codes(dev)
    assert not select.select([dev.queue_notify_fd(0)], [], [], 0)[0]  # nothing reached the worker's fd


def test_notify_writes_kick_eventfd(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    """QueueNotify after DRIVER_OK is exactly an eventfd write on the queue's kick fd (ioeventfd model)."""
    RawDriver(dev, mem).handshake()
    dev.write32(S.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    fd = dev.queue_notify_fd(0)
    assert select.select([fd], [], [], 0)[0]
    assert os.eventfd_read(fd) == 1


def test_driver_features_locked_after_features_ok(dev: VirtioBlkDevice, mem: GuestMemory) -> None:
    drv = RawDriver(dev, mem)
    drv.handshake()
    drv.write_features(0)
    assert dev.negotiated_features == dev.device_features
    assert 107 in codes(dev)


def test_status_machine_is_sans_io() -> None:
    m = StatusMachine(offered=bit(S.VIRTIO_F_VERSION_1) | bit(3))
    assert m.write_status(ACK).refusals == []
    assert m.write_status(ACK | DRV).refusals == []
    m.write_driver_features(1, 1)
    out = m.write_status(ACK | DRV | FOK)
    assert out.refusals == []
    assert m.negotiated == bit(S.VIRTIO_F_VERSION_1)
    out = m.write_status(ACK | DRV | FOK | DOK)
    assert out.start
    assert m.live
    assert m.write_status(0).reset
    assert m.status == 0


def test_close_is_idempotent(mem: GuestMemory) -> None:
    d = VirtioBlkDevice(RamBackend(512), mem)
    fd = d.queue_interrupt_fd(0)
    d.close()
    d.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
