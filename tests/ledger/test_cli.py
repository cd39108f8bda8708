"""The ``ledger`` command: the seed OS's dd syntax, info, diag, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger import _spec as S
from ledger._machine import Ledger
from ledger.cli import diag_log_path, hexdump, main, parse_size
from ledger.selftest import MISTAKES


@pytest.fixture
def image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    assert main(["create", "--size", "1M"]) == 0
    return tmp_path / "storage.img"


def test_write_then_read_back_in_the_seed_syntax(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dd", "write", "3", "hello ledger"]) == 0
    raw = image.read_bytes()
    assert raw[3 * 512 : 3 * 512 + 13] == b"hello ledger\0"
    assert raw[3 * 512 + 12 : 4 * 512] == bytes(500)  # zero-padded to the sector
    capsys.readouterr()
    assert main(["dd", "read", "3"]) == 0
    out = capsys.readouterr().out
    assert "00000600  68 65 6c 6c 6f 20 6c 65  64 67 65 72 00 00 00 00  |hello ledger....|" in out
    assert out.rstrip().endswith("00000800")


def test_write_from_file_spanning_sectors(image: Path, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 3)  # 768 bytes: two sectors
    assert main(["dd", "write", "10", "--file", str(src)]) == 0
    raw = image.read_bytes()
    assert raw[10 * 512 : 10 * 512 + 768] == src.read_bytes()
    assert raw[10 * 512 + 768 : 12 * 512] == bytes(256)


def test_info_lists_capacity_and_negotiated_features(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "capacity:     2048 sectors (1048576 bytes)" in out
    assert "RING_F_EVENT_IDX" in out
    assert "RING_F_INDIRECT_DESC" in out
    assert "serial:       storage.img" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dd", "read", "2048"], "sector 2048 is out of range: the image has 2048 sectors"),
        (["dd", "read", "2040", "--count", "9"], "sector 2048 is out of range"),
        (["dd", "read", "0", "--image", "missing.img"], "missing.img: no such image"),
        (["dd", "write", "0"], "give the TEXT to write or --file F"),
        (["dd", "write", "0", "--file", "nope"], "nope: No such file or directory"),
        (["create", "--size", "12Q"], "cannot read size"),
        (["create", "x.img", "--size", "1000"], "not a multiple of 512"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    image: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_image_not_a_multiple_of_512(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    assert main(["info", "--image", str(odd)]) == 2
    assert "not a positive multiple of 512" in capsys.readouterr().err


def test_create_refuses_to_clobber(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", "--size", "2M"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["create", "--size", "2M", "--force"]) == 0
    assert image.stat().st_size == 2 << 20


def test_parse_size_and_hexdump() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1g") == 1 << 30
    assert parse_size("4096") == 4096
    zero_row = "00000000  " + "00 " * 8 + " " + "00 " * 7 + "00  |" + "." * 16 + "|"
    assert hexdump(bytes(48)).splitlines() == [zero_row, "*", "00000030"]


def test_diag_prints_what_the_device_recorded(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diag"]) == 0
    assert "no driver errors recorded" in capsys.readouterr().out
    # A driver that notifies a queue it never set up: the device refuses and records it.
    with Ledger.open(image, diag_log=diag_log_path(image)) as led:
        assert led.device is not None
        led.device.write32(S.VIRTIO_MMIO_QUEUE_NOTIFY, 5)
    assert main(["diag"]) == 0
    out = capsys.readouterr().out
    assert "QueueNotify(5) for a queue that is not ready" in out
    assert main(["diag", "--clear"]) == 0
    capsys.readouterr()
    assert main(["diag"]) == 0
    assert "no driver errors recorded" in capsys.readouterr().out


EXPECTED_WORDS = {
    "missing-write-flag": "VIRTQ_DESC_F_WRITE missing",
    "address-zero": "not inside guest memory",
    "status-read-only": "follows a device-writable one",
    "short-header": "fewer than the 16-byte request header",
    "sector-past-end": "past the capacity",
    "odd-length": "not a multiple of 512",
    "looping-chain": "loops",
    "notify-before-driver-ok": "before DRIVER_OK",
    "unoffered-feature": "not offered",
}


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_every_classic_mistake_is_explained(mistake) -> None:
    out = mistake.run()
    assert out.diagnostics, f"{mistake.name}: the device said nothing"
    assert any(EXPECTED_WORDS[mistake.name] in str(d) for d in out.diagnostics)
    if out.status_byte is not None:
        assert out.status_byte != S.VIRTIO_BLK_S_OK  # never a silent success


def test_selftest_command_covers_every_mistake(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diag", "--selftest"]) == 0
    out = capsys.readouterr().out
    for m in MISTAKES:
        assert f"== {m.name}:" in out


def test_powercut_keeps_flushed_writes_and_is_replayable(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text("# a flushed write, then two that are not\nwrite 0 committed\nflush\nwrite 1 maybe\n"
                     "fill 8 16 0xAB\n")  # fmt: skip
    outcomes = set()
    for seed in range(12):
        out = tmp_path / f"c{seed}.img"
        assert main(["powercut", "--trace", str(trace), "--seed", str(seed), "--out", str(out)]) == 0
        img = out.read_bytes()
        assert img[:10] == b"committed\0"  # flushed before the cut: always there
        s1 = img[512:1024]
        assert s1 in (b"maybe".ljust(512, b"\0"), bytes(512))  # unflushed: whole or gone (1 sector)
        tail = img[8 * 512 : 24 * 512]
        assert all(tail[i * 512 : (i + 1) * 512] in (b"\xab" * 512, bytes(512)) for i in range(16))
        outcomes.add((s1 != bytes(512), tail.count(b"\xab") // 512))
        again = tmp_path / "again.img"
        assert main(["powercut", "--trace", str(trace), "--seed", str(seed), "--out", str(again)]) == 0
        assert again.read_bytes() == img  # same seed, same image
    assert len(outcomes) > 2  # the seeds really produce different legal outcomes
    assert image.read_bytes() == bytes(1 << 20)  # the source image is never written
    out = tmp_path / "cut.img"
    assert main(["powercut", "--trace", str(trace), "--cut-after", "1", "--out", str(out)]) == 0
    assert "1 of 4 operations completed" in capsys.readouterr().out
    assert out.read_bytes()[:10] in (b"committed\0", bytes(10))  # written, never flushed


def test_powercut_bad_trace_is_a_usage_error(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bad.txt"
    trace.write_text("write 0 ok\nerase everything\n")
    assert main(["powercut", "--trace", str(trace), "--out", str(tmp_path / "o.img")]) == 2
    assert "bad.txt:2: cannot read 'erase everything'" in capsys.readouterr().err
