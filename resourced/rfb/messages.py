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

#: The flags word that starts every Extended Clipboard payload.
EXTENDED_CLIPBOARD_FLAGS_SIZE = 4

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


@dataclass(frozen=True, slots=True)
class ExtendedClientCutText:
    """ClientCutText in its Extended Clipboard form (rfbproto "Extended Clipboard
    Pseudo-Encoding"): a negative length, a u32 flags word (`ExtendedClipboardFlag`:
    formats and one action), then what the action carries (`payload`: the caps'
    sizes, or a provide's zlib stream; nothing for request, peek and notify).

    Only a client that advertised the pseudo-encoding may send it.
    """

    flags: int
    payload: bytes = b""

    def serialize(self) -> bytes:
        return _extended_cut_text(ClientMessageType.CLIENT_CUT_TEXT, self.flags, self.payload)


ClientMessage = (
    SetPixelFormat
    | SetEncodings
    | FramebufferUpdateRequest
    | KeyEvent
    | PointerEvent
    | ClientCutText
    | ExtendedClientCutText
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


@dataclass(frozen=True, slots=True)
class ExtendedServerCutText:
    """ServerCutText in its Extended Clipboard form (see `ExtendedClientCutText`).

    A server sends it only to a client that advertised the pseudo-encoding.
    """

    flags: int
    payload: bytes = b""

    def serialize(self) -> bytes:
        return _extended_cut_text(ServerMessageType.SERVER_CUT_TEXT, self.flags, self.payload)


def _extended_cut_text(kind: int, flags: int, payload: bytes) -> bytes:
    length = EXTENDED_CLIPBOARD_FLAGS_SIZE + len(payload)
    if length > MAX_CUT_TEXT_LENGTH:
        raise LocalProtocolError(f"Extended Clipboard message of {length} bytes is too long")
    return u8(kind) + b"\0\0\0" + s32(-length) + u32(flags) + payload


@dataclass(frozen=True, slots=True)
class XvpServerMessage:
    """Server message 250 (rfbproto "xvp Server Message"): u8 pad, u8 version,
    u8 code (`XvpCode`: 0 FAIL, 1 INIT). Unknown versions and codes are framed,
    not judged."""

    version: int
    code: int

    SIZE = 3  # after the type byte

    def serialize(self) -> bytes:
        return u8(ServerMessageType.XVP) + b"\0" + u8(self.version) + u8(self.code)

    @classmethod
    def parse(cls, r: Reader) -> XvpServerMessage:
        """Parse what follows the type byte."""
        r.need(cls.SIZE)
        r.skip(1)
        return cls(r.u8(), r.u8())


def cut_text_length(r: Reader) -> tuple[int, bool]:
    """Read a cut text header after its type byte: (body length, extended?).

    A negative length is the Extended Clipboard form, whose body is `-length`
    bytes; its length is at least the flags word. The length is not checked
    against a limit here: the caller decides what to do with a long one.
    """
    r.need(7)
    r.skip(3)
    length = r.s32()
    if length >= 0:
        return length, False
    if -length < EXTENDED_CLIPBOARD_FLAGS_SIZE:
        raise RemoteProtocolError(
            f"Extended Clipboard message of {-length} bytes is shorter than its flags"
        )
    return -length, True


def parse_server_cut_text(r: Reader, *, extended: bool) -> ServerCutText | ExtendedServerCutText:
    """Parse ServerCutText after its type byte; `extended`: we advertised Extended Clipboard."""
    length, is_extended = cut_text_length(r)
    if is_extended and not extended:
        raise RemoteProtocolError(
            "Extended Clipboard ServerCutText, but we never advertised the pseudo-encoding"
        )
    if length > MAX_CUT_TEXT_LENGTH:
        raise RemoteProtocolError(f"ServerCutText: length {length} exceeds {MAX_CUT_TEXT_LENGTH}")
    body = r.take(length)
    if is_extended:
        return ExtendedServerCutText(int.from_bytes(body[:4], "big"), body[4:])
    return ServerCutText(body)


def _cut_text(r: Reader, what: str) -> bytes:
    length = r.u32()
    # A length with the top bit set is the Extended Clipboard form, which needs
    # connection state (was it advertised?): `parse_server_cut_text` and the
    # server connection handle it; here it is just too long.
    if length > MAX_CUT_TEXT_LENGTH:
        raise RemoteProtocolError(f"{what}: length {length} exceeds {MAX_CUT_TEXT_LENGTH}")
    return r.take(length)


#: Server messages whose whole body parses without connection state. The type byte
#: has been consumed. FramebufferUpdate, ServerCutText (its Extended Clipboard
#: form), xvp and QEMU (255) depend on what was advertised: the connection
#: handles them.
SIMPLE_SERVER_PARSERS: dict[int, Callable[[Reader], SetColourMapEntries | Bell]] = {
    ServerMessageType.SET_COLOUR_MAP_ENTRIES: SetColourMapEntries.parse,
    ServerMessageType.BELL: Bell.parse,
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
