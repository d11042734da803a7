"""The parsers' read cursor: every read is bounded and says "need more" without moving."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from resourced.rfb._buffer import NeedData, Reader

DATA = bytes.fromhex("01 0203 04050607 fffffffe 0a0b")

READS: list[tuple[str, Callable[[Reader], Any], Any, int]] = [
    ("u8", Reader.u8, 0x01, 1),
    ("u16", Reader.u16, 0x0102, 2),
    ("u32", Reader.u32, 0x01020304, 4),
    ("s32", Reader.s32, 0x01020304, 4),
    ("unpack", lambda r: r.unpack(struct.Struct("!BHI")), (1, 0x0203, 0x04050607), 7),
    ("take", lambda r: r.take(3), b"\x01\x02\x03", 3),
]


@pytest.mark.parametrize(
    ("read", "expected", "size"), [r[1:] for r in READS], ids=[r[0] for r in READS]
)
def test_each_read_is_bounded(read: Callable[[Reader], Any], expected: Any, size: int) -> None:
    reader = Reader(DATA)
    assert read(reader) == expected
    assert reader.pos == size
    for short in range(size):
        cut = Reader(DATA[:short])
        with pytest.raises(NeedData):
            read(cut)
        assert cut.pos == 0


def test_reading_from_a_start_position() -> None:
    reader = Reader(bytearray(DATA), 7)
    assert reader.remaining == len(DATA) - 7
    assert reader.s32() == -2
    assert reader.unpack(struct.Struct("!BB")) == (0x0A, 0x0B)
    assert reader.remaining == 0
    with pytest.raises(NeedData):
        reader.u8()
    reader.release()
