"""RFB messages after the handshake: one frozen dataclass each, parse and serialize beside it.

Client messages (rfbproto 7.5) serialize to bytes and parse back (a gateway or a
test server reads them); server messages (rfbproto 7.6) parse from a `Reader` and
serialize (test servers write them). FramebufferUpdate bodies are framed by
`resourced.rfb.encodings`; the connection assembles them. QEMU's audio messages
live in `resourced.rfb.qemu`. This module does no I/O and keeps no state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import Reader, s32, u8, u16, u32
from resourced.rfb.constants import (
    MAX_COLOUR_MAP_ENTRIES,
    MAX_CUT_TEXT_LENGTH,
    MAX_ENCODINGS,
    ClientMessageType,
    QemuClientSubtype,
    ServerMessageType,
)
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.pixelformat import PixelFormat

# ---------------------------------------------------------------------------
# Client -> server (rfbproto 7.5)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetPixelFormat:
    """rfbproto 7.5.1."""

    pixel_format: PixelFormat

    def serialize(self) -> bytes:
        return u8(ClientMessageType.SET_PIXEL_FORMAT) + b"\0\0\0" + self.pixel_format.serialize()

    @classmethod
    def parse(cls, r: Reader) -> SetPixelFormat:
        r.skip(3)
        return cls(PixelFormat.parse(r))


@dataclass(frozen=True, slots=True)
class SetEncodings:
    """rfbproto 7.5.2. Encodings are signed 32-bit numbers, most preferred first."""

    encodings: tuple[int, ...]

    def serialize(self) -> bytes:
        if len(self.encodings) > MAX_ENCODINGS:
            raise LocalProtocolError(f"SetEncodings: {len(self.encodings)} encodings is too many")
        head = u8(ClientMessageType.SET_ENCODINGS) + b"\0" + u16(len(self.encodings))
        return head + b"".join(s32(e) for e in self.encodings)

    @classmethod
    def parse(cls, r: Reader) -> SetEncodings:
        r.skip(1)
        count = r.u16()
        if count > MAX_ENCODINGS:
            raise RemoteProtocolError(f"SetEncodings: {count} encodings exceeds {MAX_ENCODINGS}")
        r.need(4 * count)
        return cls(tuple(r.s32() for _ in range(count)))


@dataclass(frozen=True, slots=True)
class FramebufferUpdateRequest:
    """rfbproto 7.5.3."""

    incremental: bool
    x: int
    y: int
    width: int
    height: int

    def serialize(self) -> bytes:
        return (
            u8(ClientMessageType.FRAMEBUFFER_UPDATE_REQUEST)
            + u8(int(self.incremental))
            + u16(self.x)
            + u16(self.y)
            + u16(self.width)
            + u16(self.height)
        )

    @classmethod
    def parse(cls, r: Reader) -> FramebufferUpdateRequest:
        incremental = r.u8()
        return cls(bool(incremental), r.u16(), r.u16(), r.u16(), r.u16())


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """rfbproto 7.5.4. `keysym` is an X11 keysym."""

    down: bool
    keysym: int

    def serialize(self) -> bytes:
        return u8(ClientMessageType.KEY_EVENT) + u8(int(self.down)) + b"\0\0" + u32(self.keysym)

    @classmethod
    def parse(cls, r: Reader) -> KeyEvent:
        down = r.u8()
        r.skip(2)
        return cls(bool(down), r.u32())


@dataclass(frozen=True, slots=True)
class PointerEvent:
    """rfbproto 7.5.5. Bit n of `buttons` is button n+1."""

    buttons: int
    x: int
    y: int

    def serialize(self) -> bytes:
        return u8(ClientMessageType.POINTER_EVENT) + u8(self.buttons) + u16(self.x) + u16(self.y)

    @classmethod
    def parse(cls, r: Reader) -> PointerEvent:
        return cls(r.u8(), r.u16(), r.u16())


@dataclass(frozen=True, slots=True)
class ClientCutText:
    """rfbproto 7.5.6. Text is ISO 8859-1 on the wire; we carry the bytes."""

    text: bytes

    def serialize(self) -> bytes:
        if len(self.text) > MAX_CUT_TEXT_LENGTH:
            raise LocalProtocolError(f"ClientCutText: {len(self.text)} bytes is too long")
        return u8(ClientMessageType.CLIENT_CUT_TEXT) + b"\0\0\0" + u32(len(self.text)) + self.text

    @classmethod
    def parse(cls, r: Reader) -> ClientCutText:
        r.skip(3)
        return cls(_cut_text(r, "ClientCutText"))


@dataclass(frozen=True, slots=True)
class QemuKeyEvent:
    """rfbproto 7.5.9.1: a key with its XT scancode (`keycode`), for keymap-free input."""

    down: bool
    keysym: int
    keycode: int

    def serialize(self) -> bytes:
        return (
            u8(ClientMessageType.QEMU)
            + u8(QemuClientSubtype.EXTENDED_KEY_EVENT)
            + u16(int(self.down))
            + u32(self.keysym)
            + u32(self.keycode)
        )

    @classmethod
    def parse(cls, r: Reader) -> QemuKeyEvent:
        """Parse what follows the two type bytes (255, 0)."""
        down = r.u16()
        return cls(bool(down), r.u32(), r.u32())


ClientMessage = (
    SetPixelFormat
    | SetEncodings
    | FramebufferUpdateRequest
    | KeyEvent
    | PointerEvent
    | ClientCutText
    | QemuKeyEvent
)

# ---------------------------------------------------------------------------
# Server -> client (rfbproto 7.6)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rectangle:
    """One rectangle of a FramebufferUpdate: its header and its still-encoded body."""

    header: RectangleHeader
    body: bytes

    def serialize(self) -> bytes:
        return self.header.serialize() + self.body


@dataclass(frozen=True, slots=True)
class FramebufferUpdate:
    """rfbproto 7.6.1. Bodies stay encoded: decoding pixels is the display's job."""

    rectangles: tuple[Rectangle, ...]

    def serialize(self) -> bytes:
        head = u8(ServerMessageType.FRAMEBUFFER_UPDATE) + b"\0" + u16(len(self.rectangles))
        return head + b"".join(rect.serialize() for rect in self.rectangles)


@dataclass(frozen=True, slots=True)
class SetColourMapEntries:
    """rfbproto 7.6.2. Colours are (red, green, blue) 16-bit triples."""

    first_colour: int
    colours: tuple[tuple[int, int, int], ...]

    def serialize(self) -> bytes:
        head = (
            u8(ServerMessageType.SET_COLOUR_MAP_ENTRIES)
            + b"\0"
            + u16(self.first_colour)
            + u16(len(self.colours))
        )
        return head + b"".join(u16(r) + u16(g) + u16(b) for r, g, b in self.colours)

    @classmethod
    def parse(cls, r: Reader) -> SetColourMapEntries:
        r.skip(1)
        first = r.u16()
        count = r.u16()
        if first + count > MAX_COLOUR_MAP_ENTRIES:
            raise RemoteProtocolError(
                f"SetColourMapEntries: entries {first}..{first + count} exceed the 16-bit map"
            )
        r.need(6 * count)
        return cls(first, tuple((r.u16(), r.u16(), r.u16()) for _ in range(count)))


@dataclass(frozen=True, slots=True)
class Bell:
    """rfbproto 7.6.3."""

    def serialize(self) -> bytes:
        return u8(ServerMessageType.BELL)

    @classmethod
    def parse(cls, r: Reader) -> Bell:
        return cls()


@dataclass(frozen=True, slots=True)
class ServerCutText:
    """rfbproto 7.6.4. Text is ISO 8859-1 on the wire; we carry the bytes."""

    text: bytes

    def serialize(self) -> bytes:
        return u8(ServerMessageType.SERVER_CUT_TEXT) + b"\0\0\0" + u32(len(self.text)) + self.text

    @classmethod
    def parse(cls, r: Reader) -> ServerCutText:
        r.skip(3)
        return cls(_cut_text(r, "ServerCutText"))


def _cut_text(r: Reader, what: str) -> bytes:
    length = r.u32()
    # A length with the top bit set is the Extended Clipboard format (rfbproto
    # 7.6.4.1), which only a client that advertised it may receive; we never do.
    if length > MAX_CUT_TEXT_LENGTH:
        raise RemoteProtocolError(f"{what}: length {length} exceeds {MAX_CUT_TEXT_LENGTH}")
    return r.take(length)


#: Server messages whose whole body parses without connection state. The type byte
#: has been consumed. FramebufferUpdate and QEMU (255) need state: the connection
#: handles them.
SIMPLE_SERVER_PARSERS: dict[int, Callable[[Reader], SetColourMapEntries | Bell | ServerCutText]] = {
    ServerMessageType.SET_COLOUR_MAP_ENTRIES: SetColourMapEntries.parse,
    ServerMessageType.BELL: Bell.parse,
    ServerMessageType.SERVER_CUT_TEXT: ServerCutText.parse,
}

#: Client messages by type (the type byte consumed), for gateways and test servers.
#: QEMU's 255 messages depend on their submessage and are parsed by `resourced.rfb.qemu`.
CLIENT_PARSERS: dict[
    int,
    Callable[
        [Reader],
        SetPixelFormat
        | SetEncodings
        | FramebufferUpdateRequest
        | KeyEvent
        | PointerEvent
        | ClientCutText,
    ],
] = {
    ClientMessageType.SET_PIXEL_FORMAT: SetPixelFormat.parse,
    ClientMessageType.SET_ENCODINGS: SetEncodings.parse,
    ClientMessageType.FRAMEBUFFER_UPDATE_REQUEST: FramebufferUpdateRequest.parse,
    ClientMessageType.KEY_EVENT: KeyEvent.parse,
    ClientMessageType.POINTER_EVENT: PointerEvent.parse,
    ClientMessageType.CLIENT_CUT_TEXT: ClientCutText.parse,
}
