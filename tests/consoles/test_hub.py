"""The console hub with its real sources: a Unix-socket peer standing in for a QEMU
chardev, and a real PTY pair. The ring alone is tested in test_ring.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import termios
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.consoles.hub import MAX_PENDING_INPUT, ConsoleHub, Overrun
from resourced.consoles.ring import READ_SLACK
from resourced.consoles.sources import (
    PTY_READ_SIZE,
    UNIX_READ_SIZE,
    ChardevSocketSource,
    PtySource,
)
from tests.consoles.streams import stream

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
    return ConsoleHub.from_spec(1, spec, ring)


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
        assert hub.last_error is not None
        hub.write(b"while down")
        assert hub.input_backlog == len(b"while down")
        drained = asyncio.Event()
        hub.when_drained(lambda _hub: drained.set())  # credit comes back once it is through
        second = Peer(path)
        await second.start()
        try:
            await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
            await asyncio.wait_for(drained.wait(), TIMEOUT)
            await until(lambda: bytes(second.received) == b"while down", hub)
            assert second.writer is not None
            second.writer.write(b"back")
            await until(lambda: hub.read(hub.oldest, 64).endswith(b"back"), hub)
        finally:
            await second.stop()
    finally:
        await hub.close()


# --- output in chunks, as the socket brings it ------------------------------------------


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


async def test_input_held_while_down_is_bounded(tmp_path: Path) -> None:
    hub = make_hub(tmp_path / "nobody-listens.sock", 64)
    hub.start()
    try:
        await until(lambda: hub.last_error is not None, hub)
        assert not hub.connected
        hub.write(b"x" * (MAX_PENDING_INPUT - 1))
        hub.write(b"yy")  # past the bound: dropped, and said so in the log
        assert hub.input_backlog == MAX_PENDING_INPUT - 1
        hub.write(b"z")
        assert hub.input_backlog == MAX_PENDING_INPUT
    finally:
        await hub.close()


async def test_the_hub_is_made_from_a_spec(tmp_path: Path) -> None:
    unix = ConsoleSpec("serial0", ConsoleKind.SERIAL, Endpoint(EndpointType.UNIX, "/run/s.sock"))
    pty = ConsoleSpec("console0", ConsoleKind.VIRTIO_CONSOLE, Endpoint(EndpointType.PTY, "/dev/x"))
    a = ConsoleHub.from_spec(3, unix, 128)
    b = ConsoleHub.from_spec(4, pty)
    assert (a.console_id, a.name, a.kind, a.spec) == (3, "serial0", unix.kind, unix)
    assert a.ring_size == 128
    assert isinstance(a.source, ChardevSocketSource)
    assert a.source.description == "unix:/run/s.sock"
    assert (b.name, b.kind, b.spec) == ("console0", ConsoleKind.VIRTIO_CONSOLE, pty)
    assert isinstance(b.source, PtySource)
    assert b.source.description == "pty:/dev/x"


async def test_no_break_over_a_chardev_socket(peer: Peer) -> None:
    hub = make_hub(peer.path, 64)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        assert hub.send_break() is False
    finally:
        await hub.close()


# --- a PTY host end (what libvirt's <serial type='pty'> gives) ------------------------


class PtyPeer:
    """The master side of a real PTY pair, as QEMU holds it; the hub opens the slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        os.set_blocking(self.master, False)
        self.received = bytearray()
        self._out = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.received += os.read(self.master, 65536)

    def write(self, data: bytes) -> None:
        self._out += data
        self._flush()

    def _flush(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._out:
                del self._out[: os.write(self.master, self._out)]
        if self._out:
            self._loop.add_writer(self.master, self._flush)
        else:
            self._loop.remove_writer(self.master)

    def close_slave(self) -> None:
        """Our own slave fd: the hub holds the PTY open by its own."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1  # never closed twice: the number may be someone else's by then

    def close(self) -> None:
        if self.master >= 0:
            self._loop.remove_reader(self.master)
            self._loop.remove_writer(self.master)
            os.close(self.master)
            self.master = -1


@pytest.fixture
async def pty_peer() -> AsyncIterator[PtyPeer]:
    p = PtyPeer()
    yield p
    p.close_slave()
    p.close()


def make_pty_hub(peer: PtyPeer, ring: int) -> ConsoleHub:
    spec = ConsoleSpec("serial1", ConsoleKind.SERIAL, Endpoint(EndpointType.PTY, peer.path))
    return ConsoleHub.from_spec(2, spec, ring)


async def test_pty_output_input_and_break(pty_peer: PtyPeer) -> None:
    hub = make_pty_hub(pty_peer, 64)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        # Raw mode: no echo and no CR/LF translation between the guest and us.
        attrs = termios.tcgetattr(pty_peer.slave)
        assert not attrs[3] & (termios.ECHO | termios.ICANON)
        pty_peer.write(b"guest says\r\nhello")
        await until(lambda: hub.total == 17, hub)
        assert hub.read(0, 64) == b"guest says\r\nhello"
        drained = asyncio.Event()
        hub.write(b"typed\n")
        hub.when_drained(lambda _hub: drained.set())
        await asyncio.wait_for(drained.wait(), TIMEOUT)
        await until(lambda: bytes(pty_peer.received) == b"typed\n", hub)
        assert hub.send_break() is True
    finally:
        await hub.close()


async def test_pty_closed_by_the_other_side_is_lost(pty_peer: PtyPeer) -> None:
    hub = make_pty_hub(pty_peer, 64)
    hub.start()
    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        pty_peer.close_slave()
        pty_peer.close()  # QEMU went away: the slave reads EIO
        await until(lambda: not hub.connected, hub)
        assert hub.last_error is not None
        hub.write(b"held")  # for when it comes back
        assert hub.input_backlog == 4
    finally:
        await hub.close()


async def test_a_reader_a_ring_behind_pauses_the_pty(pty_peer: PtyPeer) -> None:
    """Back-pressure reaches the PTY: the hub stops reading it while a reader is a
    ring behind, and reads on once that reader is gone; nothing is lost."""
    ring = 4096
    hub = make_pty_hub(pty_peer, ring)
    hub.stall_timeout = 10 * TIMEOUT  # only the reader going away ends this pause
    hub.start()

    def stuck(_hub: ConsoleHub) -> None:
        pass

    got = bytearray()

    def reader(h: ConsoleHub) -> None:
        position = len(got)
        while position < h.total:
            chunk = h.read(position, 1000)
            got.extend(chunk)
            position += len(chunk)
        h.advance(reader, position)

    try:
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        hub.subscribe(stuck, 0)
        hub.subscribe(reader, 0)
        payload = stream(0, 256 * 1024)  # far more than the ring and one read
        pty_peer.write(payload)
        await until(lambda: hub.paused, hub)
        assert ring <= hub.total <= ring + PTY_READ_SIZE
        assert hub.read(0, 10) == payload[:10]  # held for the reader behind
        hub.unsubscribe(stuck)
        assert not hub.paused
        try:
            await until(lambda: len(got) >= len(payload), hub)
        except TimeoutError:
            raise AssertionError(
                f"{len(got)} of {len(payload)} bytes read; the hub has {hub.total}, "
                f"paused={hub.paused}, {len(pty_peer._out)} bytes not yet in the PTY"
            ) from None
        assert bytes(got) == payload
    finally:
        hub.unsubscribe(stuck)
        hub.unsubscribe(reader)
        await hub.close()
