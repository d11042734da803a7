"""`RfbClient` on a real Unix socket: events pulled and pushed, errors, back-pressure.

The server is our own sans-IO `ServerConnection` (security None) behind a few
lines of asyncio, so each test scripts exactly what the server sends after the
handshake: messages, garbage, a flood, or a close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from resourced.errors import ConnectionClosed, RemoteProtocolError
from resourced.rfb.aio import MAX_UNPARSED, READ_SIZE, RfbClient, connect
from resourced.rfb.events import ServerClosed
from resourced.rfb.messages import Bell, ServerCutText
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.server import ClientInitReceived, ServerConnection, ServerSecurity

TIMEOUT = 10.0

#: What the server does once the client is initialised: write to it, then return.
Script = Callable[[ServerConnection, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[[Script], Awaitable[RfbClient]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start a server that runs `script` after the handshake; return a connected client."""
    servers: list[asyncio.Server] = []
    clients: list[RfbClient] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(script: Script) -> RfbClient:
        path = tmp_path / f"s{len(servers)}.sock"

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = ServerConnection(ServerSecurity(allow_none=True))
            writer.write(conn.data_to_send())
            try:
                while True:
                    conn.receive_data(await reader.read(65536))
                    events = list(conn.events())
                    if any(isinstance(e, ClientInitReceived) for e in events):
                        break
                    writer.write(conn.data_to_send())
                conn.send_server_init(64, 48, RGBX8888, "test")
                writer.write(conn.data_to_send())
                await script(conn, writer)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.get_running_loop().create_task(handle(reader, writer))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        servers.append(await asyncio.start_unix_server(track, str(path)))
        client = await connect(f"unix:{path}", timeout=TIMEOUT, auto_setup=False)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    for task in list(tasks):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task


def sending(*messages: bytes, then_close: bool = True) -> Script:
    async def script(conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        for message in messages:
            writer.write(message)
        await writer.drain()
        if not then_close:
            await asyncio.Event().wait()  # stay connected until the test ends

    return script


async def test_dispatch_to_pushes_events_then_ends_with_server_closed(serve: Serve) -> None:
    client = await serve(sending(Bell().serialize() * 3))
    seen: list[Any] = []
    finished = client.dispatch_to(seen.append)
    async with asyncio.timeout(TIMEOUT):
        assert await finished is None
    assert seen == [Bell(), Bell(), Bell(), ServerClosed()]
    with pytest.raises(RuntimeError):
        await client.next_event()  # events belong to the handler now


async def test_dispatch_to_ends_with_the_servers_protocol_error(serve: Serve) -> None:
    client = await serve(sending(Bell().serialize() + b"\x77garbage", then_close=False))
    seen: list[Any] = []
    finished = client.dispatch_to(seen.append)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(RemoteProtocolError):
            await finished
    assert seen == [Bell()]  # what came before the garbage was delivered
    async with asyncio.timeout(TIMEOUT):
        await client.close()  # the client closed the socket already; close() still returns


async def test_a_handler_that_raises_ends_dispatch_and_the_connection(serve: Serve) -> None:
    client = await serve(sending(Bell().serialize() * 2, then_close=False))

    def handler(event: Any) -> None:
        raise ValueError("handler bug")

    finished = client.dispatch_to(handler)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(ValueError, match="handler bug"):
            await finished
        await client.close()


async def test_pull_mode_reads_only_as_far_as_the_caller_keeps_up(serve: Serve) -> None:
    """A client nobody reads from holds at most MAX_UNPARSED (+ one read) of input;
    the rest waits in the kernel and arrives, all of it, once it is read."""
    text = bytes(range(256)) * 256  # 64 KiB per message
    count = 128  # 8 MiB in all

    async def flood(conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        for _ in range(count):
            writer.write(ServerCutText(text).serialize())
        await writer.drain()

    client = await serve(flood)
    bound = MAX_UNPARSED + READ_SIZE
    async with asyncio.timeout(TIMEOUT):
        while client.connection.pending_input <= MAX_UNPARSED:  # noqa: ASYNC110 (no event to wait on: poll each turn)
            await asyncio.sleep(0)
    # The server keeps writing in this same loop, a socket buffer per turn: a client
    # that went on reading would be megabytes past the bound within these turns.
    for _ in range(100):
        await asyncio.sleep(0)
        assert client.connection.pending_input <= bound
    received = 0
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = await client.next_event()
            if isinstance(event, ServerClosed):
                break
            assert event == ServerCutText(text)
            received += 1
            assert client.connection.pending_input <= bound
    assert received == count
    with pytest.raises(ConnectionClosed):
        await client.next_event()


async def test_pause_reading_holds_pushed_events_until_resumed(serve: Serve) -> None:
    go_on = asyncio.Event()
    rest_sent = asyncio.Event()

    async def script(conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        writer.write(Bell().serialize())
        await go_on.wait()
        writer.write(Bell().serialize() * 4)
        await writer.drain()
        rest_sent.set()

    client = await serve(script)
    seen: list[Any] = []

    def handler(event: Any) -> None:
        seen.append(event)
        if len(seen) == 1:
            client.pause_reading()
            go_on.set()

    finished = client.dispatch_to(handler)
    async with asyncio.timeout(TIMEOUT):
        await rest_sent.wait()
    # The four Bells wait in the socket, readable at the next poll: a client that
    # still read would get them within these turns of the loop.
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen == [Bell()]
    client.resume_reading()
    async with asyncio.timeout(TIMEOUT):
        await finished
    assert seen == [Bell()] * 5 + [ServerClosed()]
