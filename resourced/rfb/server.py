"""The sans-IO RFB server half: handshake, authentication, client-message framing.

`ServerConnection` runs the server side of RFB 3.3/3.7/3.8 (rfbproto 7.1-7.3) for
a gateway that stands between VNC viewers and QEMU's VNC server: it greets the
viewer, authenticates it itself (None, VNC Authentication, or VeNCrypt X509None /
X509Vnc with a TLS server handshake over `ssl.SSLObject` memory BIOs), reads
ClientInit, lets the gateway send ServerInit, then frames every client message
into an event. Like `ClientConnection` it is bytes in, events out: feed it with
`receive_data()` (b"" for EOF), pull events with `next_event()` / `events()`,
write out `data_to_send()`. Every state and what it waits for is in `ServerConnection.handlers`;
the byte plumbing shared with the client side is `resourced.rfb._engine`.

It is not a VNC server: it keeps no framebuffer, encodes no pixels and never
answers a client message on its own; the gateway forwards or answers them, and
writes whole server messages with `send_raw()`. It does no I/O, keeps no clock
(handshake timeouts and attempt limits are the caller's; `awaiting_user` tells
it when the viewer may be waiting for a person) and offers only what
`ServerSecurity` allows (see `ServerSecurity.offered_types` for the policy).

`SetDesktopSize` (251) and `XvpMessage` (250) are client messages QEMU accepts
that `resourced.rfb.messages` does not define yet; they live here until it does.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from resourced.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionClosed,
    LocalProtocolError,
    RemoteProtocolError,
    SecurityNegotiationFailed,
    TlsError,
)
from resourced.rfb._buffer import NeedData, Reader, u8, u16, u32
from resourced.rfb._engine import Engine
from resourced.rfb.constants import (
    MAX_CUT_TEXT_LENGTH,
    MAX_SCREENS,
    MAX_SERVER_NAME_LENGTH,
    ClientMessageType,
    Encoding,
    QemuClientSubtype,
    SecurityResult,
    SecurityType,
    VeNCryptSubtype,
)
from resourced.rfb.messages import (
    CLIENT_PARSERS,
    ClientCutText,
    ExtendedClientCutText,
    QemuKeyEvent,
    SetEncodings,
    SetPixelFormat,
    cut_text_length,
)
from resourced.rfb.pixelformat import PixelFormat
from resourced.rfb.qemu import parse_client_audio
from resourced.rfb.security import VNC_AUTH_CHALLENGE_SIZE, vnc_auth_response
from resourced.rfb.tls import disable_session_tickets, read_available
from resourced.rfb.version import VERSION_LENGTH, common_minor, parse_version, version_bytes

#: The version we announce; clients answer with the one they will speak.
SERVER_VERSION = version_bytes(8)

#: The reason a 3.8 client is given when its credentials are refused (QEMU's words).
AUTH_FAILED_REASON = "Authentication failed"

#: Client message types QEMU accepts beyond rfbproto's core set (rfbproto 7.5).
XVP_MESSAGE_TYPE = 250
SET_DESKTOP_SIZE_MESSAGE_TYPE = 251

#: xvp message codes (rfbproto 7.5.8 "xvp Client Message").
XVP_SHUTDOWN = 2
XVP_REBOOT = 3
XVP_RESET = 4

_NO_PARSERS: Mapping[int, Callable[[Reader], Any]] = MappingProxyType({})


# ---------------------------------------------------------------------------
# Client messages not (yet) in resourced.rfb.messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Screen:
    """A SCREEN structure (rfbproto 7.8.? "ExtendedDesktopSize Pseudo-encoding")."""

    id: int
    x: int
    y: int
    width: int
    height: int
    flags: int

    SIZE = 16

    def serialize(self) -> bytes:
        return (
            u32(self.id)
            + u16(self.x)
            + u16(self.y)
            + u16(self.width)
            + u16(self.height)
            + u32(self.flags)
        )

    @classmethod
    def parse(cls, r: Reader) -> Screen:
        return cls(r.u32(), r.u16(), r.u16(), r.u16(), r.u16(), r.u32())


@dataclass(frozen=True, slots=True)
class SetDesktopSize:
    """Client message 251 (rfbproto 7.5.7): u8 pad, u16 w, u16 h, u8 n, u8 pad, n screens."""

    width: int
    height: int
    screens: tuple[Screen, ...]

    def serialize(self) -> bytes:
        if len(self.screens) > MAX_SCREENS:
            raise LocalProtocolError(f"SetDesktopSize: {len(self.screens)} screens is too many")
        head = (
            u8(SET_DESKTOP_SIZE_MESSAGE_TYPE)
            + b"\0"
            + u16(self.width)
            + u16(self.height)
            + u8(len(self.screens))
            + b"\0"
        )
        return head + b"".join(screen.serialize() for screen in self.screens)

    @classmethod
    def parse(cls, r: Reader) -> SetDesktopSize:
        """Parse what follows the type byte."""
        r.skip(1)
        width, height = r.u16(), r.u16()
        count = r.u8()
        r.skip(1)
        # A u8 cannot exceed MAX_SCREENS today; the check keeps the bound explicit
        # should either change.
        if count > MAX_SCREENS:
            raise RemoteProtocolError(f"SetDesktopSize: {count} screens exceeds {MAX_SCREENS}")
        r.need(Screen.SIZE * count)
        return cls(width, height, tuple(Screen.parse(r) for _ in range(count)))


@dataclass(frozen=True, slots=True)
class XvpMessage:
    """Client message 250 (rfbproto 7.5.8): u8 pad, u8 version, u8 code (2/3/4 =
    shutdown/reboot/reset). Unknown versions and codes are framed, not judged."""

    version: int
    code: int

    def serialize(self) -> bytes:
        return u8(XVP_MESSAGE_TYPE) + b"\0" + u8(self.version) + u8(self.code)

    @classmethod
    def parse(cls, r: Reader) -> XvpMessage:
        """Parse what follows the type byte."""
        r.skip(1)
        return cls(r.u8(), r.u8())


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientInitReceived:
    """The client authenticated and sent ClientInit; time for `send_server_init()`."""

    shared: bool


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed the connection at a message boundary."""


@dataclass(frozen=True, slots=True)
class ClientCutTextRefused:
    """A ClientCutText longer than `limit` arrived and was skipped unread.

    Its bytes are dropped as they arrive, never buffered, and the connection
    goes on with the next message: a long paste costs the paste, not the session.
    """

    length: int
    extended: bool
    limit: int


class ClientCertificateRejected(TlsError, AuthenticationFailed):
    """The client's TLS certificate was missing or failed verification.

    It is both: the TLS handshake failed, and what failed was the client's
    credential. Catch either `TlsError` or `AuthenticationFailed`.
    """


# ---------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """What the server demands of viewers.

    - `vnc_password`: require VNC Authentication (inside TLS when `tls_context`
      is set). VNC Authentication uses only the first 8 bytes of the password's UTF-8.
    - `tls_context`: a server-side context with certificate and key loaded; set
      its `verify_mode` (and CA) to require client certificates. Offers VeNCrypt
      X509Vnc when a password is set, else X509None. Its session tickets are
      turned off here (`tls.disable_session_tickets`): QEMU sends none, and a
      viewer that works with QEMU may not cope with them (TigerVNC 1.12 does not).
      `tls.server_context()` makes a suitable one.
    - `allow_none`: also let viewers in without any authentication.

    At least one must be set: a server that silently lets everyone in is a
    configuration mistake, so it must be asked for by name.
    """

    vnc_password: str | None = None
    tls_context: ssl.SSLContext | None = None
    allow_none: bool = False

    def __post_init__(self) -> None:
        if self.vnc_password is None and self.tls_context is None and not self.allow_none:
            raise ConfigurationError(
                "no security configured: set vnc_password, tls_context or allow_none=True"
            )
        if self.vnc_password == "":
            raise ConfigurationError("an empty VNC password is no password: use allow_none")
        ctx = self.tls_context
        if ctx is not None and (ctx.protocol == ssl.PROTOCOL_TLS_CLIENT or ctx.check_hostname):
            raise ConfigurationError(
                "tls_context must be a server context (ssl.PROTOCOL_TLS_SERVER)"
            )
        if ctx is not None:
            disable_session_tickets(ctx)

    def offered_types(self) -> tuple[SecurityType, ...]:
        """The security types offered to 3.7+ clients, strongest first.

        Policy: with TLS configured, VeNCrypt is the only authenticated type
        offered; plain VNC Authentication is never put beside it, since a client
        (or an attacker in the middle) could then pick the unencrypted one and the
        TLS requirement would mean nothing. None is offered only when
        `allow_none` asks for it, beside whatever else is configured.
        """
        types: list[SecurityType] = []
        if self.tls_context is not None:
            types.append(SecurityType.VENCRYPT)
        elif self.vnc_password is not None:
            types.append(SecurityType.VNC_AUTH)
        if self.allow_none:
            types.append(SecurityType.NONE)
        return tuple(types)

    def offered_subtypes(self) -> tuple[VeNCryptSubtype, ...]:
        """The VeNCrypt subtypes offered: exactly one, certificate-based TLS.

        Anonymous TLS (TLS*) authenticates nobody and Plain needs user accounts,
        so neither is offered; with a password X509None would bypass it, so the
        password decides which one.
        """
        if self.vnc_password is not None:
            return (VeNCryptSubtype.X509_VNC,)
        return (VeNCryptSubtype.X509_NONE,)

    def type_for_33(self) -> SecurityType | None:
        """The type the server picks for a 3.3 client, which cannot choose or do
        VeNCrypt: the first offered type 3.3 can carry, or None to refuse."""
        for kind in self.offered_types():
            if kind in (SecurityType.VNC_AUTH, SecurityType.NONE):
                return kind
        return None


# ---------------------------------------------------------------------------
# TLS, server side
# ---------------------------------------------------------------------------


class _ServerTls:
    """A TLS server session over memory BIOs (the server twin of `tls.TlsLayer`).

    `receive(ciphertext)` returns plaintext; `send(plaintext)` queues it;
    `data_to_send()` returns ciphertext (including any alert OpenSSL wrote when
    the handshake failed, so the client learns why). Errors become `TlsError`.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        try:
            self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        except (ssl.SSLError, ValueError) as err:
            raise TlsError(f"cannot start a TLS server session: {err}") from err
        self.handshake_done = False
        #: The client sent its close_notify: it is leaving, as at a transport EOF.
        self.peer_closed = False

    @property
    def version(self) -> str | None:
        return self._obj.version()

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        if not self.handshake_done:
            return None
        # {} means a certificate arrived but was not verified (CERT_NONE): no
        # identity to report.
        return self._obj.getpeercert() or None

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext (b"" = transport EOF); return the plaintext it yields."""
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done:
                return b""
        # Many viewers leave without close_notify: that is an end, not an error.
        plaintext, closed = read_available(self._obj, eof_ends_stream=True)
        self.peer_closed = self.peer_closed or closed
        return plaintext

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLEOFError):
            # Not finished yet; at EOF the connection reports the client's leaving.
            return
        except ssl.SSLCertVerificationError as err:
            raise ClientCertificateRejected(
                f"the client's TLS certificate was rejected: {err.verify_message or err.reason}"
            ) from err
        except ssl.SSLError as err:
            if err.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
                raise ClientCertificateRejected(
                    "the client sent no TLS certificate, and one is required"
                ) from err
            raise TlsError(f"TLS handshake with the client failed: {err.reason or err}") from err
        self.handshake_done = True

    def send(self, plaintext: bytes) -> None:
        try:
            self._obj.write(plaintext)
        except ssl.SSLError as err:
            raise TlsError(f"TLS error while sending: {err.reason or err}") from err

    def close(self) -> None:
        """Queue a close_notify (there is no waiting for the peer's: we are leaving)."""
        # unwrap() writes ours, then wants to read the peer's: SSLWantReadError.
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()

    def data_to_send(self) -> bytes:
        return self._outgoing.read()


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class State(enum.Enum):
    """Where the server is in the protocol (rfbproto 7.1-7.5)."""

    PROTOCOL_VERSION = "waiting for the client's ProtocolVersion"
    SECURITY_TYPE = "waiting for the client's choice of security type"
    VNC_AUTH_RESPONSE = "waiting for the VNC authentication response"
    VENCRYPT_VERSION = "waiting for the client's VeNCrypt version"
    VENCRYPT_SUBTYPE = "waiting for the client's choice of VeNCrypt subtype"
    TLS_HANDSHAKE = "in the TLS handshake"
    CLIENT_INIT = "waiting for ClientInit"
    CLIENT_INIT_RECEIVED = "waiting for ServerInit to be sent"
    CONNECTED = "connected"
    CLOSED = "closed"


# Looked up once for the checks made on every message: Python 3.11 finds an enum
# member through EnumType.__getattr__, which costs about as much as parsing a field.
_CONNECTED = State.CONNECTED
_QEMU_MESSAGE = ClientMessageType.QEMU
_CLIENT_CUT_TEXT = ClientMessageType.CLIENT_CUT_TEXT


class ServerConnection(Engine):
    """One RFB server session facing a viewer, sans-IO.

    `security` says what viewers must present. `random_bytes` makes VNC
    challenges (tests pass a fixed one). `qemu_parsers` adds parsers for client
    message 255 submessages, keyed by submessage, called with a `Reader` just
    past the two type bytes; built in are 0 (`QemuKeyEvent`) and 1 (QEMU audio),
    which an entry for the same number replaces. `max_cut_text` bounds a
    ClientCutText (plain or Extended Clipboard): a longer one is skipped and
    reported as `ClientCutTextRefused` (a gateway sets its upstream's limit).

    Events: `ClientInitReceived` once authenticated, then each client message as
    its dataclass, then `ClientClosed` at EOF. Errors raised from `next_event()`
    leave the connection CLOSED for good; whatever the viewer must still be told
    (a failed SecurityResult, a TLS alert) is already in `data_to_send()`.
    """

    peer = "client"
    TLS_HANDSHAKE = State.TLS_HANDSHAKE
    CLOSED = State.CLOSED

    def __init__(
        self,
        security: ServerSecurity,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        qemu_parsers: Mapping[int, Callable[[Reader], Any]] = _NO_PARSERS,
        max_cut_text: int = MAX_CUT_TEXT_LENGTH,
    ) -> None:
        if not 0 <= max_cut_text <= MAX_CUT_TEXT_LENGTH:
            raise ConfigurationError(
                f"max_cut_text must be 0..{MAX_CUT_TEXT_LENGTH}, not {max_cut_text}"
            )
        self._max_cut_text = max_cut_text
        #: Bytes of a refused ClientCutText still to skip.
        self._discard = 0
        self._security = security
        self._random_bytes = random_bytes
        self._qemu_parsers: dict[int, Callable[[Reader], Any]] = {
            QemuClientSubtype.EXTENDED_KEY_EVENT: QemuKeyEvent.parse,
            QemuClientSubtype.AUDIO: parse_client_audio,
        }
        for subtype, parser in qemu_parsers.items():
            if not 0 <= subtype <= 255:
                raise ConfigurationError(f"QEMU submessage {subtype} does not fit a byte")
            self._qemu_parsers[subtype] = parser

        super().__init__(State.PROTOCOL_VERSION)
        self._version: tuple[int, int] | None = None
        self._security_type: SecurityType | None = None
        self._vencrypt_subtype: VeNCryptSubtype | None = None
        self._challenge = b""
        #: The client's pixel format: ServerInit's, then each SetPixelFormat's.
        self.pixel_format: PixelFormat | None = None
        #: The encodings of the client's last SetEncodings.
        self.encodings: tuple[int, ...] = ()

        self._queue_wire(SERVER_VERSION)

    # ------------------------------------------------------------------ I/O face

    @property
    def version(self) -> tuple[int, int] | None:
        """The version spoken, once the client said it: (3, 3), (3, 7) or (3, 8)."""
        return self._version

    @property
    def security_type(self) -> SecurityType | None:
        return self._security_type

    @property
    def vencrypt_subtype(self) -> VeNCryptSubtype | None:
        return self._vencrypt_subtype

    @property
    def tls_version(self) -> str | None:
        return self._tls.version if isinstance(self._tls, _ServerTls) else None

    @property
    def peer_certificate(self) -> dict[str, Any] | None:
        """The client's verified certificate (as `SSLSocket.getpeercert()` gives it)."""
        return self._tls.peer_certificate if isinstance(self._tls, _ServerTls) else None

    @property
    def awaiting_user(self) -> bool:
        """Whether the client's next answer may wait for a person.

        True while the server waits for the VNC Authentication response (viewers
        ask their user for the password once the challenge has arrived), and
        for ClientInit after a VeNCrypt TLS handshake (a viewer may first ask
        its user about the server's certificate, as TigerVNC does). A caller's
        handshake deadline should not count this wait: QEMU sets none at all.
        """
        state = self.state
        return state is State.VNC_AUTH_RESPONSE or (
            state is State.CLIENT_INIT and self._tls is not None
        )

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (for memory accounting)."""
        return self.pending_input

    def send_server_init(
        self, width: int, height: int, pixel_format: PixelFormat, name: str
    ) -> None:
        """Send ServerInit (rfbproto 7.3.2); only after `ClientInitReceived`."""
        if self.state is not State.CLIENT_INIT_RECEIVED:
            raise LocalProtocolError(f"cannot send ServerInit: {self.state.value}")
        if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
            raise LocalProtocolError(f"ServerInit: {width}x{height} does not fit 16 bits")
        encoded = name.encode("utf-8")
        # The limit our own client applies: a longer name would be refused there.
        if len(encoded) > MAX_SERVER_NAME_LENGTH:
            raise LocalProtocolError(f"ServerInit: a name of {len(encoded)} bytes is too long")
        self._write(
            u16(width) + u16(height) + pixel_format.serialize() + u32(len(encoded)) + encoded
        )
        self.pixel_format = pixel_format
        self.state = State.CONNECTED

    def send_raw(self, data: bytes) -> None:
        """Queue whole, already serialized server messages (only once connected).

        Nothing is checked: the gateway forwards QEMU's messages and inserts its
        own, and must keep them whole and in order.
        """
        if self.state is not _CONNECTED:
            raise LocalProtocolError(f"cannot send server messages: {self.state.value}")
        self._write(data)

    def close(self) -> None:
        """We are closing: queue a TLS close_notify if TLS is up; no more events."""
        if isinstance(self._tls, _ServerTls) and self._tls.handshake_done:
            self._tls.close()
        self.state = State.CLOSED

    # ------------------------------------------------------------------ internals

    def _at_eof(self) -> None:
        if self._discard:
            raise RemoteProtocolError(
                "the client closed the connection in the middle of a ClientCutText "
                f"({self._discard} bytes of it missing)"
            )
        if self.state is State.CONNECTED and not self.pending_input:
            self.state = State.CLOSED
            self._events.append(ClientClosed())
            return
        if self.state is State.CONNECTED:
            raise RemoteProtocolError(
                "the client closed the connection in the middle of a message "
                f"({self.pending_input} bytes of it received)"
            )
        raise ConnectionClosed(f"the client closed the connection while {self.state.value}")

    def _write_failure(self, reason: str) -> None:
        """SecurityResult failed; 3.8 alone carries a reason (rfbproto 7.1.3)."""
        data = u32(SecurityResult.FAILED)
        if self._version == (3, 8):
            encoded = reason.encode("utf-8")
            data += u32(len(encoded)) + encoded
        self._write(data)

    # --- handshake -------------------------------------------------------------

    def _on_version(self, r: Reader) -> list[Any]:
        reply = r.take(VERSION_LENGTH)
        version = parse_version(reply)
        if version is None:
            raise RemoteProtocolError(f"not an RFB client: version {reply!r}")
        # A client may not answer above our 3.8 (rfbproto 7.1.1); one that does
        # still speaks 3.8, as QEMU and libvncserver take it.
        ours = common_minor(*version)
        if ours is None:
            raise RemoteProtocolError(
                f"the client speaks RFB {version[0]}.{version[1]}, older than 3.3"
            )
        self._version = (3, ours)
        if ours == 3:
            self._offer_33()
        else:
            types = self._security.offered_types()
            self._write(u8(len(types)) + bytes(types))
            self.state = State.SECURITY_TYPE
        return []

    def _offer_33(self) -> None:
        choice = self._security.type_for_33()
        if choice is None:
            reason = b"this server requires VeNCrypt (TLS), which RFB 3.3 cannot negotiate"
            self._write(u32(SecurityType.INVALID) + u32(len(reason)) + reason)
            raise SecurityNegotiationFailed(
                "an RFB 3.3 client cannot use VeNCrypt, and nothing weaker is allowed"
            )
        self._write(u32(choice))
        self._start_security(choice)

    def _on_security_type(self, r: Reader) -> list[Any]:
        number = r.u8()
        offered = self._security.offered_types()
        if number not in offered:
            self._write_failure(f"security type {number} was not offered")
            raise SecurityNegotiationFailed(
                f"the client chose security type {number}, which was not offered "
                f"({', '.join(t.name for t in offered)})"
            )
        self._start_security(SecurityType(number))
        return []

    def _start_security(self, choice: SecurityType) -> None:
        self._security_type = choice
        if choice is SecurityType.NONE:
            # 3.8 sends a SecurityResult even for None (rfbproto 7.2.1); 3.3/3.7 do not.
            if self._version == (3, 8):
                self._write(u32(SecurityResult.OK))
            self.state = State.CLIENT_INIT
        elif choice is SecurityType.VNC_AUTH:
            self._send_challenge()
        elif choice is SecurityType.VENCRYPT:
            self._write(u8(0) + u8(2))
            self.state = State.VENCRYPT_VERSION
        else:  # pragma: no cover - offered_types offers only the above
            raise LocalProtocolError(f"security type {choice.name} not implemented")

    def _send_challenge(self) -> None:
        challenge = self._random_bytes(VNC_AUTH_CHALLENGE_SIZE)
        if len(challenge) != VNC_AUTH_CHALLENGE_SIZE:
            raise LocalProtocolError(f"random_bytes gave {len(challenge)} bytes, not 16")
        self._challenge = challenge
        self._write(challenge)
        self.state = State.VNC_AUTH_RESPONSE

    def _on_vnc_response(self, r: Reader) -> list[Any]:
        response = r.take(VNC_AUTH_CHALLENGE_SIZE)
        password = self._security.vnc_password
        assert password is not None
        expected = vnc_auth_response(password, self._challenge)
        # Constant time: how much of the response matched must not leak by timing.
        if not hmac.compare_digest(response, expected):
            self._write_failure(AUTH_FAILED_REASON)
            raise AuthenticationFailed("the client's VNC password was wrong")
        self._write(u32(SecurityResult.OK))
        self.state = State.CLIENT_INIT
        return []

    def _on_vencrypt_version(self, r: Reader) -> list[Any]:
        major, minor = r.u8(), r.u8()
        if (major, minor) != (0, 2):
            self._write(u8(1))
            raise SecurityNegotiationFailed(
                f"the client speaks VeNCrypt {major}.{minor}; only 0.2 is supported"
            )
        subtypes = self._security.offered_subtypes()
        self._write(u8(0) + u8(len(subtypes)) + b"".join(u32(s) for s in subtypes))
        self.state = State.VENCRYPT_SUBTYPE
        return []

    def _on_vencrypt_subtype(self, r: Reader) -> list[Any]:
        number = r.u32()
        offered = self._security.offered_subtypes()
        if number not in offered:
            self._write(u8(0))
            raise SecurityNegotiationFailed(
                f"the client chose VeNCrypt subtype {number}, which was not offered "
                f"({', '.join(s.name for s in offered)})"
            )
        self._vencrypt_subtype = VeNCryptSubtype(number)
        self._write(u8(1))
        self._tls_starting = True
        self.state = State.TLS_HANDSHAKE
        return []

    def _start_tls(self) -> None:
        assert self._security.tls_context is not None
        self._tls = _ServerTls(self._security.tls_context)

    def _eof_in_tls_handshake(self) -> ConnectionClosed:
        return ConnectionClosed("the client closed the connection in the TLS handshake")

    def _after_tls_handshake(self) -> None:
        if self._vencrypt_subtype is VeNCryptSubtype.X509_VNC:
            self._send_challenge()
        else:
            # VeNCrypt always ends in a SecurityResult, whatever the version.
            self._write(u32(SecurityResult.OK))
            self.state = State.CLIENT_INIT

    def _on_client_init(self, r: Reader) -> list[Any]:
        shared = r.u8()
        self.state = State.CLIENT_INIT_RECEIVED
        return [ClientInitReceived(bool(shared))]

    def _on_before_server_init(self, r: Reader) -> list[Any]:
        # A client may not speak before ServerInit (rfbproto 7.3): it needs the
        # pixel format first. Refusing early bytes, rather than holding them
        # while the gateway reaches upstream, keeps memory bounded.
        if r.remaining:
            raise RemoteProtocolError(f"the client sent {r.remaining} bytes before ServerInit")
        raise NeedData

    # --- normal operation --------------------------------------------------------

    def _on_client_message(self, r: Reader) -> list[Any]:
        if self._discard:
            if not r.remaining:
                raise NeedData
            skipped = min(self._discard, r.remaining)
            r.skip(skipped)
            self._discard -= skipped
            return []
        kind = r.u8()
        message: Any
        if kind == _CLIENT_CUT_TEXT:
            message = self._client_cut_text(r)
        elif kind == _QEMU_MESSAGE:
            subtype = r.u8()
            parser = self._qemu_parsers.get(subtype)
            if parser is None:
                raise RemoteProtocolError(f"unknown QEMU client submessage {subtype}")
            message = parser(r)
        elif kind == SET_DESKTOP_SIZE_MESSAGE_TYPE:
            message = SetDesktopSize.parse(r)
        elif kind == XVP_MESSAGE_TYPE:
            message = XvpMessage.parse(r)
        else:
            simple = CLIENT_PARSERS.get(kind)
            if simple is None:
                raise RemoteProtocolError(f"unknown client message type {kind}")
            message = simple(r)
            if isinstance(message, SetPixelFormat):
                self.pixel_format = message.pixel_format
            elif isinstance(message, SetEncodings):
                self.encodings = message.encodings
        return [message]

    def _client_cut_text(self, r: Reader) -> Any:
        length, extended = cut_text_length(r)
        if extended and Encoding.EXTENDED_CLIPBOARD not in self.encodings:
            raise RemoteProtocolError(
                "Extended Clipboard ClientCutText, but the client never advertised "
                "the pseudo-encoding"
            )
        if length > self._max_cut_text:
            # Skipped as it arrives (the next calls), never held whole.
            self._discard = length
            return ClientCutTextRefused(length, extended, self._max_cut_text)
        body = r.take(length)
        if extended:
            return ExtendedClientCutText(int.from_bytes(body[:4], "big"), body[4:])
        return ClientCutText(body)


ServerConnection.handlers = {
    State.PROTOCOL_VERSION: ServerConnection._on_version,
    State.SECURITY_TYPE: ServerConnection._on_security_type,
    State.VNC_AUTH_RESPONSE: ServerConnection._on_vnc_response,
    State.VENCRYPT_VERSION: ServerConnection._on_vencrypt_version,
    State.VENCRYPT_SUBTYPE: ServerConnection._on_vencrypt_subtype,
    State.CLIENT_INIT: ServerConnection._on_client_init,
    State.CLIENT_INIT_RECEIVED: ServerConnection._on_before_server_init,
    State.CONNECTED: ServerConnection._on_client_message,
}
