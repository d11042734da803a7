"""Stream positions of the console extension (docs/protocol/console-extension.md,
sections 4.9, 5.1 and 6): the wire form of HELLO's flag, OPEN's resume point and
OPENED AT, the client half's checks and verdict (`Resumed`), the server half's
choice of replay (`ServedConsole.begin`), and the two together over random
disconnections, server restarts and split points: every byte of output reaches
the client at most once and in order, and each byte it misses is one it was
told of (or one an old stream had after the client left it, which nobody can
know).

Wire vectors are packed by hand (`wire`, `struct`), not with the `serialize()`
methods under test."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import NeedData, Reader
from resourced.rfb.connection import ClientConnection
from resourced.rfb.consoles import (
    MAX_CREDIT,
    MAX_OFFSET,
    ConsoleData,
    ConsoleOpen,
    ConsoleOpened,
    Consoles,
    ConsolesAnnounced,
    Resumed,
    ServedConsole,
    StreamPosition,
    parse_client_message,
    parse_server_message,
    resumed,
)

from . import wire
from .test_consoles import (
    SERIAL0,
    SERIAL0_INFO,
    H,
    assert_fails,
    data,
    hello,
    opened,
    parse_whole,
    server_message,
)

STREAM = 0x1F2E3D4C5B6A7988
OTHER = 0x0102030405060708


def u64(value: int) -> bytes:
    return struct.pack("!Q", value)


def opened_at(
    console_id: int, credit: int, history_length: int, stream: int, start: int, end: int
) -> bytes:
    """OPENED AT (4.9): U32 id, U32 credit, U32 history_length, U64 stream, start, end."""
    body = wire.u32(console_id) + wire.u32(credit) + wire.u32(history_length)
    return server_message(8, body + u64(stream) + u64(start) + u64(end))


def open_at(
    console_id: int, window: int, max_data: int, flags: int, stream: int, offset: int
) -> bytes:
    """OPEN (5.1) with `positions`: the flags, then U64 stream, U64 offset."""
    body = wire.u32(console_id) + wire.u32(window) + wire.u32(max_data) + wire.u8(flags)
    return wire.u8(255) + wire.u8(2) + wire.u8(0) + body + u64(stream) + u64(offset)


# ---------------------------------------------------------------------------
# Wire vectors, from the spec's example (section 9) and its tables
# ---------------------------------------------------------------------------

SERVER_VECTORS: list[tuple[bytes, Any]] = [
    (
        H("ff 02 00  01 01 0001 00010000  00000001 00 01 07") + b"serial0",
        ConsolesAnnounced(1, 65536, (SERIAL0_INFO,), positions=True),
    ),
    (
        H("ff 02 08  00000001 00040000 00000016  1f2e3d4c5b6a7988")
        + H("0000000000000000 0000000000000016"),
        ConsoleOpened(1, 0x40000, 22, STREAM, 0, 22),
    ),
    (
        H("ff 02 08  00000001 00040000 00000005  1f2e3d4c5b6a7988")
        + H("0000000000000000 000000000000001b"),
        ConsoleOpened(1, 0x40000, 5, STREAM, 0, 27),
    ),
    # The largest offsets there are; a replay of nothing.
    (
        H("ff 02 08  ffffffff ffffffff 00000000  ffffffffffffffff")
        + H("ffffffffffffffff ffffffffffffffff"),
        ConsoleOpened(MAX_CREDIT, MAX_CREDIT, 0, MAX_OFFSET, MAX_OFFSET, MAX_OFFSET),
    ),
]

CLIENT_VECTORS: list[tuple[bytes, Any]] = [
    (
        H("ff 02 00  00000001 00040000 00010000 05  0000000000000000 0000000000000000"),
        ConsoleOpen(1, 0x40000, 0x10000, True, positions=True),
    ),
    (
        H("ff 02 00  00000001 00040000 00010000 05  1f2e3d4c5b6a7988 0000000000000016"),
        ConsoleOpen(1, 0x40000, 0x10000, True, positions=True, resume=StreamPosition(STREAM, 22)),
    ),
    # Positions without history (the server tells where it stands, replays nothing),
    # with marks.
    (
        H("ff 02 00  00000002 00001000 00000010 06  0000000000000000 0000000000000000"),
        ConsoleOpen(2, 4096, 16, False, marks=True, positions=True),
    ),
]


@pytest.mark.parametrize(("raw", "message"), SERVER_VECTORS)
def test_server_vectors(raw: bytes, message: Any) -> None:
    assert message.serialize().hex(" ") == raw.hex(" ")
    assert parse_whole(parse_server_message, raw) == message


@pytest.mark.parametrize(("raw", "message"), CLIENT_VECTORS)
def test_client_vectors(raw: bytes, message: Any) -> None:
    assert message.serialize().hex(" ") == raw.hex(" ")
    assert parse_whole(parse_client_message, raw) == message


def test_the_helpers_pack_the_vectors() -> None:
    assert opened_at(1, 0x40000, 5, STREAM, 0, 27) == SERVER_VECTORS[2][0]
    assert open_at(1, 0x40000, 0x10000, 5, STREAM, 22) == CLIENT_VECTORS[1][0]
    assert hello(SERIAL0, flags=1) == SERVER_VECTORS[0][0]


def test_an_open_with_positions_and_stream_0_has_no_resume_point() -> None:
    # Stream 0 names no stream: its offset means nothing.
    raw = open_at(1, 16, 16, 5, 0, 12345)
    assert parse_whole(parse_client_message, raw) == ConsoleOpen(1, 16, 16, True, positions=True)


def test_a_short_open_at_or_opened_at_is_need_more_data() -> None:
    for raw, parse in (
        (CLIENT_VECTORS[1][0], parse_client_message),
        (SERVER_VECTORS[1][0], parse_server_message),
    ):
        for cut in range(2, len(raw)):
            with pytest.raises(NeedData):
                parse(Reader(raw[:cut], 2))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (opened_at(1, 0, 0, 0, 0, 0), "stream 0"),
        (opened_at(1, 0, 0, STREAM, 10, 9), "from offset 10 to 9"),
        (opened_at(1, 0, 11, STREAM, 0, 10), "replay of 11 bytes from a history of 10"),
    ],
)
def test_an_impossible_opened_at_is_refused(raw: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        parse_whole(parse_server_message, raw)


def test_messages_that_cannot_be_said_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="positions flag"):
        ConsoleOpen(1, 1, 1, True, resume=StreamPosition(STREAM, 0)).serialize()
    with pytest.raises(LocalProtocolError, match="replay of 5"):
        ConsoleOpened(1, 0, 5, STREAM, 0, 4).serialize()
    with pytest.raises(LocalProtocolError):
        StreamPosition(0, 1)
    with pytest.raises(LocalProtocolError):
        StreamPosition(STREAM, MAX_OFFSET + 1)


offsets = st.integers(0, MAX_OFFSET)
streams = st.integers(1, MAX_OFFSET)
u32s = st.integers(0, MAX_CREDIT)


@st.composite
def opened_ats(draw: st.DrawFn) -> ConsoleOpened:
    end = draw(offsets)
    start = draw(st.integers(0, end))
    length = draw(st.integers(0, min(end - start, MAX_CREDIT)))
    return ConsoleOpened(draw(u32s), draw(u32s), length, draw(streams), start, end)


positions = st.builds(StreamPosition, streams, offsets)


@settings(max_examples=300, deadline=None, database=None)
@given(opened_ats(), st.binary(max_size=8))
def test_opened_at_round_trips_whole_bytewise_and_with_trailing_bytes(
    message: ConsoleOpened, trailing: bytes
) -> None:
    raw = message.serialize()
    assert parse_whole(parse_server_message, raw) == message
    reader = Reader(raw + trailing, 2)
    assert parse_server_message(reader) == message
    assert reader.remaining == len(trailing)


@settings(max_examples=300, deadline=None, database=None)
@given(u32s, u32s, st.integers(1, 65536), st.booleans(), st.booleans(), st.none() | positions)
def test_open_with_positions_round_trips(
    console_id: int,
    credit: int,
    max_data: int,
    history: bool,
    marks: bool,
    resume: StreamPosition | None,
) -> None:
    message = ConsoleOpen(console_id, credit, max_data, history, marks, True, resume)
    assert parse_whole(parse_client_message, message.serialize()) == message


# ---------------------------------------------------------------------------
# The client half
# ---------------------------------------------------------------------------


def announced(positions: bool) -> tuple[ClientConnection, Consoles]:
    ext = Consoles()
    conn = wire.connected(extensions=[ext])
    (event,) = wire.feed_all(conn, hello(SERIAL0, flags=1 if positions else 0))
    assert event == ConsolesAnnounced(1, 65536, (SERIAL0_INFO,), positions=positions)
    assert ext.positions is positions
    return conn, ext


def test_against_a_server_without_positions_the_open_is_as_before() -> None:
    conn, ext = announced(positions=False)
    # A resume point is not sent to a server that would misread it: `history` decides.
    ext.open(1, window=4096, max_data=4096, history=False, resume=StreamPosition(STREAM, 7))
    assert conn.data_to_send() == H("ff 02 00  00000001 00001000 00001000 00")
    assert wire.feed_all(conn, opened(1, 10, 0)) == [ConsoleOpened(1, 10, 0)]


def test_against_a_server_with_positions_every_open_asks_for_them() -> None:
    conn, ext = announced(positions=True)
    ext.open(1, window=4096, max_data=4096, history=False)
    assert conn.data_to_send() == open_at(1, 4096, 4096, 4, 0, 0)
    events = wire.feed_bytewise(conn, opened_at(1, 10, 0, STREAM, 3, 9))
    assert events == [ConsoleOpened(1, 10, 0, STREAM, 3, 9)]
    assert events[0].position == StreamPosition(STREAM, 9)


def test_a_resume_point_asks_for_history() -> None:
    conn, ext = announced(positions=True)
    ext.open(1, window=4096, max_data=4096, history=False, resume=StreamPosition(STREAM, 5))
    assert conn.data_to_send() == open_at(1, 4096, 4096, 5, STREAM, 5)
    events = wire.feed_all(conn, opened_at(1, 10, 4, STREAM, 0, 9) + data(1, b"abcdef"))
    assert events == [
        ConsoleOpened(1, 10, 4, STREAM, 0, 9, Resumed.EXACT),
        ConsoleData(1, b"abcd", history=True),
        ConsoleData(1, b"ef"),
    ]


def test_opened_and_opened_at_answer_only_their_own_open() -> None:
    conn, ext = announced(positions=True)
    ext.open(1)
    assert_fails(conn, opened(1, 10, 0), "OPENED for console serial0, not OPENED AT")
    conn, ext = announced(positions=False)
    ext.open(1)
    assert_fails(conn, opened_at(1, 10, 0, STREAM, 0, 0), "OPENED AT for console serial0")


def test_an_opened_at_while_closing_is_dropped() -> None:
    conn, ext = announced(positions=True)
    ext.open(1)
    ext.close(1)
    assert wire.feed_all(conn, opened_at(1, 10, 0, STREAM, 0, 0)) == []


RESUMED_CASES = [
    # asked (stream, offset), answered (stream, start, end, history_length), verdict
    ((STREAM, 5), (STREAM, 0, 9, 4), Resumed.EXACT),
    ((STREAM, 9), (STREAM, 0, 9, 0), Resumed.EXACT),
    ((STREAM, 3), (STREAM, 3, 9, 6), Resumed.EXACT),
    ((STREAM, 2), (STREAM, 3, 9, 6), Resumed.GAP),  # fell out of the ring
    ((STREAM, 2), (STREAM, 3, 9, 2), Resumed.GAP),  # ...and less was replayed
    ((STREAM, 5), (OTHER, 0, 9, 9), Resumed.NEW_STREAM),
    ((STREAM, 5), (OTHER, 0, 0, 0), Resumed.NEW_STREAM),
    ((STREAM, 5), (OTHER, 2, 9, 7), Resumed.GAP),  # the new stream's start is gone
]


@pytest.mark.parametrize(("asked", "answer", "verdict"), RESUMED_CASES)
def test_the_client_says_how_the_replay_joins(
    asked: tuple[int, int], answer: tuple[int, int, int, int], verdict: Resumed
) -> None:
    stream, start, end, length = answer
    conn, ext = announced(positions=True)
    ext.open(1, resume=StreamPosition(*asked))
    conn.data_to_send()
    (event,) = wire.feed_all(conn, opened_at(1, 10, length, stream, start, end))
    assert event.resumed is verdict


@pytest.mark.parametrize(
    ("asked", "answer", "match"),
    [
        ((STREAM, 10), (STREAM, 0, 9, 9), "ends at offset 9, before offset 10"),
        ((STREAM, 5), (STREAM, 0, 9, 9), "a replay from offset 0, not from 5"),
        ((STREAM, 5), (STREAM, 0, 9, 3), "a replay from offset 6, not from 5"),
    ],
)
def test_a_server_that_breaks_the_rules_ends_the_connection(
    asked: tuple[int, int], answer: tuple[int, int, int, int], match: str
) -> None:
    stream, start, end, length = answer
    conn, ext = announced(positions=True)
    ext.open(1, resume=StreamPosition(*asked))
    assert_fails(conn, opened_at(1, 10, length, stream, start, end), match)


# ---------------------------------------------------------------------------
# The server half: which replay
# ---------------------------------------------------------------------------


def served(history: bool = True, resume: StreamPosition | None = None) -> ServedConsole:
    return ServedConsole(ConsoleOpen(1, 1000, 100, history, False, True, resume), "serial0")


def test_begin_replays_from_a_resume_point_it_holds() -> None:
    start, answer = served(resume=StreamPosition(STREAM, 40)).begin(STREAM, 10, 50)
    assert start == 40
    assert answer == ConsoleOpened(1, served().input_credit, 10, STREAM, 10, 50)


@pytest.mark.parametrize(
    ("console", "start"),
    [
        (served(resume=StreamPosition(STREAM, 9)), 10),  # fell out: all it holds
        (served(resume=StreamPosition(OTHER, 40)), 10),  # another stream: all
        (served(resume=StreamPosition(STREAM, 51)), 10),  # past the end: not ours, all
        (served(), 10),  # no resume point: all
        (served(history=False, resume=StreamPosition(STREAM, 40)), 50),  # no history
    ],
)
def test_begin_otherwise(console: ServedConsole, start: int) -> None:
    got, answer = console.begin(STREAM, 10, 50)
    assert got == start
    assert (answer.start, answer.end, answer.history_length) == (10, 50, 50 - start)


def test_begin_without_positions_answers_opened() -> None:
    console = ServedConsole(ConsoleOpen(1, 1000, 100, True), "serial0")
    assert console.begin(STREAM, 10, 50) == (10, ConsoleOpened(1, console.input_credit, 40))


def test_begin_replays_at_most_a_u32() -> None:
    start, answer = served().begin(STREAM, 0, 2**40)
    assert answer.history_length == MAX_CREDIT
    assert start == answer.start == 2**40 - MAX_CREDIT
    answer.serialize()


@settings(max_examples=500, deadline=None, database=None)
@given(
    st.booleans(),
    st.none() | st.builds(StreamPosition, st.sampled_from([STREAM, OTHER]), st.integers(0, 100)),
    st.integers(0, 100),
    st.integers(0, 100),
)
def test_begin_and_the_client_agree(
    history: bool, resume: StreamPosition | None, a: int, b: int
) -> None:
    oldest, total = min(a, b), max(a, b)
    start, answer = served(history, resume).begin(STREAM, oldest, total)
    assert oldest <= start <= total
    assert answer.replay_from == start
    assert parse_whole(parse_server_message, answer.serialize()) == answer
    if resume is None or not history:
        assert start == (oldest if history else total)
        return
    if resume.stream_id == STREAM and resume.offset > total:
        with pytest.raises(RemoteProtocolError):
            resumed(resume, answer)
        return
    verdict = resumed(resume, answer)
    if resume.stream_id == STREAM and oldest <= resume.offset:
        assert verdict is Resumed.EXACT
        assert start == resume.offset
    elif resume.stream_id == STREAM:
        assert verdict is Resumed.GAP
    else:
        assert verdict is (Resumed.NEW_STREAM if oldest == 0 else Resumed.GAP)


# ---------------------------------------------------------------------------
# Both halves over random disconnections and server restarts
# ---------------------------------------------------------------------------


@dataclass
class Stream:
    """One stream of the model server: all its bytes (for checking) and its ring."""

    stream_id: int
    output: bytearray = field(default_factory=bytearray)

    def oldest(self, ring: int) -> int:
        return max(0, len(self.output) - ring)


@dataclass
class Client:
    """What a client that resumes keeps across connections, and what it got."""

    position: StreamPosition | None = None
    #: Each byte taken, as (stream, offset): the client's own count.
    got: list[tuple[int, int, int]] = field(default_factory=list)
    #: Offsets it was told it missed, or may have missed (an old stream's tail).
    missed: dict[int, set[int]] = field(default_factory=dict)

    def take(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, ConsoleOpened):
                asked, self.position = self.position, event.position
                assert self.position is not None
                told = self.missed.setdefault(event.stream_id, set())
                if asked is None or asked.stream_id != event.stream_id:
                    told.update(range(event.replay_from))
                else:
                    told.update(range(asked.offset, event.replay_from))
            elif isinstance(event, ConsoleData):
                assert self.position is not None
                stream, offset = self.position.stream_id, self.position.offset
                for i, byte in enumerate(event.data):
                    self.got.append((stream, offset + i, byte))
                self.position = StreamPosition(stream, offset + len(event.data))


steps = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=40),  # the guest writes
        st.just("cut"),  # the connection drops (what is in flight is lost)
        st.just("connect"),  # the client connects (if not connected)
        st.just("restart"),  # a new server process: a new stream
    ),
    max_size=30,
)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps, st.integers(1, 200), st.data())
def test_no_byte_twice_and_every_miss_told(plan: list[Any], ring: int, draw: st.DataObject) -> None:
    ids = iter(range(1, 1000))
    stream = Stream(next(ids))
    streams = {stream.stream_id: stream}
    client = Client()
    conn: ClientConnection | None = None
    in_flight = bytearray()  # server bytes not yet fed to the client
    tails: dict[int, set[int]] = {}  # what old streams had past the client's position

    def feed(raw: bytes) -> None:
        assert conn is not None
        cuts = draw.draw(st.lists(st.integers(0, len(raw)), max_size=4))
        client.take(wire.feed_chunks(conn, raw, cuts))

    def connect() -> None:
        nonlocal conn
        ext = Consoles()
        conn = wire.connected(extensions=[ext])
        client.take(wire.feed_all(conn, hello(SERIAL0, flags=1)))
        ext.open(1, window=MAX_CREDIT, resume=client.position)
        request = parse_client_message(Reader(conn.data_to_send(), 2))
        assert isinstance(request, ConsoleOpen)
        total = len(stream.output)
        start, answer = ServedConsole(request, "serial0").begin(
            stream.stream_id, stream.oldest(ring), total
        )
        assert stream.oldest(ring) <= start <= total  # only what the ring holds
        in_flight.extend(answer.serialize())
        if start < total:
            in_flight.extend(ConsoleData.encode(1, bytes(stream.output[start:])))

    def cut() -> None:
        nonlocal conn
        # Often all of it got through, else some (then a message may be cut short).
        keep = draw.draw(st.just(len(in_flight)) | st.integers(0, len(in_flight)))
        feed(bytes(in_flight[:keep]))  # what got through before the drop
        in_flight.clear()
        conn = None

    connect()
    for step in plan:
        if isinstance(step, bytes):
            stream.output += step
            if conn is not None:
                in_flight.extend(ConsoleData.encode(1, step))
        elif step == "cut" and conn is not None:
            cut()
        elif step == "connect" and conn is None:
            connect()
        elif step == "restart":
            if conn is not None:
                cut()
            at = client.position
            if at is not None and at.stream_id == stream.stream_id:
                tails[at.stream_id] = set(range(at.offset, len(stream.output)))
            stream = Stream(next(ids))
            streams[stream.stream_id] = stream
    if conn is not None:
        feed(bytes(in_flight))

    # Each byte the client counted is that byte of that stream, in order, once.
    for stream_id, offset, byte in client.got:
        assert streams[stream_id].output[offset] == byte
    order = [(stream_id, offset) for stream_id, offset, _ in client.got]
    assert order == sorted(order)  # streams in the order they began, offsets rising
    assert len(set(order)) == len(order)
    # What it did not get of a stream up to its last position there, it was told of
    # (or it is an old stream's tail, which only the dead server knew).
    for stream_id, told in client.missed.items():
        offsets = {o for s, o, _ in client.got if s == stream_id}
        reached = max(offsets, default=-1) + 1
        if client.position is not None and client.position.stream_id == stream_id:
            reached = client.position.offset
        missing = set(range(reached)) - offsets
        assert missing <= told | tails.get(stream_id, set())
        assert not (told & offsets)
    # A ring that holds everything loses nothing but old streams' tails.
    if ring >= max(len(s.output) for s in streams.values()):
        assert all(not told for told in client.missed.values())
