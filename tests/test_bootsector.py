"""Unit tests of the demo guest's boot sector builder (no QEMU needed)."""

from __future__ import annotations

import pytest

from resourced.demo.bootsector import (
    MAX_BANNER_LENGTH,
    PIT_HZ,
    build_boot_sector,
    pit_divisor,
    tone_frequency,
)


def test_size_and_signature() -> None:
    sector = build_boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"


def test_banner_is_embedded() -> None:
    assert b"resourced demo guest\r\n" in build_boot_sector()
    assert b"other words\x00\xff" in build_boot_sector(b"other words\x00\xff")


def test_divisor_is_programmed() -> None:
    # mov al, low; out 0x42, al; mov al, high; out 0x42, al
    divisor = pit_divisor(440)
    assert divisor == 2712
    expected = bytes([0xB0, divisor & 0xFF, 0xE6, 0x42, 0xB0, divisor >> 8, 0xE6, 0x42])
    assert expected in build_boot_sector(tone_hz=440)


def test_tone_frequency() -> None:
    assert PIT_HZ == 1193182
    assert tone_frequency(440) == pytest.approx(1193182 / 2712)
    assert abs(tone_frequency(440) - 440) < 0.1
    assert tone_frequency(1000) == PIT_HZ / 1193
    for hz in (20, 441, 5000, 20000):
        assert tone_frequency(hz) == PIT_HZ / round(PIT_HZ / hz)
        assert pit_divisor(hz) <= 0xFFFF


@pytest.mark.parametrize("tone_hz", [0, 19, 20001, -440])
def test_bad_tone_is_refused(tone_hz: int) -> None:
    with pytest.raises(ValueError, match="tone_hz"):
        build_boot_sector(tone_hz=tone_hz)
    with pytest.raises(ValueError, match="tone_hz"):
        tone_frequency(tone_hz)


def test_longest_banner_fits_and_one_more_byte_does_not() -> None:
    banner = b"x" * MAX_BANNER_LENGTH
    sector = build_boot_sector(banner)
    assert len(sector) == 512
    assert sector[510 - MAX_BANNER_LENGTH : 510] == banner
    with pytest.raises(ValueError, match="banner"):
        build_boot_sector(banner + b"x")


def test_empty_banner() -> None:
    assert len(build_boot_sector(b"")) == 512
