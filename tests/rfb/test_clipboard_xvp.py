"""Extended Clipboard cut text, xvp server messages and refused long pastes.

Wire vectors are packed by hand from rfbproto ("Extended Clipboard
Pseudo-Encoding", "xvp Server Message") in both directions; each is fed whole,
a byte at a time and with trailing bytes; hypothesis checks that any bytes give
events or `RemoteProtocolError`, within bounded memory, and that messages
round-trip.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.errors import ConfigurationError, LocalProtocolError, RemoteProtocolError
from resourced.rfb import clipboard
from resourced.rfb.connection import ClientConnection
from resourced.rfb.constants import (
    MAX_CUT_TEXT_LENGTH,
    Encoding,
    ExtendedClipboardFlag,
    XvpCode,
)
from resourced.rfb.messages import (
    ClientCutText,
    ExtendedClientCutText,
    ExtendedServerCutText,
    KeyEvent,
    ServerCutText,
    SetEncodings,
    XvpServerMessage,
)
from resourced.rfb.server import ClientCutTextRefused, ServerConnection, ServerSecurity

from . import wire
from .test_server import CONNECTED_EVENTS, connected_server
from .wire import traced_peak

TEXT = ExtendedClipboardFlag.TEXT
CAPS = ExtendedClipboardFlag.CAPS
NOTIFY = ExtendedClipboardFlag.NOTIFY
REQUEST = ExtendedClipboardFlag.REQUEST
PROVIDE = ExtendedClipboardFlag.PROVIDE
MIB = 1024 * 1024
FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], max_examples=400
)


def extended(kind: int, flags: int, payload: bytes = b"") -> bytes:
    """A cut text message in its extended form: negative length, flags, payload."""
    return wire.u8(kind) + b"\0\0\0" + wire.s32(-(4 + len(payload))) + wire.u32(flags) + payload


def xvp(version: int, code: int) -> bytes:
    return wire.u8(250) + b"\0" + wire.u8(version) + wire.u8(code)


def client(*encodings: int) -> ClientConnection:
    conn = wire.connected()
    conn.send(SetEncodings(encodings))
    conn.data_to_send()
    return conn


def viewer_server(*encodings: int, **options: Any) -> ServerConnection:
    server = connected_server(**options)
    assert feed(server, SetEncodings(encodings).serialize()) == [SetEncodings(encodings)]
    return server


def feed(server: ServerConnection, data: bytes) -> list[Any]:
    server.receive_data(data)
    return list(server.events())


# ---------------------------------------------------------------------------
# Server -> client
# ---------------------------------------------------------------------------

# QEMU's own messages (ui/vnc-clipboard.c): caps with one text size, notify, request.
QEMU_CAPS = extended(3, int(CAPS | NOTIFY | REQUEST | PROVIDE | TEXT), wire.u32(0))
SERVER_VECTORS = [
    (QEMU_CAPS, ExtendedServerCutText(int(CAPS | NOTIFY | REQUEST | PROVIDE | TEXT), bytes(4))),
    (extended(3, int(NOTIFY | TEXT)), ExtendedServerCutText(int(NOTIFY | TEXT))),
    (extended(3, int(REQUEST | TEXT)), ExtendedServerCutText(int(REQUEST | TEXT))),
    (
        extended(3, int(PROVIDE | TEXT), b"zlib bytes"),
        ExtendedServerCutText(int(PROVIDE | TEXT), b"zlib bytes"),
    ),
    (xvp(1, 1), XvpServerMessage(1, XvpCode.INIT)),
    (xvp(1, 0), XvpServerMessage(1, XvpCode.FAIL)),
    (xvp(7, 9), XvpServerMessage(7, 9)),  # framed, not judged
]


@pytest.mark.parametrize(("data", "message"), SERVER_VECTORS)
def test_server_vectors(data: bytes, message: Any) -> None:
    both = (Encoding.EXTENDED_CLIPBOARD, Encoding.XVP)
    assert wire.feed_all(client(*both), data) == [message]
    assert wire.feed_bytewise(client(*both), data) == [message]
    assert wire.feed_with_trailing(client(*both), data, b"\x03\0") == [message]
    assert message.serialize() == data


def test_plain_cut_text_still_plain_with_extended_clipboard() -> None:
    conn = client(Encoding.EXTENDED_CLIPBOARD)
    assert wire.feed_all(conn, wire.server_cut_text(b"plain")) == [ServerCutText(b"plain")]


@pytest.mark.parametrize(
    ("advertised", "data", "match"),
    [
        ((), extended(3, int(NOTIFY | TEXT)), "never advertised"),
        ((Encoding.EXTENDED_CLIPBOARD,), xvp(1, 1), "never advertised xvp"),
        ((Encoding.EXTENDED_CLIPBOARD,), wire.u8(3) + b"\0\0\0" + wire.s32(-3), "shorter"),
        (
            (Encoding.EXTENDED_CLIPBOARD,),
            wire.u8(3) + b"\0\0\0" + wire.s32(-(MAX_CUT_TEXT_LENGTH + 1)),
            "exceeds",
        ),
        ((Encoding.EXTENDED_CLIPBOARD,), wire.u8(3) + b"\0\0\0" + wire.s32(-(2**31)), "exceeds"),
    ],
)
def test_bad_server_messages(advertised: tuple[int, ...], data: bytes, match: str) -> None:
    conn = client(*advertised)
    with pytest.raises(RemoteProtocolError, match=match):
        wire.feed_all(conn, data)


def test_extended_message_after_the_encoding_was_dropped_is_still_framed() -> None:
    """QEMU may have sent it before it read the SetEncodings without the encoding."""
    conn = client(Encoding.EXTENDED_CLIPBOARD, Encoding.XVP)
    conn.send(SetEncodings((0,)))
    assert wire.feed_all(conn, extended(3, int(NOTIFY)) + xvp(1, 1)) == [
        ExtendedServerCutText(int(NOTIFY)),
        XvpServerMessage(1, 1),
    ]


def test_extended_at_limit_is_accepted() -> None:
    payload = bytes(MAX_CUT_TEXT_LENGTH - 4)
    conn = client(Encoding.EXTENDED_CLIPBOARD)
    assert wire.feed_all(conn, extended(3, int(PROVIDE | TEXT), payload)) == [
        ExtendedServerCutText(int(PROVIDE | TEXT), payload)
    ]


def test_extended_over_limit_refuses_to_serialize() -> None:
    with pytest.raises(LocalProtocolError):
        ExtendedServerCutText(0, bytes(MAX_CUT_TEXT_LENGTH - 3)).serialize()
    with pytest.raises(LocalProtocolError):
        ExtendedClientCutText(0, bytes(MAX_CUT_TEXT_LENGTH - 3)).serialize()


# ---------------------------------------------------------------------------
# Client -> server
# ---------------------------------------------------------------------------

CLIENT_VECTORS = [
    (
        extended(6, int(CAPS | TEXT), wire.u32(1 << 20)),
        ExtendedClientCutText(int(CAPS | TEXT), wire.u32(1 << 20)),
    ),
    (extended(6, int(NOTIFY | TEXT)), ExtendedClientCutText(int(NOTIFY | TEXT))),
    (extended(6, int(NOTIFY)), ExtendedClientCutText(int(NOTIFY))),
    (extended(6, int(PROVIDE | TEXT), b"z"), ExtendedClientCutText(int(PROVIDE | TEXT), b"z")),
    (wire.u8(6) + b"\0\0\0" + wire.string(b"plain"), ClientCutText(b"plain")),
]


@pytest.mark.parametrize(("data", "message"), CLIENT_VECTORS)
def test_client_vectors(data: bytes, message: Any) -> None:
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD)
    assert feed(server, data) == [message]
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD)
    events = [event for byte in data for event in feed(server, bytes([byte]))]
    assert events == [message]
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD)
    assert feed(server, data + b"\x06\0\0") == [message]
    assert message.serialize() == data


def test_extended_from_a_client_that_dropped_the_encoding_is_refused() -> None:
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD)
    feed(server, SetEncodings((0,)).serialize())
    with pytest.raises(RemoteProtocolError, match="never advertised"):
        feed(server, extended(6, int(NOTIFY)))


@pytest.mark.parametrize("is_extended", [False, True])
def test_long_cut_text_is_skipped_as_it_arrives(is_extended: bool) -> None:
    """Over `max_cut_text`: one event, the bytes dropped as they come, then the
    next message is read as usual."""
    limit = 1000
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD, max_cut_text=limit)
    body = bytes(range(256)) * 40  # 10240 bytes
    if is_extended:
        data = extended(6, int(PROVIDE | TEXT), body[4:])
    else:
        data = wire.u8(6) + b"\0\0\0" + wire.string(body)
    key = KeyEvent(True, 0x61).serialize()
    events = feed(server, data[:100])
    assert events == [ClientCutTextRefused(len(body), is_extended, limit)]
    for at in range(100, len(data), 777):
        assert feed(server, data[at : at + 777]) == []
        assert server.buffered < 1000
    assert feed(server, key) == [KeyEvent(True, 0x61)]
    # At the limit it is taken.
    assert feed(server, wire.u8(6) + b"\0\0\0" + wire.string(bytes(limit))) == [
        ClientCutText(bytes(limit))
    ]


def test_eof_inside_a_skipped_cut_text_is_an_error() -> None:
    server = viewer_server(max_cut_text=10)
    assert feed(server, wire.u8(6) + b"\0\0\0" + wire.u32(100) + bytes(50)) == [
        ClientCutTextRefused(100, False, 10)
    ]
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="50 bytes of it missing"):
        list(server.events())


def test_max_cut_text_is_bounded() -> None:
    with pytest.raises(ConfigurationError):
        ServerConnection(ServerSecurity(allow_none=True), max_cut_text=MAX_CUT_TEXT_LENGTH + 1)


# ---------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------


def test_caps_round_trip() -> None:
    flags = int(CAPS | TEXT | ExtendedClipboardFlag.HTML)
    payload = clipboard.caps_payload({int(TEXT): 1 << 20, int(ExtendedClipboardFlag.HTML): 7})
    assert payload == wire.u32(1 << 20) + wire.u32(7)
    assert clipboard.parse_caps(flags, payload) == {1: 1 << 20, 4: 7}
    with pytest.raises(RemoteProtocolError):
        clipboard.parse_caps(flags, payload[:5])


def test_provide_matches_the_spec_layout() -> None:
    """zlib of u32 size + bytes per format, in bit order (here: what QEMU sends)."""
    payload = clipboard.provide_payload({int(TEXT): b"hello\0"})
    assert zlib.decompress(payload) == wire.u32(6) + b"hello\0"
    assert clipboard.parse_provide(int(PROVIDE | TEXT), payload) == {1: b"hello\0"}
    qemu_style = zlib.compress(struct.pack("!I", 3) + b"abc")
    assert clipboard.parse_provide(int(PROVIDE | TEXT), qemu_style) == {1: b"abc"}


def test_inflate_is_bounded() -> None:
    bomb = zlib.compress(bytes(10 * MIB), 9)  # ~10 KB that inflate to 10 MiB
    with traced_peak() as peak:
        assert clipboard.inflate(bomb, MIB) is None
    assert peak[0] < 3 * MIB
    assert clipboard.inflate(zlib.compress(bytes(MIB)), MIB) == bytes(MIB)
    with pytest.raises(RemoteProtocolError, match="zlib"):
        clipboard.inflate(b"not zlib", MIB)
    with pytest.raises(RemoteProtocolError, match="inflates past"):
        clipboard.parse_provide(int(PROVIDE | TEXT), bomb, MIB)


@pytest.mark.parametrize(
    ("raw", "match"),
    [(b"", "missing"), (wire.u32(10) + b"short", "claims 10 bytes")],
)
def test_bad_provide(raw: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        clipboard.parse_provide(int(PROVIDE | TEXT), zlib.compress(raw))


# ---------------------------------------------------------------------------
# Fuzz
# ---------------------------------------------------------------------------

u32s = st.integers(0, 2**32 - 1)
flags = st.one_of(u32s, st.sampled_from([int(f) for f in ExtendedClipboardFlag]))
server_messages = st.one_of(
    st.builds(ExtendedServerCutText, flags, st.binary(max_size=64)),
    st.builds(XvpServerMessage, st.integers(0, 255), st.integers(0, 255)),
)
client_messages = st.builds(ExtendedClientCutText, flags, st.binary(max_size=64))


@FUZZ
@given(server_messages)
def test_server_round_trip(message: Any) -> None:
    conn = client(Encoding.EXTENDED_CLIPBOARD, Encoding.XVP)
    assert wire.feed_all(conn, message.serialize()) == [message]


@FUZZ
@given(client_messages)
def test_client_round_trip(message: ExtendedClientCutText) -> None:
    assert feed(viewer_server(Encoding.EXTENDED_CLIPBOARD), message.serialize()) == [message]


headers = st.one_of(
    st.builds(lambda n: wire.u8(3) + b"\0\0\0" + wire.s32(n), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda n: wire.u8(3) + b"\0\0\0" + wire.s32(-n), st.integers(0, 64)),
    st.builds(lambda v, c: xvp(v, c), st.integers(0, 255), st.integers(0, 255)),
    server_messages.map(lambda m: m.serialize()),
    st.binary(max_size=16),
)


@FUZZ
@given(st.lists(headers, max_size=12).map(b"".join), st.booleans())
def test_client_survives_any_clipboard_bytes(data: bytes, advertise: bool) -> None:
    conn = client(*((Encoding.EXTENDED_CLIPBOARD, Encoding.XVP) if advertise else ()))
    with traced_peak() as peak:
        try:
            wire.feed_bytewise(conn, data) if len(data) < 200 else wire.feed_all(conn, data)
        except RemoteProtocolError as err:
            error: RemoteProtocolError | None = err
        else:
            error = None
    assert error is None or str(error)
    assert peak[0] < 4 * len(data) + 2 * MIB


client_headers = st.one_of(
    st.builds(lambda n: wire.u8(6) + b"\0\0\0" + wire.s32(n), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda n: wire.u8(6) + b"\0\0\0" + wire.s32(-n), st.integers(0, 64)),
    client_messages.map(lambda m: m.serialize()),
    st.binary(max_size=16),
)


@FUZZ
@given(st.lists(client_headers, max_size=12).map(b"".join), st.integers(0, 64))
def test_server_survives_any_clipboard_bytes(data: bytes, limit: int) -> None:
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD, max_cut_text=limit)
    with traced_peak() as peak:
        try:
            for event in feed(server, data) if data else []:
                assert isinstance(event, (*CONNECTED_EVENTS, ExtendedClientCutText)), event
                if isinstance(event, ClientCutText | ExtendedClientCutText):
                    assert len(event.serialize()) - 8 <= limit
        except RemoteProtocolError as err:
            error: RemoteProtocolError | None = err
        else:
            error = None
    assert error is None or str(error)
    assert peak[0] < 4 * len(data) + 2 * MIB


@pytest.mark.parametrize("length", [-1, -3])
def test_client_extended_shorter_than_its_flags_is_refused(length: int) -> None:
    server = viewer_server(Encoding.EXTENDED_CLIPBOARD)
    with pytest.raises(RemoteProtocolError, match="shorter than its flags"):
        feed(server, wire.u8(6) + b"\0\0\0" + wire.s32(length))
