"""The fd client (`resourced.sinks.console.StreamClient`) on a real socketpair, in
front of a hub whose host end is a Unix-socket peer standing in for a QEMU
chardev: an app slower than the console, and output still on its way when the
console goes away. The D-Bus tests (tests/dbus) use it through `Console.Open`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resourced.consoles.hub import ConsoleHub
from resourced.sinks.console import StreamClient
from tests.consoles.streams import stream
from tests.consoles.test_hub import TIMEOUT, Peer, make_hub, until


@pytest.fixture
async def chardev(tmp_path: Path) -> AsyncIterator[Peer]:
    p = Peer(tmp_path / "chardev.sock")
    await p.start()
    yield p
    await p.stop()


@contextlib.asynccontextmanager
async def attached(
    chardev: Peer, *, read_only: bool
) -> AsyncIterator[tuple[ConsoleHub, StreamClient, int, asyncio.StreamWriter]]:
    """A hub on `chardev` (64 KiB ring) and an fd client attached to it with history:
    the hub, the client, the app's end of the socketpair, and the chardev's writer."""
    hub = make_hub(chardev.path, 64 * 1024)
    hub.start()
    client, theirs = StreamClient.pair(hub, history=True, read_only=read_only)
    try:
        await asyncio.wait_for(chardev.connected.wait(), TIMEOUT)
        await client.attach()
        assert chardev.writer is not None
        yield hub, client, theirs, chardev.writer
    finally:
        client.close("test over")
        await hub.close()


def read_all(fd: int, size: int, *, until_eof: bool = False) -> bytes:
    """Blocking reads on the app's end: `size` bytes (then EOF too, if asked)."""
    got = bytearray()
    with socket.socket(fileno=fd) as app:
        app.settimeout(TIMEOUT)
        while len(got) < size or until_eof:
            data = app.recv(4096)
            if not data:
                break
            got += data
    return bytes(got)


async def test_an_app_behind_the_console_gets_every_byte_in_order(chardev: Peer) -> None:
    """The app reads nothing until the console is held back for it (its socket full,
    what we took from the ring waiting, the ring a whole ring behind); then it
    reads everything, in order, and its input reaches the host end."""
    async with attached(chardev, read_only=False) as (hub, client, theirs, writer):
        payload = stream(0, 4 * 1024 * 1024)
        writer.write(payload)
        await until(lambda: hub.paused, hub)
        assert not client.closed
        got = await asyncio.to_thread(read_all, os.dup(theirs), len(payload))
        assert got == payload
        with socket.socket(fileno=theirs) as app:
            app.sendall(b"typed")
            await until(lambda: bytes(chardev.received) == b"typed", hub)


async def test_output_on_its_way_reaches_the_app_before_eof(chardev: Peer) -> None:
    """The console goes away while the app is behind: what we held for it, and what
    the ring still held for it, reach it before EOF."""
    async with attached(chardev, read_only=False) as (hub, client, theirs, writer):
        payload = stream(0, 300 * 1024)  # more than the socket takes
        writer.write(payload)
        await until(lambda: hub.total == len(payload), hub)
        client.close("the console went away")
        got = await asyncio.to_thread(read_all, theirs, len(payload), until_eof=True)
        assert got == payload


async def test_a_read_only_app_reads_and_cannot_write(chardev: Peer) -> None:
    """Output reaches a read-only app; its writes fail (EPIPE) instead of vanishing,
    and nothing reaches the host end."""
    async with attached(chardev, read_only=True) as (hub, client, theirs, writer):
        writer.write(b"read me")
        got = await asyncio.to_thread(read_all, os.dup(theirs), len(b"read me"))
        assert got == b"read me"
        with socket.socket(fileno=theirs) as app, pytest.raises(BrokenPipeError):
            app.sendall(b"typed")
        assert not client.closed
        writer.write(b" and more")
        await until(lambda: hub.total == len(b"read me and more"), hub)
        assert bytes(chardev.received) == b""
