"""`ServerConnection`: the server half of the RFB handshake and client-message framing.

Most scenarios run it against the real `ClientConnection` in memory, bytes pumped
both ways until neither side has anything left to say, with real TLS for
VeNCrypt (certificates from `tests.certs`). Older clients (3.3, 3.7) and
misbehaving ones are written by hand from rfbproto with the `wire` helpers.
The end of the file holds the property tests: any bytes fed to a connected
server give events or `RemoteProtocolError` with bounded memory, and the
SetDesktopSize / xvp dataclasses round-trip.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.audio import AudioFormat, SampleFormat
from resourced.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionClosed,
    LocalProtocolError,
    RemoteProtocolError,
    ResourcedError,
    SecurityNegotiationFailed,
    TlsError,
)
from resourced.rfb import tls
from resourced.rfb._buffer import Reader
from resourced.rfb.connection import CORE_PSEUDO_ENCODINGS, DEFAULT_ENCODINGS, ClientConnection
from resourced.rfb.connection import State as ClientState
from resourced.rfb.constants import (
    MAX_ENCODINGS,
    Encoding,
    SecurityType,
    VeNCryptSubtype,
)
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.events import Connected
from resourced.rfb.messages import (
    Bell,
    ClientCutText,
    FramebufferUpdate,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    QemuKeyEvent,
    Rectangle,
    ServerCutText,
    SetEncodings,
    SetPixelFormat,
)
from resourced.rfb.pixelformat import RGBX8888, PixelFormat
from resourced.rfb.qemu import QemuAudioDisable, QemuAudioEnable, QemuAudioSetFormat
from resourced.rfb.security import TlsMode
from resourced.rfb.server import (
    XVP_REBOOT,
    XVP_SHUTDOWN,
    ClientCertificateRejected,
    ClientClosed,
    ClientCutTextRefused,
    ClientInitReceived,
    Screen,
    ServerConnection,
    ServerSecurity,
    SetDesktopSize,
    State,
    XvpMessage,
)
from resourced.rfb.tls import TlsCredentials
from tests.certs import Pki, make_pki

from . import wire
from .test_handshake import VNC_VECTORS, password_for_des_key
from .wire import mutated, traced_peak

WIDTH, HEIGHT = 64, 48
NAME = "gateway test"
MIB = 1024 * 1024

# An independent VNC authentication vector: DES key 0123456789ABCDEF turns
# "Now is t" into 3FA40E8A984D4815, so a 16-byte challenge of it twice has a
# known response under the password whose bit-reversed bytes are that key.
_KEY, _PLAIN, _CIPHER = VNC_VECTORS[0]
PASSWORD = password_for_des_key(_KEY)
CHALLENGE = _PLAIN * 2
RESPONSE = _CIPHER * 2


def fixed_challenge(n: int) -> bytes:
    assert n == 16
    return CHALLENGE


def server_init_bytes(name: bytes = NAME.encode()) -> bytes:
    """ServerInit (rfbproto 7.3.2) for WIDTH x HEIGHT, RGBX8888 and `name`."""
    return wire.server_init(WIDTH, HEIGHT, name)


# ---------------------------------------------------------------------------
# Pumping bytes between a ServerConnection and a ClientConnection
# ---------------------------------------------------------------------------


@dataclass
class Conversation:
    client_events: list[Any] = field(default_factory=list)
    server_events: list[Any] = field(default_factory=list)
    client_error: ResourcedError | None = None
    server_error: ResourcedError | None = None


def converse(
    server: ServerConnection,
    client: ClientConnection,
    *,
    server_init: bool = True,
    rounds: int = 64,
) -> Conversation:
    """Move bytes both ways until nothing moves. Errors are recorded, not raised,
    and the failed side's last bytes are still delivered (a failed SecurityResult,
    a TLS alert), as a gateway would flush them before closing. On
    `ClientInitReceived` the server sends ServerInit, as the gateway would."""
    talk = Conversation()
    for _ in range(rounds):
        moved = False
        data = server.data_to_send()
        if data:
            client.receive_data(data)
            moved = True
        if talk.client_error is None:
            try:
                for event in client.events():
                    talk.client_events.append(event)
                    moved = True
            except ResourcedError as err:
                talk.client_error = err
                moved = True
        data = client.data_to_send()
        if data:
            server.receive_data(data)
            moved = True
        if talk.server_error is None:
            try:
                for event in server.events():
                    talk.server_events.append(event)
                    moved = True
                    if server_init and isinstance(event, ClientInitReceived):
                        server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
            except ResourcedError as err:
                talk.server_error = err
                moved = True
        if not moved:
            return talk
    raise AssertionError("the conversation did not settle")


def assert_stays_failed(server: ServerConnection, error: BaseException) -> None:
    assert server.state is State.CLOSED
    with pytest.raises(type(error)) as again:
        server.next_event()
    assert again.value is error


def connected_pair(
    security: ServerSecurity | None = None, **client_options: Any
) -> tuple[ServerConnection, ClientConnection, Conversation]:
    server = ServerConnection(security or ServerSecurity(allow_none=True))
    client = ClientConnection(**client_options)
    talk = converse(server, client)
    assert talk.client_error is None, talk.client_error
    assert talk.server_error is None, talk.server_error
    assert server.state is State.CONNECTED
    assert client.state is ClientState.CONNECTED
    return server, client, talk


def connected_server(**options: Any) -> ServerConnection:
    """A server taken to CONNECTED by hand-written 3.8 None-security client bytes."""
    server = ServerConnection(ServerSecurity(allow_none=True), **options)
    server.receive_data(b"RFB 003.008\n" + b"\x01" + b"\x01")
    assert list(server.events()) == [ClientInitReceived(True)]
    server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    assert server.data_to_send() == (
        b"RFB 003.008\n" + wire.security_types(1) + wire.security_result_ok() + server_init_bytes()
    )
    return server


def feed(server: ServerConnection, data: bytes, *, eof: bool = False) -> list[Any]:
    server.receive_data(data)
    if eof:
        server.receive_data(b"")
    return list(server.events())


# ---------------------------------------------------------------------------
# Policy: what is offered
# ---------------------------------------------------------------------------

_V, _N = SecurityType.VNC_AUTH, SecurityType.NONE
_VC = SecurityType.VENCRYPT


@pytest.mark.parametrize(
    ("password", "tls", "allow_none", "types", "subtypes", "for_33"),
    [
        ("pw", False, False, (_V,), (VeNCryptSubtype.X509_VNC,), _V),
        (None, False, True, (_N,), (VeNCryptSubtype.X509_NONE,), _N),
        ("pw", False, True, (_V, _N), (VeNCryptSubtype.X509_VNC,), _V),
        (None, True, False, (_VC,), (VeNCryptSubtype.X509_NONE,), None),
        ("pw", True, False, (_VC,), (VeNCryptSubtype.X509_VNC,), None),
        ("pw", True, True, (_VC, _N), (VeNCryptSubtype.X509_VNC,), _N),
    ],
)
def test_offering_policy(
    password: str | None,
    tls: bool,
    allow_none: bool,
    types: tuple[SecurityType, ...],
    subtypes: tuple[VeNCryptSubtype, ...],
    for_33: SecurityType | None,
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if tls else None
    security = ServerSecurity(vnc_password=password, tls_context=context, allow_none=allow_none)
    assert security.offered_types() == types
    # Never plain VNC Authentication beside TLS: that would make TLS optional.
    if tls:
        assert SecurityType.VNC_AUTH not in security.offered_types()
    assert security.offered_subtypes() == subtypes
    assert security.type_for_33() == for_33


def test_security_must_be_configured() -> None:
    with pytest.raises(ConfigurationError, match="no security configured"):
        ServerSecurity()
    with pytest.raises(ConfigurationError, match="empty VNC password"):
        ServerSecurity(vnc_password="")
    with pytest.raises(ConfigurationError, match="server context"):
        ServerSecurity(tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


def test_qemu_parser_numbers_must_fit_a_byte() -> None:
    with pytest.raises(ConfigurationError, match="256"):
        ServerConnection(ServerSecurity(allow_none=True), qemu_parsers={256: XvpMessage.parse})


# ---------------------------------------------------------------------------
# Against the real client: None and VNC Authentication
# ---------------------------------------------------------------------------


def test_none_security() -> None:
    server, _, talk = connected_pair()
    assert talk.client_events == [
        Connected("3.8", "NONE", WIDTH, HEIGHT, RGBX8888, NAME, tls_version=None)
    ]
    # The client's automatic SetEncodings is the first client message.
    advertised = DEFAULT_ENCODINGS + CORE_PSEUDO_ENCODINGS
    assert talk.server_events == [ClientInitReceived(True), SetEncodings(advertised)]
    assert server.version == (3, 8)
    assert server.security_type is SecurityType.NONE
    assert server.vencrypt_subtype is None
    assert server.tls_version is None
    assert server.peer_certificate is None
    assert server.encodings == advertised
    assert server.pixel_format == RGBX8888


def test_vnc_password_right() -> None:
    server, client, talk = connected_pair(ServerSecurity(vnc_password="s3cret"), password="s3cret")
    assert client.security_description == "VNC_AUTH"
    assert server.security_type is SecurityType.VNC_AUTH
    assert talk.server_events[0] == ClientInitReceived(True)


def test_vnc_password_wrong() -> None:
    server = ServerConnection(ServerSecurity(vnc_password="s3cret"))
    client = ClientConnection(password="guess")
    talk = converse(server, client)
    assert isinstance(talk.server_error, AuthenticationFailed)
    # The SecurityResult reached the client before the server gave up, reason and all.
    assert isinstance(talk.client_error, AuthenticationFailed)
    assert "Authentication failed" in str(talk.client_error)
    assert talk.server_events == []
    assert_stays_failed(server, talk.server_error)


def test_allow_none_beside_a_password_lets_either_client_in() -> None:
    security = ServerSecurity(vnc_password="pw", allow_none=True)
    server, _, _ = connected_pair(security, password="pw")
    assert server.security_type is SecurityType.VNC_AUTH
    server, _, _ = connected_pair(security)
    assert server.security_type is SecurityType.NONE


def test_exclusive_client_init() -> None:
    _, _, talk = connected_pair(shared=False)
    assert talk.server_events[0] == ClientInitReceived(False)


# ---------------------------------------------------------------------------
# Hand-written clients: RFB 3.3 and 3.7, and misbehaviour
# ---------------------------------------------------------------------------


def test_rfb33_client_with_vnc_auth() -> None:
    server = ServerConnection(ServerSecurity(vnc_password=PASSWORD), random_bytes=fixed_challenge)
    assert server.data_to_send() == b"RFB 003.008\n"
    assert feed(server, b"RFB 003.003\n") == []
    assert server.version == (3, 3)
    # 3.3: the server picks and says it as a u32 (rfbproto 7.1.2), then challenges.
    assert server.data_to_send() == wire.security_type_33(2) + CHALLENGE
    assert feed(server, RESPONSE) == []
    assert server.data_to_send() == wire.security_result_ok()
    assert feed(server, b"\x00") == [ClientInitReceived(False)]
    server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    assert server.data_to_send() == server_init_bytes()
    key = wire.u8(4) + wire.u8(1) + b"\0\0" + wire.u32(0x61)
    assert feed(server, key) == [KeyEvent(True, 0x61)]


def test_rfb33_client_without_auth() -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    assert feed(server, b"RFB 003.003\n") == []
    # None on 3.3 goes straight to ClientInit: no SecurityResult (rfbproto 7.2.1).
    assert server.data_to_send() == wire.security_type_33(1)
    assert feed(server, b"\x01") == [ClientInitReceived(True)]


def test_rfb33_wrong_password_gets_no_reason() -> None:
    server = ServerConnection(ServerSecurity(vnc_password=PASSWORD), random_bytes=fixed_challenge)
    server.data_to_send()
    feed(server, b"RFB 003.003\n")
    server.data_to_send()
    with pytest.raises(AuthenticationFailed) as failed:
        feed(server, bytes(16))
    assert server.data_to_send() == wire.security_result_failed()
    assert_stays_failed(server, failed.value)
    # A gateway slow to close cannot make a failed connection hoard bytes.
    server.receive_data(bytes(4096))
    assert server.buffered == 0


def test_rfb33_refused_when_tls_is_required() -> None:
    server = ServerConnection(ServerSecurity(tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)))
    server.data_to_send()
    with pytest.raises(SecurityNegotiationFailed, match=r"3\.3"):
        feed(server, b"RFB 003.003\n")
    # Security type 0 and a reason: the 3.3 way to refuse (rfbproto 7.1.2).
    out = server.data_to_send()
    assert out[:4] == wire.u32(0)
    reason = out[8:]
    assert wire.string(reason) == out[4:]
    assert b"VeNCrypt" in reason


def test_rfb37_client_without_auth() -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    assert feed(server, b"RFB 003.007\n") == []
    assert server.version == (3, 7)
    assert server.data_to_send() == wire.security_types(1)
    # 3.7 None: no SecurityResult either.
    assert feed(server, b"\x01") == []
    assert server.data_to_send() == b""
    assert feed(server, b"\x01") == [ClientInitReceived(True)]


def test_rfb37_vnc_auth_right_and_wrong() -> None:
    server = ServerConnection(ServerSecurity(vnc_password=PASSWORD), random_bytes=fixed_challenge)
    server.data_to_send()
    feed(server, b"RFB 003.007\n" + b"\x02")
    assert server.data_to_send() == wire.security_types(2) + CHALLENGE
    assert feed(server, RESPONSE + b"\x01") == [ClientInitReceived(True)]
    assert server.data_to_send() == wire.security_result_ok()

    server = ServerConnection(ServerSecurity(vnc_password=PASSWORD), random_bytes=fixed_challenge)
    server.data_to_send()
    feed(server, b"RFB 003.007\n" + b"\x02")
    server.data_to_send()
    with pytest.raises(AuthenticationFailed):
        feed(server, RESPONSE[::-1])
    # 3.7 failures carry no reason (rfbproto 7.1.3).
    assert server.data_to_send() == wire.security_result_failed()


def test_rfb38_wrong_password_carries_the_reason() -> None:
    server = ServerConnection(ServerSecurity(vnc_password=PASSWORD), random_bytes=fixed_challenge)
    server.data_to_send()
    feed(server, b"RFB 003.008\n" + b"\x02")
    assert server.data_to_send() == wire.security_types(2) + CHALLENGE
    with pytest.raises(AuthenticationFailed):
        feed(server, bytes(16))
    assert server.data_to_send() == wire.security_result_failed(b"Authentication failed")


def test_non_ascii_password_keys_with_its_utf8() -> None:
    """The gateway checks a viewer's response as QEMU would (issue #9): DES keyed
    with the password's UTF-8. "pässwö" is 70 C3A4 73 73 77 C3B6, which keys DES
    as "pC$sswC6" does (DES ignores the bits VNC's bit reversal puts at the top)."""
    security = ServerSecurity(vnc_password="pässwö")
    server = ServerConnection(security, random_bytes=fixed_challenge)
    server.data_to_send()
    feed(server, b"RFB 003.008\n" + b"\x02")
    server.data_to_send()
    like = ClientConnection(password="pC$sswC6")
    wire.feed_all(like, b"RFB 003.008\n" + wire.security_types(2) + CHALLENGE)
    response = like.data_to_send()[len(b"RFB 003.008\n\x02") :]
    assert feed(server, response + b"\x01") == [ClientInitReceived(True)]
    assert server.data_to_send() == wire.security_result_ok()
    # And our own client with the same password gets in.
    connected_pair(security, password="pässwö")


def test_server_init_name_is_utf8() -> None:
    """rfbproto "String Encodings": UTF-8 for the name the gateway relays."""
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    feed(server, b"RFB 003.008\n\x01\x01")
    server.send_server_init(WIDTH, HEIGHT, RGBX8888, "QEMU (gäst ☃)")
    assert server.data_to_send().endswith(wire.string("QEMU (gäst ☃)".encode()))


@pytest.mark.parametrize("reply", [b"RFB 003.005\n", b"RFB 003.004\n", b"RFB 003.006\n"])
def test_odd_versions_speak_33(reply: bytes) -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    assert feed(server, reply) == []
    assert server.version == (3, 3)
    assert server.data_to_send() == wire.security_type_33(1)


@pytest.mark.parametrize(
    "reply", [b"RFB 003.009\n", b"RFB 003.889\n", b"RFB 004.001\n", b"RFB 005.000\n"]
)
def test_versions_above_ours_speak_38(reply: bytes) -> None:
    """A client may not answer above our 3.8; one that does is taken at 3.8, the
    highest version both know, not demoted to 3.3 (issue #9)."""
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    assert feed(server, reply) == []
    assert server.version == (3, 8)
    assert server.data_to_send() == wire.security_types(1)
    assert feed(server, b"\x01") == []
    assert server.data_to_send() == wire.security_result_ok()
    assert feed(server, b"\x01") == [ClientInitReceived(True)]


@pytest.mark.parametrize("reply", [b"RFB 002.000\n", b"RFB 003.002\n", b"RFB 000.000\n"])
def test_versions_below_33_are_refused(reply: bytes) -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    with pytest.raises(RemoteProtocolError, match=r"older than 3\.3") as failed:
        feed(server, reply)
    assert_stays_failed(server, failed.value)
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    "reply", [b"GET / HTTP/1.", b"RFB 003.00x\n", b"RFB 003.008\r", b"SSH-2.0-Open", bytes(12)]
)
def test_garbage_version(reply: bytes) -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    server.data_to_send()
    with pytest.raises(RemoteProtocolError, match="not an RFB client") as failed:
        feed(server, reply)
    assert_stays_failed(server, failed.value)


@pytest.mark.parametrize("choice", [1, 19, 0, 255])
def test_unoffered_security_type(choice: int) -> None:
    server = ServerConnection(ServerSecurity(vnc_password="pw"))
    server.data_to_send()
    with pytest.raises(SecurityNegotiationFailed, match="not offered"):
        feed(server, b"RFB 003.008\n" + bytes([choice]))
    reason = b"security type %d was not offered" % choice
    assert server.data_to_send() == wire.security_types(2) + wire.security_result_failed(reason)


def tls_server_at_vencrypt(password: str | None = None) -> ServerConnection:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server = ServerConnection(ServerSecurity(vnc_password=password, tls_context=context))
    server.data_to_send()
    feed(server, b"RFB 003.008\n" + b"\x13")
    assert server.data_to_send() == wire.security_types(19) + wire.vencrypt_version(0, 2)
    return server


def test_vencrypt_version_must_be_02() -> None:
    server = tls_server_at_vencrypt()
    with pytest.raises(SecurityNegotiationFailed, match=r"VeNCrypt 0\.1"):
        feed(server, wire.vencrypt_version(0, 1))
    assert server.data_to_send() == wire.vencrypt_ack(False)


@pytest.mark.parametrize(
    ("password", "offered", "choice"),
    [(None, 260, 257), (None, 260, 261), ("pw", 261, 260), ("pw", 261, 256)],
)
def test_vencrypt_unoffered_subtype(password: str | None, offered: int, choice: int) -> None:
    server = tls_server_at_vencrypt(password)
    assert feed(server, wire.vencrypt_version(0, 2)) == []
    assert server.data_to_send() == wire.vencrypt_ack() + wire.vencrypt_subtypes(offered)
    with pytest.raises(SecurityNegotiationFailed, match="not offered"):
        feed(server, wire.u32(choice))
    assert server.data_to_send() == wire.vencrypt_accept(False)


@pytest.mark.parametrize(
    "sent",
    [b"", b"RFB 003", b"RFB 003.008\n", b"RFB 003.008\n\x02", b"RFB 003.008\n\x02" + bytes(15)],
)
def test_eof_mid_handshake(sent: bytes) -> None:
    server = ServerConnection(ServerSecurity(vnc_password="pw"))
    with pytest.raises(ConnectionClosed, match="closed the connection while"):
        feed(server, sent, eof=True)


def test_eof_before_server_init() -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    assert feed(server, b"RFB 003.008\n\x01\x01") == [ClientInitReceived(True)]
    with pytest.raises(ConnectionClosed, match="ServerInit"):
        feed(server, b"", eof=True)


def test_bytes_before_server_init_are_refused() -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    key = KeyEvent(True, 0x61).serialize()
    # The ClientInit still comes out first; the early message then fails.
    server.receive_data(b"RFB 003.008\n\x01\x01" + key)
    assert server.next_event() == ClientInitReceived(True)
    with pytest.raises(RemoteProtocolError, match="8 bytes before ServerInit"):
        server.next_event()


def test_misuse_is_local() -> None:
    server = ServerConnection(ServerSecurity(allow_none=True))
    with pytest.raises(LocalProtocolError, match="ServerInit"):
        server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    with pytest.raises(LocalProtocolError, match="cannot send server messages"):
        server.send_raw(Bell().serialize())
    feed(server, b"RFB 003.008\n\x01\x01")
    with pytest.raises(LocalProtocolError, match="16 bits"):
        server.send_server_init(70000, HEIGHT, RGBX8888, NAME)
    with pytest.raises(LocalProtocolError, match="too long"):
        server.send_server_init(WIDTH, HEIGHT, RGBX8888, "x" * (64 * 1024 + 1))
    server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    with pytest.raises(LocalProtocolError):
        server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"x")

    short = ServerConnection(ServerSecurity(vnc_password="pw"), random_bytes=lambda n: b"1234")
    with pytest.raises(LocalProtocolError, match="random_bytes"):
        feed(short, b"RFB 003.008\n\x02")


# ---------------------------------------------------------------------------
# VeNCrypt with real TLS
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: Pki, *, verify_clients: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if verify_clients:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca_cert)
    return context


def client_tls(
    pki: Pki, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> TlsCredentials:
    return TlsCredentials(
        ca_file=ca or pki.ca_cert, server_name="localhost", client_cert=cert, client_key=key
    )


def test_vencrypt_x509_none(pki: Pki) -> None:
    security = ServerSecurity(tls_context=server_context(pki))
    server, client, talk = connected_pair(security, tls=client_tls(pki))
    connected = talk.client_events[0]
    assert isinstance(connected, Connected)
    assert connected.security == "VENCRYPT/X509_NONE"
    assert connected.tls_version is not None
    assert server.security_type is SecurityType.VENCRYPT
    assert server.vencrypt_subtype is VeNCryptSubtype.X509_NONE
    assert server.tls_version == connected.tls_version
    assert server.peer_certificate is None
    # Messages flow through TLS both ways.
    client.send(KeyEvent(True, 0xFF0D))
    server.send_raw(Bell().serialize())
    talk = converse(server, client)
    assert talk.server_events == [KeyEvent(True, 0xFF0D)]
    assert talk.client_events == [Bell()]


def test_vencrypt_x509_vnc_with_client_certificate(pki: Pki) -> None:
    security = ServerSecurity(
        vnc_password="s3cret", tls_context=server_context(pki, verify_clients=True)
    )
    tls = client_tls(pki, cert=pki.client_cert, key=pki.client_key)
    server, client, talk = connected_pair(security, password="s3cret", tls=tls)
    assert client.security_description == "VENCRYPT/X509_VNC"
    assert server.vencrypt_subtype is VeNCryptSubtype.X509_VNC
    assert talk.server_events[0] == ClientInitReceived(True)
    cert = server.peer_certificate
    assert cert is not None
    assert (("commonName", "resourced test client"),) in cert["subject"]


def test_vencrypt_x509_vnc_wrong_password(pki: Pki) -> None:
    security = ServerSecurity(vnc_password="s3cret", tls_context=server_context(pki))
    server = ServerConnection(security)
    client = ClientConnection(password="guess", tls=client_tls(pki))
    talk = converse(server, client)
    assert isinstance(talk.server_error, AuthenticationFailed)
    assert not isinstance(talk.server_error, TlsError)
    assert isinstance(talk.client_error, AuthenticationFailed)
    assert "Authentication failed" in str(talk.client_error)


def test_client_distrusts_the_server(pki: Pki) -> None:
    security = ServerSecurity(tls_context=server_context(pki))
    server = ServerConnection(security)
    client = ClientConnection(tls=client_tls(pki, ca=pki.other_ca_cert))
    talk = converse(server, client)
    assert isinstance(talk.client_error, TlsError)
    assert "not trusted" in str(talk.client_error)
    # The client's alert reached the server, which reports it as a TLS failure.
    assert isinstance(talk.server_error, TlsError)
    assert server.state is State.CLOSED


@pytest.mark.parametrize("which", ["missing", "foreign"])
def test_client_certificate_required(pki: Pki, which: str) -> None:
    security = ServerSecurity(
        vnc_password="s3cret", tls_context=server_context(pki, verify_clients=True)
    )
    server = ServerConnection(security)
    if which == "missing":
        tls = client_tls(pki)
    else:
        tls = client_tls(pki, cert=pki.other_client_cert, key=pki.other_client_key)
    client = ClientConnection(password="s3cret", tls=tls)
    talk = converse(server, client)
    error = talk.server_error
    assert isinstance(error, ClientCertificateRejected)
    # Both a TLS failure and a refused credential: callers may catch either.
    assert isinstance(error, TlsError)
    assert isinstance(error, AuthenticationFailed)
    assert ("no TLS certificate" if which == "missing" else "certificate was rejected") in str(
        error
    )
    assert isinstance(talk.client_error, ResourcedError)
    assert talk.server_events == []
    assert server.peer_certificate is None


def test_tls_with_allow_none_offers_both(pki: Pki) -> None:
    security = ServerSecurity(tls_context=server_context(pki), allow_none=True)
    server, _, _ = connected_pair(security, tls_mode=TlsMode.NEVER)
    assert server.security_type is SecurityType.NONE
    server, _, _ = connected_pair(security, tls=client_tls(pki))
    assert server.security_type is SecurityType.VENCRYPT


def test_tls_client_leaving(pki: Pki) -> None:
    server, _, _ = connected_pair(
        ServerSecurity(tls_context=server_context(pki)), tls=client_tls(pki)
    )
    # A viewer that just closes the socket (no close_notify) at a message
    # boundary has left cleanly as far as RFB is concerned.
    assert feed(server, b"", eof=True) == [ClientClosed()]
    assert server.state is State.CLOSED


def test_server_close_sends_close_notify(pki: Pki) -> None:
    server, _, _ = connected_pair(
        ServerSecurity(tls_context=server_context(pki)), tls=client_tls(pki)
    )
    server.close()
    assert server.data_to_send()  # the close_notify alert record
    assert server.state is State.CLOSED
    assert server.next_event() is None


def test_client_hello_in_the_same_piece_as_the_subtype(pki: Pki) -> None:
    # A client that does not wait for the acceptance: everything after the
    # subtype, though it arrived with it as plaintext, is TLS.
    server = ServerConnection(ServerSecurity(tls_context=server_context(pki)))
    feed(server, b"RFB 003.008\n" + b"\x13")
    server.data_to_send()
    tls = ssl.create_default_context(cafile=pki.ca_cert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        session.do_handshake()
    hello = outgoing.read()
    choice = wire.vencrypt_version(0, 2) + wire.u32(VeNCryptSubtype.X509_NONE)
    assert feed(server, choice + hello) == []
    assert server.state is State.TLS_HANDSHAKE
    answer = server.data_to_send()
    plain = wire.vencrypt_ack() + wire.vencrypt_subtypes(VeNCryptSubtype.X509_NONE)
    assert answer.startswith(plain + wire.vencrypt_accept())
    incoming.write(answer[len(plain) + 1 :])
    session.do_handshake()
    feed(server, outgoing.read())
    incoming.write(server.data_to_send())
    assert session.read() == wire.security_result_ok()
    assert server.state is State.CLIENT_INIT


def _ticket_seen(
    exchange: Callable[[bytes], bytes], pki: Pki, version: ssl.TLSVersion
) -> tuple[bool, bytes]:
    """Run a TLS client (at most `version`) until 16 plaintext bytes arrive after
    the handshake; return whether it holds a session ticket, and those bytes.

    `exchange` takes the client's ciphertext and returns the server's answer.
    """
    tls = ssl.create_default_context(cafile=pki.ca_cert)
    tls.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls.wrap_bio(incoming, outgoing, server_hostname="localhost")
    plaintext = b""
    for _ in range(16):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
            # Reading also takes in whatever else came: TLS 1.3's tickets.
            plaintext += client.read(16 - len(plaintext))
        if len(plaintext) == 16:
            break
        incoming.write(exchange(outgoing.read()))
    assert client.session is not None
    return client.session.has_ticket, plaintext


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
def test_no_session_tickets(pki: Pki, version: ssl.TLSVersion) -> None:
    """Like QEMU's, our TLS sends no session tickets: a VNC session is never
    resumed, and TigerVNC 1.12 hangs when TLS 1.3's arrive with the challenge."""
    # Any server context given is fixed, not only one from tls.server_context().
    security = ServerSecurity(vnc_password=PASSWORD, tls_context=server_context(pki))
    server = ServerConnection(security, random_bytes=fixed_challenge)
    feed(server, b"RFB 003.008\n\x13" + wire.vencrypt_version(0, 2))
    feed(server, wire.u32(VeNCryptSubtype.X509_VNC))
    server.data_to_send()
    assert server.state is State.TLS_HANDSHAKE

    def exchange(data: bytes) -> bytes:
        feed(server, data)
        return server.data_to_send()

    has_ticket, first = _ticket_seen(exchange, pki, version)
    assert first == CHALLENGE
    assert not has_ticket
    assert server.tls_version == {ssl.TLSVersion.TLSv1_2: "TLSv1.2"}.get(version, "TLSv1.3")

    # The control: Python's defaults do send one, so the check above can fail.
    bare_in, bare_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    bare = server_context(pki).wrap_bio(bare_in, bare_out, server_side=True)

    def bare_exchange(data: bytes) -> bytes:
        bare_in.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            bare.do_handshake()
            bare.write(CHALLENGE)
        return bare_out.read()

    assert _ticket_seen(bare_exchange, pki, version) == (True, CHALLENGE)


def test_awaiting_user_marks_the_waits_a_person_may_cause(pki: Pki) -> None:
    """Only the VNC response, and ClientInit after TLS, may wait for a person."""
    server = ServerConnection(ServerSecurity(vnc_password=PASSWORD), random_bytes=fixed_challenge)
    assert not server.awaiting_user
    feed(server, b"RFB 003.008\n")
    assert not server.awaiting_user
    feed(server, b"\x02")
    assert server.state is State.VNC_AUTH_RESPONSE
    assert server.awaiting_user
    feed(server, RESPONSE)
    assert server.state is State.CLIENT_INIT
    assert not server.awaiting_user

    plain = ServerConnection(ServerSecurity(allow_none=True))
    feed(plain, b"RFB 003.008\n\x01")
    assert plain.state is State.CLIENT_INIT
    assert not plain.awaiting_user

    x509 = ServerConnection(ServerSecurity(tls_context=server_context(pki)))
    client = ClientConnection(tls=client_tls(pki))
    states = []
    for _ in range(16):
        states.append((x509.state, x509.awaiting_user))
        client.receive_data(x509.data_to_send())
        list(client.events())
        if x509.state is State.CLIENT_INIT:
            break
        feed(x509, client.data_to_send())
    assert (State.TLS_HANDSHAKE, False) in states
    assert states[-1] == (State.CLIENT_INIT, True)  # TigerVNC may ask about the certificate


def test_server_context_from_files(pki: Pki, tmp_path: Path) -> None:
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    assert context.num_tickets == 0
    assert context.options & ssl.OP_NO_TICKET
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert tls.server_context(pki.server_cert, pki.server_key).verify_mode is ssl.CERT_NONE
    with pytest.raises(ConfigurationError, match="cannot load the TLS certificate"):
        tls.server_context(tmp_path / "missing.pem", pki.server_key)


def test_close_notify_is_the_viewers_eof(pki: Pki) -> None:
    """A viewer's close_notify ends the session at once, as QEMU (gnutls reads it
    as the end of the stream) would; TLS allows nothing after it, so whatever
    still arrives is dropped, not an error."""
    server = ServerConnection(ServerSecurity(tls_context=server_context(pki)))
    feed(server, b"RFB 003.008\n\x13" + wire.vencrypt_version(0, 2))
    feed(server, wire.u32(VeNCryptSubtype.X509_NONE))
    server.data_to_send()
    tls = ssl.create_default_context(cafile=pki.ca_cert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    session = tls.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(8):
        with contextlib.suppress(ssl.SSLWantReadError):
            session.do_handshake()
            break
        feed(server, outgoing.read())
        incoming.write(server.data_to_send())
    session.write(b"\x01")  # ClientInit, shared
    assert feed(server, outgoing.read()) == [ClientInitReceived(True)]
    server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    incoming.write(server.data_to_send())
    received = b""
    with contextlib.suppress(ssl.SSLWantReadError):
        while True:
            received += session.read()
    assert received == wire.security_result_ok() + server_init_bytes()
    with pytest.raises(ssl.SSLWantReadError):
        session.unwrap()  # our close_notify is out; it would wait for the server's
    key = KeyEvent(True, 0x61).serialize()
    assert feed(server, outgoing.read()) == [ClientClosed()]
    assert server.state is State.CLOSED
    server.receive_data(b"\x17\x03\x03\x00\x05" + key)  # late bytes, then the EOF
    server.receive_data(b"")
    assert server.next_event() is None


def test_pending_input_counts_what_is_not_parsed_yet() -> None:
    server = connected_server()
    key = KeyEvent(True, 0x61).serialize()
    server.receive_data(key + key + key[:3])
    assert server.pending_input == 2 * len(key) + 3
    assert server.next_event() == KeyEvent(True, 0x61)
    assert server.pending_input == len(key) + 3
    assert server.next_event() == KeyEvent(True, 0x61)
    assert server.next_event() is None
    assert server.pending_input == server.buffered == 3
    server.receive_data(key[3:])
    assert server.next_event() == KeyEvent(True, 0x61)
    assert server.pending_input == 0


def test_tls_handshake_cut_short(pki: Pki) -> None:
    server = tls_server_at_vencrypt()
    feed(server, wire.vencrypt_version(0, 2) + wire.u32(260))
    server.data_to_send()
    assert server.state is State.TLS_HANDSHAKE
    with pytest.raises(ConnectionClosed, match="TLS handshake"):
        feed(server, b"\x16\x03\x01", eof=True)


def test_tls_garbage_is_a_tls_error(pki: Pki) -> None:
    server = tls_server_at_vencrypt()
    feed(server, wire.vencrypt_version(0, 2) + wire.u32(260))
    with pytest.raises(TlsError, match="TLS handshake with the client failed"):
        feed(server, b"GET / HTTP/1.1\r\n\r\n")


# ---------------------------------------------------------------------------
# Connected: client messages in, server messages out
# ---------------------------------------------------------------------------

PF565 = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)

MESSAGES: list[Any] = [
    SetPixelFormat(PF565),
    SetEncodings((16, 5, 0, -223, -258, -259)),
    SetEncodings(()),
    FramebufferUpdateRequest(True, 1, 2, 30, 40),
    FramebufferUpdateRequest(False, 0, 0, WIDTH, HEIGHT),
    KeyEvent(True, 0xFF0D),
    KeyEvent(False, 0x61),
    PointerEvent(0b101, 10, 20),
    ClientCutText(b"caf\xe9 au lait\n"),
    ClientCutText(b""),
    QemuKeyEvent(True, 0x61, 0x1E),
    QemuKeyEvent(False, 0x61, 0x1E),
    QemuAudioSetFormat(AudioFormat(SampleFormat.U8, 1, 8000)),
    QemuAudioSetFormat(AudioFormat()),
    QemuAudioEnable(),
    QemuAudioDisable(),
    SetDesktopSize(1024, 768, (Screen(1, 0, 0, 1024, 768, 0),)),
    SetDesktopSize(800, 600, ()),
    XvpMessage(1, XVP_REBOOT),
    XvpMessage(1, XVP_SHUTDOWN),
]
MESSAGE_BYTES = b"".join(m.serialize() for m in MESSAGES)


def test_every_client_message_arrives_equal() -> None:
    server, client, _ = connected_pair()
    for message in MESSAGES:
        client.send(message)
    talk = converse(server, client)
    assert talk.server_events == MESSAGES
    assert server.pixel_format == PF565
    assert server.encodings == ()


@pytest.mark.parametrize("how", ["whole", "bytewise", "trailing"])
def test_client_messages_however_cut(how: str) -> None:
    server = connected_server()
    events: list[Any] = []
    if how == "whole":
        events = feed(server, MESSAGE_BYTES)
    elif how == "bytewise":
        for byte in MESSAGE_BYTES:
            events += feed(server, bytes([byte]))
    else:
        # Each piece is the rest of a message and the first byte of the next.
        pieces = [m.serialize() for m in MESSAGES]
        carry = 0
        for piece, following in zip(pieces, [*pieces[1:], b""], strict=True):
            events += feed(server, piece[carry:] + following[:1])
            carry = 1
    assert events == MESSAGES
    assert server.buffered == 0
    assert feed(server, b"", eof=True) == [ClientClosed()]


def test_client_messages_written_by_hand() -> None:
    """The framing of 250 and 251 from rfbproto 7.5.7 / 7.5.8, not from serialize()."""
    server = connected_server()
    desktop = (
        wire.u8(251)
        + wire.u8(0)
        + wire.u16(1920)
        + wire.u16(1080)
        + wire.u8(2)
        + wire.u8(0)
        + wire.u32(7)
        + wire.u16(0)
        + wire.u16(0)
        + wire.u16(960)
        + wire.u16(1080)
        + wire.u32(0)
        + wire.u32(8)
        + wire.u16(960)
        + wire.u16(0)
        + wire.u16(960)
        + wire.u16(1080)
        + wire.u32(0xDEADBEEF)
    )
    xvp = wire.u8(250) + wire.u8(0) + wire.u8(1) + wire.u8(4)
    qemu_key = wire.u8(255) + wire.u8(0) + wire.u16(1) + wire.u32(0x61) + wire.u32(0x1E)
    audio = wire.u8(255) + wire.u8(1) + wire.u16(2) + wire.u8(3) + wire.u8(2) + wire.u32(44100)
    two_screens = (Screen(7, 0, 0, 960, 1080, 0), Screen(8, 960, 0, 960, 1080, 0xDEADBEEF))
    expected: list[Any] = [
        SetDesktopSize(1920, 1080, two_screens),
        XvpMessage(1, 4),
        QemuKeyEvent(True, 0x61, 0x1E),
        QemuAudioSetFormat(AudioFormat(SampleFormat.S16, 2, 44100)),
    ]
    assert feed(server, desktop + xvp + qemu_key + audio) == expected
    assert desktop == SetDesktopSize(1920, 1080, two_screens).serialize()
    assert xvp == XvpMessage(1, 4).serialize()


def test_server_messages_reach_the_client() -> None:
    server, client, _ = connected_pair()
    update = FramebufferUpdate(
        (Rectangle(RectangleHeader(0, 0, 2, 1, Encoding.RAW), bytes(range(8))),)
    )
    server.send_raw(update.serialize() + Bell().serialize())
    server.send_raw(ServerCutText(b"hello").serialize())
    talk = converse(server, client)
    assert talk.client_events == [update, Bell(), ServerCutText(b"hello")]
    assert talk.client_error is None


@dataclass(frozen=True)
class ConsoleMessage:
    number: int


def test_extra_qemu_parsers() -> None:
    def parse_console(r: Reader) -> ConsoleMessage:
        return ConsoleMessage(r.u16())

    def parse_keys_differently(r: Reader) -> str:
        r.skip(10)
        return "key"

    server = connected_server(qemu_parsers={2: parse_console, 0: parse_keys_differently})
    data = (
        b"\xff\x02\x00\x07" + QemuKeyEvent(True, 1, 2).serialize() + QemuAudioEnable().serialize()
    )
    assert feed(server, data) == [ConsoleMessage(7), "key", QemuAudioEnable()]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x07", "unknown client message type 7"),
        (b"\x01\x00\x00\x00", "unknown client message type 1"),  # FixColourMapEntries
        (b"\x96\x01\x00\x00\x00\x00\x00\x00\x00\x00", "unknown client message type 150"),
        (b"\xf8", "unknown client message type 248"),
        (b"\x02\x00" + wire.u16(MAX_ENCODINGS + 1), "SetEncodings"),
        (b"\x02\x00\xff\xff", "SetEncodings"),
        # Extended Clipboard (a negative length) without the pseudo-encoding.
        (b"\x06\x00\x00\x00" + wire.u32(0x80000010), "never advertised"),
        (b"\x06\x00\x00\x00" + wire.s32(-4), "never advertised"),
        (b"\xff\x09", "unknown QEMU client submessage 9"),
        (b"\xff\x01\x00\x07", "unknown client operation 7"),
        (b"\xff\x01\x00\x02\x09\x02" + wire.u32(44100), "set-format"),
        (b"\xff\x01\x00\x02\x03\x03" + wire.u32(44100), "set-format"),
        (b"\xff\x01\x00\x02\x03\x02" + wire.u32(96000), "set-format"),
        (b"\x00\x00\x00\x00" + bytes.fromhex("0c 08 00 01 00ff 00ff 00ff 10 08 00 000000"), "12"),
    ],
)
def test_malformed_client_messages(data: bytes, match: str) -> None:
    server = connected_server()
    good = KeyEvent(True, 1).serialize()
    server.receive_data(good + data)
    assert server.next_event() == KeyEvent(True, 1)
    with pytest.raises(RemoteProtocolError, match=match) as failed:
        server.next_event()
    assert_stays_failed(server, failed.value)


def test_eof_in_the_middle_of_a_message() -> None:
    server = connected_server()
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        feed(server, KeyEvent(True, 1).serialize()[:5], eof=True)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

u8s = st.integers(0, 0xFF)
u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 0xFFFFFFFF)
s32s = st.integers(-(2**31), 2**31 - 1)

screens = st.builds(Screen, u32s, u16s, u16s, u16s, u16s, u32s)
set_desktop_sizes = st.builds(SetDesktopSize, u16s, u16s, st.lists(screens, max_size=4).map(tuple))
xvp_messages = st.builds(XvpMessage, u8s, u8s)
audio_formats = st.builds(
    AudioFormat, st.sampled_from(list(SampleFormat)), st.sampled_from([1, 2]), st.integers(1, 48000)
)
client_messages: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([SetPixelFormat(RGBX8888), SetPixelFormat(PF565)]),
    st.lists(s32s, max_size=8).map(lambda e: SetEncodings(tuple(e))),
    st.builds(FramebufferUpdateRequest, st.booleans(), u16s, u16s, u16s, u16s),
    st.builds(KeyEvent, st.booleans(), u32s),
    st.builds(PointerEvent, u8s, u16s, u16s),
    st.binary(max_size=64).map(ClientCutText),
    st.builds(QemuKeyEvent, st.booleans(), u32s, u32s),
    st.sampled_from([QemuAudioEnable(), QemuAudioDisable()]),
    audio_formats.map(QemuAudioSetFormat),
    set_desktop_sizes,
    xvp_messages,
)

CONNECTED_EVENTS = (
    SetPixelFormat,
    SetEncodings,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    ClientCutText,
    QemuKeyEvent,
    QemuAudioEnable,
    QemuAudioDisable,
    QemuAudioSetFormat,
    SetDesktopSize,
    XvpMessage,
    ClientCutTextRefused,
    ClientClosed,
)


fragments = st.one_of(
    mutated(client_messages.map(lambda m: m.serialize())),
    mutated(client_messages.map(lambda m: m.serialize())),
    st.binary(max_size=40),
    # Headers with lengths both plausible and huge.
    st.builds(lambda n: b"\x06\x00\x00\x00" + wire.u32(n), st.one_of(st.integers(0, 64), u32s)),
    st.builds(lambda n: b"\x02\x00" + wire.u16(n), st.one_of(st.integers(0, 64), u16s)),
    st.builds(lambda n: b"\xfb\x00\x01\x00\x01\x00" + wire.u8(n) + b"\x00", u8s),
    st.builds(lambda s: b"\xff" + wire.u8(s), u8s),
)
client_noise = st.one_of(
    st.binary(max_size=2048),
    st.lists(fragments, max_size=24).map(b"".join),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@settings(FUZZ, max_examples=2000)
@given(data=client_noise, cuts=st.lists(st.integers(0, 2048), max_size=12), eof=st.booleans())
def test_connected_server_survives_any_bytes(data: bytes, cuts: list[int], eof: bool) -> None:
    server = connected_server()
    events: list[Any] = []
    error: RemoteProtocolError | None = None
    fed = 0
    with traced_peak() as peak:
        for piece in [*split(data, cuts), *([b""] if eof else [])]:
            server.receive_data(piece)
            fed += len(piece)
            try:
                events.extend(server.events())
            except RemoteProtocolError as err:
                error = err
                break
            assert server.buffered <= fed
    assert peak[0] < 4 * len(data) + 2 * MIB
    for event in events:
        assert isinstance(event, CONNECTED_EVENTS), event
    hypothesis.event("refused" if error is not None else "accepted")
    if error is not None:
        assert str(error)
        assert_stays_failed(server, error)
    elif eof:
        assert events[-1] == ClientClosed()
        assert server.state is State.CLOSED
    else:
        assert server.state is State.CONNECTED
    assert server.data_to_send() == b""  # it never answers on its own


client_versions = st.one_of(
    st.sampled_from([b"RFB 003.003\n", b"RFB 003.005\n", b"RFB 003.007\n", b"RFB 003.008\n"]),
    st.binary(min_size=12, max_size=12),
)
handshake_parts = st.one_of(
    st.sampled_from(
        [b"\x00", b"\x01", b"\x02", b"\x13", b"\x00\x02", wire.u32(260), wire.u32(261)]
    ),
    st.sampled_from([RESPONSE, bytes(16)]),
    st.binary(max_size=32),
    fragments,
)
#: Client sides of handshakes that succeed against some of the servers below.
HANDSHAKE_SCRIPTS = [
    b"RFB 003.008\n\x01\x01",
    b"RFB 003.007\n\x01\x00",
    b"RFB 003.003\n\x01",
    b"RFB 003.008\n\x02" + RESPONSE + b"\x01",
    b"RFB 003.003\n" + RESPONSE + b"\x00",
    b"RFB 003.008\n\x13\x00\x02" + wire.u32(261),  # then TLS, which noise is not
]
scripted = st.tuples(
    mutated(st.sampled_from(HANDSHAKE_SCRIPTS)), st.lists(fragments, max_size=6)
).map(lambda t: t[0] + b"".join(t[1]))
handshake_noise = st.one_of(
    st.binary(max_size=512),
    st.tuples(client_versions, st.lists(handshake_parts, max_size=8)).map(
        lambda t: t[0] + b"".join(t[1])
    ),
    scripted,
    scripted,
)


@settings(FUZZ, max_examples=1000)
@given(
    data=handshake_noise,
    cuts=st.lists(st.integers(0, 512), max_size=8),
    which=st.sampled_from(["none", "vnc", "both", "tls"]),
    eof=st.booleans(),
)
def test_handshake_survives_any_bytes(
    pki: Pki, data: bytes, cuts: list[int], which: str, eof: bool
) -> None:
    """Before authentication anything may arrive: only `ResourcedError`s other
    than our own misuse may come out, and nothing grows beyond the input."""
    security = {
        "none": ServerSecurity(allow_none=True),
        "vnc": ServerSecurity(vnc_password=PASSWORD),
        "both": ServerSecurity(vnc_password=PASSWORD, allow_none=True),
        "tls": ServerSecurity(vnc_password=PASSWORD, tls_context=server_context(pki)),
    }[which]
    server = ServerConnection(security, random_bytes=fixed_challenge)
    error: ResourcedError | None = None
    fed = 0
    with traced_peak() as peak:
        for piece in [*split(data, cuts), *([b""] if eof else [])]:
            server.receive_data(piece)
            fed += len(piece)
            try:
                for item in server.events():
                    assert isinstance(item, (ClientInitReceived, *CONNECTED_EVENTS)), item
                    if isinstance(item, ClientInitReceived):
                        server.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
            except ResourcedError as err:
                error = err
                break
            assert server.buffered <= fed
    assert peak[0] < 4 * len(data) + 2 * MIB
    assert not isinstance(error, LocalProtocolError), error
    hypothesis.event(type(error).__name__ if error is not None else server.state.name)
    if error is not None:
        assert str(error)
        assert_stays_failed(server, error)


@settings(FUZZ, max_examples=500)
@given(messages=st.lists(client_messages, max_size=12), cuts=st.lists(st.integers(0, 600)))
def test_valid_client_messages_in_any_chunks(messages: list[Any], cuts: list[int]) -> None:
    server = connected_server()
    data = b"".join(m.serialize() for m in messages)
    events: list[Any] = []
    for piece in split(data, cuts):
        events += feed(server, piece)
    assert events == messages


@settings(FUZZ, max_examples=200)
@given(message=st.one_of(set_desktop_sizes, xvp_messages))
def test_round_trip(message: SetDesktopSize | XvpMessage) -> None:
    data = message.serialize()
    reader = Reader(data)
    assert reader.u8() == (251 if isinstance(message, SetDesktopSize) else 250)
    assert type(message).parse(reader) == message
    assert reader.remaining == 0
