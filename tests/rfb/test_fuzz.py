"""Property tests of `ClientConnection` against hostile and random servers.

(a) Any bytes, in any chunking, fed to a connected client give events or a
    `RemoteProtocolError`, nothing else, with memory bounded by the input.
(b) The same during the handshake, where any `ResourcedError` but
    `LocalProtocolError` may end it.
(c) Valid server message sequences, serialized and fed in random chunks, come
    out as the same messages in the same order.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.audio import AudioFormat
from resourced.errors import LocalProtocolError, RemoteProtocolError, ResourcedError
from resourced.rfb.connection import ClientConnection, State
from resourced.rfb.constants import Encoding, QemuAudioServerOp
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.events import (
    Connected,
    CursorShape,
    DesktopResized,
    PixelFormatChanged,
    ServerClosed,
)
from resourced.rfb.messages import (
    Bell,
    FramebufferUpdate,
    Rectangle,
    ServerCutText,
    SetColourMapEntries,
)
from resourced.rfb.qemu import (
    AudioBegin,
    AudioData,
    AudioEnd,
    AudioSupported,
    LedStateChanged,
    QemuAudio,
    QemuLedState,
    audio_server_message,
)
from resourced.rfb.security import TlsMode
from resourced.rfb.tls import TlsCredentials

from . import wire
from .wire import mutated, traced_peak

WIDTH, HEIGHT = 64, 48
MIB = 1024 * 1024

CONNECTED_EVENTS = (
    Bell,
    ServerCutText,
    SetColourMapEntries,
    FramebufferUpdate,
    DesktopResized,
    CursorShape,
    PixelFormatChanged,
    ServerClosed,
    AudioSupported,
    AudioBegin,
    AudioEnd,
    AudioData,
    LedStateChanged,
)

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    pieces = []
    start = 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [p for p in pieces if p]


def feed_hostile(
    conn: ClientConnection,
    pieces: list[bytes],
    allowed: tuple[type[BaseException], ...],
    *,
    eof: bool,
) -> tuple[list[Any], BaseException | None]:
    """Feed pieces until the connection fails with an allowed error (anything
    else propagates); check `buffered` never exceeds what was fed."""
    events: list[Any] = []
    fed = 0
    for piece in [*pieces, *([b""] if eof else [])]:
        conn.receive_data(piece)
        fed += len(piece)
        try:
            events.extend(conn.events())
        except allowed as err:
            return events, err
        assert conn.buffered <= fed
    return events, None


def assert_stays_failed(conn: ClientConnection, error: BaseException) -> None:
    assert conn.state is State.CLOSED
    with pytest.raises(type(error)) as again:
        conn.next_event()
    assert again.value is error


# ---------------------------------------------------------------------------
# Valid server messages: (c) feeds them as they are, (a) mutates them
# ---------------------------------------------------------------------------

u16s = st.integers(0, 0xFFFF)


@st.composite
def colour_maps(draw: st.DrawFn) -> SetColourMapEntries:
    count = draw(st.integers(0, 12))
    first = draw(st.integers(0, min(0xFFFF, 65536 - count)))
    colours = draw(st.lists(st.tuples(u16s, u16s, u16s), min_size=count, max_size=count))
    return SetColourMapEntries(first, tuple(colours))


@st.composite
def pixel_rects(draw: st.DrawFn) -> Rectangle:
    width = draw(st.integers(0, 12))
    height = draw(st.integers(0, 12))
    x = draw(st.integers(0, WIDTH - width))
    y = draw(st.integers(0, HEIGHT - height))
    encoding = draw(st.sampled_from([Encoding.RAW, Encoding.COPY_RECT]))
    if encoding == Encoding.RAW:
        body = draw(st.binary(min_size=width * height * 4, max_size=width * height * 4))
    else:
        body = wire.u16(draw(st.integers(0, WIDTH - width))) + wire.u16(
            draw(st.integers(0, HEIGHT - height))
        )
    return Rectangle(RectangleHeader(x, y, width, height, int(encoding)), body)


led_rects = st.integers(0, 7).map(
    lambda bits: Rectangle(RectangleHeader(0, 0, 0, 0, Encoding.QEMU_LED_STATE), bytes([bits]))
)

updates = st.lists(st.one_of(pixel_rects(), led_rects), max_size=5).map(
    lambda rects: FramebufferUpdate(tuple(rects))
)

server_messages = st.one_of(
    st.just(Bell()),
    st.binary(max_size=64).map(ServerCutText),
    colour_maps(),
    updates,
    st.binary(max_size=64).map(lambda d: AudioData(d, AudioFormat())),
    st.just(AudioBegin(AudioFormat())),
    st.just(AudioEnd()),
)


def serialize(message: Any) -> bytes:
    if isinstance(message, AudioBegin):
        return audio_server_message(QemuAudioServerOp.BEGIN)
    if isinstance(message, AudioEnd):
        return audio_server_message(QemuAudioServerOp.END)
    data: bytes = message.serialize()
    return data


def expected_events(message: Any) -> list[Any]:
    if isinstance(message, FramebufferUpdate):
        leds = [
            LedStateChanged(bool(r.body[0] & 1), bool(r.body[0] & 2), bool(r.body[0] & 4))
            for r in message.rectangles
            if r.header.encoding == Encoding.QEMU_LED_STATE
        ]
        return [*leds, message]
    return [message]


# ---------------------------------------------------------------------------
# (a) a connected client: bytes that look like server messages often enough to
# get past the type byte
# ---------------------------------------------------------------------------


#: What a connected client advertised or otherwise takes, and a few it does not.
ENCODINGS = [int(e) for e in Encoding] + [3, 9, -1, -22, -300, 0x7FFFFFFF, -(2**31)]

small = st.integers(0, 70)
rect_headers = st.builds(
    lambda x, y, w, h, enc: wire.rect(x, y, w, h, enc),
    small,
    small,
    st.one_of(small, small, st.integers(0, 0xFFFF)),
    st.one_of(small, small, st.integers(0, 0xFFFF)),
    st.one_of(
        st.sampled_from(ENCODINGS),
        st.sampled_from(ENCODINGS),
        st.sampled_from(ENCODINGS),
        st.integers(-(2**31), 2**31 - 1),
    ),
)
fbu_with_rects = st.lists(
    st.tuples(rect_headers, st.binary(max_size=48)), min_size=1, max_size=6
).map(lambda rs: wire.fbu(*(h + body for h, body in rs)))
lengths = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)).map(wire.u32)
fragments = st.one_of(
    mutated(server_messages.map(serialize)),
    mutated(server_messages.map(serialize)),
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"\xff\x00",
            wire.fbu(wire.rect(0, 0, WIDTH, HEIGHT, Encoding.QEMU_AUDIO)),
            wire.fbu(wire.rect(0, 0, 8, 8, Encoding.DESKTOP_SIZE)),
            wire.fbu(wire.rect(0, 0, 16384, 16384, Encoding.DESKTOP_SIZE)),
        ]
    ),
    st.integers(0, 0xFFFF).map(lambda n: wire.fbu(count=n)),
    fbu_with_rects,
    rect_headers,
    lengths,
)
server_noise = st.one_of(
    st.binary(max_size=2048),
    st.lists(fragments, max_size=24).map(b"".join),
)


def connected_client() -> ClientConnection:
    conn = ClientConnection(extensions=[QemuAudio(), QemuLedState()])
    wire.handshake(conn, width=WIDTH, height=HEIGHT)
    return conn


@settings(FUZZ, max_examples=2500)
@given(data=server_noise, cuts=st.lists(st.integers(0, 4096), max_size=16), eof=st.booleans())
def test_connected_client_survives_any_bytes(data: bytes, cuts: list[int], eof: bool) -> None:
    conn = connected_client()
    pieces = split(data, cuts)
    with traced_peak() as peak:
        events, error = feed_hostile(conn, pieces, (RemoteProtocolError,), eof=eof)
    assert peak[0] < 4 * len(data) + 2 * MIB
    for event in events:
        assert isinstance(event, CONNECTED_EVENTS), event
    if error is not None:
        assert str(error)
        assert_stays_failed(conn, error)
    elif eof:
        assert events[-1] == ServerClosed()
        assert conn.state is State.CLOSED
    else:
        assert conn.state is State.CONNECTED
        assert conn.buffered <= len(data)


# ---------------------------------------------------------------------------
# (b) the handshake
# ---------------------------------------------------------------------------

greetings = st.one_of(
    st.sampled_from([b"3.3", b"3.7", b"3.8", b"3.5", b"3.889"]).map(wire.greeting),
    st.binary(min_size=12, max_size=12),
)
security_lists = st.one_of(
    st.lists(st.sampled_from([0, 1, 2, 16, 18, 19, 20]), max_size=5).map(
        lambda ts: wire.security_types(*ts)
    ),
    st.sampled_from([1, 2, 19]).map(wire.security_type_33),
    st.binary(max_size=8),
)
vencrypt_parts = st.one_of(
    st.just(wire.vencrypt_version() + wire.vencrypt_ack()),
    st.lists(st.integers(250, 270), max_size=6).map(lambda s: wire.vencrypt_subtypes(*s)),
    st.sampled_from([wire.vencrypt_accept(True), wire.vencrypt_accept(False)]),
    st.binary(max_size=8),
)
handshake_parts = st.one_of(
    st.sampled_from(
        [
            wire.security_result_ok(),
            wire.security_result_failed(),
            wire.security_result_failed(b"no"),
            wire.server_init(WIDTH, HEIGHT),
            wire.vnc_challenge(),
        ]
    ),
    vencrypt_parts,
    lengths,
    st.binary(max_size=64),
)


@st.composite
def handshake_scripts(draw: st.DrawFn) -> bytes:
    """A server's side of a plausible handshake, then some connected-phase bytes."""
    path = draw(st.sampled_from(["none", "vnc", "vencrypt", "refused"]))
    version = draw(st.sampled_from([b"3.3", b"3.7", b"3.8", b"3.5", b"3.889"]))
    spoken = wire.spoken_version(version)
    data = wire.greeting(version)
    if path == "refused":
        reason = draw(st.binary(max_size=20))
        if spoken == b"3.3":
            return data + wire.security_refused_33(reason)
        return data + wire.security_refused(reason)
    if path == "vencrypt" and spoken != b"3.3":
        data += wire.security_types(19) + wire.vencrypt_version() + wire.vencrypt_ack()
        subtypes = draw(st.lists(st.integers(255, 265), min_size=1, max_size=5))
        data += wire.vencrypt_subtypes(*subtypes) + wire.vencrypt_accept()
        return data + draw(st.binary(max_size=64))  # what would be TLS records
    if path == "vnc":
        data += wire.security_type_33(2) if spoken == b"3.3" else wire.security_types(2)
        data += wire.vnc_challenge(draw(st.binary(min_size=16, max_size=16)))
        data += wire.security_result_ok()
    else:
        data += wire.security_none(version)
    data += wire.server_init(WIDTH, HEIGHT, draw(st.binary(max_size=16)))
    return data + draw(st.lists(fragments, max_size=4).map(b"".join))


handshake_noise = st.one_of(
    st.binary(max_size=1024),
    st.tuples(greetings, security_lists, st.lists(handshake_parts, max_size=8)).map(
        lambda t: t[0] + t[1] + b"".join(t[2])
    ),
    mutated(handshake_scripts()),
    mutated(handshake_scripts()),
)

client_options = st.fixed_dictionaries(
    {
        "password": st.sampled_from([None, "pw"]),
        "username": st.sampled_from([None, "user"]),
        "tls_mode": st.sampled_from(list(TlsMode)),
        "allow_anonymous_tls": st.booleans(),
    }
)

HANDSHAKE_ERRORS = (ResourcedError,)


@settings(FUZZ, max_examples=2500)
@given(
    data=handshake_noise,
    cuts=st.lists(st.integers(0, 1024), max_size=12),
    options=client_options,
    eof=st.booleans(),
)
def test_handshake_survives_any_bytes(
    data: bytes, cuts: list[int], options: dict[str, Any], eof: bool
) -> None:
    conn = ClientConnection(
        tls=TlsCredentials(verify=False), extensions=[QemuAudio(), QemuLedState()], **options
    )
    pieces = split(data, cuts)
    with traced_peak() as peak:
        events, error = feed_hostile(conn, pieces, HANDSHAKE_ERRORS, eof=eof)
    assert peak[0] < 4 * len(data) + 2 * MIB
    assert not isinstance(error, LocalProtocolError), error
    for event in events:
        assert isinstance(event, (Connected, *CONNECTED_EVENTS)), event
    if events:
        assert isinstance(events[0], Connected)
    if error is not None:
        assert str(error)
        assert_stays_failed(conn, error)
    elif eof:
        # EOF must end the handshake one way or the other.
        assert conn.state is State.CLOSED


# ---------------------------------------------------------------------------
# (c) valid message sequences come out as they went in
# ---------------------------------------------------------------------------


@settings(FUZZ, max_examples=1000)
@given(messages=st.lists(server_messages, max_size=12), data=st.data())
def test_valid_messages_come_out_in_order(messages: list[Any], data: st.DataObject) -> None:
    conn = connected_client()
    ack = wire.fbu(wire.rect(0, 0, WIDTH, HEIGHT, Encoding.QEMU_AUDIO))
    assert wire.feed_all(conn, ack)[0] == AudioSupported()
    stream = b"".join(serialize(m) for m in messages)
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=len(stream) // 4 + 4))
    events = wire.feed_chunks(conn, stream, cuts)
    assert events == [e for m in messages for e in expected_events(m)]
    assert conn.buffered == 0
    assert conn.state is State.CONNECTED
    conn.receive_data(b"")
    assert list(conn.events()) == [ServerClosed()]
