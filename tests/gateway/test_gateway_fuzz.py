"""The gateway facing arbitrary bytes from a viewer or from upstream (hypothesis).

The upstream is a small VNC server built from our own `ServerConnection` (QEMU
never sends garbage; this fake exists only to inject it). Whatever arrives, the
gateway ends that one session cleanly with a logged reason or carries on, stays
up for the next viewer, and holds no more than it was sent.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.errors import ResourcedError
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.rfb.aio import connect
from resourced.rfb.constants import SecurityType
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.server import ClientInitReceived, ServerConnection, ServerSecurity

TIMEOUT = 20.0
OPEN = ServerSecurity(allow_none=True)
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


async def fake_upstream(path: str, garbage: bytes) -> asyncio.Server:
    """A VNC server that completes the handshake, then sends `garbage`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = ServerConnection(OPEN)
        writer.write(server.data_to_send())
        try:
            while data := await reader.read(65536):
                server.receive_data(data)
                for event in server.events():
                    if isinstance(event, ClientInitReceived):
                        server.send_server_init(64, 48, RGBX8888, "fake")
                        server.send_raw(garbage)
                writer.write(server.data_to_send())
        except (ResourcedError, OSError):
            pass  # the gateway hung up on us: that is its right
        finally:
            writer.close()

    return await asyncio.start_unix_server(handler, path)


async def viewer_handshake(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.write(b"RFB 003.008\n")
    count = (await reader.readexactly(1))[0]
    offered = await reader.readexactly(count)
    assert SecurityType.NONE in offered
    writer.write(b"\x01")
    assert await reader.readexactly(4) == b"\0\0\0\0"
    writer.write(b"\x01")
    head = await reader.readexactly(24)
    await reader.readexactly(struct.unpack("!I", head[20:24])[0])
    return reader, writer


async def drain_until_closed(reader: asyncio.StreamReader, budget: float) -> bool:
    """Read until EOF; whether the gateway closed the connection within `budget` s."""
    try:
        async with asyncio.timeout(budget):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    return True


async def run_viewer_garbage(garbage: bytes) -> tuple[bool, int]:
    with tempfile.TemporaryDirectory(prefix="rsd-fz-", dir="/tmp") as directory:
        upstream = await fake_upstream(f"{directory}/up.sock", b"")
        gateway = Gateway(GatewayConfig(upstream=f"unix:{directory}/up.sock", security=OPEN))
        await gateway.start()
        await gateway.listen_unix(f"{directory}/gw.sock")
        try:
            reader, writer = await viewer_handshake(f"{directory}/gw.sock")
            writer.write(garbage)
            await writer.drain()
            closed = await drain_until_closed(reader, 0.3)
            buffered = max((s.server.buffered for s in gateway.sessions), default=0)
            writer.close()
            # The gateway still serves the next viewer.
            client = await connect(f"unix:{directory}/gw.sock", timeout=TIMEOUT)
            await client.close()
            return closed, buffered
        finally:
            await gateway.close()
            upstream.close()


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=4096))
def test_viewer_garbage_ends_cleanly(garbage: bytes) -> None:
    closed, buffered = asyncio.run(run_viewer_garbage(garbage))
    # Either the bytes were (the start of) acceptable messages and the session
    # lives on, holding at most what it was sent, or it was closed.
    assert closed or buffered <= len(garbage)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def run_upstream_garbage(garbage: bytes) -> tuple[bool, list[str]]:
    collect = Collect()
    logger = logging.getLogger("resourced.gateway")
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="rsd-fz-", dir="/tmp") as directory:
        upstream = await fake_upstream(f"{directory}/up.sock", garbage)
        gateway = Gateway(GatewayConfig(upstream=f"unix:{directory}/up.sock", security=OPEN))
        await gateway.start()
        await gateway.listen_unix(f"{directory}/gw.sock")
        try:
            reader, writer = await viewer_handshake(f"{directory}/gw.sock")
            closed = await drain_until_closed(reader, 0.3)
            writer.close()
            client = await connect(f"unix:{directory}/gw.sock", timeout=TIMEOUT)
            await client.close()
            return closed, collect.messages
        finally:
            await gateway.close()
            upstream.close()
            logger.removeHandler(collect)


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=4096))
def test_upstream_garbage_ends_the_session_with_a_reason(garbage: bytes) -> None:
    closed, messages = asyncio.run(run_upstream_garbage(garbage))
    if closed:
        # The fake upstream closes after its garbage: whatever the gateway made of
        # it, the viewer's session ends with a logged reason.
        assert any("disconnected" in m or "closed" in m for m in messages), messages


def test_upstream_garbage_example_is_logged() -> None:
    """One fixed case, so the reason is checked word for word."""
    closed, messages = asyncio.run(run_upstream_garbage(b"\x63garbage"))
    assert closed
    assert any("unknown server message type 99" in m for m in messages), messages
