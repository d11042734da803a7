"""Byte reading helpers for the RFB parsers: a cursor that says "need more data".

`Reader` walks a buffer without copying. Running past the end raises `NeedData`,
an internal signal (never seen outside `resourced.rfb`) that the caller turns into
"wait for more bytes", rolling back to where the message started. This module does
no I/O and knows no message.
"""

from __future__ import annotations

import struct

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_S32 = struct.Struct("!i")


class NeedData(Exception):
    """The buffer ends before the message does (internal to the parsers)."""


class Reader:
    """A read cursor over bytes; raises `NeedData` when the bytes run out."""

    __slots__ = ("_data", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._data = memoryview(data)
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def need(self, n: int) -> None:
        if self.pos + n > len(self._data):
            raise NeedData

    def u8(self) -> int:
        self.need(1)
        (v,) = _U8.unpack_from(self._data, self.pos)
        self.pos += 1
        return int(v)

    def u16(self) -> int:
        self.need(2)
        (v,) = _U16.unpack_from(self._data, self.pos)
        self.pos += 2
        return int(v)

    def u32(self) -> int:
        self.need(4)
        (v,) = _U32.unpack_from(self._data, self.pos)
        self.pos += 4
        return int(v)

    def s32(self) -> int:
        self.need(4)
        (v,) = _S32.unpack_from(self._data, self.pos)
        self.pos += 4
        return int(v)

    def release(self) -> None:
        """Drop the view so the underlying bytearray may be resized."""
        self._data.release()

    def take(self, n: int) -> bytes:
        """Return the next `n` bytes as a copy. Check `n` against a limit first."""
        self.need(n)
        out = bytes(self._data[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n


def u8(v: int) -> bytes:
    return _U8.pack(v)


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def s32(v: int) -> bytes:
    return _S32.pack(v)
