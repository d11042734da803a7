"""The test stream the console tests send: every byte knows its offset."""

from __future__ import annotations

#: Byte `i` of every stream in these tests is PATTERN[i % 251] (a prime period, so
#: that a byte out of place shows).
PATTERN = bytes(range(251)) * 8


def stream(start: int, stop: int) -> bytes:
    """Bytes `start` to `stop` of the test stream."""
    out = bytearray()
    while start < stop:
        piece = PATTERN[start % 251 : start % 251 + min(stop - start, 1500)]
        out += piece
        start += len(piece)
    return bytes(out)
