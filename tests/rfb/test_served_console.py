"""The server half's accounting of one open console (`ServedConsole`), alone and
talking to the client half (`Consoles`) over the wire bytes of both."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import Reader
from resourced.rfb.connection import ClientConnection
from resourced.rfb.consoles import (
    MAX_CREDIT,
    ConsoleCredit,
    ConsoleData,
    ConsoleGrant,
    ConsoleOpen,
    ConsoleOpened,
    Consoles,
    ConsoleWrite,
    ServedConsole,
    parse_client_message,
)

from . import wire
from .test_consoles import SERIAL0, hello


def test_opened_says_the_input_window_and_the_replay() -> None:
    served = ServedConsole(ConsoleOpen(7, 1000, 300, True), "serial0", input_window=4096)
    assert served.opened(123) == ConsoleOpened(7, 4096, 123)
    assert served.sendable == 300  # max_data bounds one DATA


def test_output_goes_as_far_as_the_credit() -> None:
    served = ServedConsole(ConsoleOpen(1, 1000, 300, True), "serial0")
    assert served.sent(300) == 300
    assert served.sent(300) == 300
    assert served.sent(300) == 100  # what is left of the credit
    assert served.sent(100) == 0
    with pytest.raises(LocalProtocolError, match="beyond the 0 allowed"):
        served.sent(1)
    served.grant(ConsoleGrant(1, 50))
    assert served.sendable == 50
    served.grant(ConsoleGrant(1, 5000))
    assert served.sendable == 300


def test_credit_beyond_a_u32_is_the_clients_error() -> None:
    served = ServedConsole(ConsoleOpen(1, MAX_CREDIT - 10, 65536, True), "serial0")
    served.grant(ConsoleGrant(1, 10))
    with pytest.raises(RemoteProtocolError, match="serial0: credit beyond 2\\*\\*32-1"):
        served.grant(ConsoleGrant(1, 1))
    assert served.credit == MAX_CREDIT


def test_input_beyond_the_credit_is_refused_and_changes_nothing() -> None:
    served = ServedConsole(ConsoleOpen(1, 0, 100, True), "serial0", input_window=100)
    assert not served.received(b"x" * 40)
    with pytest.raises(RemoteProtocolError, match="61 bytes of input beyond the 60 bytes"):
        served.received(b"x" * 61)
    assert (served.input_credit, served.returning) == (60, 40)


def test_keystrokes_cost_no_credit_message_and_half_a_window_comes_back() -> None:
    served = ServedConsole(ConsoleOpen(3, 0, 100, True), "serial0", input_window=100)
    for _ in range(49):
        assert not served.received(b"k")
    assert served.drained() is None  # below half a window: no CREDIT yet
    assert served.received(b"k")  # half a window passed on: due once drained
    assert served.drained() == ConsoleCredit(3, 50)
    assert (served.input_credit, served.returning) == (100, 0)
    assert served.drained() is None


def test_a_bad_input_window_is_ours() -> None:
    with pytest.raises(LocalProtocolError):
        ServedConsole(ConsoleOpen(1, 0, 100, True), "serial0", input_window=0)


# --- both halves, over the wire ------------------------------------------------------


def client_messages(raw: bytes) -> list[Any]:
    """The console messages in a client's output (each 255/2)."""
    reader = Reader(raw, 0)
    messages = []
    while reader.remaining:
        assert (reader.u8(), reader.u8()) == (255, 2)
        messages.append(parse_client_message(reader))
    return messages


def open_both(window: int, input_window: int) -> tuple[ClientConnection, Consoles, ServedConsole]:
    ext = Consoles()
    conn = wire.connected(extensions=[ext])
    wire.feed_all(conn, hello(SERIAL0))
    ext.open(1, window=window, max_data=4096, history=False)
    (open_message,) = client_messages(conn.data_to_send())
    served = ServedConsole(open_message, "serial0", input_window)
    assert wire.feed_all(conn, served.opened(0).serialize()) == [ConsoleOpened(1, input_window, 0)]
    return conn, ext, served


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(1, 20000),
    input_window=st.integers(1, 20000),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("type"), st.integers(1, 9000)),
            st.tuples(st.just("drain"), st.just(0)),
            st.tuples(st.just("output"), st.integers(1, 30000)),
        ),
        max_size=60,
    ),
)
def test_the_two_halves_agree_on_credit(
    window: int, input_window: int, steps: list[tuple[str, int]]
) -> None:
    """Whatever the client types and the server outputs, and whenever the host end
    drains: neither side sees the other break its credit, the client may write
    exactly what the server will accept, and every byte of output arrives."""
    conn, ext, served = open_both(window, input_window)
    pending: list[bytes] = []  # output the server has and the client's credit holds back
    got = bytearray()
    produced = bytearray()
    for kind, size in steps:
        if kind == "type":
            assert ext.writable(1) == served.input_credit
            went = ext.write(1, b"t" * size)
            assert went == min(size, served.input_credit)
            for message in client_messages(conn.data_to_send()):
                assert isinstance(message, ConsoleWrite)
                served.received(message.data)  # never beyond the credit
        elif kind == "drain":
            credit = served.drained()
            if credit is not None:
                assert wire.feed_all(conn, credit.serialize()) == [credit]
        else:
            data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
            produced += data
            pending.append(data)
        # The server sends what the client's credit allows; the client grants more.
        while pending and served.sendable:
            data = pending.pop(0)
            chunk, rest = data[: served.sendable], data[served.sendable :]
            if rest:
                pending.insert(0, rest)
            served.sent(len(chunk))
            for event in wire.feed_all(conn, ConsoleData.encode(1, chunk)):
                assert isinstance(event, ConsoleData)
                got += event.data
            for message in client_messages(conn.data_to_send()):
                assert isinstance(message, ConsoleGrant)
                served.grant(message)
        assert served.input_credit + served.returning == input_window
    assert bytes(got) + b"".join(pending) == bytes(produced)
