"""The console hub against a real Unix-socket peer standing in for a QEMU chardev."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.gateway.hub import READ_SLACK, ConsoleHub, Overrun

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
