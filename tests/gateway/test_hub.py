"""The console hub against a real Unix-socket peer standing in for a QEMU chardev."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.gateway import hub as hub_module
from resourced.gateway.hub import (
    _MERGE_MAX,
    _MERGE_RUN,
    READ_SLACK,
    UNIX_READ_SIZE,
    ConsoleHub,
    Overrun,
)

TIMEOUT = 30.0


class Peer:
    """A chardev-like Unix socket server: one connection at a time, scripted by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: asyncio.StreamWriter | None = None
        self.received = bytearray()
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on_client, str(self.path))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        while data := await reader.read(65536):
            self.received += data

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.connected.clear()


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    p = Peer(tmp_path / "chardev.sock")
    await p.start()
    yield p
    await p.stop()


def make_hub(path: Path, ring: int) -> ConsoleHub:
    spec = ConsoleSpec("serial0", ConsoleKind.SERIAL, Endpoint(EndpointType.UNIX, str(path)))
    return ConsoleHub(1, spec, ring)


async def until(condition: Callable[[], bool], hub: ConsoleHub) -> None:
    """Wait for `condition`, re-checked whenever the hub reports something."""
    changed = asyncio.Event()

    def listener(_hub: ConsoleHub) -> None:
        changed.set()

    hub.subscribe(listener)
    try:
        async with asyncio.timeout(TIMEOUT):
            while not condition():
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.1)
    finally:
        hub.unsubscribe(listener)


async def test_ring_keeps_the_newest_bytes(peer: Peer) -> None:
    hub = make_hub(peer.path, 16)
    hub.start()
    try:
        await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
        assert peer.writer is not None
        peer.writer.write(b"0123456789abcdefGHIJ")
        await until(lambda: hub.total == 20, hub)
        assert hub.oldest == 4
        assert hub.read(4, 100) == b"456789abcdefGHIJ"
        with pytest.raises(Overrun, match="dropped"):
            hub.read(0, 4)
    finally:
        await hub.close()


async def test_input_reaches_the_peer_and_drains(peer: Peer) -> None:
    hub = make_hub(peer.path, 64)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        drained = asyncio.Event()
        hub.write(b"typed")
        hub.when_drained(lambda _hub: drained.set())
        await asyncio.wait_for(drained.wait(), TIMEOUT)
        await until(lambda: bytes(peer.received) == b"typed", hub)
    finally:
        await hub.close()


async def test_slow_reader_pauses_the_console_then_is_left_behind(peer: Peer) -> None:
    """A reader a ring behind pauses reading from the host end (flow control), for
    at most the stall timeout; memory stays bounded by ring + one read's slack."""
    ring = 4096
    hub = make_hub(peer.path, ring)
    hub.stall_timeout = 0.5
    hub.start()

    def stuck(_hub: ConsoleHub) -> None:
        pass

    try:
        await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
        hub.subscribe(stuck, 0)
        assert peer.writer is not None
        payload = bytes(range(256)) * 1024  # 256 KiB: far more than the ring
        peer.writer.write(payload)
        await until(lambda: hub.total >= ring, hub)
        assert hub.total <= ring + READ_SLACK
        assert hub.read(0, 10) == payload[:10]  # still held for the reader behind
        await until(lambda: hub.total == len(payload), hub)  # the stall timed out
        with pytest.raises(Overrun):
            hub.read(0, 10)
        assert hub.read(hub.oldest, ring) == payload[-ring:]
    finally:
        hub.unsubscribe(stuck)
        await hub.close()


async def test_reader_that_keeps_up_loses_nothing(peer: Peer) -> None:
    ring = 4096
    hub = make_hub(peer.path, ring)
    hub.start()
    got = bytearray()

    def reader(h: ConsoleHub) -> None:
        position = len(got)
        while position < h.total:
            chunk = h.read(position, 1000)
            got.extend(chunk)
            position += len(chunk)
        h.advance(reader, position)

    try:
        await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
        hub.subscribe(reader, 0)
        payload = bytes(range(251)) * 2000  # ~500 KB, a prime-sized pattern
        assert peer.writer is not None
        peer.writer.write(payload)
        await until(lambda: len(got) == len(payload), hub)
        assert bytes(got) == payload
    finally:
        hub.unsubscribe(reader)
        await hub.close()


async def test_reconnects_and_delivers_input_held_while_down(tmp_path: Path) -> None:
    path = tmp_path / "chardev.sock"
    first = Peer(path)
    await first.start()
    hub = make_hub(path, 64)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        await first.stop()
        await until(lambda: not hub.connected, hub)
        hub.write(b"while down")
        second = Peer(path)
        await second.start()
        try:
            await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
            await until(lambda: bytes(second.received) == b"while down", hub)
            assert second.writer is not None
            second.writer.write(b"back")
            await until(lambda: hub.read(hub.oldest, 64).endswith(b"back"), hub)
        finally:
            await second.stop()
    finally:
        await hub.close()


# --- the ring: a list of chunks as received ------------------------------------------

#: Byte `i` of every stream in these tests is PATTERN[i % 251] (a prime period, so
#: that a byte out of place shows).
PATTERN = bytes(range(251)) * 8


def stream(start: int, stop: int) -> bytes:
    """Bytes `start` to `stop` of the test stream."""
    out = bytearray()
    while start < stop:
        piece = PATTERN[start % 251 : start % 251 + min(stop - start, 1500)]
        out += piece
        start += len(piece)
    return bytes(out)


async def send_chunks(peer: Peer, hub: ConsoleHub, sizes: list[int]) -> None:
    """Write the test stream in pieces of `sizes`, each once the hub has the one
    before, so that each arrives as a chunk of its own."""
    assert peer.writer is not None
    for size in sizes:
        target = hub.total + size
        peer.writer.write(stream(hub.total, target))
        await until(lambda target=target: hub.total == target, hub)


async def test_history_replays_across_many_small_chunks(peer: Peer) -> None:
    ring = 300
    hub = make_hub(peer.path, ring)
    hub.start()
    try:
        await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
        sizes = [1] * 500 + [2, 3, 1] * 40  # keystroke echoes, and some longer ones
        await send_chunks(peer, hub, sizes)
        total = sum(sizes)
        assert hub.total == total
        assert hub.oldest == total - ring  # exact to the byte
        # Runs of tiny chunks are joined: a ring of one-byte chunks does not hold
        # a chunk per byte.
        assert len(hub._chunks) - hub._head < 2 * _MERGE_RUN
        # A late subscriber replays the history, in reads of any size.
        for limit in (1, 7, 64, 299, 300, 1000):
            got = bytearray()
            position = hub.oldest
            while position < hub.total:
                piece = hub.read(position, limit)
                assert 0 < len(piece) <= limit
                got += piece
                position += len(piece)
            assert bytes(got) == stream(total - ring, total)
        with pytest.raises(Overrun):
            hub.read(hub.oldest - 1, 10)
        assert hub.read(hub.total, 10) == b""
    finally:
        await hub.close()


async def test_reads_spanning_chunks(peer: Peer) -> None:
    sizes = [3, 5, 1, 2, 8, 1, 1, 4, 13, 2]
    total = sum(sizes)
    for ring in (total + 10, 17):  # everything held; the oldest chunk partly dropped
        hub = make_hub(peer.path, ring)
        hub.start()
        try:
            await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
            base = hub.total
            await send_chunks(peer, hub, sizes)
            assert hub.oldest == base + max(0, total - ring)
            for offset in range(hub.oldest, hub.total + 1):
                for limit in range(hub.total - offset + 3):
                    assert hub.read(offset, limit) == stream(offset, min(offset + limit, total))
        finally:
            await hub.close()
            await peer.stop()
            await peer.start()


async def test_a_reader_that_keeps_up_gets_each_chunk_as_it_came(peer: Peer) -> None:
    hub = make_hub(peer.path, 64)
    hub.start()
    got: list[bytes] = []
    whole: list[bool] = []

    def reader(h: ConsoleHub) -> None:
        position = sum(map(len, got))
        if position < h.total:
            chunk = h.read(position, h.total - position)
            got.append(chunk)
            # No copy: reading the chunk again gives the very same object.
            whole.append(h.read(position, h.total - position) is chunk)
            h.advance(reader, h.total)

    try:
        await asyncio.wait_for(peer.connected.wait(), TIMEOUT)
        hub.subscribe(reader, 0)
        sizes = [1, 1, 5, 100, 1000, 64 * 1024]
        await send_chunks(peer, hub, sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        assert got == [stream(a, b) for a, b in itertools.pairwise(offsets)]
        assert all(whole)
    finally:
        hub.unsubscribe(reader)
        await hub.close()


async def test_one_read_from_the_host_end_fits_the_slack(peer: Peer) -> None:
    hub = make_hub(peer.path, 64)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        assert UNIX_READ_SIZE <= READ_SLACK
        assert peer.writer is not None
        payload = stream(0, 1024 * 1024)
        chunks: list[int] = []

        def sizes(h: ConsoleHub) -> None:
            chunks.append(h.total)

        hub.subscribe(sizes)
        peer.writer.write(payload)
        await until(lambda: hub.total == len(payload), hub)
        hub.unsubscribe(sizes)
        steps = [b - a for a, b in itertools.pairwise([0, *chunks])]
        assert max(steps) <= READ_SLACK
        assert hub.read(hub.oldest, len(payload)) == payload[hub.oldest :]
    finally:
        await hub.close()


class _Model:
    """Readers of a hub fed by hand, and what the ring must hold after each chunk."""

    def __init__(self, hub: ConsoleHub, slack: int) -> None:
        self.hub = hub
        self.slack = slack
        self.readers: list[Callable[[ConsoleHub], None]] = []
        self.positions: dict[Callable[[ConsoleHub], None], int] = {}
        self.largest = 0

    def add_reader(self, position: int) -> None:
        def reader(_hub: ConsoleHub) -> None:
            pass

        self.readers.append(reader)
        self.positions[reader] = position
        self.hub.subscribe(reader, position)

    def check(self) -> None:
        hub = self.hub
        ring = hub.ring_size
        assert hub.oldest <= max(0, hub.total - ring)  # at least a ring's worth kept
        assert hub.total - hub.oldest <= ring + self.slack
        assert hub.total - hub.oldest <= hub._held()
        assert hub._held() <= ring + self.slack + max(self.largest, _MERGE_MAX)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ring=st.integers(1, 200),
    slack=st.one_of(st.integers(1, 400), st.just(READ_SLACK)),
    eager=st.booleans(),
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("receive"),
                st.one_of(st.integers(1, 4), st.integers(1, 700)),
                st.one_of(st.just(1), st.integers(1, 150)),  # how many chunks of that size
            ),
            st.tuples(st.just("subscribe"), st.booleans()),
            st.tuples(st.just("advance"), st.integers(0, 7), st.integers(0, 800)),
            st.tuples(st.just("unsubscribe"), st.integers(0, 7)),
            st.tuples(st.just("give up"), st.just(0)),
            st.tuples(st.just("read"), st.integers(-5, 1000), st.integers(0, 1000)),
        ),
        max_size=120,
    ),
)
def test_the_ring_keeps_what_it_must_and_no_more(
    ring: int, slack: int, eager: bool, steps: list[tuple[Any, ...]]
) -> None:
    """Chunks of any sizes, readers of any speeds: the ring keeps exactly the newest
    `ring` bytes and beyond them, up to `ring + READ_SLACK`, what the slowest reader
    not given up on still needs; reads give the right bytes or `Overrun`; memory
    stays within that plus one chunk (as received, or small ones joined)."""

    async def scenario() -> None:
        hub = ConsoleHub(
            1, ConsoleSpec("c", ConsoleKind.SERIAL, Endpoint(EndpointType.UNIX, "/x")), ring
        )
        model = _Model(hub, slack)
        keeping_up = bytearray()  # what the eager reader got
        last = [b""]  # the chunk received last
        uncopied: list[bool] = []  # whether each chunk read whole was the chunk itself

        def eager_reader(h: ConsoleHub) -> None:
            # Reads all there is, as a session does, the newest chunk whole.
            position = len(keeping_up)
            if h.total - position == len(last[0]):  # (asserts here would be logged only)
                uncopied.append(h.read(position, len(last[0])) is last[0])
            while position < h.total:
                piece = h.read(position, 1 + position % 97)
                keeping_up.extend(piece)
                position += len(piece)
            h.advance(eager_reader, position)

        if eager:
            hub.subscribe(eager_reader, 0)
        for step in steps:
            kind = step[0]
            if kind == "receive":
                size = step[1]
                model.largest = max(model.largest, size)
                for _ in range(step[2]):
                    data = stream(hub.total, hub.total + size)
                    last[0] = data
                    before = hub.oldest
                    hub._received(data)
                    given_up = hub._given_up
                    behind = [p for r, p in model.positions.items() if r not in given_up]
                    if eager:
                        behind.append(len(keeping_up))
                    keep_from = hub.total - ring
                    if behind and min(behind) < keep_from:
                        keep_from = max(min(behind), keep_from - slack)
                    assert hub.oldest == max(before, keep_from)
                    model.check()
            elif kind == "subscribe" and len(model.readers) < 8:
                model.add_reader(hub.oldest if step[1] else hub.total)
            elif kind == "advance" and model.readers:
                reader = model.readers[step[1] % len(model.readers)]
                position = model.positions[reader]
                if position < hub.oldest:
                    with pytest.raises(Overrun):
                        hub.read(position, 1)
                    position = hub.oldest  # the reader skips what it lost
                piece = hub.read(position, step[2])
                assert piece == stream(position, min(hub.total, position + step[2]))
                model.positions[reader] = position + len(piece)
                hub.advance(reader, position + len(piece))
            elif kind == "unsubscribe" and model.readers:
                reader = model.readers.pop(step[1] % len(model.readers))
                del model.positions[reader]
                hub.unsubscribe(reader)
            elif kind == "give up" and hub._stall_timer is not None:
                hub._stall_timer.cancel()
                hub._stall_expired()
            elif kind == "read":
                offset = hub.oldest + step[1] - 5
                if offset < hub.oldest:
                    with pytest.raises(Overrun):
                        hub.read(offset, step[2])
                else:
                    expected = stream(offset, min(hub.total, offset + step[2]))
                    assert hub.read(offset, step[2]) == expected
            model.check()
        if eager:
            assert bytes(keeping_up) == stream(0, hub.total)
            assert all(uncopied)
        if hub._stall_timer is not None:
            hub._stall_timer.cancel()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_module, "READ_SLACK", slack)
        asyncio.run(scenario())
