"""The payloads of Extended Clipboard messages (rfbproto "Extended Clipboard Pseudo-Encoding").

`ExtendedClientCutText` / `ExtendedServerCutText` (in `resourced.rfb.messages`)
frame the messages: a flags word and the bytes after it. This module reads and
writes what those bytes mean for each action: caps carry a u32 size limit per
format bit set; provide carries one zlib stream holding, per format bit set and
in bit order, a u32 size and that many bytes. Request, peek and notify carry
nothing but their flags.

Inflating is bounded: a provide never inflates past the limit the caller gives
(a zlib stream can expand a thousandfold). No I/O, no clipboard state: who owns
the clipboard and who asked for what is the peers' business.
"""

from __future__ import annotations

import struct
import zlib

from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb.constants import EXTENDED_CLIPBOARD_FORMATS, MAX_CUT_TEXT_LENGTH

_U32 = struct.Struct("!I")


def formats(flags: int) -> list[int]:
    """The format bits set in `flags`, lowest first (the order payloads follow)."""
    return [1 << bit for bit in range(16) if flags & EXTENDED_CLIPBOARD_FORMATS & (1 << bit)]


def caps_payload(sizes: dict[int, int]) -> bytes:
    """The payload of a caps message: a u32 limit per format, in bit order."""
    return b"".join(_U32.pack(sizes[fmt]) for fmt in sorted(sizes))


def parse_caps(flags: int, payload: bytes) -> dict[int, int]:
    """Format bit -> the peer's size limit for it, from a caps message."""
    wanted = formats(flags)
    if len(payload) < _U32.size * len(wanted):
        raise RemoteProtocolError(
            f"Extended Clipboard caps: {len(payload)} bytes for {len(wanted)} format sizes"
        )
    return {fmt: _U32.unpack_from(payload, _U32.size * i)[0] for i, fmt in enumerate(wanted)}


def provide_payload(data: dict[int, bytes]) -> bytes:
    """The zlib stream of a provide message for `data` (format bit -> bytes).

    Text is UTF-8 with a terminating NUL (rfbproto); the caller supplies it so.
    """
    raw = b"".join(_U32.pack(len(data[fmt])) + data[fmt] for fmt in sorted(data))
    if len(raw) > MAX_CUT_TEXT_LENGTH:
        raise LocalProtocolError(f"Extended Clipboard provide of {len(raw)} bytes is too long")
    return zlib.compress(raw)


def inflate(payload: bytes, limit: int) -> bytes | None:
    """The provide stream inflated, or None if it inflates to more than `limit` bytes.

    Raises `RemoteProtocolError` for a stream that is not zlib.
    """
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload, limit + 1)
    except zlib.error as err:
        raise RemoteProtocolError(f"Extended Clipboard provide: bad zlib data ({err})") from err
    if len(raw) > limit or inflater.unconsumed_tail:
        return None
    return raw


def parse_provide(flags: int, payload: bytes, limit: int = MAX_CUT_TEXT_LENGTH) -> dict[int, bytes]:
    """Format bit -> bytes, from a provide message; at most `limit` bytes inflated."""
    raw = inflate(payload, limit)
    if raw is None:
        raise RemoteProtocolError(f"Extended Clipboard provide inflates past {limit} bytes")
    data: dict[int, bytes] = {}
    pos = 0
    for fmt in formats(flags):
        if pos + _U32.size > len(raw):
            raise RemoteProtocolError(f"Extended Clipboard provide: format {fmt:#x} is missing")
        (size,) = _U32.unpack_from(raw, pos)
        pos += _U32.size
        if pos + size > len(raw):
            raise RemoteProtocolError(
                f"Extended Clipboard provide: format {fmt:#x} claims {size} bytes, "
                f"{len(raw) - pos} are there"
            )
        data[fmt] = raw[pos : pos + size]
        pos += size
    return data
