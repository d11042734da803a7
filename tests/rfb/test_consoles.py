"""The console extension (docs/protocol/console-extension.md): messages and client half.

Wire vectors are written by hand from the spec (its section 8 example and the
layouts of sections 4 and 5); server bytes fed to the client are packed here with
`struct` (via `wire`), never with the `serialize()` methods under test. The client
half (`Consoles` on a `ClientConnection`) is driven sans-IO: server bytes in,
events and `data_to_send()` out. Then a hostile-input fuzz with a memory bound,
and the client talking to a real `ServerConnection` in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.consoles import ConsoleKind
from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import Reader
from resourced.rfb.connection import CORE_PSEUDO_ENCODINGS, ClientConnection, State
from resourced.rfb.consoles import (
    CloseReason,
    ConsoleAdded,
    ConsoleBreak,
    ConsoleClose,
    ConsoleClosed,
    ConsoleCredit,
    ConsoleData,
    ConsoleGrant,
    ConsoleInfo,
    ConsoleMark,
    ConsoleOpen,
    ConsoleOpened,
    ConsoleRemoved,
    Consoles,
    ConsolesAnnounced,
    ConsoleWrite,
    MarkKind,
    parse_client_message,
    parse_server_message,
)
from resourced.rfb.events import Connected, ServerClosed
from resourced.rfb.messages import Bell, FramebufferUpdate, SetEncodings
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.server import ClientInitReceived, ServerConnection, ServerSecurity

from . import wire
from .wire import traced_peak

MAX_U32 = 0xFFFFFFFF
MIB = 1024 * 1024

#: Makes a client (with its `Consoles`) in some state.
Setup = Callable[[], tuple[ClientConnection, Consoles]]

# ---------------------------------------------------------------------------
# Server bytes, packed by hand from sections 4.1-4.8 of the spec
# ---------------------------------------------------------------------------


def server_message(op: int, body: bytes) -> bytes:
    """U8 255, U8 2, U8 op, then the body."""
    return wire.u8(255) + wire.u8(2) + wire.u8(op) + body


def console(console_id: int, kind: int, flags: int, name: bytes) -> bytes:
    """CONSOLE: U32 id, U8 kind, U8 flags, U8 name length, name."""
    return wire.u32(console_id) + wire.u8(kind) + wire.u8(flags) + wire.u8(len(name)) + name


def hello(
    *consoles: bytes,
    version: int = 1,
    flags: int = 0,
    max_data: int = 65536,
    count: int | None = None,
) -> bytes:
    n = len(consoles) if count is None else count
    head = wire.u8(version) + wire.u8(flags) + wire.u16(n) + wire.u32(max_data)
    return server_message(0, head + b"".join(consoles))


def added(console_id: int, kind: int, flags: int, name: bytes) -> bytes:
    return server_message(1, console(console_id, kind, flags, name))


def removed(console_id: int) -> bytes:
    return server_message(2, wire.u32(console_id))


def opened(console_id: int, credit: int, history_length: int = 0) -> bytes:
    return server_message(3, wire.u32(console_id) + wire.u32(credit) + wire.u32(history_length))


def data(console_id: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return server_message(4, wire.u32(console_id) + wire.u32(size) + payload)


def closed(console_id: int, reason: int, message: bytes = b"", length: int | None = None) -> bytes:
    size = len(message) if length is None else length
    return server_message(5, wire.u32(console_id) + wire.u8(reason) + wire.u16(size) + message)


def credit(console_id: int, increment: int) -> bytes:
    return server_message(6, wire.u32(console_id) + wire.u32(increment))


# Client bytes, sections 5.1-5.5.


def client_message(op: int, body: bytes) -> bytes:
    return wire.u8(255) + wire.u8(2) + wire.u8(op) + body


def open_bytes(console_id: int, window: int, max_data: int, history: bool) -> bytes:
    body = wire.u32(console_id) + wire.u32(window) + wire.u32(max_data)
    return client_message(0, body + wire.u8(1 if history else 0))


def close_bytes(console_id: int) -> bytes:
    return client_message(1, wire.u32(console_id))


def write_bytes(console_id: int, payload: bytes) -> bytes:
    return client_message(2, wire.u32(console_id) + wire.u32(len(payload)) + payload)


def break_bytes(console_id: int) -> bytes:
    return client_message(3, wire.u32(console_id))


def grant_bytes(console_id: int, increment: int) -> bytes:
    return client_message(4, wire.u32(console_id) + wire.u32(increment))


SERIAL0 = console(1, 0, 1, b"serial0")
MONITOR = console(2, 3, 1, b"monitor")
SERIAL0_INFO = ConsoleInfo(1, ConsoleKind.SERIAL, "serial0", True)
MONITOR_INFO = ConsoleInfo(2, ConsoleKind.MONITOR, "monitor", True)
TWO_CONSOLES = ConsolesAnnounced(1, 65536, (SERIAL0_INFO, MONITOR_INFO))

# ---------------------------------------------------------------------------
# 1. Wire vectors, both ways, written by hand from the spec
# ---------------------------------------------------------------------------

H = bytes.fromhex

SERVER_VECTORS: list[tuple[bytes, Any]] = [
    # Section 8: HELLO v1, 2 consoles, max_data 65536.
    (
        H("ff 02 00  01 00 0002 00010000")
        + H("00000001 00 01 07")
        + b"serial0"
        + H("00000002 03 01 07")
        + b"monitor",
        TWO_CONSOLES,
    ),
    (H("ff 02 00  01 00 0000 00000400"), ConsolesAnnounced(1, 1024, ())),
    (
        H("ff 02 01  00000003 04 00 08") + b"channel0",
        ConsoleAdded(ConsoleInfo(3, ConsoleKind.CHANNEL, "channel0", False)),
    ),
    (
        H("ff 02 01  0000002a 01 01 06") + b"tty-\xc3\xa9",
        ConsoleAdded(ConsoleInfo(42, ConsoleKind.VIRTIO_CONSOLE, "tty-\u00e9", True)),
    ),
    (
        H("ff 02 01  fffffffe 02 00 03") + b"lp0",
        ConsoleAdded(ConsoleInfo(0xFFFFFFFE, ConsoleKind.PARALLEL, "lp0", False)),
    ),
    (H("ff 02 02  00000002"), ConsoleRemoved(2)),
    # Section 8: OPENED 1, credit 4096, 22 bytes of history.
    (H("ff 02 03  00000001 00001000 00000016"), ConsoleOpened(1, 4096, 22)),
    (
        H("ff 02 04  00000001 00000016") + b"resourced demo guest\r\n",
        ConsoleData(1, b"resourced demo guest\r\n"),
    ),
    (H("ff 02 04  00000001 00000001 78"), ConsoleData(1, b"x")),
    (H("ff 02 04  00000007 00000000"), ConsoleData(7, b"")),
    # Section 8: CLOSED 1, requested.
    (H("ff 02 05  00000001 00 0000"), ConsoleClosed(1, CloseReason.REQUESTED, "")),
    (
        H("ff 02 05  00000002 05 0011") + b"chardev went away",
        ConsoleClosed(2, CloseReason.BACKEND_ERROR, "chardev went away"),
    ),
    (H("ff 02 05  00000003 04 0000"), ConsoleClosed(3, CloseReason.OVERRUN, "")),
    (H("ff 02 06  00000001 00000800"), ConsoleCredit(1, 2048)),
    (H("ff 02 06  00000009 ffffffff"), ConsoleCredit(9, MAX_U32)),
    # MARK 1, reattached, "boot".
    (H("ff 02 07  00000001 00 0004") + b"boot", ConsoleMark(1, MarkKind.REATTACHED, "boot")),
    (H("ff 02 07  00000002 ff 0000"), ConsoleMark(2, MarkKind.OTHER, "")),
]

CLIENT_VECTORS: list[tuple[bytes, Any]] = [
    # Section 8: OPEN 1, credit 256 KiB, max_data 64 KiB, history.
    (H("ff 02 00  00000001 00040000 00010000 01"), ConsoleOpen(1, 262144, 65536, True)),
    (H("ff 02 00  00000002 00001000 00000010 00"), ConsoleOpen(2, 4096, 16, False)),
    # History and marks.
    (H("ff 02 00  00000003 00001000 00000010 03"), ConsoleOpen(3, 4096, 16, True, True)),
    # Section 8: CLOSE 1.
    (H("ff 02 01  00000001"), ConsoleClose(1)),
    # Section 8: DATA, type "x".
    (H("ff 02 02  00000001 00000001") + b"x", ConsoleWrite(1, b"x")),
    (H("ff 02 02  00000005 00000003 1b 5b 41"), ConsoleWrite(5, b"\x1b[A")),
    (H("ff 02 03  00000001"), ConsoleBreak(1)),
    (H("ff 02 04  00000001 00020000"), ConsoleGrant(1, 131072)),
    (H("ff 02 04  00000002 00000001"), ConsoleGrant(2, 1)),
]


def _vector_id(vector: tuple[bytes, Any]) -> str:
    return type(vector[1]).__name__


def parse_whole(parse: Callable[[Reader], Any], raw: bytes) -> Any:
    """Parse a 255/2 message, checking its two type bytes and that it is all used."""
    assert raw[:2] == b"\xff\x02"
    reader = Reader(raw, 2)
    message = parse(reader)
    assert reader.remaining == 0
    return message


@pytest.mark.parametrize("vector", SERVER_VECTORS, ids=_vector_id)
def test_server_vector(vector: tuple[bytes, Any]) -> None:
    raw, message = vector
    assert message.serialize().hex(" ") == raw.hex(" ")
    assert parse_whole(parse_server_message, raw) == message


@pytest.mark.parametrize("vector", CLIENT_VECTORS, ids=_vector_id)
def test_client_vector(vector: tuple[bytes, Any]) -> None:
    raw, message = vector
    assert message.serialize().hex(" ") == raw.hex(" ")
    assert parse_whole(parse_client_message, raw) == message


def test_the_hand_packers_agree_with_the_vectors() -> None:
    # The packers below feed the client; they must say what the vectors say.
    assert hello(SERIAL0, MONITOR) == SERVER_VECTORS[0][0]
    assert opened(1, 4096, 22) == H("ff 02 03 00000001 00001000 00000016")
    assert closed(1, 0) == H("ff 02 05 00000001 00 0000")
    assert open_bytes(1, 0x40000, 0x10000, True) == CLIENT_VECTORS[0][0]
    assert write_bytes(1, b"x") == H("ff 02 02 00000001 00000001 78")


def test_unknown_kind_and_reason_read_as_other() -> None:
    info = parse_whole(parse_server_message, H("ff 02 01 00000004 07 00 01") + b"z")
    assert info == ConsoleAdded(ConsoleInfo(4, ConsoleKind.OTHER, "z", False))
    gone = parse_whole(parse_server_message, H("ff 02 05 00000004 09 0000"))
    assert gone == ConsoleClosed(4, CloseReason.OTHER, "")


def test_flags_beyond_history_marks_and_positions_are_ignored() -> None:
    # HELLO: bit 0 is `positions`; CONSOLE: bit 0 is `history`.
    raw = H("ff 02 00 01 fe 0001 00000001 00000001 00 fe 01") + b"s"
    assert parse_whole(parse_server_message, raw) == ConsolesAnnounced(
        1, 1, (ConsoleInfo(1, ConsoleKind.SERIAL, "s", False),)
    )
    # OPEN: bits 0, 1 and 2 are `history`, `marks` and `positions`.
    assert parse_whole(parse_client_message, H("ff 02 00 00000001 00000010 00000010 f8")) == (
        ConsoleOpen(1, 16, 16, False)
    )


def test_a_mark_comes_only_to_a_client_that_asked() -> None:
    conn, ext = announced()
    ext.open(1, marks=True)
    conn.data_to_send()
    wire.feed_all(conn, opened(1, 4096))
    mark = H("ff 02 07 00000001 00 0000")
    assert wire.feed_all(conn, mark) == [ConsoleMark(1, MarkKind.REATTACHED, "")]
    conn, ext = announced()
    ext.open(1)
    conn.data_to_send()
    wire.feed_all(conn, opened(1, 4096))
    assert_fails(conn, mark, "not asked for")


def test_invalid_utf8_is_replaced_without_losing_sync() -> None:
    raw = H("ff 02 01 00000005 00 00 03 61 ff 62") + H("ff 02 05 00000005 00 0002 c3 28")
    reader = Reader(raw, 2)
    assert parse_server_message(reader) == ConsoleAdded(
        ConsoleInfo(5, ConsoleKind.SERIAL, "a\ufffdb", False)
    )
    assert reader.u8() == 255
    assert reader.u8() == 2
    assert parse_server_message(reader) == ConsoleClosed(5, CloseReason.REQUESTED, "\ufffd(")
    assert reader.remaining == 0


@pytest.mark.parametrize("message_type", [ConsoleClosed, ConsoleMark])
def test_messages_are_utf8_cut_at_a_character_and_never_fail(message_type: Any) -> None:
    """A CLOSED or MARK message is at most 1024 bytes of UTF-8, cut between two
    characters (after "x", 511 two-byte é, not 511 and a half); a file name of
    bytes that are not UTF-8 (a surrogate in Python) is shown escaped."""
    kind = CloseReason.BACKEND_ERROR if message_type is ConsoleClosed else MarkKind.REATTACHED
    long = message_type(1, kind, "x" + "é" * 600).serialize()
    assert int.from_bytes(long[8:10], "big") == 1023  # ff 02 op, u32 id, u8 kind, u16 length
    assert long[10:].decode("utf-8") == "x" + "é" * 511
    escaped = message_type(1, kind, "unix:/run/caf\udce9.sock: gone").serialize()
    parsed = parse_server_message(Reader(escaped, 2))
    assert parsed.message == "unix:/run/caf\\udce9.sock: gone"


@pytest.mark.parametrize(
    "raw",
    [
        H("ff 02 00 00000001 00000010 00000000 00"),  # max_data 0
        H("ff 02 00 00000001 00000010 00010001 00"),  # max_data 65537
        H("ff 02 02 00000001 00010001"),  # DATA of 65537 bytes
        H("ff 02 05"),  # no such client operation
        H("ff 02 ff"),
    ],
)
def test_bad_client_messages_are_refused(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_client_message(Reader(raw, 2))


# --- round trips ---------------------------------------------------------------

u32s = st.integers(0, MAX_U32)
max_datas = st.integers(1, 65536)
payloads = st.binary(max_size=4096)
utf8_chars = st.characters(codec="utf-8")
names = st.one_of(
    st.text(utf8_chars, min_size=1, max_size=16),  # at most 64 bytes, any width
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64),
)
infos = st.builds(ConsoleInfo, u32s, st.sampled_from(list(ConsoleKind)), names, st.booleans())

server_messages = st.one_of(
    st.builds(
        ConsolesAnnounced,
        st.integers(0, 255),
        max_datas,
        st.lists(infos, max_size=6).map(tuple),
    ),
    st.builds(ConsoleAdded, infos),
    st.builds(ConsoleRemoved, u32s),
    st.builds(ConsoleOpened, u32s, u32s, u32s),
    st.builds(ConsoleData, u32s, payloads),
    st.builds(
        ConsoleClosed,
        u32s,
        st.sampled_from(list(CloseReason)),
        st.text(utf8_chars, max_size=256),  # at most 1024 bytes
    ),
    st.builds(ConsoleCredit, u32s, u32s),
)

client_messages = st.one_of(
    st.builds(ConsoleOpen, u32s, u32s, max_datas, st.booleans()),
    st.builds(ConsoleClose, u32s),
    st.builds(ConsoleWrite, u32s, payloads),
    st.builds(ConsoleBreak, u32s),
    st.builds(ConsoleGrant, u32s, u32s),
)


@settings(max_examples=300, deadline=None, database=None)
@given(server_messages)
def test_server_messages_round_trip(message: Any) -> None:
    raw = message.serialize()
    assert parse_whole(parse_server_message, raw) == message


@settings(max_examples=300, deadline=None, database=None)
@given(client_messages)
def test_client_messages_round_trip(message: Any) -> None:
    raw = message.serialize()
    assert parse_whole(parse_client_message, raw) == message


# ---------------------------------------------------------------------------
# Driving the client half
# ---------------------------------------------------------------------------


def console_conn(consoles: Consoles | None = None) -> tuple[ClientConnection, Consoles]:
    """A connected client with a `Consoles` extension, nothing announced yet."""
    ext = consoles or Consoles()
    conn = wire.connected(extensions=[ext])
    return conn, ext


def announced(*infos: bytes, max_data: int = 65536) -> tuple[ClientConnection, Consoles]:
    """After HELLO (serial0 and monitor unless told otherwise), output drained."""
    conn, ext = console_conn()
    body = infos or (SERIAL0, MONITOR)
    events = wire.feed_all(conn, hello(*body, max_data=max_data))
    assert len(events) == 1
    assert isinstance(events[0], ConsolesAnnounced)
    assert conn.data_to_send() == b""
    return conn, ext


def opened_console(
    *,
    window: int = 4096,
    send_credit: int = 4096,
    history_length: int = 0,
    auto_credit: bool = True,
    server_max_data: int = 65536,
    max_data: int = 65536,
) -> tuple[ClientConnection, Consoles]:
    """Console 1 (serial0) open, output drained."""
    conn, ext = announced(max_data=server_max_data)
    ext.open(1, window=window, max_data=max_data, history=True, auto_credit=auto_credit)
    assert conn.data_to_send() == open_bytes(1, window, max_data, True)
    events = wire.feed_all(conn, opened(1, send_credit, history_length))
    assert events == [ConsoleOpened(1, send_credit, history_length)]
    return conn, ext


def assert_fails(conn: ClientConnection, raw: bytes, match: str | None = None) -> None:
    """Feeding `raw` ends the connection with a RemoteProtocolError, for good."""
    conn.receive_data(raw)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        list(conn.events())
    assert conn.state is State.CLOSED
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is info.value


# --- the same events however the bytes arrive ------------------------------------


def _fresh() -> tuple[ClientConnection, Consoles]:
    return console_conn()


def _announced() -> tuple[ClientConnection, Consoles]:
    return announced()


def _opening() -> tuple[ClientConnection, Consoles]:
    conn, ext = announced()
    ext.open(1, window=4096)
    conn.data_to_send()
    return conn, ext


def _open() -> tuple[ClientConnection, Consoles]:
    return opened_console(history_length=3)


FEED_CASES: list[tuple[str, Setup, bytes, list[Any]]] = [
    ("hello-0", _fresh, hello(max_data=1024), [ConsolesAnnounced(1, 1024, ())]),
    ("hello-2", _fresh, hello(SERIAL0, MONITOR), [TWO_CONSOLES]),
    (
        "added",
        _announced,
        added(3, 4, 0, b"channel0"),
        [ConsoleAdded(ConsoleInfo(3, ConsoleKind.CHANNEL, "channel0", False))],
    ),
    ("removed", _announced, removed(2), [ConsoleRemoved(2)]),
    ("opened", _opening, opened(1, 100, 7), [ConsoleOpened(1, 100, 7)]),
    ("data-history", _open, data(1, b"abc"), [ConsoleData(1, b"abc", history=True)]),
    (
        "data-two",
        _open,
        data(1, b"abc") + data(1, b"defg"),
        [ConsoleData(1, b"abc", history=True), ConsoleData(1, b"defg")],
    ),
    (
        "closed-message",
        _open,
        closed(1, 6, b"bye now"),
        [ConsoleClosed(1, CloseReason.SHUTDOWN, "bye now")],
    ),
    ("credit", _open, credit(1, 5), [ConsoleCredit(1, 5)]),
    (
        "interleaved",
        _open,
        wire.bell() + data(1, b"abc") + wire.bell() + credit(1, 1),
        [Bell(), ConsoleData(1, b"abc", history=True), Bell(), ConsoleCredit(1, 1)],
    ),
]


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize(
    ("setup", "raw", "expected"),
    [case[1:] for case in FEED_CASES],
    ids=[case[0] for case in FEED_CASES],
)
def test_server_messages_reach_the_client(
    mode: str,
    setup: Setup,
    raw: bytes,
    expected: list[Any],
) -> None:
    conn, _ = setup()
    trailing = data(1, b"xyz")[:6]  # the start of a DATA, never complete
    if mode == "whole":
        events = wire.feed_all(conn, raw)
    elif mode == "bytewise":
        events = wire.feed_bytewise(conn, raw)
    else:
        events = wire.feed_with_trailing(conn, raw, trailing)
        assert conn.buffered == len(trailing)
    assert events == expected
    assert conn.state is State.CONNECTED


# ---------------------------------------------------------------------------
# 2. The client half's behaviour
# ---------------------------------------------------------------------------


def test_set_encodings_advertises_minus_262() -> None:
    conn = ClientConnection(encodings=(0,), extensions=[Consoles()])
    conn.receive_data(wire.greeting() + wire.security_none() + wire.server_init(64, 48))
    events = list(conn.events())
    assert len(events) == 1
    assert isinstance(events[0], Connected)
    # Version, security None, ClientInit (shared), then SetEncodings and nothing more.
    advertised = (0, *CORE_PSEUDO_ENCODINGS, -262)
    set_encodings = (
        wire.u8(2) + b"\0" + wire.u16(len(advertised)) + b"".join(wire.s32(e) for e in advertised)
    )
    assert conn.data_to_send() == b"RFB 003.008\n" + b"\x01" + b"\x01" + set_encodings
    assert wire.s32(-262) == H("fffffefa")


def test_nothing_console_related_is_sent_before_hello() -> None:
    conn, ext = console_conn()
    assert wire.feed_all(conn, wire.bell() + wire.fbu()) == [Bell(), FramebufferUpdate(())]
    assert conn.data_to_send() == b""
    assert not ext.announced
    assert ext.consoles == []


@pytest.mark.parametrize(
    "action",
    [
        lambda ext: ext.open(1),
        lambda ext: ext.close(1),
        lambda ext: ext.write(1, b"x"),
        lambda ext: ext.send_break(1),
        lambda ext: ext.grant(1, 1),
        lambda ext: ext.writable(1),
    ],
    ids=["open", "close", "write", "send_break", "grant", "writable"],
)
def test_commands_before_hello_are_local_errors(action: Callable[[Consoles], Any]) -> None:
    conn, ext = console_conn()
    with pytest.raises(LocalProtocolError, match="not announced"):
        action(ext)
    assert conn.data_to_send() == b""
    assert conn.state is State.CONNECTED


def test_hello_announces_the_consoles() -> None:
    _, ext = announced()
    assert ext.announced
    assert ext.version == 1
    assert ext.server_max_data == 65536
    assert ext.consoles == [SERIAL0_INFO, MONITOR_INFO]
    assert ext.by_name("monitor") == MONITOR_INFO
    assert ext.by_name("serial1") is None
    assert not ext.is_open(1)


def test_the_section_8_example() -> None:
    conn, ext = announced()
    ext.open(1, window=256 * 1024, max_data=64 * 1024, history=True)
    assert conn.data_to_send() == H("ff 02 00 00000001 00040000 00010000 01")
    events = wire.feed_all(conn, H("ff 02 03 00000001 00001000 00000016"))
    assert events == [ConsoleOpened(1, 4096, 22)]
    assert ext.is_open(1)
    assert ext.writable(1) == 4096
    banner = H("ff 02 04 00000001 00000016") + b"resourced demo guest\r\n"
    assert wire.feed_all(conn, banner) == [
        ConsoleData(1, b"resourced demo guest\r\n", history=True)
    ]
    assert ext.write(1, b"x") == 1
    assert conn.data_to_send() == H("ff 02 02 00000001 00000001") + b"x"
    echo = wire.feed_all(conn, H("ff 02 04 00000001 00000001") + b"x")
    assert echo == [ConsoleData(1, b"x", history=False)]
    ext.close(1)
    assert conn.data_to_send() == H("ff 02 01 00000001")
    assert wire.feed_all(conn, H("ff 02 05 00000001 00 0000")) == [
        ConsoleClosed(1, CloseReason.REQUESTED, "")
    ]
    assert not ext.is_open(1)
    assert conn.data_to_send() == b""


def test_open_without_history_and_reopen_after_close() -> None:
    conn, ext = announced()
    ext.open(2, window=10, max_data=5, history=False)
    assert conn.data_to_send() == H("ff 02 00 00000002 0000000a 00000005 00")
    wire.feed_all(conn, opened(2, 0))
    ext.close(2)
    assert conn.data_to_send() == close_bytes(2)
    assert wire.feed_all(conn, closed(2, 0)) == [ConsoleClosed(2, CloseReason.REQUESTED)]
    ext.open(2, window=20)
    assert conn.data_to_send() == open_bytes(2, 20, 65536, True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "out of range"),
        ({"window": MAX_U32 + 1}, "out of range"),
        ({"max_data": 0}, "out of range"),
        ({"max_data": 65537}, "out of range"),
    ],
)
def test_open_checks_its_arguments(kwargs: dict[str, int], match: str) -> None:
    conn, ext = announced()
    with pytest.raises(LocalProtocolError, match=match):
        ext.open(1, **kwargs)
    assert conn.data_to_send() == b""
    ext.open(1, window=MAX_U32, max_data=1)  # the extremes themselves are fine
    assert conn.data_to_send() == open_bytes(1, MAX_U32, 1, True)


def test_open_unknown_or_twice_is_a_local_error() -> None:
    conn, ext = announced()
    with pytest.raises(LocalProtocolError, match="no console 9"):
        ext.open(9)
    ext.open(1)
    conn.data_to_send()
    with pytest.raises(LocalProtocolError, match="opening"):
        ext.open(1)
    with pytest.raises(LocalProtocolError, match="opening"):
        ext.write(1, b"x")
    with pytest.raises(LocalProtocolError, match="opening"):
        ext.send_break(1)
    assert conn.data_to_send() == b""


def test_send_break() -> None:
    conn, ext = opened_console()
    ext.send_break(1)
    assert conn.data_to_send() == H("ff 02 03 00000001")


# --- receiving: history, credit ----------------------------------------------------


def test_history_flag_counts_bytes() -> None:
    conn, _ = opened_console(history_length=10)
    events = wire.feed_all(conn, data(1, b"0123") + data(1, b"456789") + data(1, b"live"))
    assert events == [
        ConsoleData(1, b"0123", history=True),
        ConsoleData(1, b"456789", history=True),
        ConsoleData(1, b"live", history=False),
    ]


def test_no_history_means_live_data() -> None:
    conn, _ = opened_console(history_length=0)
    assert wire.feed_all(conn, data(1, b"abc")) == [ConsoleData(1, b"abc", history=False)]


def test_empty_data_is_an_event_and_does_not_end_history() -> None:
    conn, _ = opened_console(history_length=2)
    events = wire.feed_all(conn, data(1, b"") + data(1, b"hi") + data(1, b"!"))
    assert [e.history for e in events] == [True, True, False]
    assert [e.data for e in events] == [b"", b"hi", b"!"]


def test_data_straddling_the_end_of_history_is_split() -> None:
    # history_length counts bytes (spec 4.4): of one DATA carrying the last 3
    # bytes of replay and 4 bytes of live output, only the 3 are history.
    conn, _ = opened_console(history_length=3)
    events = wire.feed_all(conn, data(1, b"old" + b"new!"))
    assert b"".join(e.data for e in events) == b"oldnew!"
    labelled = [(e.data, e.history) for e in events]
    assert labelled == [(b"old", True), (b"new!", False)]


def test_auto_credit_regrants_at_half_the_window() -> None:
    conn, _ = opened_console(window=4096)
    wire.feed_all(conn, data(1, b"a" * 2047))
    assert conn.data_to_send() == b""
    wire.feed_all(conn, data(1, b"b"))
    assert conn.data_to_send() == H("ff 02 04 00000001 00000800")
    # The window is whole again: 4096 more bytes fit, 4097 would not.
    wire.feed_all(conn, data(1, b"c" * 2048))
    assert conn.data_to_send() == grant_bytes(1, 2048)
    wire.feed_all(conn, data(1, b"d" * 1000))
    assert conn.data_to_send() == b""
    wire.feed_all(conn, data(1, b"e" * 3096))
    assert conn.data_to_send() == grant_bytes(1, 4096)


def test_auto_credit_keeps_a_fast_stream_flowing() -> None:
    conn, _ = opened_console(window=64)
    total = 0
    for i in range(40):
        chunk = bytes([i]) * 20
        events = wire.feed_all(conn, data(1, chunk))
        assert events == [ConsoleData(1, chunk)]
        total += len(chunk)
    granted = conn.data_to_send()
    increments = []
    reader = Reader(granted)
    while reader.remaining:
        assert reader.u8() == 255
        assert reader.u8() == 2
        increments.append(parse_client_message(reader))
    assert all(isinstance(m, ConsoleGrant) and m.console_id == 1 for m in increments)
    # Never more outstanding than the window: all granted back but what is unread.
    assert 0 <= total - sum(m.increment for m in increments) < 32


def test_without_auto_credit_nothing_is_granted_until_grant() -> None:
    conn, ext = opened_console(window=4096, auto_credit=False)
    wire.feed_all(conn, data(1, b"a" * 4000) + data(1, b"b" * 96))
    assert conn.data_to_send() == b""
    ext.grant(1)
    assert conn.data_to_send() == H("ff 02 04 00000001 00001000")
    ext.grant(1)  # nothing consumed since
    assert conn.data_to_send() == b""
    ext.grant(1, 10)
    assert conn.data_to_send() == grant_bytes(1, 10)
    # 4096 + 10 bytes may now arrive, and not one more.
    wire.feed_all(conn, data(1, b"c" * 4106))
    assert_fails(conn, data(1, b"d"), "beyond")


def test_without_auto_credit_the_window_is_a_hard_limit() -> None:
    conn, _ = opened_console(window=16, auto_credit=False)
    assert wire.feed_all(conn, data(1, b"a" * 16)) == [ConsoleData(1, b"a" * 16)]
    assert conn.data_to_send() == b""
    assert_fails(conn, data(1, b"b"), "beyond")


def test_grant_overflow_is_a_local_error() -> None:
    conn, ext = opened_console(window=MAX_U32, auto_credit=False)
    with pytest.raises(LocalProtocolError, match="2\\*\\*32-1"):
        ext.grant(1, 1)
    assert conn.data_to_send() == b""


# --- sending: write and credit -----------------------------------------------------


def test_write_splits_by_max_data_and_stops_at_credit() -> None:
    conn, ext = opened_console(send_credit=10, server_max_data=4)
    assert ext.writable(1) == 10
    assert ext.write(1, b"abcdefghijkl") == 10
    assert conn.data_to_send() == (
        write_bytes(1, b"abcd") + write_bytes(1, b"efgh") + write_bytes(1, b"ij")
    )
    assert ext.writable(1) == 0
    assert ext.write(1, b"kl") == 0
    assert conn.data_to_send() == b""
    assert wire.feed_all(conn, credit(1, 5)) == [ConsoleCredit(1, 5)]
    assert ext.writable(1) == 5
    assert ext.write(1, b"kl") == 2
    assert conn.data_to_send() == write_bytes(1, b"kl")
    assert ext.writable(1) == 3


def test_write_of_nothing_sends_nothing() -> None:
    conn, ext = opened_console()
    assert ext.write(1, b"") == 0
    assert conn.data_to_send() == b""


def test_write_with_no_initial_credit_waits_for_credit() -> None:
    conn, ext = opened_console(send_credit=0)
    assert ext.write(1, b"hello") == 0
    assert conn.data_to_send() == b""
    wire.feed_all(conn, credit(1, 100))
    assert ext.write(1, b"hello") == 5
    assert conn.data_to_send() == write_bytes(1, b"hello")


def test_credit_up_to_the_limit_is_fine() -> None:
    conn, ext = opened_console(send_credit=0xFFFFFF00)
    assert wire.feed_all(conn, credit(1, 0xFF)) == [ConsoleCredit(1, 0xFF)]
    assert ext.writable(1) == MAX_U32


# --- closing ---------------------------------------------------------------------


def test_data_while_closing_is_dropped_but_counted() -> None:
    conn, ext = opened_console(window=16, auto_credit=False)
    ext.close(1)
    assert conn.data_to_send() == H("ff 02 01 00000001")
    assert not ext.is_open(1)
    assert wire.feed_all(conn, data(1, b"a" * 10)) == []
    assert wire.feed_all(conn, credit(1, 3)) == []  # no event for a closing console
    with pytest.raises(LocalProtocolError, match="closing"):
        ext.write(1, b"x")
    with pytest.raises(LocalProtocolError, match="closing"):
        ext.close(1)
    assert conn.data_to_send() == b""
    # 6 bytes of credit are left; a 7th is a protocol error even while closing.
    assert_fails(conn, data(1, b"b" * 7), "beyond")


def test_closed_after_closing() -> None:
    conn, ext = opened_console(window=16)
    ext.close(1)
    conn.data_to_send()
    events = wire.feed_all(conn, data(1, b"late") + closed(1, 0))
    assert events == [ConsoleClosed(1, CloseReason.REQUESTED, "")]
    assert conn.data_to_send() == b""  # no credit granted for dropped data
    assert not ext.is_open(1)
    assert_fails(conn, data(1, b"x"), "not open")


def test_close_while_opening_then_opened_is_quiet() -> None:
    conn, ext = announced()
    ext.open(1, window=100)
    ext.close(1)
    assert conn.data_to_send() == open_bytes(1, 100, 65536, True) + close_bytes(1)
    events = wire.feed_all(conn, opened(1, 50, 5) + data(1, b"abc") + closed(1, 0))
    assert events == [ConsoleClosed(1, CloseReason.REQUESTED, "")]
    assert not ext.is_open(1)


def test_server_closes_an_open_console() -> None:
    conn, ext = opened_console()
    events = wire.feed_all(conn, closed(1, 4, b"too slow"))
    assert events == [ConsoleClosed(1, CloseReason.OVERRUN, "too slow")]
    assert not ext.is_open(1)
    with pytest.raises(LocalProtocolError, match="closed"):
        ext.write(1, b"x")
    assert ext.writable(1) == 0


def test_open_refused_with_closed() -> None:
    conn, ext = announced()
    ext.open(2)
    conn.data_to_send()
    events = wire.feed_all(conn, closed(2, 3, b"already open"))
    assert events == [ConsoleClosed(2, CloseReason.ALREADY_OPEN, "already open")]
    assert not ext.is_open(2)


# --- consoles coming and going ------------------------------------------------------


def test_added_and_removed_update_the_list() -> None:
    conn, ext = announced()
    events = wire.feed_all(conn, added(7, 1, 0, b"hvc0"))
    info = ConsoleInfo(7, ConsoleKind.VIRTIO_CONSOLE, "hvc0", False)
    assert events == [ConsoleAdded(info)]
    assert ext.consoles == [SERIAL0_INFO, MONITOR_INFO, info]
    assert ext.by_name("hvc0") == info
    assert wire.feed_all(conn, removed(1)) == [ConsoleRemoved(1)]
    assert ext.consoles == [MONITOR_INFO, info]
    assert ext.by_name("serial0") is None
    with pytest.raises(LocalProtocolError, match="no console 1"):
        ext.open(1)
    assert conn.data_to_send() == b""


def test_removed_while_open_closes_first() -> None:
    conn, ext = opened_console()
    events = wire.feed_all(conn, removed(1))
    assert events == [ConsoleClosed(1, CloseReason.REMOVED, ""), ConsoleRemoved(1)]
    assert ext.by_name("serial0") is None
    assert not ext.is_open(1)


def test_removed_after_closed_removed_is_not_doubled() -> None:
    conn, _ = opened_console()
    events = wire.feed_all(conn, closed(1, 1) + removed(1))
    assert events == [ConsoleClosed(1, CloseReason.REMOVED, ""), ConsoleRemoved(1)]


def test_256_consoles_are_allowed_but_not_257() -> None:
    many = [console(i, 0, 0, b"c%d" % i) for i in range(256)]
    conn, ext = console_conn()
    events = wire.feed_all(conn, hello(*many))
    assert len(events[0].consoles) == 256
    assert len(ext.consoles) == 256
    assert_fails(conn, added(1000, 0, 0, b"one-too-many"), "more than 256")


# --- hostile servers ----------------------------------------------------------------


def _opened16() -> tuple[ClientConnection, Consoles]:
    return opened_console(window=16, auto_credit=False)


def _removed_open() -> tuple[ClientConnection, Consoles]:
    conn, ext = opened_console()
    wire.feed_all(conn, closed(1, 0))
    return conn, ext


HOSTILE: list[tuple[str, Setup, bytes, str]] = [
    ("data-beyond-credit", _opened16, data(1, b"x" * 17), "beyond"),
    ("data-unknown-id", _announced, data(9, b"x"), "unknown console id 9"),
    ("opened-unknown-id", _opening, opened(9, 1), "unknown console id 9"),
    ("closed-unknown-id", _open, closed(9, 0), "unknown console id 9"),
    ("credit-unknown-id", _open, credit(9, 1), "unknown console id 9"),
    ("removed-unknown-id", _announced, removed(9), "unknown console id 9"),
    ("data-not-open", _announced, data(1, b"x"), "not open"),
    ("data-while-opening", _opening, data(1, b"x"), "not open"),
    ("data-after-closed", _removed_open, data(1, b"x"), "not open"),
    ("opened-not-opening", _announced, opened(1, 1), "not being opened"),
    ("opened-twice", _open, opened(1, 1), "not being opened"),
    ("closed-when-closed", _announced, closed(1, 0), "which is closed"),
    ("second-hello", _announced, hello(), "second"),
    ("second-hello-while-open", _open, hello(SERIAL0), "second"),
    ("hello-version-2", _fresh, hello(SERIAL0, version=2), "version 2"),
    ("hello-version-0", _fresh, hello(version=0), "version 0"),
    ("added-before-hello", _fresh, added(1, 0, 0, b"s"), "before HELLO"),
    ("data-before-hello", _fresh, data(1, b"x"), "before HELLO"),
    ("credit-before-hello", _fresh, credit(1, 1), "before HELLO"),
    ("removed-before-hello", _fresh, removed(1), "before HELLO"),
    (
        "hello-257-consoles",
        _fresh,
        hello(*[console(i, 0, 0, b"c") for i in range(257)]),
        "257 consoles",
    ),
    ("hello-65535-consoles-header", _fresh, hello(count=0xFFFF), "65535 consoles"),
    ("hello-name-0", _fresh, hello(console(1, 0, 0, b"")), "name of 0 bytes"),
    ("hello-name-65", _fresh, hello(console(1, 0, 0, b"n" * 65)), "name of 65 bytes"),
    ("added-name-0", _announced, added(3, 0, 0, b""), "name of 0 bytes"),
    ("added-name-65", _announced, added(3, 0, 0, b"n" * 65), "name of 65 bytes"),
    ("added-name-255-header", _announced, server_message(1, H("00000003 00 00 ff")), "255"),
    ("data-65537-header", _open, data(1, b"", length=65537), "65537"),
    ("data-4g-header", _open, data(1, b"", length=MAX_U32), "4294967295"),
    ("hello-max-data-0", _fresh, hello(max_data=0), "max_data 0"),
    ("hello-max-data-65537", _fresh, hello(max_data=65537), "max_data 65537"),
    ("duplicate-added", _announced, added(2, 0, 0, b"other"), "announced twice"),
    ("duplicate-in-hello", _fresh, hello(SERIAL0, console(1, 0, 0, b"x")), "twice"),
    ("unknown-op-9", _announced, server_message(9, b""), "unknown server operation 9"),
    ("unknown-op-255", _open, server_message(255, wire.u32(1)), "operation 255"),
    ("unknown-op-before-hello", _fresh, server_message(10, b""), "operation 10"),
    ("closed-message-1025-header", _open, closed(1, 0, length=1025), "1025"),
]


@pytest.mark.parametrize(
    ("setup", "raw", "match"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_hostile_server_messages_fail_the_connection(setup: Setup, raw: bytes, match: str) -> None:
    conn, _ = setup()
    assert_fails(conn, raw, match)


@pytest.mark.parametrize(
    ("setup", "raw", "match"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_hostile_server_messages_fail_bytewise_too(setup: Setup, raw: bytes, match: str) -> None:
    conn, _ = setup()
    with pytest.raises(RemoteProtocolError, match=match):
        wire.feed_bytewise(conn, raw)
    assert conn.state is State.CLOSED


def test_credit_overflow_fails() -> None:
    conn, _ = opened_console(send_credit=MAX_U32)
    assert_fails(conn, credit(1, 1), "beyond 2\\*\\*32-1")


def test_credit_overflow_fails_in_steps() -> None:
    conn, _ = opened_console(send_credit=0xFFFFFF00)
    assert wire.feed_all(conn, credit(1, 0x80)) == [ConsoleCredit(1, 0x80)]
    assert_fails(conn, credit(1, 0x80), "beyond 2\\*\\*32-1")


def test_credit_overflow_fails_while_closing() -> None:
    conn, ext = opened_console(send_credit=MAX_U32)
    ext.close(1)
    assert_fails(conn, credit(1, 1), "beyond 2\\*\\*32-1")


def test_data_beyond_credit_fails_cumulatively() -> None:
    conn, _ = opened_console(window=16, auto_credit=False)
    wire.feed_all(conn, data(1, b"a" * 10))
    assert_fails(conn, data(1, b"b" * 7), "6 bytes of credit")


def test_data_beyond_the_clients_max_data_fails() -> None:
    # Spec 3 / 4.5 / 6: a DATA payload is never larger than the receiver's
    # max_data (the client's, from OPEN); a longer one is a protocol error.
    conn, _ = opened_console(window=4096, max_data=16)
    assert wire.feed_all(conn, data(1, b"a" * 16)) == [ConsoleData(1, b"a" * 16)]
    assert_fails(conn, data(1, b"b" * 17))


def test_an_id_is_never_announced_twice_even_after_removal() -> None:
    # Spec 3: ids "are never reused on that connection, so a late message about
    # a removed console can never be mistaken for a new one"; spec 6 closes the
    # connection on "an id announced twice".
    conn, _ = announced()
    assert wire.feed_all(conn, removed(2)) == [ConsoleRemoved(2)]
    assert_fails(conn, added(2, 3, 0, b"monitor"))


def test_a_half_received_message_changes_nothing() -> None:
    conn, ext = opened_console(window=16, auto_credit=False)
    raw = data(1, b"a" * 16)
    assert wire.feed_all(conn, raw[:-1]) == []
    assert wire.feed_all(conn, raw[-1:]) == [ConsoleData(1, b"a" * 16)]
    ext.grant(1)
    assert conn.data_to_send() == grant_bytes(1, 16)


# ---------------------------------------------------------------------------
# 3. Fuzz: any bytes after HELLO give events or RemoteProtocolError, bounded memory
# ---------------------------------------------------------------------------


fuzz_ids = st.one_of(st.sampled_from([1, 2, 3, 0, 7]), u32s)
small_u32s = st.one_of(st.integers(0, 5000), u32s)


@st.composite
def fragments(draw: st.DrawFn) -> bytes:
    """Console messages with random fields (often valid), sometimes cut or bent."""
    # Hypothesis favours the first choices: the common, deep-reaching ones first.
    op = draw(st.sampled_from([4, 4, 6, 4, 3, 4, 5, 1, 4, 2, 6, 4, 0]))
    cid = draw(fuzz_ids)
    if op == 0:
        infos = draw(st.lists(st.tuples(fuzz_ids, st.binary(max_size=3)), max_size=3))
        body = hello(
            *[console(i, 0, 1, n) for i, n in infos],
            version=draw(st.sampled_from([1, 1, 2])),
            max_data=draw(st.sampled_from([1, 4096, 65536, 0, 65537])),
        )
    elif op == 1:
        name = draw(st.one_of(st.binary(min_size=1, max_size=8), st.binary(max_size=66)))
        body = added(cid, draw(st.integers(0, 255)), 0, name)
    elif op == 2:
        body = removed(cid)
    elif op == 3:
        body = opened(cid, draw(small_u32s), draw(small_u32s))
    elif op == 4:
        payload = draw(st.binary(max_size=2100))
        length = draw(st.sampled_from([len(payload)] * 6 + [len(payload) + 1, 65537]))
        body = data(cid, payload, length)
    elif op == 5:
        text = draw(st.binary(max_size=40))
        body = closed(cid, draw(st.integers(0, 255)), text, draw(st.sampled_from([None, 1025])))
    else:
        body = credit(cid, draw(small_u32s))
    mutation = draw(st.integers(0, 11))
    if mutation == 10:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif mutation == 11:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    return body


streams = st.lists(
    st.one_of(
        fragments(),
        fragments(),
        fragments(),
        st.binary(max_size=64),
        st.integers(7, 255).map(lambda op: server_message(op, b"\0\0\0\1")),
        st.sampled_from([wire.bell(), wire.fbu(), wire.server_cut_text(b"cut")]),
    ),
    max_size=12,
).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes], bool]:
    """A stream, the non-empty pieces it arrives in, and whether EOF follows."""
    raw = draw(streams)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(raw))), max_size=8))))
    pieces, start = [], 0
    for cut in [*cuts, len(raw)]:
        if cut > start:
            pieces.append(raw[start:cut])
            start = cut
    return raw, [p for p in pieces if p], draw(st.booleans())


def _fuzz_target() -> tuple[ClientConnection, Consoles]:
    conn, ext = announced()
    ext.open(1, window=4096)
    wire.feed_all(conn, opened(1, 4096, 100))
    conn.data_to_send()
    return conn, ext


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(chunked())
def test_fuzz_after_hello(case: tuple[bytes, list[bytes], bool]) -> None:
    raw, pieces, eof = case
    conn, ext = _fuzz_target()
    events: list[Any] = []
    error: RemoteProtocolError | None = None
    with traced_peak() as peak:
        for piece in [*pieces, *([b""] if eof else [])]:
            conn.receive_data(piece)
            try:
                events.extend(conn.events())
            except RemoteProtocolError as err:
                error = err
                break
            assert conn.buffered <= len(raw)
    assert peak[0] < 4 * len(raw) + 2 * MIB
    if error is not None:
        assert conn.state is State.CLOSED
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
    elif eof:
        assert conn.state is State.CLOSED
        assert isinstance(events[-1], ServerClosed)
    else:
        assert conn.state is State.CONNECTED
    for info in ext.consoles:
        assert 0 <= ext.writable(info.console_id) <= MAX_U32
    # Whatever the client said back is well-formed credit for console 1, never
    # more than it has received since it opened.
    reader = Reader(conn.data_to_send())
    granted = 0
    while reader.remaining:
        assert (reader.u8(), reader.u8()) == (255, 2)
        message = parse_client_message(reader)
        assert isinstance(message, ConsoleGrant)
        assert message.console_id == 1
        assert message.increment > 0
        granted += message.increment
    received = sum(len(e.data) for e in events if isinstance(e, ConsoleData) and e.console_id == 1)
    assert granted <= received


# ---------------------------------------------------------------------------
# 4. Client and a real ServerConnection, in memory
# ---------------------------------------------------------------------------


def pump(server: ServerConnection, client: ClientConnection) -> tuple[list[Any], list[Any]]:
    """Move bytes both ways until both are quiet; (server events, client events)."""
    server_events: list[Any] = []
    client_events: list[Any] = []
    for _ in range(100):
        moved = False
        out = server.data_to_send()
        if out:
            client.receive_data(out)
            moved = True
        for event in client.events():
            client_events.append(event)
            moved = True
        out = client.data_to_send()
        if out:
            server.receive_data(out)
            moved = True
        for event in server.events():
            server_events.append(event)
            moved = True
            if isinstance(event, ClientInitReceived):
                server.send_server_init(64, 48, RGBX8888, "consoles")
        if not moved:
            return server_events, client_events
    raise AssertionError("the conversation did not settle")


def pair() -> tuple[ServerConnection, ClientConnection, Consoles]:
    server = ServerConnection(
        ServerSecurity(allow_none=True), qemu_parsers={2: parse_client_message}
    )
    ext = Consoles()
    client = ClientConnection(extensions=[ext])
    server_events, client_events = pump(server, client)
    assert isinstance(server_events[0], ClientInitReceived)
    assert isinstance(server_events[-1], SetEncodings)
    assert -262 in server_events[-1].encodings
    assert isinstance(client_events[0], Connected)
    return server, client, ext


def test_client_console_messages_reach_a_real_server() -> None:
    server, client, ext = pair()
    server.send_raw(hello(SERIAL0, MONITOR, max_data=8))
    announced_ = ConsolesAnnounced(1, 8, (SERIAL0_INFO, MONITOR_INFO))
    assert pump(server, client) == ([], [announced_])

    ext.open(1, window=1000, max_data=1000, history=False)
    assert pump(server, client) == ([ConsoleOpen(1, 1000, 1000, False)], [])
    server.send_raw(opened(1, 20))
    assert pump(server, client) == ([], [ConsoleOpened(1, 20, 0)])

    assert ext.write(1, b"hello, console!") == 15
    ext.send_break(1)
    expected = [ConsoleWrite(1, b"hello, c"), ConsoleWrite(1, b"onsole!"), ConsoleBreak(1)]
    assert pump(server, client) == (expected, [])

    server.send_raw(data(1, b"z" * 600))
    assert pump(server, client) == ([ConsoleGrant(1, 600)], [ConsoleData(1, b"z" * 600)])

    ext.close(1)
    assert pump(server, client) == ([ConsoleClose(1)], [])
    server.send_raw(closed(1, 0))
    assert pump(server, client) == ([], [ConsoleClosed(1, CloseReason.REQUESTED, "")])


def test_manual_grant_reaches_a_real_server() -> None:
    server, client, ext = pair()
    server.send_raw(hello(SERIAL0, MONITOR))
    pump(server, client)
    ext.open(2, window=50, auto_credit=False)
    server.send_raw(opened(2, 0))
    server.send_raw(data(2, b"q" * 50))
    server_events, client_events = pump(server, client)
    assert server_events == [ConsoleOpen(2, 50, 65536, True)]
    assert client_events == [ConsoleOpened(2, 0, 0), ConsoleData(2, b"q" * 50)]
    ext.grant(2)
    ext.grant(2, 7)
    assert pump(server, client) == ([ConsoleGrant(2, 50), ConsoleGrant(2, 7)], [])


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(client_messages, max_size=8))
def test_every_client_console_message_arrives_equal(messages: list[Any]) -> None:
    server, client, _ = pair()
    for message in messages:
        client.send(message)
    server_events, client_events = pump(server, client)
    assert server_events == messages
    assert client_events == []
