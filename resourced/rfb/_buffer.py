"""Byte reading helpers for the RFB parsers: a cursor that says "need more data".

`Reader` walks a buffer without copying. Running past the end raises `NeedData`,
an internal signal (never seen outside `resourced.rfb`) that the caller turns into
"wait for more bytes", rolling back to where the message started. This module does
no I/O and knows no message.
"""

from __future__ import annotations

import struct
from typing import Any

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_S32 = struct.Struct("!i")


class NeedData(Exception):
    """The buffer ends before the message does (internal to the parsers)."""


class Reader:
    """A read cursor over bytes; raises `NeedData` when the bytes run out.

    Each read checks the bound itself rather than through `need()`: the parsers
    run once per message, and a Python call per field is most of their cost.
    """

    __slots__ = ("_data", "_end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self._data = memoryview(data)
        self._end = len(self._data)
        self.pos = pos

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def need(self, n: int) -> None:
        if self.pos + n > self._end:
            raise NeedData

    def u8(self) -> int:
        pos = self.pos
        if pos >= self._end:
            raise NeedData
        self.pos = pos + 1
        return self._data[pos]

    def u16(self) -> int:
        pos = self.pos
        if pos + 2 > self._end:
            raise NeedData
        self.pos = pos + 2
        value: int = _U16.unpack_from(self._data, pos)[0]
        return value

    def u32(self) -> int:
        pos = self.pos
        if pos + 4 > self._end:
            raise NeedData
        self.pos = pos + 4
        value: int = _U32.unpack_from(self._data, pos)[0]
        return value

    def s32(self) -> int:
        pos = self.pos
        if pos + 4 > self._end:
            raise NeedData
        self.pos = pos + 4
        value: int = _S32.unpack_from(self._data, pos)[0]
        return value

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        """Read the fixed-size fields of `layout` at once: one bound check, one call."""
        pos = self.pos
        end = pos + layout.size
        if end > self._end:
            raise NeedData
        self.pos = end
        return layout.unpack_from(self._data, pos)

    def release(self) -> None:
        """Drop the view so the underlying bytearray may be resized."""
        self._data.release()

    def take(self, n: int) -> bytes:
        """Return the next `n` bytes as a copy. Check `n` against a limit first."""
        pos = self.pos
        end = pos + n
        if end > self._end:
            raise NeedData
        self.pos = end
        return bytes(self._data[pos:end])

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
