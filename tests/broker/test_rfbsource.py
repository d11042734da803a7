"""The service's console source over the console extension (`RfbConsoleSource`),
driven sans-IO: a client connection with `Consoles` per RFB connection, server
bytes packed by hand, the OPENs it sends parsed back. What it remembers of the
server's stream across connections, what it asks for on each reopen, and what it
logs. The same source against a real gateway and a real QEMU is in
tests/dbus/test_faults.py."""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest

from resourced.broker.rfbsource import RfbConsoleSource
from resourced.rfb._buffer import Reader
from resourced.rfb.aio import RfbClient
from resourced.rfb.connection import ClientConnection
from resourced.rfb.consoles import (
    ConsoleClosed,
    ConsoleCredit,
    ConsoleData,
    ConsoleOpen,
    ConsoleOpened,
    Consoles,
    StreamPosition,
    parse_client_message,
)
from tests.rfb import wire
from tests.rfb.test_console_positions import opened_at
from tests.rfb.test_consoles import SERIAL0, closed, data, hello, opened

STREAM = 0x1F2E3D4C5B6A7988
OTHER = 0x0102030405060708


class Hub:
    """What a hub is told (a `SourceHandler`)."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.connected = 0
        self.lost: list[str] = []

    def source_connected(self) -> None:
        self.connected += 1

    def source_data(self, data: bytes) -> None:
        self.output += data

    def source_drained(self) -> None:
        pass

    def source_lost(self, reason: str) -> None:
        self.lost.append(reason)


class Flush:
    """The source flushes its client after each command: the bytes stay in the
    connection, read back with `sent()`."""

    def flush(self) -> None:
        pass


class Link:
    """One RFB connection of the guest, as far as the source sees it."""

    def __init__(self, source: RfbConsoleSource, positions: bool) -> None:
        self.source = source
        self.ext = Consoles()
        self.conn: ClientConnection = wire.connected(extensions=[self.ext])
        wire.feed_all(self.conn, hello(SERIAL0, flags=1 if positions else 0))

    def attach(self, history: bool) -> ConsoleOpen:
        self.source.attach(cast(RfbClient, Flush()), self.ext, 1, history)
        return self.sent()

    def sent(self) -> Any:
        return parse_client_message(Reader(self.conn.data_to_send(), 2))

    def feed(self, raw: bytes) -> None:
        """Server bytes in, events routed as the guest routes them."""
        for event in wire.feed_all(self.conn, raw):
            if isinstance(event, ConsoleOpened):
                self.source.on_opened(event)
            elif isinstance(event, ConsoleData):
                self.source.on_data(event)
            elif isinstance(event, ConsoleClosed):
                self.source.on_closed(event)
            elif isinstance(event, ConsoleCredit):
                self.source.on_credit(event)


def source_with_hub() -> tuple[RfbConsoleSource, Hub]:
    source = RfbConsoleSource("demo", "serial0", window=4096)
    hub = Hub()
    source.start(hub)
    return source, hub


def opened_with(source: RfbConsoleSource, first: bytes) -> Link:
    """A link to a gateway with positions, attached with history, that sent `first`."""
    link = Link(source, positions=True)
    link.attach(history=True)
    link.feed(first)
    return link


def reconnected(source: RfbConsoleSource, first: bytes) -> tuple[Link, ConsoleOpen]:
    """A gateway with positions sent `first` on the guest's first connection, which
    then dropped; the next connection's link and the OPEN it sent (no history)."""
    opened_with(source, first)
    source.detach("gone")
    link = Link(source, positions=True)
    return link, link.attach(history=False)


def test_a_reconnect_resumes_right_after_the_last_byte() -> None:
    source, hub = source_with_hub()
    link = Link(source, positions=True)
    request = link.attach(history=True)
    assert (request.positions, request.history, request.resume) == (True, True, None)
    link.feed(opened_at(1, 100, 6, STREAM, 0, 6) + data(1, b"boot\r\n") + data(1, b"ab"))
    assert source.position == StreamPosition(STREAM, 8)

    link.source.detach("the connection closed")
    assert hub.lost == ["the connection closed"]
    link = Link(source, positions=True)
    # The hub is not empty, so the guest says no history; the source resumes anyway.
    request = link.attach(history=False)
    assert request.resume == StreamPosition(STREAM, 8)
    assert request.history
    link.feed(opened_at(1, 100, 3, STREAM, 0, 11) + data(1, b"cdelive"))
    assert bytes(hub.output) == b"boot\r\nabcdelive"
    assert source.position == StreamPosition(STREAM, 15)
    assert source.history_left == 0


def test_a_new_stream_is_taken_whole_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    source, hub = source_with_hub()
    link, request = reconnected(source, opened_at(1, 100, 0, STREAM, 0, 0) + data(1, b"old"))
    assert request.resume == StreamPosition(STREAM, 3)
    with caplog.at_level(logging.INFO, logger="resourced.broker.rfbsource"):
        link.feed(opened_at(1, 100, 4, OTHER, 0, 4) + data(1, b"new!"))
    assert bytes(hub.output) == b"oldnew!"
    assert source.position == StreamPosition(OTHER, 4)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "a new one" in record.getMessage()
    assert "replaying all 4 bytes" in record.getMessage()


def test_a_gap_is_logged_once_and_nothing_is_made_up(caplog: pytest.LogCaptureFixture) -> None:
    source, hub = source_with_hub()
    link, _ = reconnected(source, opened_at(1, 100, 0, STREAM, 0, 0) + data(1, b"12"))
    with caplog.at_level(logging.INFO, logger="resourced.broker.rfbsource"):
        # The server's ring now starts at 10: bytes 2..9 are gone.
        link.feed(opened_at(1, 100, 3, STREAM, 10, 13) + data(1, b"abc") + data(1, b"d"))
    assert bytes(hub.output) == b"12abcd"
    assert source.position == StreamPosition(STREAM, 14)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "8 bytes of output were lost" in record.getMessage()


def test_an_exact_resume_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    source, _hub = source_with_hub()
    link, _ = reconnected(source, opened_at(1, 100, 2, STREAM, 0, 2) + data(1, b"hi"))
    with caplog.at_level(logging.INFO, logger="resourced.broker.rfbsource"):
        link.feed(opened_at(1, 100, 0, STREAM, 0, 2))
    assert caplog.records == []


def test_an_overrun_reopens_from_the_last_byte() -> None:
    source, hub = source_with_hub()
    link = opened_with(source, opened_at(1, 100, 0, STREAM, 0, 0) + data(1, b"xyz"))
    link.feed(closed(1, 4, b"overrun"))
    assert link.sent().resume == StreamPosition(STREAM, 3)
    link.feed(opened_at(1, 100, 0, STREAM, 3, 3) + data(1, b"!"))
    assert bytes(hub.output) == b"xyz!"


def test_a_backend_error_reopens_from_the_last_byte() -> None:
    source, hub = source_with_hub()
    link = opened_with(source, opened_at(1, 100, 0, STREAM, 0, 0) + data(1, b"xyz"))
    link.feed(closed(1, 5, b"the host end went away"))
    assert hub.lost == ["the server closed the console (the host end went away)"]
    # Output that came before this OPEN arrived (the host end was back at once).
    assert link.sent().resume == StreamPosition(STREAM, 3)
    link.feed(opened_at(1, 100, 2, STREAM, 0, 5) + data(1, b"up"))
    assert bytes(hub.output) == b"xyzup"


def test_against_a_server_without_positions_it_opens_as_before() -> None:
    source, hub = source_with_hub()
    link = Link(source, positions=False)
    request = link.attach(history=True)
    assert (request.positions, request.history) == (False, True)
    link.feed(opened(1, 100, 2) + data(1, b"hi"))
    assert source.position is None
    source.detach("gone")
    link = Link(source, positions=False)
    request = link.attach(history=False)
    assert (request.positions, request.history, request.resume) == (False, False, None)
    link.feed(opened(1, 100, 0) + data(1, b"!"))
    assert bytes(hub.output) == b"hi!"
    # Then a gateway with positions: it learns the stream, nothing to resume yet.
    source.detach("gone")
    link = Link(source, positions=True)
    request = link.attach(history=False)
    assert (request.positions, request.history, request.resume) == (True, False, None)
    link.feed(opened_at(1, 100, 0, STREAM, 0, 9))
    assert source.position == StreamPosition(STREAM, 9)
