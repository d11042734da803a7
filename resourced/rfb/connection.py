"""The sans-IO RFB client: bytes in, events out, bytes to send.

`ClientConnection` runs the whole client side of RFB 3.3/3.7/3.8 (rfbproto 7):
version and security handshake (None, VNC Authentication, VeNCrypt with TLS via
`resourced.rfb.tls`), ClientInit/ServerInit, then server messages. It never
touches a socket or a clock: feed it with `receive_data()` (b"" for EOF), pull
events with `next_event()` / `events()`, queue messages with `send()` and write
out `data_to_send()`. Every state and what it waits for is in `ClientConnection.handlers`;
the byte plumbing shared with the server side is `resourced.rfb._engine`.

It is not a framebuffer: rectangle bodies are framed, bounds-checked and handed
on still encoded.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

from resourced.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    LocalProtocolError,
    RemoteProtocolError,
    SecurityNegotiationFailed,
    TlsError,
)
from resourced.rfb._buffer import NeedData, Reader, u8, u32
from resourced.rfb._engine import Engine
from resourced.rfb.constants import (
    MAX_FRAMEBUFFER_DIMENSION,
    MAX_REASON_LENGTH,
    MAX_SECURITY_TYPES,
    MAX_SERVER_NAME_LENGTH,
    PIXEL_ENCODINGS,
    Encoding,
    SecurityResult,
    SecurityType,
    ServerMessageType,
    VeNCryptSubtype,
)
from resourced.rfb.encodings import RectangleFramer, RectangleHeader, framer_for
from resourced.rfb.events import (
    Connected,
    CursorShape,
    DesktopResized,
    PixelFormatChanged,
    ServerClosed,
)
from resourced.rfb.extension import Extension
from resourced.rfb.messages import (
    SIMPLE_SERVER_PARSERS,
    FramebufferUpdate,
    FramebufferUpdateRequest,
    Rectangle,
    SetEncodings,
    SetPixelFormat,
    XvpServerMessage,
    parse_server_cut_text,
)
from resourced.rfb.pixelformat import PixelFormat
from resourced.rfb.security import (
    VENCRYPT_SUBTYPES,
    VNC_AUTH_CHALLENGE_SIZE,
    Credentials,
    Inner,
    TlsMode,
    choose_security_type,
    choose_vencrypt_subtype,
    vnc_auth_response,
)
from resourced.rfb.text import credential_bytes, decode_text, printable
from resourced.rfb.tls import TlsCredentials, TlsLayer, anonymous_context
from resourced.rfb.version import VERSION_LENGTH, common_minor, parse_version, version_bytes

#: Pixel encodings we advertise by default, best first. We frame them all.
DEFAULT_ENCODINGS: tuple[int, ...] = (
    Encoding.ZRLE,
    Encoding.HEXTILE,
    Encoding.RRE,
    Encoding.COPY_RECT,
    Encoding.RAW,
)

#: Pseudo-encodings the core itself handles.
CORE_PSEUDO_ENCODINGS: tuple[int, ...] = (
    Encoding.DESKTOP_SIZE,
    Encoding.EXTENDED_DESKTOP_SIZE,
    Encoding.LAST_RECT,
    Encoding.CURSOR,
)


class Message(Protocol):
    def serialize(self) -> bytes: ...


class State(enum.Enum):
    """Where the client is in the protocol (rfbproto 7.1-7.6)."""

    PROTOCOL_VERSION = "waiting for the server's ProtocolVersion"
    SECURITY_TYPES = "waiting for the list of security types"
    SECURITY_TYPE_33 = "waiting for the security type (3.3)"
    VNC_AUTH_CHALLENGE = "waiting for the VNC authentication challenge"
    VENCRYPT_VERSION = "waiting for the VeNCrypt version"
    VENCRYPT_ACK = "waiting for the VeNCrypt version acknowledgement"
    VENCRYPT_SUBTYPES = "waiting for the VeNCrypt subtypes"
    VENCRYPT_ACCEPT = "waiting for the VeNCrypt subtype acceptance"
    TLS_HANDSHAKE = "in the TLS handshake"
    SECURITY_RESULT = "waiting for the SecurityResult"
    SERVER_INIT = "waiting for ServerInit"
    CONNECTED = "connected"
    CLOSED = "closed"


# Looked up once for the checks made on every message: Python 3.11 finds an enum
# member through EnumType.__getattr__, which costs about as much as parsing a field.
_CONNECTED = State.CONNECTED
_FRAMEBUFFER_UPDATE = ServerMessageType.FRAMEBUFFER_UPDATE
_QEMU_MESSAGE = ServerMessageType.QEMU
_SERVER_CUT_TEXT = ServerMessageType.SERVER_CUT_TEXT
_XVP_MESSAGE = ServerMessageType.XVP


class ClientConnection(Engine):
    """One RFB client session, sans-IO.

    Credentials and policy: `password` (VNC auth, VeNCrypt *Vnc), `username` (for
    VeNCrypt *Plain), `tls_mode` (`AUTO` prefers verified TLS; `REQUIRE` refuses
    anything but certificate-verified TLS), `tls` (certificates; by default found
    where gtk-vnc looks), `allow_anonymous_tls` (with REQUIRE, accept anonymous
    Diffie-Hellman TLS too). `shared` keeps other viewers connected (default on).
    `encodings` are the pixel encodings to advertise; extensions add theirs.
    `auto_setup` sends SetPixelFormat/SetEncodings after ServerInit; a proxy turns
    it off and sends its own client's.
    """

    peer = "server"
    TLS_HANDSHAKE = State.TLS_HANDSHAKE
    CLOSED = State.CLOSED

    def __init__(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        tls_mode: TlsMode = TlsMode.AUTO,
        tls: TlsCredentials | None = None,
        allow_anonymous_tls: bool = False,
        server_name: str | None = None,
        shared: bool = True,
        encodings: Sequence[int] = DEFAULT_ENCODINGS,
        pixel_format: PixelFormat | None = None,
        extensions: Sequence[Extension] = (),
        auto_setup: bool = True,
    ) -> None:
        self._credentials = Credentials(password=password, username=username)
        self._tls_mode = tls_mode
        self._tls_credentials = tls
        self._allow_anonymous_tls = allow_anonymous_tls
        self._server_name = server_name
        self._shared = shared
        self._encodings = tuple(encodings)
        self._requested_pixel_format = pixel_format
        self._auto_setup = auto_setup
        # Encodings in our last SetEncodings: only those rectangles may arrive.
        self._advertised: frozenset[int] = frozenset()
        # Every encoding we ever advertised: a message a pseudo-encoding brings
        # (Extended Clipboard, xvp) may have been sent before the server read a
        # SetEncodings that dropped it.
        self._ever_advertised: frozenset[int] = frozenset()
        self.extensions = list(extensions)
        self._by_encoding: dict[int, Extension] = {}
        self._by_subtype: dict[int, Extension] = {}
        for ext in self.extensions:
            ext.attach(self)
            for enc in ext.pseudo_encodings:
                self._claim(self._by_encoding, enc, ext, "pseudo-encoding")
            for sub in ext.server_subtypes:
                self._claim(self._by_subtype, sub, ext, "QEMU submessage")

        super().__init__(State.PROTOCOL_VERSION)
        self.version: tuple[int, int] | None = None
        self.security_type: SecurityType | None = None
        self.vencrypt_subtype: VeNCryptSubtype | None = None
        self.width = 0
        self.height = 0
        self.pixel_format: PixelFormat | None = None
        self.name = ""

        self._tls_params: tuple[Any, str | None, str] | None = None
        self._update: _UpdateInProgress | None = None

    @staticmethod
    def _claim(table: dict[int, Extension], key: int, ext: Extension, what: str) -> None:
        if key in table:
            raise LocalProtocolError(
                f"{what} {key} claimed by both {type(table[key]).__name__} and {type(ext).__name__}"
            )
        table[key] = ext

    # ------------------------------------------------------------------ I/O face

    def send(self, message: Message) -> None:
        """Queue a client message (only once connected).

        SetPixelFormat and SetEncodings also change how we read what the server
        sends next (rectangle sizes, which pseudo-rectangles may arrive).
        """
        if self.state is not _CONNECTED:
            raise LocalProtocolError(f"cannot send {type(message).__name__}: {self.state.value}")
        data = message.serialize()
        if isinstance(message, SetPixelFormat):
            self.pixel_format = message.pixel_format
        elif isinstance(message, SetEncodings):
            self._advertised = frozenset(message.encodings)
            self._ever_advertised |= self._advertised
        self._write(data)

    def request_update(self, incremental: bool = False) -> None:
        """Ask for the whole framebuffer (convenience for FramebufferUpdateRequest)."""
        self.send(FramebufferUpdateRequest(incremental, 0, 0, self.width, self.height))

    @property
    def tls_version(self) -> str | None:
        return self._tls.version if isinstance(self._tls, TlsLayer) else None

    @property
    def security_description(self) -> str:
        if self.security_type is None:
            return "none yet"
        if self.vencrypt_subtype is not None:
            return f"{self.security_type.name}/{self.vencrypt_subtype.name}"
        return self.security_type.name

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (for memory accounting)."""
        pending = self._update.buffered if self._update else 0
        return self.pending_input + pending

    @property
    def message_in_progress(self) -> str | None:
        """What the server is in the middle of sending, or None at a message boundary.

        For a caller that timed out waiting: "inside a FramebufferUpdate" says the
        server stalled mid-message, which no missing feature explains.
        """
        if self._update is not None:
            return (
                f"a FramebufferUpdate ({self.buffered} bytes of it received, "
                f"{self._update.remaining} of its rectangles still to come)"
            )
        if self.state is State.CONNECTED and self.pending_input:
            return f"a server message ({self.pending_input} bytes of it received)"
        return None

    # ------------------------------------------------------------------ internals

    def _parses_without_bytes(self) -> bool:
        # An update ends once its count of rectangles is in, and an empty
        # rectangle body is whole before any byte of it arrives.
        return self._update is not None

    def _at_eof(self) -> None:
        if self.state is State.CONNECTED and not self.pending_input and self._update is None:
            self.state = State.CLOSED
            self._events.append(ServerClosed())
            return
        if self.state is State.CONNECTED:
            raise RemoteProtocolError(
                "the server closed the connection in the middle of a message "
                f"({self.buffered} bytes of it received)"
            )
        raise ConnectionClosed(f"the server closed the connection while {self.state.value}")

    def _read_reason(self, r: Reader) -> str:
        length = r.u32()
        if length > MAX_REASON_LENGTH:
            raise RemoteProtocolError(f"failure reason of {length} bytes exceeds the limit")
        return printable(decode_text(r.take(length)))

    # --- handshake -------------------------------------------------------------

    def _on_version(self, r: Reader) -> list[Any]:
        greeting = r.take(VERSION_LENGTH)
        version = parse_version(greeting)
        if version is None:
            raise RemoteProtocolError(f"not an RFB server: greeting {greeting!r}")
        ours = common_minor(*version)
        if ours is None:
            raise RemoteProtocolError(
                f"the server speaks RFB {version[0]}.{version[1]}, older than 3.3"
            )
        self.version = (3, ours)
        self._write(version_bytes(ours))
        self.state = State.SECURITY_TYPE_33 if ours == 3 else State.SECURITY_TYPES
        return []

    def _on_security_types(self, r: Reader) -> list[Any]:
        count = r.u8()
        if count == 0:
            reason = self._read_reason(r)
            raise SecurityNegotiationFailed(f"the server refused the connection: {reason}")
        if count > MAX_SECURITY_TYPES:
            raise RemoteProtocolError(f"{count} security types is more than allowed")
        offered = list(r.take(count))
        choice = choose_security_type(
            offered, self._tls_mode, self._credentials, self._allow_anonymous_tls
        )
        self._write(u8(choice))
        self._start_security(choice)
        return []

    def _on_security_type_33(self, r: Reader) -> list[Any]:
        number = r.u32()
        if number == SecurityType.INVALID:
            reason = self._read_reason(r)
            raise SecurityNegotiationFailed(f"the server refused the connection: {reason}")
        if number not in (SecurityType.NONE, SecurityType.VNC_AUTH):
            raise RemoteProtocolError(f"RFB 3.3 server chose security type {number}")
        if self._tls_mode is TlsMode.REQUIRE:
            raise SecurityNegotiationFailed(
                "TLS was required but the server (RFB 3.3) offers no VeNCrypt"
            )
        if number == SecurityType.VNC_AUTH and self._credentials.password is None:
            raise AuthenticationFailed("the server requires a VNC password and none was given")
        self._start_security(SecurityType(number))
        return []

    def _start_security(self, choice: SecurityType) -> None:
        self.security_type = choice
        if choice is SecurityType.NONE:
            # 3.8 sends a SecurityResult even for None (rfbproto 7.2.1); 3.3/3.7 do not.
            if self.version == (3, 8):
                self.state = State.SECURITY_RESULT
            else:
                self._send_client_init()
        elif choice is SecurityType.VNC_AUTH:
            self.state = State.VNC_AUTH_CHALLENGE
        elif choice is SecurityType.VENCRYPT:
            self.state = State.VENCRYPT_VERSION
        else:  # pragma: no cover - choose_security_type returns only the above
            raise LocalProtocolError(f"security type {choice.name} not implemented")

    def _on_vnc_challenge(self, r: Reader) -> list[Any]:
        challenge = r.take(VNC_AUTH_CHALLENGE_SIZE)
        password = self._credentials.password
        if password is None:
            raise AuthenticationFailed("the server requires a VNC password and none was given")
        self._write(vnc_auth_response(password, challenge))
        self.state = State.SECURITY_RESULT
        return []

    def _on_vencrypt_version(self, r: Reader) -> list[Any]:
        major, minor = r.u8(), r.u8()
        if (major, minor) < (0, 2):
            raise SecurityNegotiationFailed(
                f"the server speaks VeNCrypt {major}.{minor}; only 0.2 is supported"
            )
        self._write(u8(0) + u8(2))
        self.state = State.VENCRYPT_ACK
        return []

    def _on_vencrypt_ack(self, r: Reader) -> list[Any]:
        if r.u8() != 0:
            raise SecurityNegotiationFailed("the server did not accept VeNCrypt version 0.2")
        self.state = State.VENCRYPT_SUBTYPES
        return []

    def _on_vencrypt_subtypes(self, r: Reader) -> list[Any]:
        count = r.u8()
        if count == 0:
            raise SecurityNegotiationFailed("the server offers no VeNCrypt subtypes")
        r.need(4 * count)
        offered = [r.u32() for _ in range(count)]
        subtype = choose_vencrypt_subtype(
            offered, self._tls_mode, self._credentials, self._allow_anonymous_tls
        )
        self.vencrypt_subtype = subtype
        self._write(u32(subtype))
        self.state = State.VENCRYPT_ACCEPT
        return []

    def _on_vencrypt_accept(self, r: Reader) -> list[Any]:
        if r.u8() != 1:
            raise SecurityNegotiationFailed(
                f"the server refused VeNCrypt subtype {self.vencrypt_subtype!s}"
            )
        assert self.vencrypt_subtype is not None
        info = VENCRYPT_SUBTYPES[self.vencrypt_subtype]
        if not info.tls:
            self._start_inner_auth(info.inner)
            return []
        if info.x509:
            creds = (self._tls_credentials or TlsCredentials.discover()).with_server_name(
                self._server_name
            )
            context = creds.make_context()
            name, describe = creds.server_name, creds.describe()
        else:
            context, name, describe = anonymous_context(), None, "nothing (anonymous TLS)"
        self._tls_params = (context, name, describe)
        self._tls_starting = True
        self.state = State.TLS_HANDSHAKE
        return []

    def _start_tls(self) -> None:
        assert self._tls_params is not None
        context, name, describe = self._tls_params
        self._tls_params = None
        self._tls = TlsLayer(context, name, describe)
        self._queue_wire(self._tls.data_to_send())

    def _eof_in_tls_handshake(self) -> TlsError:
        return TlsError("the server closed the connection during the TLS handshake")

    def _after_tls_handshake(self) -> None:
        assert self.vencrypt_subtype is not None
        self._start_inner_auth(VENCRYPT_SUBTYPES[self.vencrypt_subtype].inner)

    def _start_inner_auth(self, inner: Inner) -> None:
        if inner is Inner.NONE:
            # VeNCrypt always ends in a SecurityResult (QEMU sends it for *None too).
            self.state = State.SECURITY_RESULT
        elif inner is Inner.VNC:
            self.state = State.VNC_AUTH_CHALLENGE
        elif inner is Inner.PLAIN:
            user = credential_bytes(self._credentials.username or "")
            password = credential_bytes(self._credentials.password or "")
            self._write(u32(len(user)) + u32(len(password)) + user + password)
            self.state = State.SECURITY_RESULT
        else:  # pragma: no cover - SASL is never chosen
            raise LocalProtocolError("SASL is not implemented")

    def _on_security_result(self, r: Reader) -> list[Any]:
        result = r.u32()
        if result == SecurityResult.OK:
            self._send_client_init()
            return []
        reason = ""
        # Only 3.8 explains a failure (rfbproto 7.1.3).
        if self.version == (3, 8):
            reason = self._read_reason(r)
        if result == SecurityResult.TOO_MANY_ATTEMPTS:
            reason = reason or "too many attempts"
        raise AuthenticationFailed(
            f"the server rejected our credentials ({self.security_description})"
            + (f": {reason}" if reason else "")
        )

    def _send_client_init(self) -> None:
        self._write(u8(int(self._shared)))
        self.state = State.SERVER_INIT

    def _on_server_init(self, r: Reader) -> list[Any]:
        width, height = r.u16(), r.u16()
        pixel_format = PixelFormat.parse(r)
        name_length = r.u32()
        if name_length > MAX_SERVER_NAME_LENGTH:
            raise RemoteProtocolError(f"desktop name of {name_length} bytes exceeds the limit")
        name = decode_text(r.take(name_length))
        _check_size(width, height)
        self.width, self.height, self.pixel_format, self.name = width, height, pixel_format, name
        self.state = State.CONNECTED
        if self._auto_setup:
            if self._requested_pixel_format is not None:
                self.send(SetPixelFormat(self._requested_pixel_format))
            pseudo = list(CORE_PSEUDO_ENCODINGS)
            for ext in self.extensions:
                pseudo.extend(ext.pseudo_encodings)
            self.send(SetEncodings(self._encodings + tuple(pseudo)))
        for ext in self.extensions:
            ext.on_connected()
        assert self.version is not None
        return [
            Connected(
                version=f"{self.version[0]}.{self.version[1]}",
                security=self.security_description,
                width=width,
                height=height,
                pixel_format=self.pixel_format,
                name=name,
                tls_version=self.tls_version,
            )
        ]

    # --- normal operation --------------------------------------------------------

    def _on_server_message(self, r: Reader) -> list[Any]:
        if self._update is not None:
            return self._continue_update(r)
        kind = r.u8()
        if kind == _FRAMEBUFFER_UPDATE:
            r.skip(1)
            count = r.u16()
            self._update = _UpdateInProgress(count)
            self._update.buffered_bytes = r.pos
            return []
        if kind == _QEMU_MESSAGE:
            subtype = r.u8()
            ext = self._by_subtype.get(subtype)
            if ext is None:
                raise RemoteProtocolError(f"unknown QEMU server submessage {subtype}")
            return ext.parse_server_message(subtype, r)
        if kind == _SERVER_CUT_TEXT:
            extended = Encoding.EXTENDED_CLIPBOARD in self._ever_advertised
            return [parse_server_cut_text(r, extended=extended)]
        if kind == _XVP_MESSAGE:
            # QEMU sends xvp only to a client that advertised it (and only with
            # power-control=on); from anyone else it is a protocol error.
            if Encoding.XVP not in self._ever_advertised:
                raise RemoteProtocolError("xvp message, but we never advertised xvp")
            return [XvpServerMessage.parse(r)]
        parser = SIMPLE_SERVER_PARSERS.get(kind)
        if parser is None:
            raise RemoteProtocolError(f"unknown server message type {kind}")
        return [parser(r)]

    def _continue_update(self, r: Reader) -> list[Any]:
        update = self._update
        assert update is not None
        assert self.pixel_format is not None
        if update.header is None:
            if update.remaining == 0:
                self._update = None
                return [FramebufferUpdate(tuple(update.rectangles))]
            header = RectangleHeader.parse(r)
            if header.encoding == Encoding.LAST_RECT:
                self._update = None
                return [FramebufferUpdate(tuple(update.rectangles))]
            self._check_rectangle(header)
            update.buffered_bytes += RectangleHeader.SIZE
            update.header = header
            update.framer = framer_for(header, self.pixel_format)
            return []
        assert update.framer is not None
        view = memoryview(self._buf)[r.pos :]
        try:
            length = update.framer.frame(view)
        finally:
            view.release()
        if length is None:
            raise NeedData
        body = r.take(length)
        rect = Rectangle(update.header, body)
        update.header = None
        update.framer = None
        update.remaining -= 1
        return self._rectangle_events(rect, update)

    def _check_rectangle(self, header: RectangleHeader) -> None:
        if header.encoding in PIXEL_ENCODINGS:
            if header.x + header.width > self.width or header.y + header.height > self.height:
                raise RemoteProtocolError(
                    f"rectangle {header.width}x{header.height}+{header.x}+{header.y} lies outside "
                    f"the {self.width}x{self.height} framebuffer"
                )
        elif header.encoding not in self._advertised:
            raise RemoteProtocolError(
                f"rectangle with encoding {header.encoding}, which we did not advertise"
            )

    def _rectangle_events(self, rect: Rectangle, update: _UpdateInProgress) -> list[Any]:
        enc = rect.header.encoding
        events: list[Any] = []
        ext = self._by_encoding.get(enc)
        if ext is not None:
            events.extend(ext.on_rectangle(rect))
        elif enc in (Encoding.DESKTOP_SIZE, Encoding.EXTENDED_DESKTOP_SIZE):
            _check_size(rect.header.width, rect.header.height)
            self.width, self.height = rect.header.width, rect.header.height
            events.append(DesktopResized(self.width, self.height))
        elif enc in (Encoding.CURSOR, Encoding.X_CURSOR, Encoding.ALPHA_CURSOR):
            h = rect.header
            events.append(CursorShape(enc, h.x, h.y, h.width, h.height, rect.body))
        elif enc == Encoding.WMVI:
            self.pixel_format = PixelFormat.parse(Reader(rect.body))
            events.append(PixelFormatChanged(self.pixel_format))
        update.rectangles.append(rect)
        update.buffered_bytes += len(rect.body)
        return events


def _check_size(width: int, height: int) -> None:
    if width > MAX_FRAMEBUFFER_DIMENSION or height > MAX_FRAMEBUFFER_DIMENSION:
        raise RemoteProtocolError(
            f"framebuffer {width}x{height} exceeds {MAX_FRAMEBUFFER_DIMENSION} on a side"
        )


class _UpdateInProgress:
    """A FramebufferUpdate whose rectangles are still arriving."""

    __slots__ = ("buffered_bytes", "framer", "header", "rectangles", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.rectangles: list[Rectangle] = []
        self.header: RectangleHeader | None = None
        self.framer: RectangleFramer | None = None
        self.buffered_bytes = 0

    @property
    def buffered(self) -> int:
        return self.buffered_bytes


ClientConnection.handlers = {
    State.PROTOCOL_VERSION: ClientConnection._on_version,
    State.SECURITY_TYPES: ClientConnection._on_security_types,
    State.SECURITY_TYPE_33: ClientConnection._on_security_type_33,
    State.VNC_AUTH_CHALLENGE: ClientConnection._on_vnc_challenge,
    State.VENCRYPT_VERSION: ClientConnection._on_vencrypt_version,
    State.VENCRYPT_ACK: ClientConnection._on_vencrypt_ack,
    State.VENCRYPT_SUBTYPES: ClientConnection._on_vencrypt_subtypes,
    State.VENCRYPT_ACCEPT: ClientConnection._on_vencrypt_accept,
    State.SECURITY_RESULT: ClientConnection._on_security_result,
    State.SERVER_INIT: ClientConnection._on_server_init,
    State.CONNECTED: ClientConnection._on_server_message,
}
