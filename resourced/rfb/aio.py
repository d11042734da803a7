"""asyncio transports for the RFB client: TCP, Unix socket, or an already-connected fd.

This is the one module of `resourced.rfb` that does I/O. `connect()` opens the
transport, runs the handshake under a timeout and returns an `RfbClient`, which
shovels bytes between the socket and a sans-IO `ClientConnection` and hands its
events out as an async iterator. It holds no protocol decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from resourced.errors import ConfigurationError, ConnectionClosed, HandshakeTimeout
from resourced.rfb.connection import ClientConnection, Message, State
from resourced.rfb.events import Connected, ServerClosed

READ_SIZE = 256 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
VNC_BASE_PORT = 5900


@dataclass(frozen=True, slots=True)
class Address:
    """Where a VNC server is: `tcp` (host, port), `unix` (path) or `fd` (a connected fd)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}::{self.port}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"fd:{self.fd}"


_BARE_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]/]*)$")
_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]+\]|[^:\[\]]*)(?P<sep>::?)(?P<num>\d+)$")


def parse_address(text: str) -> Address:
    """Parse a VNC address the way VNC viewers do.

    `unix:/path` or `/path` (Unix socket), `fd:N` (inherited connected socket),
    `host::port` (TCP port), `host:N` (display N, port 5900+N; N of 100 or more
    is taken as a port, as TigerVNC does), `vnc://host:port` (a port, as in
    virt-viewer's URIs).
    """
    if text.startswith("unix:") or text.startswith("/"):
        path = text[5:] if text.startswith("unix:") else text
        if not path:
            raise ConfigurationError(f"empty Unix socket path in {text!r}")
        return Address("unix", path=path)
    if text.startswith("fd:"):
        try:
            fd = int(text[3:])
        except ValueError:
            fd = -1
        if fd < 0:
            raise ConfigurationError(f"bad fd address {text!r} (want fd:N, N >= 0)")
        return Address("fd", fd=fd)
    if text.startswith("vnc://"):
        rest = text[6:].rstrip("/")
        match = _HOST_PORT.match(rest)
        if match is None:
            if not _BARE_HOST.match(rest):
                raise ConfigurationError(f"cannot parse VNC URI {text!r}")
            return Address("tcp", host=rest.strip("[]") or "localhost", port=VNC_BASE_PORT)
        host = match["host"].strip("[]") or "localhost"
        return Address("tcp", host=host, port=_port(int(match["num"])))
    match = _HOST_PORT.match(text)
    if match is None:
        raise ConfigurationError(
            f"cannot parse VNC address {text!r} (use host:display, host::port, unix:PATH or fd:N)"
        )
    host = match["host"].strip("[]") or "localhost"
    number = int(match["num"])
    if match["sep"] == "::":
        return Address("tcp", host=host, port=_port(number))
    return Address(
        "tcp", host=host, port=_port(number if number >= 100 else VNC_BASE_PORT + number)
    )


def _port(number: int) -> int:
    if not 0 < number < 65536:
        raise ConfigurationError(f"port {number} is out of range")
    return number


async def _open(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        if address.kind == "tcp":
            return await asyncio.open_connection(address.host, address.port, limit=READ_SIZE)
        if address.kind == "unix":
            return await asyncio.open_unix_connection(address.path, limit=READ_SIZE)
        sock = socket.socket(fileno=os.dup(address.fd))
        sock.setblocking(False)
        return await asyncio.open_connection(sock=sock, limit=READ_SIZE)
    except OSError as err:
        raise ConnectionClosed(f"cannot connect to {address}: {err.strerror or err}") from err


class RfbClient:
    """A connected RFB client over an asyncio stream."""

    def __init__(
        self,
        connection: ClientConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: Address,
    ) -> None:
        self.connection = connection
        self.address = address
        self.info: Connected | None = None
        self._reader = reader
        self._writer = writer
        self._closed = False

    def send(self, message: Message) -> None:
        """Queue a message and hand it to the transport (see `drain` for back-pressure)."""
        self.connection.send(message)
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data and not self._closed:
            self._writer.write(data)

    async def drain(self) -> None:
        self.flush()
        await self._writer.drain()

    async def next_event(self) -> Any:
        """The next event; `ServerClosed` once, then `ConnectionClosed` is raised."""
        while True:
            event = self.connection.next_event()
            self.flush()
            if event is not None:
                return event
            if self._closed:
                raise ConnectionClosed("the connection is closed")
            if self.connection.state is State.CLOSED:
                # ServerClosed was handed out already: nothing more will come.
                raise ConnectionClosed(f"{self.address}: the server closed the connection")
            try:
                data = await self._reader.read(READ_SIZE)
            except OSError:
                data = b""  # a reset ends the stream like EOF; the core says if mid-message
            self.connection.receive_data(data)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, ServerClosed):
                return

    async def handshake(self, timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> Connected:
        """Run the handshake; events other than `Connected` stay queued in order."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self.connection.next_event()
                    self.flush()
                    if isinstance(event, Connected):
                        self.info = event
                        return event
                    if event is not None:  # pragma: no cover - nothing precedes Connected
                        continue
                    data = await self._reader.read(READ_SIZE)
                    self.connection.receive_data(data)
        except TimeoutError:
            raise HandshakeTimeout(
                f"the RFB handshake with {self.address} did not finish within {timeout:g} s "
                f"({self.connection.state.value})"
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            data = self.connection.data_to_send()
            if data:
                self._writer.write(data)
            self._writer.close()
            await self._writer.wait_closed()

    async def __aenter__(self) -> RfbClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    address: str | Address,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    **connection_options: Any,
) -> RfbClient:
    """Connect, authenticate and initialise; return the ready client.

    `connection_options` go to `ClientConnection` (password, tls_mode, tls,
    extensions, ...). Over TCP the host name is the TLS server name unless
    `server_name` is given.
    """
    if isinstance(address, str):
        address = parse_address(address)
    if address.kind == "tcp":
        connection_options.setdefault("server_name", address.host)
    connection = ClientConnection(**connection_options)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _open(address)
    except TimeoutError:
        raise HandshakeTimeout(f"connecting to {address} timed out after {timeout:g} s") from None
    client = RfbClient(connection, reader, writer, address)
    try:
        await client.handshake(timeout)
    except BaseException:
        await client.close()
        raise
    return client
