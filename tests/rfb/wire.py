"""Server-side wire bytes for the RFB client tests, built by hand from rfbproto.

Everything here packs bytes with `struct` straight from the message layouts of
rfbproto 7 (and QEMU's `ui/vnc.c` for its audio messages); nothing calls the
`serialize()` methods under test, so a test that compares the two compares two
independent readings of the specification.

It also has small drivers for a `ClientConnection`: `handshake()` takes a fresh
client to CONNECTED with security None, and the `feed_*` helpers push bytes in
whole, one byte at a time, or followed by the start of the next message.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hypothesis import strategies as st

from resourced.rfb.connection import ClientConnection, State
from resourced.rfb.events import Connected

# ---------------------------------------------------------------------------
# Primitive packing
# ---------------------------------------------------------------------------


def u8(value: int) -> bytes:
    return struct.pack(">B", value)


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def s32(value: int) -> bytes:
    return struct.pack(">i", value)


def string(text: bytes) -> bytes:
    """A u32 length followed by the bytes (reasons, names, cut text)."""
    return u32(len(text)) + text


# ---------------------------------------------------------------------------
# Handshake (rfbproto 7.1-7.3)
# ---------------------------------------------------------------------------

#: 32 bits per pixel, depth 24, little-endian, true colour, 8 bits a channel,
#: red at 16, green at 8, blue at 0: the 16 bytes of a PIXEL_FORMAT (rfbproto 7.4).
PIXEL_FORMAT_RGBX = bytes.fromhex("20 18 00 01 00ff 00ff 00ff 10 08 00 000000")
#: 8 bits per pixel, depth 8, colour-mapped.
PIXEL_FORMAT_MAPPED8 = bytes.fromhex("08 08 00 00 0000 0000 0000 00 00 00 000000")


def greeting(version: bytes = b"3.8") -> bytes:
    """The server's ProtocolVersion, e.g. b"3.8" -> b"RFB 003.008\\n"."""
    major, minor = version.split(b".")
    return b"RFB %03d.%03d\n" % (int(major), int(minor))


def security_types(*types: int) -> bytes:
    """3.7+: u8 count, then one u8 per security type."""
    return u8(len(types)) + bytes(types)


def security_refused(reason: bytes) -> bytes:
    """3.7+: a count of zero, then the reason string."""
    return u8(0) + string(reason)


def security_type_33(number: int) -> bytes:
    """3.3: the server decides, as a u32."""
    return u32(number)


def security_refused_33(reason: bytes) -> bytes:
    """3.3: security type 0 (invalid), then the reason string."""
    return u32(0) + string(reason)


def vnc_challenge(challenge: bytes = bytes(range(16))) -> bytes:
    assert len(challenge) == 16
    return challenge


def security_result_ok() -> bytes:
    return u32(0)


def security_result_failed(reason: bytes | None = None, code: int = 1) -> bytes:
    """Failure; 3.8 follows it with a reason string, 3.3/3.7 with nothing."""
    return u32(code) + (string(reason) if reason is not None else b"")


def vencrypt_version(major: int = 0, minor: int = 2) -> bytes:
    return u8(major) + u8(minor)


def vencrypt_ack(ok: bool = True) -> bytes:
    return u8(0 if ok else 1)


def vencrypt_subtypes(*subtypes: int) -> bytes:
    return u8(len(subtypes)) + b"".join(u32(s) for s in subtypes)


def vencrypt_accept(ok: bool = True) -> bytes:
    return u8(1 if ok else 0)


def server_init(
    width: int = 640,
    height: int = 480,
    name: bytes = b"test desktop",
    pixel_format: bytes = PIXEL_FORMAT_RGBX,
) -> bytes:
    """u16 width, u16 height, PIXEL_FORMAT, u32 name length, name (rfbproto 7.3.2)."""
    return u16(width) + u16(height) + pixel_format + string(name)


def spoken_version(version: bytes) -> bytes:
    """The version a client answers a server greeting with (rfbproto 7.1.1): 3.8 for
    3.8 and anything newer (4.x, 5.x too), 3.7 for 3.7, and 3.3 for 3.3 to 3.6."""
    major, minor = (int(part) for part in version.split(b"."))
    assert (major, minor) >= (3, 3)
    if (major, minor) >= (3, 8):
        return b"3.8"
    return b"3.7" if minor == 7 else b"3.3"


def security_none(version: bytes = b"3.8") -> bytes:
    """What a None-security server sends after its greeting, for each version."""
    spoken = spoken_version(version)
    if spoken == b"3.3":
        return security_type_33(1)
    if spoken == b"3.7":
        return security_types(1)
    return security_types(1) + security_result_ok()


# ---------------------------------------------------------------------------
# Server messages (rfbproto 7.6; QEMU ui/vnc.c)
# ---------------------------------------------------------------------------


def rect(x: int, y: int, width: int, height: int, encoding: int, body: bytes = b"") -> bytes:
    """A rectangle header (u16 x, y, w, h; s32 encoding) and its body."""
    return u16(x) + u16(y) + u16(width) + u16(height) + s32(encoding) + body


def fbu(*rects: bytes, count: int | None = None) -> bytes:
    """FramebufferUpdate: u8 0, u8 pad, u16 number of rectangles, rectangles."""
    return u8(0) + u8(0) + u16(len(rects) if count is None else count) + b"".join(rects)


def colour_map(first: int, colours: Sequence[tuple[int, int, int]]) -> bytes:
    """SetColourMapEntries: u8 1, pad, u16 first, u16 count, count x (u16 r, g, b)."""
    body = b"".join(u16(r) + u16(g) + u16(b) for r, g, b in colours)
    return u8(1) + u8(0) + u16(first) + u16(len(colours)) + body


def bell() -> bytes:
    return u8(2)


def server_cut_text(text: bytes) -> bytes:
    """ServerCutText: u8 3, 3 pad, u32 length, text."""
    return u8(3) + b"\0\0\0" + string(text)


def qemu_audio(op: int) -> bytes:
    """QEMU server message 255, submessage 1 (audio), u16 operation."""
    return u8(255) + u8(1) + u16(op)


def audio_end() -> bytes:
    return qemu_audio(0)


def audio_begin() -> bytes:
    return qemu_audio(1)


def audio_data(data: bytes) -> bytes:
    return qemu_audio(2) + string(data)


# ---------------------------------------------------------------------------
# Driving a ClientConnection
# ---------------------------------------------------------------------------


def feed_all(conn: ClientConnection, data: bytes) -> list[Any]:
    """Feed `data` in one piece and collect every event it yields.

    Empty `data` feeds nothing (it is not EOF: say `conn.receive_data(b"")` for that).
    """
    if data:
        conn.receive_data(data)
    return list(conn.events())


def feed_bytewise(conn: ClientConnection, data: bytes) -> list[Any]:
    """Feed `data` one byte at a time, collecting events after each byte."""
    events: list[Any] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events.extend(conn.events())
    return events


def feed_chunks(conn: ClientConnection, data: bytes, cuts: Iterable[int]) -> list[Any]:
    """Feed `data` split at the offsets `cuts`, collecting events after each piece."""
    events: list[Any] = []
    start = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
        events.extend(feed_all(conn, data[start:cut]))
        start = cut
    return events


def feed_with_trailing(conn: ClientConnection, data: bytes, trailing: bytes) -> list[Any]:
    """Feed `data` followed, in the same piece, by `trailing` (the start of what
    comes next); return the events. `trailing` must not complete a message."""
    return feed_all(conn, data + trailing)


def handshake(
    conn: ClientConnection,
    version: bytes = b"3.8",
    *,
    width: int = 640,
    height: int = 480,
    name: bytes = b"test desktop",
    pixel_format: bytes = PIXEL_FORMAT_RGBX,
) -> Connected:
    """Take a fresh client to CONNECTED with security None; return `Connected`.

    What the client sent on the way is discarded (read `data_to_send()` before
    calling this to keep it).
    """
    data = greeting(version) + security_none(version)
    data += server_init(width, height, name, pixel_format)
    events = feed_all(conn, data)
    assert conn.state is State.CONNECTED, conn.state
    assert len(events) == 1, events
    assert isinstance(events[0], Connected)
    conn.data_to_send()
    return events[0]


def connected(*, width: int = 64, height: int = 48, **options: Any) -> ClientConnection:
    """A new client, handshaken with security None (RFB 3.8), output drained."""
    conn = ClientConnection(**options)
    handshake(conn, width=width, height=height)
    return conn


@contextmanager
def traced_peak() -> Iterator[list[int]]:
    """Measure the peak of traced allocations inside the block, above its start."""
    result = [0]
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield result
        result[0] = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()


@st.composite
def mutated(draw: st.DrawFn, messages: st.SearchStrategy[bytes]) -> bytes:
    """A valid byte string, kept, cut short, or with bytes overwritten or inserted."""
    data = draw(messages)
    how = draw(st.sampled_from(["keep", "keep", "truncate", "overwrite", "insert"]))
    if how == "keep" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    junk = draw(st.binary(min_size=1, max_size=4))
    if how == "overwrite":
        return data[:at] + junk + data[at + len(junk) :]
    return data[:at] + junk + data[at:]
