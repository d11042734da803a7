"""RFB messages after the handshake, both directions, against hand-written wire bytes.

Client messages: every vector below was written out from rfbproto 7.5 (and 7.5.9
for QEMU's), then checked both ways: `serialize()` must produce it and `parse()`
must read it back. Server messages (rfbproto 7.6, QEMU 7.6.8) are fed to a
connected `ClientConnection` whole, a byte at a time, and followed by the first
bytes of the next message. Limits must fail with `RemoteProtocolError`, and leave
the connection failed for good.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resourced.audio import AudioFormat, SampleFormat
from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import NeedData, Reader
from resourced.rfb.connection import ClientConnection, State
from resourced.rfb.constants import (
    MAX_AUDIO_CHUNK,
    MAX_CUT_TEXT_LENGTH,
    MAX_ENCODINGS,
    MAX_FRAMEBUFFER_DIMENSION,
    MAX_SERVER_NAME_LENGTH,
    Encoding,
    QemuAudioServerOp,
)
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.events import CursorShape, DesktopResized, ServerClosed
from resourced.rfb.messages import (
    CLIENT_PARSERS,
    Bell,
    ClientCutText,
    FramebufferUpdate,
    FramebufferUpdateRequest,
    KeyEvent,
    PointerEvent,
    QemuKeyEvent,
    Rectangle,
    ServerCutText,
    SetColourMapEntries,
    SetEncodings,
    SetPixelFormat,
)
from resourced.rfb.pixelformat import RGBX8888, PixelFormat
from resourced.rfb.qemu import (
    AudioBegin,
    AudioData,
    AudioEnd,
    AudioSupported,
    LedStateChanged,
    QemuAudio,
    QemuAudioDisable,
    QemuAudioEnable,
    QemuAudioSetFormat,
    QemuLedState,
    audio_server_message,
    parse_client_audio,
)

from . import wire

PF16 = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)
PF8_MAPPED = PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0)

# ---------------------------------------------------------------------------
# Client messages: hand-written vectors
# ---------------------------------------------------------------------------

CLIENT_VECTORS: list[tuple[Any, str]] = [
    # SetPixelFormat: u8 0, 3 pad, PIXEL_FORMAT (bpp, depth, big-endian, true-colour,
    # u16 red/green/blue max, u8 red/green/blue shift, 3 pad).
    (SetPixelFormat(RGBX8888), "00 000000 20 18 00 01 00ff 00ff 00ff 10 08 00 000000"),
    (SetPixelFormat(PF16), "00 000000 10 10 01 01 001f 003f 001f 0b 05 00 000000"),
    (SetPixelFormat(PF8_MAPPED), "00 000000 08 08 00 00 0000 0000 0000 00 00 00 000000"),
    # SetEncodings: u8 2, pad, u16 count, s32 each.
    (SetEncodings(()), "02 00 0000"),
    (SetEncodings((16, 0, -223)), "02 00 0003 00000010 00000000 ffffff21"),
    (SetEncodings((-259, 0x574D5669, -2147483648)), "02 00 0003 fffffefd 574d5669 80000000"),
    # FramebufferUpdateRequest: u8 3, u8 incremental, u16 x, y, width, height.
    (FramebufferUpdateRequest(False, 0, 0, 640, 480), "03 00 0000 0000 0280 01e0"),
    (FramebufferUpdateRequest(True, 1, 2, 65535, 3), "03 01 0001 0002 ffff 0003"),
    # KeyEvent: u8 4, u8 down-flag, u16 pad, u32 keysym.
    (KeyEvent(True, 0xFF0D), "04 01 0000 0000ff0d"),
    (KeyEvent(False, 0x61), "04 00 0000 00000061"),
    (KeyEvent(True, 0xFFFFFFFF), "04 01 0000 ffffffff"),
    # PointerEvent: u8 5, u8 button-mask, u16 x, u16 y.
    (PointerEvent(0b101, 300, 200), "05 05 012c 00c8"),
    (PointerEvent(0, 0, 0), "05 00 0000 0000"),
    (PointerEvent(0xFF, 65535, 65535), "05 ff ffff ffff"),
    # ClientCutText: u8 6, 3 pad, u32 length, text (ISO 8859-1).
    (ClientCutText(b""), "06 000000 00000000"),
    (ClientCutText(b"hi\xe9"), "06 000000 00000003 6869e9"),
]

QEMU_CLIENT_VECTORS: list[tuple[Any, str]] = [
    # QEMU audio: u8 255, u8 1, u16 operation; set-format adds u8 format,
    # u8 channels, u32 frequency (rfbproto 7.5.9.2).
    (QemuAudioEnable(), "ff 01 0000"),
    (QemuAudioDisable(), "ff 01 0001"),
    (QemuAudioSetFormat(AudioFormat()), "ff 01 0002 03 02 0000ac44"),
    (QemuAudioSetFormat(AudioFormat(SampleFormat.U8, 1, 8000)), "ff 01 0002 00 01 00001f40"),
    (QemuAudioSetFormat(AudioFormat(SampleFormat.S8, 2, 11025)), "ff 01 0002 01 02 00002b11"),
    (QemuAudioSetFormat(AudioFormat(SampleFormat.U16, 1, 22050)), "ff 01 0002 02 01 00005622"),
    (QemuAudioSetFormat(AudioFormat(SampleFormat.U32, 2, 32000)), "ff 01 0002 04 02 00007d00"),
    (QemuAudioSetFormat(AudioFormat(SampleFormat.S32, 2, 48000)), "ff 01 0002 05 02 0000bb80"),
]

# QEMU extended key event: u8 255, u8 0, u16 down-flag, u32 keysym, u32 XT keycode
# (rfbproto 7.5.9.1).
QEMU_KEY_VECTORS: list[tuple[QemuKeyEvent, str]] = [
    (QemuKeyEvent(True, 0x61, 0x1E), "ff 00 0001 00000061 0000001e"),
    (QemuKeyEvent(False, 0xFF0D, 0xE01C), "ff 00 0000 0000ff0d 0000e01c"),
]


def _ids(vectors: list[tuple[Any, str]]) -> list[str]:
    return [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(vectors)]


def parse_client(data: bytes) -> Any:
    """Parse one client message the way a gateway would, checking it is used up."""
    reader = Reader(data)
    kind = reader.u8()
    if kind == 255:
        subtype = reader.u8()
        assert subtype == 1, "only QEMU audio is parsed here"
        message = parse_client_audio(reader)
    else:
        message = CLIENT_PARSERS[kind](reader)
    assert reader.remaining == 0, f"{reader.remaining} bytes left over"
    return message


@pytest.mark.parametrize(("message", "hexed"), CLIENT_VECTORS, ids=_ids(CLIENT_VECTORS))
def test_client_message_serializes_to_vector(message: Any, hexed: str) -> None:
    assert message.serialize().hex() == bytes.fromhex(hexed).hex()


@pytest.mark.parametrize(("message", "hexed"), CLIENT_VECTORS, ids=_ids(CLIENT_VECTORS))
def test_client_message_parses_from_vector(message: Any, hexed: str) -> None:
    assert parse_client(bytes.fromhex(hexed)) == message


@pytest.mark.parametrize(("message", "hexed"), QEMU_CLIENT_VECTORS, ids=_ids(QEMU_CLIENT_VECTORS))
def test_qemu_audio_message_serializes_to_vector(message: Any, hexed: str) -> None:
    assert message.serialize().hex() == bytes.fromhex(hexed).hex()


@pytest.mark.parametrize(("message", "hexed"), QEMU_CLIENT_VECTORS, ids=_ids(QEMU_CLIENT_VECTORS))
def test_qemu_audio_message_parses_from_vector(message: Any, hexed: str) -> None:
    assert parse_client(bytes.fromhex(hexed)) == message


@pytest.mark.parametrize(("message", "hexed"), QEMU_KEY_VECTORS, ids=_ids(QEMU_KEY_VECTORS))
def test_qemu_key_event_serializes_to_vector(message: QemuKeyEvent, hexed: str) -> None:
    assert message.serialize().hex() == bytes.fromhex(hexed).hex()


@pytest.mark.parametrize(("message", "hexed"), QEMU_KEY_VECTORS, ids=_ids(QEMU_KEY_VECTORS))
def test_qemu_key_event_parses_from_vector(message: QemuKeyEvent, hexed: str) -> None:
    # messages.py promises that client messages "serialize to bytes and parse back";
    # QemuKeyEvent is the one client message without a parser. Parsed like
    # parse_client_audio: after its two type bytes.
    data = bytes.fromhex(hexed)
    reader = Reader(data[2:])
    assert QemuKeyEvent.parse(reader) == message  # type: ignore[attr-defined]
    assert reader.remaining == 0


@pytest.mark.parametrize(
    ("message", "hexed"),
    CLIENT_VECTORS + QEMU_CLIENT_VECTORS,
    ids=_ids(CLIENT_VECTORS + QEMU_CLIENT_VECTORS),
)
def test_truncated_client_message_needs_data(message: Any, hexed: str) -> None:
    data = bytes.fromhex(hexed)
    for cut in range(len(data)):
        with pytest.raises(NeedData):
            parse_client(data[:cut])


@pytest.mark.parametrize(
    ("message", "hexed"),
    [
        (KeyEvent(True, 0x20), "04 01 0000 00000020"),
        (PointerEvent(1, 10, 20), "05 01 000a 0014"),
        (FramebufferUpdateRequest(True, 0, 0, 64, 48), "03 01 0000 0000 0040 0030"),
        (ClientCutText(b"x"), "06 000000 00000001 78"),
    ],
)
def test_connected_client_sends_exact_bytes(message: Any, hexed: str) -> None:
    conn = wire.connected()
    conn.send(message)
    assert conn.data_to_send().hex() == bytes.fromhex(hexed).hex()
    assert conn.data_to_send() == b""


def test_request_update_covers_the_framebuffer() -> None:
    conn = wire.connected(width=800, height=600)
    conn.request_update(incremental=True)
    assert conn.data_to_send() == bytes.fromhex("03 01 0000 0000 0320 0258")


def test_send_before_connected_is_a_local_error() -> None:
    conn = ClientConnection()
    with pytest.raises(LocalProtocolError, match="cannot send KeyEvent"):
        conn.send(KeyEvent(True, 0x61))
    assert conn.data_to_send() == b""


# --- client-side limits --------------------------------------------------------


def test_client_cut_text_over_limit_refuses_to_serialize() -> None:
    with pytest.raises(LocalProtocolError, match="ClientCutText"):
        ClientCutText(b"x" * (MAX_CUT_TEXT_LENGTH + 1)).serialize()


def test_client_cut_text_at_limit_serializes() -> None:
    data = ClientCutText(b"x" * MAX_CUT_TEXT_LENGTH).serialize()
    assert data[:8] == bytes.fromhex("06 000000") + MAX_CUT_TEXT_LENGTH.to_bytes(4, "big")
    assert len(data) == 8 + MAX_CUT_TEXT_LENGTH


def test_set_encodings_over_limit_refuses_to_serialize() -> None:
    with pytest.raises(LocalProtocolError, match="encodings"):
        SetEncodings(tuple(range(MAX_ENCODINGS + 1))).serialize()


def test_set_encodings_count_over_limit_refuses_to_parse() -> None:
    data = wire.u8(1) + wire.u16(MAX_ENCODINGS + 1)  # after the type byte
    with pytest.raises(RemoteProtocolError, match=str(MAX_ENCODINGS + 1)):
        SetEncodings.parse(Reader(data))


def test_client_cut_text_length_over_limit_refuses_to_parse() -> None:
    data = b"\0\0\0" + wire.u32(MAX_CUT_TEXT_LENGTH + 1)
    with pytest.raises(RemoteProtocolError, match="ClientCutText"):
        ClientCutText.parse(Reader(data))


@pytest.mark.parametrize(
    ("hexed", "match"),
    [
        ("0003", "unknown client operation 3"),
        ("0002 06 02 0000ac44", "set-format"),  # sample format 6 does not exist
        ("0002 03 03 0000ac44", "set-format"),  # three channels
        ("0002 03 02 00000000", "set-format"),  # 0 Hz
    ],
)
def test_parse_client_audio_rejects_bad_messages(hexed: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        parse_client_audio(Reader(bytes.fromhex(hexed)))


# --- round trips ----------------------------------------------------------------

u16s = st.integers(0, 0xFFFF)
u32s = st.integers(0, 0xFFFFFFFF)


@st.composite
def pixel_formats(draw: st.DrawFn) -> PixelFormat:
    bpp = draw(st.sampled_from([8, 16, 32]))
    return PixelFormat(
        bpp,
        draw(st.integers(1, bpp)),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(u16s),
        draw(u16s),
        draw(u16s),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 255)),
        draw(st.integers(0, 255)),
    )


audio_formats = st.builds(
    AudioFormat,
    st.sampled_from(list(SampleFormat)),
    st.sampled_from([1, 2]),
    st.integers(1, 48000),
)

client_messages = st.one_of(
    st.builds(SetPixelFormat, pixel_formats()),
    st.builds(
        SetEncodings,
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40).map(tuple),
    ),
    st.builds(FramebufferUpdateRequest, st.booleans(), u16s, u16s, u16s, u16s),
    st.builds(KeyEvent, st.booleans(), u32s),
    st.builds(PointerEvent, st.integers(0, 255), u16s, u16s),
    st.builds(ClientCutText, st.binary(max_size=300)),
    st.just(QemuAudioEnable()),
    st.just(QemuAudioDisable()),
    st.builds(QemuAudioSetFormat, audio_formats),
)


@settings(max_examples=400, deadline=None, database=None)
@given(client_messages)
def test_client_message_round_trip(message: Any) -> None:
    assert parse_client(message.serialize()) == message


# ---------------------------------------------------------------------------
# Server messages through a connected client
# ---------------------------------------------------------------------------

RAW_2X1 = bytes.fromhex("00112233 44556677")  # two 32-bit pixels


@dataclass
class ServerCase:
    """Server bytes and the events a connected client must turn them into."""

    name: str
    make_conn: Callable[[], ClientConnection]
    data: bytes
    events: list[Any]


def _plain() -> ClientConnection:
    return wire.connected(width=64, height=48)


def _with_audio() -> ClientConnection:
    """Connected with QemuAudio, the ack already seen and the client's output drained."""
    conn = wire.connected(width=64, height=48, extensions=[QemuAudio()])
    events = wire.feed_all(conn, wire.fbu(wire.rect(0, 0, 64, 48, Encoding.QEMU_AUDIO)))
    assert events[0] == AudioSupported()
    conn.data_to_send()
    return conn


def _header(x: int, y: int, w: int, h: int, enc: int) -> RectangleHeader:
    return RectangleHeader(x, y, w, h, enc)


SERVER_CASES = [
    ServerCase("bell", _plain, bytes.fromhex("02"), [Bell()]),
    ServerCase(
        "cut-text",
        _plain,
        bytes.fromhex("03 000000 00000005 68656c6c6f"),
        [ServerCutText(b"hello")],
    ),
    ServerCase("cut-text-empty", _plain, bytes.fromhex("03 000000 00000000"), [ServerCutText(b"")]),
    ServerCase(
        "colour-map",
        _plain,
        bytes.fromhex("01 00 0005 0002 ffff 0000 0000 0000 8000 1234"),
        [SetColourMapEntries(5, ((0xFFFF, 0, 0), (0, 0x8000, 0x1234)))],
    ),
    ServerCase(
        "colour-map-last-entry",
        _plain,
        bytes.fromhex("01 00 ffff 0001 0001 0002 0003"),
        [SetColourMapEntries(65535, ((1, 2, 3),))],
    ),
    ServerCase(
        "colour-map-empty", _plain, bytes.fromhex("01 00 0000 0000"), [SetColourMapEntries(0, ())]
    ),
    ServerCase("fbu-empty", _plain, bytes.fromhex("00 00 0000"), [FramebufferUpdate(())]),
    ServerCase(
        "fbu-raw",
        _plain,
        # one rectangle: x 1, y 2, 2x1, encoding 0 (Raw), 2 pixels of 4 bytes
        bytes.fromhex("00 00 0001 0001 0002 0002 0001 00000000") + RAW_2X1,
        [FramebufferUpdate((Rectangle(_header(1, 2, 2, 1, 0), RAW_2X1),))],
    ),
    ServerCase(
        "fbu-raw-and-copyrect",
        _plain,
        bytes.fromhex("00 00 0002")
        + bytes.fromhex("003e 002f 0002 0001 00000000")
        + RAW_2X1
        + bytes.fromhex("0000 0000 0040 0030 00000001 0000 0000"),
        [
            FramebufferUpdate(
                (
                    Rectangle(_header(62, 47, 2, 1, 0), RAW_2X1),
                    Rectangle(_header(0, 0, 64, 48, 1), bytes.fromhex("0000 0000")),
                )
            )
        ],
    ),
    ServerCase(
        "fbu-last-rect",
        _plain,
        # count 0xffff ends early with a LastRect (-224) rectangle
        bytes.fromhex("00 00 ffff")
        + bytes.fromhex("0000 0000 0001 0001 00000000 deadbeef")
        + bytes.fromhex("0000 0000 0000 0000 ffffff20"),
        [FramebufferUpdate((Rectangle(_header(0, 0, 1, 1, 0), bytes.fromhex("deadbeef")),))],
    ),
    ServerCase(
        "fbu-desktop-size",
        _plain,
        bytes.fromhex("00 00 0001 0000 0000 0320 0258 ffffff21"),
        [
            DesktopResized(800, 600),
            FramebufferUpdate((Rectangle(_header(0, 0, 800, 600, Encoding.DESKTOP_SIZE), b""),)),
        ],
    ),
    ServerCase(
        "fbu-cursor",
        _plain,
        # 1x1 rich cursor, hotspot 0,0: one pixel then a one-byte mask row
        bytes.fromhex("00 00 0001 0000 0000 0001 0001 ffffff11 01020304 80"),
        [
            CursorShape(Encoding.CURSOR, 0, 0, 1, 1, bytes.fromhex("01020304 80")),
            FramebufferUpdate(
                (Rectangle(_header(0, 0, 1, 1, Encoding.CURSOR), bytes.fromhex("0102030480")),)
            ),
        ],
    ),
    ServerCase(
        "audio-data",
        _with_audio,
        bytes.fromhex("ff 01 0002 00000004 01020304"),
        [AudioData(bytes.fromhex("01020304"), AudioFormat())],
    ),
    ServerCase(
        "audio-data-empty",
        _with_audio,
        bytes.fromhex("ff 01 0002 00000000"),
        [AudioData(b"", AudioFormat())],
    ),
    ServerCase(
        "audio-begin", _with_audio, bytes.fromhex("ff 01 0001"), [AudioBegin(AudioFormat())]
    ),
    ServerCase("audio-end", _with_audio, bytes.fromhex("ff 01 0000"), [AudioEnd()]),
]


def _case_ids() -> list[str]:
    return [case.name for case in SERVER_CASES]


@pytest.mark.parametrize("case", SERVER_CASES, ids=_case_ids())
def test_server_message_whole(case: ServerCase) -> None:
    conn = case.make_conn()
    assert wire.feed_all(conn, case.data) == case.events
    assert conn.buffered == 0
    assert conn.next_event() is None
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("case", SERVER_CASES, ids=_case_ids())
def test_server_message_bytewise(case: ServerCase) -> None:
    conn = case.make_conn()
    events: list[Any] = []
    for i in range(len(case.data)):
        conn.receive_data(case.data[i : i + 1])
        got = list(conn.events())
        if i < len(case.data) - 1:
            # Nothing may come out before the message is whole: a FramebufferUpdate
            # only once its last rectangle is in (its pseudo-rectangle events may
            # come earlier, as each pseudo-rectangle completes).
            assert not any(isinstance(e, FramebufferUpdate) for e in got)
            assert all(e in case.events for e in got)
        events.extend(got)
    assert events == case.events
    assert conn.buffered == 0


@pytest.mark.parametrize("case", SERVER_CASES, ids=_case_ids())
def test_server_message_short_input_needs_more_data(case: ServerCase) -> None:
    for cut in range(1, len(case.data)):
        conn = case.make_conn()
        conn.receive_data(case.data[:cut])
        got = list(conn.events())  # never an error
        # At most the pseudo-rectangle events that precede the update itself.
        assert len(got) < len(case.events)
        assert got == case.events[: len(got)]
        assert conn.state is State.CONNECTED


NEXT_MESSAGES = [
    (wire.server_cut_text(b"next"), ServerCutText(b"next")),
    (wire.fbu(), FramebufferUpdate(())),
    (wire.colour_map(7, [(1, 2, 3)]), SetColourMapEntries(7, ((1, 2, 3),))),
    (
        wire.fbu(wire.rect(0, 0, 1, 1, 0, b"\x01\x02\x03\x04")),
        FramebufferUpdate((Rectangle(_header(0, 0, 1, 1, 0), b"\x01\x02\x03\x04"),)),
    ),
    (wire.bell(), Bell()),
]


@pytest.mark.parametrize("case", SERVER_CASES, ids=_case_ids())
@pytest.mark.parametrize("following", range(len(NEXT_MESSAGES)))
def test_server_message_with_trailing_bytes(case: ServerCase, following: int) -> None:
    next_data, next_event = NEXT_MESSAGES[following]
    # A cut of 0 is the message alone; a Bell is one byte, so it is all or nothing.
    for cut in range(len(next_data)):
        conn = case.make_conn()
        assert wire.feed_with_trailing(conn, case.data, next_data[:cut]) == case.events
        assert wire.feed_all(conn, next_data[cut:]) == [next_event]
        assert conn.buffered == 0


def test_two_messages_in_one_piece() -> None:
    conn = wire.connected()
    data = wire.bell() + wire.server_cut_text(b"a") + wire.bell() + wire.fbu()
    assert wire.feed_all(conn, data) == [
        Bell(),
        ServerCutText(b"a"),
        Bell(),
        FramebufferUpdate(()),
    ]


def test_led_state_rectangle() -> None:
    conn = wire.connected(extensions=[QemuLedState()])
    data = wire.fbu(wire.rect(0, 0, 0, 0, Encoding.QEMU_LED_STATE, b"\x05"))
    events = wire.feed_bytewise(conn, data)
    assert events[0] == LedStateChanged(scroll_lock=True, num_lock=False, caps_lock=True)
    assert isinstance(events[1], FramebufferUpdate)


def test_clean_eof_between_messages_is_server_closed() -> None:
    conn = wire.connected()
    conn.receive_data(wire.bell())
    conn.receive_data(b"")
    assert list(conn.events()) == [Bell(), ServerClosed()]
    assert conn.state is State.CLOSED
    assert conn.next_event() is None


@pytest.mark.parametrize(
    "partial",
    [b"\x03\x00\x00\x00\x00\x00\x00\x05he", b"\x00\x00\x00\x01", b"\x00\x00\x00\x01\x00", b"\x01"],
)
def test_eof_inside_a_message_is_a_remote_error(partial: bytes) -> None:
    conn = wire.connected()
    conn.receive_data(partial)
    assert conn.next_event() is None
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_data_after_eof_is_a_local_error() -> None:
    conn = wire.connected()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x02")


def test_server_messages_serialize_like_the_wire() -> None:
    assert Bell().serialize() == wire.bell()
    assert ServerCutText(b"abc").serialize() == wire.server_cut_text(b"abc")
    colours = ((1, 2, 3), (0xFFFF, 0, 0x8000))
    assert SetColourMapEntries(9, colours).serialize() == wire.colour_map(9, colours)
    rect = Rectangle(_header(1, 2, 1, 1, 0), b"\x00\x01\x02\x03")
    assert FramebufferUpdate((rect,)).serialize() == wire.fbu(
        wire.rect(1, 2, 1, 1, 0, b"\x00\x01\x02\x03")
    )
    assert AudioData(b"\x01\x02", AudioFormat()).serialize() == wire.audio_data(b"\x01\x02")
    assert audio_server_message(QemuAudioServerOp.BEGIN) == wire.audio_begin()
    assert audio_server_message(QemuAudioServerOp.END) == wire.audio_end()


# ---------------------------------------------------------------------------
# Limits and malformed server messages
# ---------------------------------------------------------------------------


@dataclass
class BadCase:
    name: str
    make_conn: Callable[[], ClientConnection]
    data: bytes
    match: str
    #: Bytes that must go through without error first (the prefix that is valid).
    ok_prefix: int


def _bad_cases() -> list[BadCase]:
    over_cut = MAX_CUT_TEXT_LENGTH + 1
    return [
        BadCase(
            "cut-text-over-limit",
            _plain,
            wire.u8(3) + b"\0\0\0" + wire.u32(over_cut),
            f"ServerCutText: length {over_cut} exceeds",
            7,
        ),
        BadCase(
            "cut-text-extended-clipboard",
            _plain,
            wire.u8(3) + b"\0\0\0" + wire.u32(0x80000010),
            "Extended Clipboard ServerCutText, but we never advertised",
            7,
        ),
        BadCase(
            "colour-map-past-65536",
            _plain,
            bytes.fromhex("01 00 ffff 0002"),
            r"SetColourMapEntries: entries 65535\.\.65537",
            5,
        ),
        BadCase(
            "colour-map-huge-count",
            _plain,
            bytes.fromhex("01 00 8000 8001"),
            "SetColourMapEntries",
            5,
        ),
        BadCase(
            "audio-chunk-over-limit",
            _with_audio,
            wire.qemu_audio(2) + wire.u32(MAX_AUDIO_CHUNK + 1),
            f"data chunk of {MAX_AUDIO_CHUNK + 1} bytes",
            7,
        ),
        BadCase(
            "unknown-audio-op",
            _with_audio,
            bytes.fromhex("ff 01 0003"),
            "unknown server operation 3",
            3,
        ),
        BadCase(
            "unknown-message-type",
            _plain,
            bytes.fromhex("07"),
            "unknown server message type 7",
            0,
        ),
        BadCase(
            "unadvertised-continuous-updates",
            _plain,
            bytes.fromhex("96"),
            "unknown server message type 150",
            0,
        ),
        BadCase(
            "unknown-qemu-submessage",
            _with_audio,
            bytes.fromhex("ff 07"),
            "unknown QEMU server submessage 7",
            1,
        ),
        BadCase(
            "qemu-audio-without-extension",
            _plain,
            bytes.fromhex("ff 01 0001"),
            "unknown QEMU server submessage 1",
            1,
        ),
        BadCase(
            "rect-right-of-framebuffer",
            _plain,
            wire.fbu(wire.rect(60, 0, 5, 1, 0)),
            "rectangle 5x1\\+60\\+0 lies outside the 64x48 framebuffer",
            4 + 11,
        ),
        BadCase(
            "rect-below-framebuffer",
            _plain,
            wire.fbu(wire.rect(0, 48, 1, 1, 1)),
            "lies outside the 64x48 framebuffer",
            4 + 11,
        ),
        BadCase(
            "rect-huge",
            _plain,
            wire.fbu(wire.rect(65535, 65535, 65535, 65535, 0)),
            "lies outside",
            4 + 11,
        ),
        BadCase(
            "desktop-size-over-limit",
            _plain,
            wire.fbu(wire.rect(0, 0, MAX_FRAMEBUFFER_DIMENSION + 1, 10, Encoding.DESKTOP_SIZE)),
            f"framebuffer {MAX_FRAMEBUFFER_DIMENSION + 1}x10 exceeds",
            4 + 11,
        ),
        BadCase(
            "extended-desktop-size-over-limit",
            _plain,
            wire.fbu(
                wire.rect(
                    0,
                    0,
                    10,
                    MAX_FRAMEBUFFER_DIMENSION + 1,
                    Encoding.EXTENDED_DESKTOP_SIZE,
                    b"\0\0\0\0",
                )
            ),
            f"framebuffer 10x{MAX_FRAMEBUFFER_DIMENSION + 1} exceeds",
            4 + 15,
        ),
        BadCase(
            "unadvertised-pseudo-encoding",
            _plain,
            wire.fbu(wire.rect(0, 0, 0, 0, Encoding.QEMU_AUDIO)),
            "encoding -259, which we did not advertise",
            4 + 11,
        ),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
def test_bad_server_message_fails_the_connection(case: BadCase) -> None:
    conn = case.make_conn()
    with pytest.raises(RemoteProtocolError, match=case.match):
        wire.feed_all(conn, case.data)
    assert conn.state is State.CLOSED
    # The connection stays failed: the same error again, whatever comes next.
    with pytest.raises(RemoteProtocolError, match=case.match):
        conn.next_event()
    conn.receive_data(wire.bell())
    with pytest.raises(RemoteProtocolError, match=case.match):
        conn.next_event()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
def test_bad_server_message_bytewise_fails_at_the_bad_byte(case: BadCase) -> None:
    conn = case.make_conn()
    for i in range(case.ok_prefix):
        conn.receive_data(case.data[i : i + 1])
        assert conn.next_event() is None, f"after byte {i}"
    conn.receive_data(case.data[case.ok_prefix :][:1])
    with pytest.raises(RemoteProtocolError, match=case.match):
        conn.next_event()


def test_cut_text_at_limit_is_accepted() -> None:
    conn = _plain()
    text = b"c" * MAX_CUT_TEXT_LENGTH
    assert wire.feed_all(conn, wire.server_cut_text(text)) == [ServerCutText(text)]


def test_audio_chunk_at_limit_is_accepted() -> None:
    conn = _with_audio()
    data = b"\x01" * MAX_AUDIO_CHUNK
    assert wire.feed_all(conn, wire.audio_data(data)) == [AudioData(data, AudioFormat())]


def test_rectangle_on_the_edge_is_inside() -> None:
    conn = _plain()
    body = b"\0" * 16
    events = wire.feed_all(conn, wire.fbu(wire.rect(60, 47, 4, 1, 0, body)))
    assert events == [FramebufferUpdate((Rectangle(_header(60, 47, 4, 1, 0), body),))]


def test_desktop_size_at_limit_then_rectangles_use_it() -> None:
    conn = _plain()
    side = MAX_FRAMEBUFFER_DIMENSION
    events = wire.feed_all(conn, wire.fbu(wire.rect(0, 0, side, side, Encoding.DESKTOP_SIZE)))
    assert events[0] == DesktopResized(side, side)
    assert (conn.width, conn.height) == (side, side)
    copy = wire.rect(side - 1, side - 1, 1, 1, Encoding.COPY_RECT, b"\0\0\0\0")
    assert len(wire.feed_all(conn, wire.fbu(copy))) == 1


def test_desktop_name_over_limit_fails_the_handshake() -> None:
    conn = ClientConnection()
    too_long = MAX_SERVER_NAME_LENGTH + 1
    data = wire.greeting() + wire.security_none()
    data += wire.u16(64) + wire.u16(48) + wire.PIXEL_FORMAT_RGBX + wire.u32(too_long)
    with pytest.raises(RemoteProtocolError, match=f"desktop name of {too_long} bytes"):
        wire.feed_all(conn, data)
    with pytest.raises(RemoteProtocolError, match="desktop name"):
        conn.next_event()
    assert conn.state is State.CLOSED


def test_desktop_name_at_limit_is_accepted() -> None:
    conn = ClientConnection()
    name = b"n" * MAX_SERVER_NAME_LENGTH
    connected = wire.handshake(conn, name=name)
    assert connected.name == name.decode()


@pytest.mark.parametrize(
    ("width", "height"),
    [(MAX_FRAMEBUFFER_DIMENSION + 1, 1), (1, MAX_FRAMEBUFFER_DIMENSION + 1), (65535, 65535)],
)
def test_server_init_size_over_limit_fails(width: int, height: int) -> None:
    conn = ClientConnection()
    data = wire.greeting() + wire.security_none() + wire.server_init(width, height)
    with pytest.raises(RemoteProtocolError, match=f"framebuffer {width}x{height} exceeds"):
        wire.feed_all(conn, data)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    ("pixel_format", "match"),
    [
        (bytes.fromhex("18 18 00 01 00ff 00ff 00ff 10 08 00 000000"), "bits-per-pixel 24"),
        (bytes.fromhex("10 11 00 01 001f 003f 001f 0b 05 00 000000"), "depth 17"),
        (bytes.fromhex("20 00 00 01 00ff 00ff 00ff 10 08 00 000000"), "depth 0"),
    ],
)
def test_server_init_bad_pixel_format_fails(pixel_format: bytes, match: str) -> None:
    conn = ClientConnection()
    data = wire.greeting() + wire.security_none()
    data += wire.server_init(64, 48, pixel_format=pixel_format)
    with pytest.raises(RemoteProtocolError, match=match):
        wire.feed_all(conn, data)


def test_buffered_counts_an_unfinished_update() -> None:
    # `buffered` is "bytes received but not yet turned into events (for memory
    # accounting)". The rectangles of an unfinished FramebufferUpdate are held in
    # memory until its last rectangle; their headers (and the update's own header)
    # are received bytes not yet turned into events, like their bodies.
    conn = _plain()
    data = wire.fbu(
        wire.rect(0, 0, 0, 0, Encoding.RAW),
        wire.rect(0, 0, 1, 1, Encoding.COPY_RECT, b"\0\0\0\0"),
        count=3,
    )
    assert wire.feed_all(conn, data) == []
    assert conn.buffered == len(data)  # 4 + 12 + 16 = 32
