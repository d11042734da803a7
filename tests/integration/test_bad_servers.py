"""Misbehaving VNC servers (fakes: a real QEMU never does these things).

Each fake is a real Unix-socket server scripted byte by byte; the client goes
through the real asyncio transport. Every case must end in a clear error from the
`ResourcedError` family, promptly, never a hang or a stray exception.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from resourced.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    HandshakeTimeout,
    RemoteProtocolError,
    SecurityNegotiationFailed,
)
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.events import ServerClosed
from resourced.rfb.messages import FramebufferUpdate, Rectangle
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.qemu import AudioData, QemuAudio

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

SERVER_INIT = struct.pack("!HH", 640, 480) + RGBX8888.serialize() + struct.pack("!I", 4) + b"fake"


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> str:
        path = str(tmp_path / f"fake{len(servers)}.sock")

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            finally:
                writer.close()

        servers.append(await asyncio.start_unix_server(handler, path))
        return f"unix:{path}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def none_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"RFB 003.008\n")
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.write(b"\x01\x01")
    assert await reader.readexactly(1) == b"\x01"
    writer.write(struct.pack("!I", 0))
    assert await reader.readexactly(1) == b"\x01"  # shared ClientInit
    writer.write(SERVER_INIT)
    await writer.drain()


async def drain_events(client: RfbClient) -> None:
    async with asyncio.timeout(10):
        while True:
            await client.next_event()


async def test_truncated_greeting(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003")
        await writer.drain()

    address = await serve(script)
    with pytest.raises(ConnectionClosed, match="ProtocolVersion"):
        await connect(address, timeout=10)


async def test_not_a_vnc_server(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()

    address = await serve(script)
    with pytest.raises(RemoteProtocolError, match="not an RFB server"):
        await connect(address, timeout=10)


async def test_refusal_reason_is_reported(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        reason = b"Too many connections"
        writer.write(b"\x00" + struct.pack("!I", len(reason)) + reason)
        await writer.drain()

    address = await serve(script)
    with pytest.raises(SecurityNegotiationFailed, match="Too many connections"):
        await connect(address, timeout=10)


async def test_absurd_reason_length(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(b"\x00" + struct.pack("!I", 0xFFFFFFF0))
        await writer.drain()
        await reader.read()  # hold the connection open: the client must give up by itself

    address = await serve(script)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        await connect(address, timeout=10)


async def test_absurd_name_length(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(b"\x01\x01")
        await reader.readexactly(1)
        writer.write(struct.pack("!I", 0))
        await reader.readexactly(1)
        writer.write(SERVER_INIT[:-8] + struct.pack("!I", 0x7FFFFFFF))
        await writer.drain()
        await reader.read()

    address = await serve(script)
    with pytest.raises(RemoteProtocolError, match="desktop name"):
        await connect(address, timeout=10)


async def test_wrong_password_is_reported(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(b"\x01\x02")
        await reader.readexactly(1)
        writer.write(bytes(range(16)))
        await reader.readexactly(16)
        reason = b"Authentication failed"
        writer.write(struct.pack("!II", 1, len(reason)) + reason)
        await writer.drain()

    address = await serve(script)
    with pytest.raises(AuthenticationFailed, match="Authentication failed"):
        await connect(address, timeout=10, password="secret")


async def test_stalled_server_times_out(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await writer.drain()
        await reader.read()  # never answers again

    address = await serve(script)
    with pytest.raises(HandshakeTimeout, match="security types"):
        await connect(address, timeout=1)


async def test_unknown_qemu_submessage(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)
        writer.write(b"\xff\x07\x00\x00")
        await writer.drain()
        await reader.read()

    client = await connect(await serve(script), timeout=10)
    async with client:
        with pytest.raises(RemoteProtocolError, match="unknown QEMU server submessage 7"):
            await drain_events(client)


async def test_absurd_audio_chunk(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)
        writer.write(b"\xff\x01\x00\x02" + struct.pack("!I", 0xFFFFFFFF))
        await writer.drain()
        await reader.read()

    client = await connect(await serve(script), timeout=10, extensions=[QemuAudio()])
    async with client:
        with pytest.raises(RemoteProtocolError, match="exceeds"):
            await drain_events(client)


async def test_disconnect_mid_message(serve: Callable[[Script], Awaitable[str]]) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)
        chunk = b"\x01\x02" * 100
        writer.write(b"\xff\x01\x00\x02" + struct.pack("!I", 1000) + chunk)
        await writer.drain()

    client = await connect(await serve(script), timeout=10, extensions=[QemuAudio()])
    async with client:
        with pytest.raises(RemoteProtocolError, match="middle of a message"):
            await drain_events(client)


async def test_good_data_before_garbage_is_delivered(
    serve: Callable[[Script], Awaitable[str]],
) -> None:
    """Events that arrived intact before a bad message are not lost."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)
        good = b"\xff\x01\x00\x02" + struct.pack("!I", 4) + b"\x01\x00\x02\x00"
        writer.write(good + b"\x63")  # then message type 99, which does not exist
        await writer.drain()
        await reader.read()

    client = await connect(await serve(script), timeout=10, extensions=[QemuAudio()])
    received: list[bytes] = []

    async def collect() -> None:
        async with asyncio.timeout(10):
            while True:
                event = await client.next_event()
                if isinstance(event, AudioData):
                    received.append(event.data)

    async with client:
        with pytest.raises(RemoteProtocolError, match="unknown server message type 99"):
            await collect()
    assert received == [b"\x01\x00\x02\x00"]


async def test_reading_past_server_close_raises(serve: Callable[[Script], Awaitable[str]]) -> None:
    """After ServerClosed, asking for more is an error, not a busy loop on EOF."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)

    client = await connect(await serve(script), timeout=10)
    async with client:
        async with asyncio.timeout(10):
            assert isinstance(await client.next_event(), ServerClosed)
        with pytest.raises(ConnectionClosed, match="closed the connection"):
            async with asyncio.timeout(10):
                await client.next_event()


async def probe_audio(address: str, tmp_path: Path) -> tuple[int, str]:
    """`python -m resourced.rfb probe --audio` with a short wait: exit code, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.rfb",
        "probe",
        address,
        "--audio",
        str(tmp_path / "out.wav"),
        "--duration",
        "0.2",
        "--audio-timeout",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_probe_says_the_server_stalled_inside_an_update(
    serve: Callable[[Script], Awaitable[str]], tmp_path: Path
) -> None:
    """Issue 9: a server that stops in the middle of a FramebufferUpdate while the
    probe waits for audio is reported as that, not as lacking audio."""

    async def stall_in_update(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)
        await reader.readexactly(4)  # SetEncodings header
        header = FramebufferUpdate((Rectangle(RectangleHeader(0, 0, 64, 48, 0), b""),))
        # The update's header and 100 of the rectangle's 12288 bytes, then nothing.
        writer.write(header.serialize() + bytes(100))
        await writer.drain()
        await reader.read()  # until the probe gives up and leaves

    code, err = await probe_audio(await serve(stall_in_update), tmp_path)
    assert code == 1, err
    assert "inside a FramebufferUpdate" in err
    assert "does not support QEMU audio" not in err
    assert "Traceback" not in err


async def test_probe_still_says_when_audio_is_not_supported(
    serve: Callable[[Script], Awaitable[str]], tmp_path: Path
) -> None:
    """The contrast: a server idle at a message boundary that never acknowledged
    audio does lack it."""

    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await none_handshake(reader, writer)
        await reader.read()

    code, err = await probe_audio(await serve(idle), tmp_path)
    assert code == 1, err
    assert "the server does not support QEMU audio" in err
