"""The RFB handshake of `ClientConnection` (rfbproto 7.1-7.3), byte for byte.

Server bytes come from `wire`, written from the specification; what the client
must answer is spelled out in hex here. Every scenario is also run a byte at a
time, which must give the same events, the same output and the same error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from resourced.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    RemoteProtocolError,
    ResourcedError,
    SecurityNegotiationFailed,
    TlsError,
)
from resourced.rfb.connection import ClientConnection, State
from resourced.rfb.constants import MAX_REASON_LENGTH, VeNCryptSubtype
from resourced.rfb.events import Connected
from resourced.rfb.pixelformat import RGBX8888, PixelFormat
from resourced.rfb.qemu import QemuAudio, QemuLedState
from resourced.rfb.security import TlsMode
from resourced.rfb.tls import TlsCredentials

from . import wire

#: SetEncodings the client sends after ServerInit by default: ZRLE 16, Hextile 5,
#: RRE 2, CopyRect 1, Raw 0, then DesktopSize -223, ExtendedDesktopSize -308,
#: LastRect -224, Cursor -239 (rfbproto 7.5.2: u8 2, pad, u16 count, s32 each).
DEFAULT_SET_ENCODINGS = bytes.fromhex(
    "02 00 0009 00000010 00000005 00000002 00000001 00000000 ffffff21 fffffecc ffffff20 ffffff11"
)
#: The same with QEMU audio (-259) appended.
AUDIO_SET_ENCODINGS = bytes.fromhex(
    "02 00 000a 00000010 00000005 00000002 00000001 00000000"
    " ffffff21 fffffecc ffffff20 ffffff11 fffffefd"
)
CLIENT_INIT_SHARED = b"\x01"


# ---------------------------------------------------------------------------
# An independent VNC authentication vector
# ---------------------------------------------------------------------------


def reverse_bits(byte: int) -> int:
    out = 0
    for bit in range(8):
        if byte & (1 << bit):
            out |= 0x80 >> bit
    return out


def password_for_des_key(key: bytes) -> str:
    """A VNC password whose key schedule is `key`: VNC uses each password byte
    with its bits reversed as the DES key byte, so reverse them back. DES ignores
    each key byte's lowest (parity) bit, the password byte's highest after the
    reversal: clearing it gives an ASCII password, the same in any encoding."""
    return bytes(reverse_bits(b) & 0x7F for b in key).decode("ascii")


# Well-known single-DES vectors: key 0123456789ABCDEF encrypts "Now is t" to
# 3FA40E8A984D4815; key 133457799BBCDFF1 encrypts 0123456789ABCDEF to 85E813540F0AB405.
VNC_VECTORS = [
    (bytes.fromhex("0123456789abcdef"), b"Now is t", bytes.fromhex("3fa40e8a984d4815")),
    (
        bytes.fromhex("133457799bbcdff1"),
        bytes.fromhex("0123456789abcdef"),
        bytes.fromhex("85e813540f0ab405"),
    ),
]


def test_reverse_bits_helper() -> None:
    assert [reverse_bits(b) for b in (0x01, 0x80, 0x23, 0xF0, 0xFF)] == [
        0x80,
        0x01,
        0xC4,
        0x0F,
        0xFF,
    ]
    assert password_for_des_key(bytes.fromhex("0123456789abcdef")).encode() == (
        bytes.fromhex("0044226611553377")
    )


@pytest.mark.parametrize(("key", "plain", "cipher"), VNC_VECTORS)
def test_des_vectors_hold_for_the_library(key: bytes, plain: bytes, cipher: bytes) -> None:
    # Sanity check of the vectors themselves (3DES with K1=K2=K3 is single DES).
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    assert encryptor.update(plain) + encryptor.finalize() == cipher


# ---------------------------------------------------------------------------
# Running a scenario whole and byte by byte
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    events: list[Any]
    output: bytes
    error: tuple[type[BaseException], str] | None
    state: State


def run(conn: ClientConnection, data: bytes, *, bytewise: bool, eof: bool = False) -> Outcome:
    events: list[Any] = []
    error = None
    try:
        if bytewise:
            events += wire.feed_bytewise(conn, data)
        else:
            events += wire.feed_all(conn, data)
        if eof:
            conn.receive_data(b"")
            events += conn.events()
    except ResourcedError as err:
        error = (type(err), str(err))
    return Outcome(events, conn.data_to_send(), error, conn.state)


def run_both(make: Callable[[], ClientConnection], data: bytes, eof: bool = False) -> Outcome:
    whole = run(make(), data, bytewise=False, eof=eof)
    bytewise = run(make(), data, bytewise=True, eof=eof)
    assert bytewise == whole
    return whole


# ---------------------------------------------------------------------------
# Protocol versions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "reply", "spoken"),
    [
        (b"3.3", b"RFB 003.003\n", "3.3"),
        (b"3.7", b"RFB 003.007\n", "3.7"),
        (b"3.8", b"RFB 003.008\n", "3.8"),
        (b"3.5", b"RFB 003.003\n", "3.3"),  # Apple's 3.5 was never a real version
        (b"3.6", b"RFB 003.003\n", "3.3"),
        (b"3.889", b"RFB 003.008\n", "3.8"),  # Apple Remote Desktop
        (b"3.9", b"RFB 003.008\n", "3.8"),
        # Newer servers speak 3.8 to a client that answers 3.8 (issue #9).
        (b"4.0", b"RFB 003.008\n", "3.8"),  # RealVNC 4.x, Intel AMT
        (b"4.1", b"RFB 003.008\n", "3.8"),  # RealVNC 4.6
        (b"5.0", b"RFB 003.008\n", "3.8"),  # RealVNC 5 and later
        (b"999.999", b"RFB 003.008\n", "3.8"),
        (b"3.4", b"RFB 003.003\n", "3.3"),  # UltraVNC
    ],
)
def test_version_and_security_none(server: bytes, reply: bytes, spoken: str) -> None:
    data = wire.greeting(server) + wire.security_none(server) + wire.server_init(name=b"vm")
    outcome = run_both(ClientConnection, data)
    assert outcome.error is None
    assert outcome.events == [
        Connected(
            version=spoken,
            security="NONE",
            width=640,
            height=480,
            pixel_format=RGBX8888,
            name="vm",
            tls_version=None,
        )
    ]
    # 3.7/3.8 answer the type list with the chosen type (1); 3.3 has no list.
    choice = b"" if spoken == "3.3" else b"\x01"
    assert outcome.output == reply + choice + CLIENT_INIT_SHARED + DEFAULT_SET_ENCODINGS


def test_greeting_answered_before_anything_else() -> None:
    conn = ClientConnection()
    assert conn.data_to_send() == b""
    for byte in wire.greeting(b"3.8")[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is None
        assert conn.data_to_send() == b""
    conn.receive_data(b"\n")
    assert conn.next_event() is None
    assert conn.data_to_send() == b"RFB 003.008\n"
    assert conn.state is State.SECURITY_TYPES
    assert conn.version == (3, 8)


@pytest.mark.parametrize(
    ("greeting", "match"),
    [
        (b"HTTP/1.1 400", "not an RFB server"),
        (b"RFB 003.00x\n", "not an RFB server"),
        (b"RFB 003.008\r", "not an RFB server"),
        (b"RFB 3.8\n\0\0\0\0\0", "not an RFB server"),
        (b"SSH-2.0-Open", "not an RFB server"),
        (b"RFB 002.002\n", "RFB 2.2, older than 3.3"),
        (b"RFB 003.002\n", "RFB 3.2, older than 3.3"),
        (b"RFB 000.000\n", "RFB 0.0, older than 3.3"),  # an UltraVNC repeater
    ],
)
def test_bad_greeting(greeting: bytes, match: str) -> None:
    outcome = run_both(ClientConnection, greeting)
    assert outcome.error is not None
    assert outcome.error[0] is RemoteProtocolError
    assert match in outcome.error[1]
    assert outcome.output == b""  # nothing answered
    assert outcome.state is State.CLOSED


def test_garbage_greeting_keeps_failing() -> None:
    conn = ClientConnection()
    conn.receive_data(b"GET / HTTP/1.0\r\n")
    with pytest.raises(RemoteProtocolError, match="not an RFB server"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError, match="not an RFB server"):
        conn.next_event()


# ---------------------------------------------------------------------------
# Security None, step by step
# ---------------------------------------------------------------------------


def test_none_38_waits_for_security_result() -> None:
    conn = ClientConnection()
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_types(1))
    assert conn.data_to_send() == b"RFB 003.008\n\x01"  # no ClientInit yet
    assert conn.state is State.SECURITY_RESULT
    wire.feed_all(conn, wire.security_result_ok())
    assert conn.data_to_send() == CLIENT_INIT_SHARED
    assert conn.state is State.SERVER_INIT


def test_none_37_has_no_security_result() -> None:
    conn = ClientConnection()
    wire.feed_all(conn, wire.greeting(b"3.7") + wire.security_types(1))
    assert conn.data_to_send() == b"RFB 003.007\n\x01" + CLIENT_INIT_SHARED
    assert conn.state is State.SERVER_INIT


def test_none_33_has_no_type_list_and_no_security_result() -> None:
    conn = ClientConnection()
    wire.feed_all(conn, wire.greeting(b"3.3") + wire.security_type_33(1))
    assert conn.data_to_send() == b"RFB 003.003\n" + CLIENT_INIT_SHARED
    assert conn.state is State.SERVER_INIT


def test_37_server_init_is_not_read_as_a_security_result() -> None:
    # A 3.7 server sends ServerInit straight after the choice of None; its first four
    # bytes (width 0x0280, height 0x01e0) must not be taken for a failed result.
    conn = ClientConnection()
    events = wire.feed_all(
        conn, wire.greeting(b"3.7") + wire.security_types(1) + wire.server_init(640, 480)
    )
    assert isinstance(events[0], Connected)


@pytest.mark.parametrize(("shared", "flag"), [(True, b"\x01"), (False, b"\x00")])
def test_client_init_shared_flag(shared: bool, flag: bytes) -> None:
    conn = ClientConnection(shared=shared)
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_none(b"3.8"))
    assert conn.data_to_send() == b"RFB 003.008\n\x01" + flag


def test_none_preferred_when_no_password_and_both_offered() -> None:
    conn = ClientConnection()
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_types(2, 1))
    assert conn.data_to_send() == b"RFB 003.008\n\x01"
    assert conn.security_type is not None
    assert conn.security_type.name == "NONE"


# ---------------------------------------------------------------------------
# After ServerInit: SetEncodings (and SetPixelFormat)
# ---------------------------------------------------------------------------


def test_set_encodings_after_server_init_default() -> None:
    conn = ClientConnection()
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_none(b"3.8"))
    conn.data_to_send()
    assert conn.next_event() is None
    events = wire.feed_all(conn, wire.server_init())
    assert isinstance(events[0], Connected)
    assert conn.data_to_send() == DEFAULT_SET_ENCODINGS


def test_set_encodings_with_qemu_audio() -> None:
    conn = ClientConnection(extensions=[QemuAudio()])
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_none(b"3.8"))
    conn.data_to_send()
    wire.feed_all(conn, wire.server_init())
    assert conn.data_to_send() == AUDIO_SET_ENCODINGS


def test_set_encodings_with_several_extensions_and_own_encodings() -> None:
    conn = ClientConnection(encodings=(0, 1), extensions=[QemuLedState(), QemuAudio()])
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_none(b"3.8"))
    conn.data_to_send()
    wire.feed_all(conn, wire.server_init())
    # Raw, CopyRect; core pseudo-encodings; LED state -261, audio -259 in order.
    assert conn.data_to_send() == bytes.fromhex(
        "02 00 0008 00000000 00000001 ffffff21 fffffecc ffffff20 ffffff11 fffffefb fffffefd"
    )


def test_requested_pixel_format_is_sent_before_set_encodings() -> None:
    pf16 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
    conn = ClientConnection(pixel_format=pf16)
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_none(b"3.8"))
    conn.data_to_send()
    events = wire.feed_all(conn, wire.server_init())
    assert events[0].pixel_format == pf16
    assert conn.pixel_format == pf16
    set_pixel_format = bytes.fromhex("00 000000 10 10 00 01 001f 003f 001f 0b 05 00 000000")
    assert conn.data_to_send() == set_pixel_format + DEFAULT_SET_ENCODINGS


@pytest.mark.parametrize(
    ("name", "decoded"),
    [
        ("QEMU (gäst ☃)".encode(), "QEMU (gäst ☃)"),  # QEMU: UTF-8, from -name
        (b"caf\xe9", "café"),  # a Latin-1 server: not UTF-8, so read as Latin-1
        (b"caf\xe9 \xc3\xa9", "café Ã©"),  # any bytes: nothing lost to U+FFFD
    ],
)
def test_server_init_name_utf8_else_latin1(name: bytes, decoded: str) -> None:
    """rfbproto "String Encodings": UTF-8 recommended, Latin-1 in old servers."""
    conn = ClientConnection()
    connected = wire.handshake(conn, name=name)
    assert connected.name == decoded
    assert conn.name == connected.name


def test_server_init_geometry_is_kept() -> None:
    conn = ClientConnection()
    connected = wire.handshake(conn, width=1024, height=768)
    assert (connected.width, connected.height) == (1024, 768)
    assert (conn.width, conn.height) == (1024, 768)
    assert conn.pixel_format == RGBX8888


# ---------------------------------------------------------------------------
# VNC authentication
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [b"3.3", b"3.7", b"3.8"])
@pytest.mark.parametrize(("key", "plain", "cipher"), VNC_VECTORS)
def test_vnc_auth_response_on_the_wire(
    version: bytes, key: bytes, plain: bytes, cipher: bytes
) -> None:
    password = password_for_des_key(key)
    # The response encrypts the 16-byte challenge as two independent 8-byte blocks.
    challenge = plain + plain
    offer = wire.security_type_33(2) if version == b"3.3" else wire.security_types(2)
    data = wire.greeting(version) + offer + wire.vnc_challenge(challenge)
    outcome = run_both(lambda: ClientConnection(password=password), data)
    assert outcome.error is None
    choice = b"" if version == b"3.3" else b"\x02"
    assert outcome.output == wire.greeting(version) + choice + cipher + cipher
    assert outcome.state is State.SECURITY_RESULT

    # The result then lets the client on to ServerInit.
    conn = ClientConnection(password=password)
    wire.feed_all(conn, data + wire.security_result_ok() + wire.server_init())
    assert conn.state is State.CONNECTED
    assert conn.security_description == "VNC_AUTH"


def test_vnc_auth_response_mixed_blocks() -> None:
    (key, plain1, cipher1), (_, plain2, _) = VNC_VECTORS[0], VNC_VECTORS[1]
    conn = ClientConnection(password=password_for_des_key(key))
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_types(2) + plain2 + plain1)
    response = conn.data_to_send()[len(b"RFB 003.008\n\x02") :]
    assert len(response) == 16
    assert response[8:] == cipher1


def test_vnc_auth_failure_38_carries_reason() -> None:
    data = (
        wire.greeting(b"3.8")
        + wire.security_types(2)
        + wire.vnc_challenge()
        + wire.security_result_failed(b"Authentication failure: wrong password")
    )
    outcome = run_both(lambda: ClientConnection(password="secret"), data)
    assert outcome.error is not None
    kind, message = outcome.error
    assert kind is AuthenticationFailed
    assert "Authentication failure: wrong password" in message
    assert "VNC_AUTH" in message
    assert outcome.state is State.CLOSED


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        # QEMU counts the NUL that ends its C string (ui/vnc.c, sizeof).
        (b"Authentication failed\0", "rejected our credentials (VNC_AUTH): Authentication failed"),
        (b"bad\r\n\x1b[31mred\0\0", "(VNC_AUTH): bad\\r\\n\\x1b[31mred"),
        ("mot de passe refusé".encode(), "(VNC_AUTH): mot de passe refusé"),
        (b"refus\xe9", "(VNC_AUTH): refusé"),  # Latin-1
    ],
)
def test_failure_reason_shown_without_nul_or_controls(reason: bytes, shown: str) -> None:
    data = (
        wire.greeting(b"3.8")
        + wire.security_types(2)
        + wire.vnc_challenge()
        + wire.security_result_failed(reason)
    )
    outcome = run_both(lambda: ClientConnection(password="secret"), data)
    assert outcome.error is not None
    assert outcome.error[1].endswith(shown)


@pytest.mark.parametrize("version", [b"3.3", b"3.7"])
def test_vnc_auth_failure_without_reason(version: bytes) -> None:
    offer = wire.security_type_33(2) if version == b"3.3" else wire.security_types(2)
    # No reason follows on 3.3/3.7: the client must fail at once, not wait for one.
    data = wire.greeting(version) + offer + wire.vnc_challenge() + wire.security_result_failed()
    outcome = run_both(lambda: ClientConnection(password="secret"), data)
    assert outcome.error is not None
    assert outcome.error[0] is AuthenticationFailed
    assert "rejected our credentials" in outcome.error[1]


def test_too_many_attempts_33() -> None:
    data = (
        wire.greeting(b"3.3")
        + wire.security_type_33(2)
        + wire.vnc_challenge()
        + wire.security_result_failed(code=2)
    )
    outcome = run_both(lambda: ClientConnection(password="pw"), data)
    assert outcome.error is not None
    assert outcome.error[0] is AuthenticationFailed
    assert "too many attempts" in outcome.error[1]


def test_security_none_rejected_by_result_38() -> None:
    data = wire.greeting(b"3.8") + wire.security_types(1) + wire.security_result_failed(b"busy")
    outcome = run_both(ClientConnection, data)
    assert outcome.error == (
        AuthenticationFailed,
        "the server rejected our credentials (NONE): busy",
    )


def test_failure_reason_over_limit() -> None:
    data = (
        wire.greeting(b"3.8")
        + wire.security_types(1)
        + wire.u32(1)
        + wire.u32(MAX_REASON_LENGTH + 1)
    )
    outcome = run_both(ClientConnection, data)
    assert outcome.error is not None
    assert outcome.error[0] is RemoteProtocolError
    assert "failure reason" in outcome.error[1]


@pytest.mark.parametrize("version", [b"3.3", b"3.8"])
def test_missing_password_when_only_vnc_auth_offered(version: bytes) -> None:
    offer = wire.security_type_33(2) if version == b"3.3" else wire.security_types(2)
    outcome = run_both(ClientConnection, wire.greeting(version) + offer)
    assert outcome.error is not None
    assert outcome.error[0] is AuthenticationFailed
    assert "password" in outcome.error[1]
    assert outcome.output == wire.greeting(version)  # chose nothing


# ---------------------------------------------------------------------------
# The server refusing, and policy refusals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [b"3.7", b"3.8"])
def test_server_refuses_with_reason(version: bytes) -> None:
    data = wire.greeting(version) + wire.security_refused(b"Too many security failures")
    outcome = run_both(ClientConnection, data)
    assert outcome.error == (
        SecurityNegotiationFailed,
        "the server refused the connection: Too many security failures",
    )


def test_server_refuses_with_reason_33() -> None:
    data = wire.greeting(b"3.3") + wire.security_refused_33(b"go away")
    outcome = run_both(ClientConnection, data)
    assert outcome.error == (
        SecurityNegotiationFailed,
        "the server refused the connection: go away",
    )


def test_33_server_choosing_another_type() -> None:
    outcome = run_both(ClientConnection, wire.greeting(b"3.3") + wire.security_type_33(19))
    assert outcome.error is not None
    assert outcome.error[0] is RemoteProtocolError
    assert "security type 19" in outcome.error[1]


@pytest.mark.parametrize("offered", [(1,), (2,), (1, 2), (2, 1, 16)])
def test_tls_required_never_falls_back(offered: tuple[int, ...]) -> None:
    data = wire.greeting(b"3.8") + wire.security_types(*offered)
    outcome = run_both(lambda: ClientConnection(password="pw", tls_mode=TlsMode.REQUIRE), data)
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "TLS was required" in outcome.error[1]
    assert outcome.output == b"RFB 003.008\n"  # no security type chosen


@pytest.mark.parametrize("number", [1, 2])
def test_tls_required_refuses_33(number: int) -> None:
    data = wire.greeting(b"3.3") + wire.security_type_33(number)
    outcome = run_both(lambda: ClientConnection(password="pw", tls_mode=TlsMode.REQUIRE), data)
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "TLS was required" in outcome.error[1]
    assert outcome.output == b"RFB 003.003\n"


def test_only_sasl_offered_is_refused_clearly() -> None:
    outcome = run_both(ClientConnection, wire.greeting(b"3.8") + wire.security_types(20))
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "SASL" in outcome.error[1]


def test_unknown_security_types_are_refused() -> None:
    outcome = run_both(ClientConnection, wire.greeting(b"3.8") + wire.security_types(5, 16, 200))
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "RA2, TIGHT, 200" in outcome.error[1]


# ---------------------------------------------------------------------------
# VeNCrypt up to the subtype choice
# ---------------------------------------------------------------------------

S = VeNCryptSubtype


def vencrypt_prefix(*subtypes: int) -> bytes:
    return (
        wire.greeting(b"3.8")
        + wire.security_types(1, 2, 19)
        + wire.vencrypt_version()
        + wire.vencrypt_ack()
        + wire.vencrypt_subtypes(*subtypes)
    )


@dataclass
class VeNCryptCase:
    offered: tuple[int, ...]
    chosen: int
    options: dict[str, Any] = field(default_factory=dict)


VENCRYPT_CASES = [
    VeNCryptCase((S.X509_VNC, S.X509_NONE, S.PLAIN), S.X509_VNC, {"password": "pw"}),
    VeNCryptCase((S.X509_VNC, S.X509_NONE, S.PLAIN), S.X509_NONE),
    VeNCryptCase(
        (S.PLAIN, S.X509_PLAIN, S.X509_VNC), S.X509_PLAIN, {"password": "pw", "username": "u"}
    ),
    VeNCryptCase((S.TLS_NONE, S.TLS_VNC, S.X509_NONE), S.X509_NONE, {"password": "pw"}),
    VeNCryptCase((S.TLS_NONE, S.TLS_VNC), S.TLS_VNC, {"password": "pw"}),
    VeNCryptCase((S.TLS_NONE, S.TLS_VNC), S.TLS_NONE),
    VeNCryptCase((S.TLS_SASL, S.X509_SASL, S.TLS_NONE), S.TLS_NONE),
    VeNCryptCase((999, S.X509_NONE), S.X509_NONE),
    VeNCryptCase(
        (S.TLS_NONE, S.X509_NONE), S.X509_NONE, {"tls_mode": TlsMode.REQUIRE}
    ),  # never the anonymous one when certificates are required
    VeNCryptCase(
        (S.TLS_VNC,),
        S.TLS_VNC,
        {"tls_mode": TlsMode.REQUIRE, "allow_anonymous_tls": True, "password": "pw"},
    ),
]


@pytest.mark.parametrize("case", VENCRYPT_CASES)
def test_vencrypt_subtype_choice(case: VeNCryptCase) -> None:
    data = vencrypt_prefix(*case.offered)
    outcome = run_both(lambda: ClientConnection(**case.options), data)
    assert outcome.error is None
    # 19 = VeNCrypt; version 0.2; the chosen subtype as u32.
    assert outcome.output == b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + wire.u32(case.chosen)
    assert outcome.state is State.VENCRYPT_ACCEPT


def test_vencrypt_chosen_over_none_and_vnc_in_auto_mode() -> None:
    conn = ClientConnection(password="pw")
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_types(1, 2, 19))
    assert conn.data_to_send() == b"RFB 003.008\n\x13"
    assert conn.state is State.VENCRYPT_VERSION


def test_vencrypt_not_chosen_when_tls_is_never() -> None:
    conn = ClientConnection(password="pw", tls_mode=TlsMode.NEVER)
    wire.feed_all(conn, wire.greeting(b"3.8") + wire.security_types(19, 2))
    assert conn.data_to_send() == b"RFB 003.008\n\x02"


def test_vencrypt_x509_vnc_subtype_bytes() -> None:
    conn = ClientConnection(password="pw")
    wire.feed_all(conn, vencrypt_prefix(S.X509_VNC, S.X509_NONE, S.PLAIN))
    assert conn.data_to_send()[-4:] == bytes.fromhex("00000105")  # 261
    assert conn.vencrypt_subtype is S.X509_VNC
    assert conn.security_description == "VENCRYPT/X509_VNC"


@pytest.mark.parametrize(
    ("offered", "options", "error", "match"),
    [
        ((S.PLAIN,), {"password": "pw", "username": "u"}, SecurityNegotiationFailed, "unencrypted"),
        ((S.X509_SASL, S.TLS_SASL), {}, SecurityNegotiationFailed, "SASL is not supported"),
        ((S.X509_SASL,), {}, SecurityNegotiationFailed, "X509_SASL"),
        ((S.TLS_SASL,), {}, SecurityNegotiationFailed, "TLS_SASL"),
        ((S.TLS_NONE, S.TLS_VNC), {"tls_mode": TlsMode.REQUIRE}, SecurityNegotiationFailed, "TLS"),
        ((S.X509_VNC,), {}, AuthenticationFailed, "missing credentials"),
        ((S.X509_PLAIN,), {"password": "pw"}, AuthenticationFailed, "X509_PLAIN"),
        ((999, 1000), {}, SecurityNegotiationFailed, "none known"),
    ],
)
def test_vencrypt_subtype_refused(
    offered: tuple[int, ...], options: dict[str, Any], error: type[Exception], match: str
) -> None:
    outcome = run_both(lambda: ClientConnection(**options), vencrypt_prefix(*offered))
    assert outcome.error is not None
    assert outcome.error[0] is error
    assert match in outcome.error[1]
    # Nothing was chosen: the output stops after the version.
    assert outcome.output == b"RFB 003.008\n\x13\x00\x02"


def test_vencrypt_version_01_refused() -> None:
    data = wire.greeting(b"3.8") + wire.security_types(19) + wire.vencrypt_version(0, 1)
    outcome = run_both(ClientConnection, data)
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "VeNCrypt 0.1" in outcome.error[1]
    assert outcome.output == b"RFB 003.008\n\x13"


def test_vencrypt_newer_server_version_answered_with_02() -> None:
    conn = ClientConnection()
    wire.feed_all(
        conn, wire.greeting(b"3.8") + wire.security_types(19) + wire.vencrypt_version(0, 3)
    )
    assert conn.data_to_send() == b"RFB 003.008\n\x13\x00\x02"


def test_vencrypt_version_not_acknowledged() -> None:
    data = (
        wire.greeting(b"3.8")
        + wire.security_types(19)
        + wire.vencrypt_version()
        + wire.vencrypt_ack(ok=False)
    )
    outcome = run_both(ClientConnection, data)
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed


def test_vencrypt_no_subtypes() -> None:
    outcome = run_both(ClientConnection, vencrypt_prefix())
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "no VeNCrypt subtypes" in outcome.error[1]


def test_vencrypt_subtype_not_accepted() -> None:
    data = vencrypt_prefix(S.X509_NONE) + wire.vencrypt_accept(ok=False)
    outcome = run_both(ClientConnection, data)
    assert outcome.error is not None
    assert outcome.error[0] is SecurityNegotiationFailed
    assert "X509_NONE" in outcome.error[1] or "260" in outcome.error[1]


def test_vencrypt_accept_starts_tls() -> None:
    conn = ClientConnection(tls=TlsCredentials(verify=False))
    wire.feed_all(conn, vencrypt_prefix(S.X509_NONE))
    conn.data_to_send()
    assert wire.feed_all(conn, wire.vencrypt_accept()) == []
    assert conn.state is State.TLS_HANDSHAKE
    hello = conn.data_to_send()
    # A TLS record: content type 22 (handshake), version 3.x, then a ClientHello (1).
    assert hello[0] == 22
    assert hello[1] == 3
    assert hello[5] == 1
    # The server hanging up now is a TLS failure.
    conn.receive_data(b"")
    with pytest.raises(TlsError):
        conn.next_event()
    assert conn.state is State.CLOSED


# ---------------------------------------------------------------------------
# EOF during the handshake
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("received", "options", "state"),
    [
        (b"", {}, "waiting for the server's ProtocolVersion"),
        (b"RFB 003.0", {}, "waiting for the server's ProtocolVersion"),
        (wire.greeting(b"3.8"), {}, "waiting for the list of security types"),
        (wire.greeting(b"3.8") + b"\x02\x01", {}, "waiting for the list of security types"),
        (wire.greeting(b"3.3") + b"\0\0", {}, "waiting for the security type (3.3)"),
        (
            wire.greeting(b"3.8") + wire.security_types(2) + b"\0" * 15,
            {"password": "pw"},
            "waiting for the VNC authentication challenge",
        ),
        (
            wire.greeting(b"3.8") + wire.security_types(1),
            {},
            "waiting for the SecurityResult",
        ),
        (
            wire.greeting(b"3.8") + wire.security_none(b"3.8"),
            {},
            "waiting for ServerInit",
        ),
        (
            wire.greeting(b"3.8") + wire.security_none(b"3.8") + wire.server_init()[:-1],
            {},
            "waiting for ServerInit",
        ),
        (
            wire.greeting(b"3.8") + wire.security_types(19),
            {},
            "waiting for the VeNCrypt version",
        ),
        (
            wire.greeting(b"3.8") + wire.security_types(19) + wire.vencrypt_version(),
            {},
            "waiting for the VeNCrypt version acknowledgement",
        ),
        (
            wire.greeting(b"3.8")
            + wire.security_types(19)
            + wire.vencrypt_version()
            + wire.vencrypt_ack(),
            {},
            "waiting for the VeNCrypt subtypes",
        ),
        (vencrypt_prefix(S.X509_NONE), {}, "waiting for the VeNCrypt subtype acceptance"),
    ],
)
def test_eof_during_handshake(received: bytes, options: dict[str, Any], state: str) -> None:
    outcome = run_both(lambda: ClientConnection(**options), received, eof=True)
    assert outcome.error == (
        ConnectionClosed,
        f"the server closed the connection while {state}",
    )
    assert outcome.state is State.CLOSED


def test_eof_during_handshake_keeps_failing() -> None:
    conn = ClientConnection()
    conn.receive_data(wire.greeting())
    conn.receive_data(b"")
    with pytest.raises(ConnectionClosed, match="security types"):
        conn.next_event()
    with pytest.raises(ConnectionClosed, match="security types"):
        conn.next_event()


# ---------------------------------------------------------------------------
# Whole handshakes: whole and byte by byte give the same result
# ---------------------------------------------------------------------------


def _vnc_38() -> tuple[Callable[[], ClientConnection], bytes]:
    data = (
        wire.greeting(b"3.8")
        + wire.security_types(2)
        + wire.vnc_challenge()
        + wire.security_result_ok()
        + wire.server_init(name=b"vnc")
    )
    return lambda: ClientConnection(password="pw"), data


def _audio_37() -> tuple[Callable[[], ClientConnection], bytes]:
    data = wire.greeting(b"3.7") + wire.security_none(b"3.7") + wire.server_init()
    # ServerInit followed at once by the audio ack and a bell.
    data += wire.fbu(wire.rect(0, 0, 640, 480, -259)) + wire.bell()
    return lambda: ClientConnection(extensions=[QemuAudio()]), data


@pytest.mark.parametrize("scenario", [_vnc_38, _audio_37])
def test_full_handshake_whole_equals_bytewise(
    scenario: Callable[[], tuple[Callable[[], ClientConnection], bytes]],
) -> None:
    make, data = scenario()
    outcome = run_both(make, data)
    assert outcome.error is None
    assert isinstance(outcome.events[0], Connected)
    assert outcome.state is State.CONNECTED


def test_audio_handshake_output() -> None:
    make, data = _audio_37()
    outcome = run_both(make, data)
    assert outcome.output == (
        b"RFB 003.007\n\x01"
        + CLIENT_INIT_SHARED
        + AUDIO_SET_ENCODINGS
        + bytes.fromhex("ff 01 0002 03 02 0000ac44")
        + bytes.fromhex("ff 01 0000")
    )
