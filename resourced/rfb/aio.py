"""asyncio transports for the RFB client: TCP, Unix socket, or an already-connected fd.

This is the one module of `resourced.rfb` that does I/O. `connect()` opens the
transport, runs the handshake under a timeout and returns an `RfbClient`: the
socket's asyncio protocol, which feeds a sans-IO `ClientConnection` and hands its
events out, pulled (`next_event`, `async for`) or pushed from the read callback
(`dispatch_to`). It holds no protocol decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

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


#: A client nobody is reading from stops reading the socket once this much is unparsed.
MAX_UNPARSED = 4 * READ_SIZE
#: Bytes queued for the server before `drain()` waits.
WRITE_HIGH_WATER = 256 * 1024

EventHandler = Callable[[Any], None]


async def _open(address: Address, client: RfbClient) -> None:
    loop = asyncio.get_running_loop()
    try:
        if address.kind == "tcp":
            await loop.create_connection(lambda: client, address.host, address.port)
        elif address.kind == "unix":
            await loop.create_unix_connection(lambda: client, address.path)
        else:
            sock = socket.socket(fileno=os.dup(address.fd))
            sock.setblocking(False)
            try:
                await loop.create_connection(lambda: client, sock=sock)
            except BaseException:
                sock.close()
                raise
    except OSError as err:
        raise ConnectionClosed(f"cannot connect to {address}: {_connect_reason(err)}") from err


#: asyncio's wording for a failed connect: "[Errno 111] Connect call failed ('::1', 5900, 0, 0)".
_CONNECT_CALL_FAILED = re.compile(r"\[Errno (\d+)\] Connect call failed")


def _connect_reason(err: OSError) -> str:
    """Why a connect failed, in the system's words ("Connection refused").

    asyncio replaces the strerror with "Connect call failed (ADDRESS)", and for a
    host name with several addresses (localhost: ::1 and 127.0.0.1) joins them as
    "Multiple exceptions: ..."; the reason is the errno, the same for each address.
    """
    if err.strerror and not err.strerror.startswith("Connect call failed"):
        return err.strerror  # the system's own words (a name lookup's, too)
    codes = {int(code) for code in _CONNECT_CALL_FAILED.findall(str(err))}
    if err.errno is not None:
        codes = {err.errno}
    if len(codes) == 1:
        return os.strerror(codes.pop())
    return str(err)


class RfbClient(asyncio.BufferedProtocol):
    """A connected RFB client: an asyncio protocol feeding a sans-IO `ClientConnection`.

    Events come out one of two ways. `next_event()` (or `async for`) pulls them:
    the socket is read only as far as the caller keeps up. `dispatch_to(handler)`
    pushes them instead: each event goes to `handler` straight from the socket's
    read callback, with no task wake-up in between, which is what a relay wants
    for keystroke latency; the handler applies back-pressure with
    `pause_reading()` / `resume_reading()`.
    """

    def __init__(self, connection: ClientConnection, address: Address) -> None:
        self.connection = connection
        self.address = address
        self.info: Connected | None = None
        self._transport: asyncio.Transport | None = None
        # The socket is read into this one buffer (recv_into): a fresh 256 KiB
        # bytes object per read would cost an mmap and munmap each time, which
        # is most of a keystroke's cost here. An anonymous mapping, not a
        # bytearray (which is zero-filled, so all 256 KiB resident at once):
        # only the pages a read reaches take memory, a few KiB for a connection
        # that carries keystrokes (the service holds one per guest).
        self._view = memoryview(mmap.mmap(-1, READ_SIZE))
        loop = asyncio.get_running_loop()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._handler: EventHandler | None = None
        self._finished: asyncio.Future[None] | None = None
        self._closed = False  # we closed it (close(), or a failed dispatch)
        self._eof = False  # end of input was fed to the connection
        self._write_paused = False
        self._paused_by_user = False
        self._paused_for_buffer = False

    # --- asyncio.BufferedProtocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.connection.receive_data(self._view[:nbytes])
        self._input_arrived()

    def eof_received(self) -> bool:
        self._feed_eof()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        # A reset ends the stream like EOF; the core says whether it came mid-message.
        self._feed_eof()
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake_drain()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # --- sending -------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message and hand it to the transport (see `drain` for back-pressure)."""
        self.connection.send(message)
        self.flush()

    def flush(self) -> None:
        data = self.connection.data_to_send()
        if data and not self._closed and self._transport is not None:
            self._transport.write(data)

    @property
    def write_buffer_size(self) -> int:
        """Bytes handed to the transport that the kernel has not taken yet."""
        if self._transport is None or self._transport.is_closing():
            return 0
        return self._transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Flush, then wait while more than `WRITE_HIGH_WATER` bytes are queued."""
        self.flush()
        while self._write_paused and not self._lost.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._lost.done() and not self._closed:
            raise ConnectionClosed(f"{self.address}: the connection was lost")

    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # --- receiving: pull ---------------------------------------------------------

    async def next_event(self) -> Any:
        """The next event; `ServerClosed` once, then `ConnectionClosed` is raised."""
        if self._handler is not None:
            raise RuntimeError("events are being dispatched to a handler")
        while True:
            event = self.connection.next_event()
            self.flush()
            if event is not None:
                return event
            if self._closed:
                raise ConnectionClosed("the connection is closed")
            if self.connection.state is State.CLOSED or self._eof:
                # ServerClosed was handed out already: nothing more will come.
                raise ConnectionClosed(f"{self.address}: the server closed the connection")
            await self._wait_input()

    async def _wait_input(self) -> None:
        if self._paused_for_buffer:
            self._paused_for_buffer = False
            self._apply_reading()
        self._data_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    def _input_arrived(self) -> None:
        if self._handler is not None:
            self._dispatch()
            return
        if self.connection.pending_input > MAX_UNPARSED and not self._paused_for_buffer:
            self._paused_for_buffer = True
            self._apply_reading()
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    def _feed_eof(self) -> None:
        if not self._eof:
            self._eof = True
            self.connection.receive_data(b"")
            self._input_arrived()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, ServerClosed):
                return

    # --- receiving: push -----------------------------------------------------------

    def dispatch_to(self, handler: EventHandler) -> asyncio.Future[None]:
        """From now on, hand every event to `handler` as soon as it is parsed.

        Events already parsed go first, from the event loop's next turn. Returns a
        future that completes when the connection ends: with None after the
        handler was given `ServerClosed` or the client was closed, with the
        exception when the server broke the protocol or the handler raised (the
        connection is then closed).
        """
        if self._handler is not None:
            raise RuntimeError("events are already dispatched to a handler")
        self._handler = handler
        self._finished = asyncio.get_running_loop().create_future()
        if self._closed:
            self._finished.set_result(None)
        else:
            asyncio.get_running_loop().call_soon(self._dispatch)
        return self._finished

    def _dispatch(self) -> None:
        handler, finished = self._handler, self._finished
        if handler is None or finished is None or finished.done():
            return
        try:
            while (event := self.connection.next_event()) is not None:
                handler(event)
            self.flush()
        except Exception as err:  # the protocol's error, or the handler's: both end it
            finished.set_exception(err)
            self._abort()
            return
        if self.connection.state is State.CLOSED or self._closed:
            finished.set_result(None)

    def pause_reading(self) -> None:
        """Stop reading from the server until `resume_reading()` (back-pressure)."""
        self._paused_by_user = True
        self._apply_reading()

    def resume_reading(self) -> None:
        self._paused_by_user = False
        self._apply_reading()

    def _apply_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        paused = self._paused_by_user or self._paused_for_buffer
        if paused and transport.is_reading():
            transport.pause_reading()
        elif not paused and not transport.is_reading():
            transport.resume_reading()

    # --- handshake and close ------------------------------------------------------

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
                    if self._eof:  # pragma: no cover - the core raises at EOF mid-handshake
                        raise ConnectionClosed(f"{self.address}: closed during the handshake")
                    await self._wait_input()
        except TimeoutError:
            raise HandshakeTimeout(
                f"the RFB handshake with {self.address} did not finish within {timeout:g} s "
                f"({self.connection.state.value})"
            ) from None

    def _abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    async def close(self) -> None:
        if self._closed:
            if self._transport is not None:
                await self._lost
            return
        self._closed = True
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)
        if self._transport is None:
            return
        with contextlib.suppress(OSError):
            data = self.connection.data_to_send()
            if data and not self._transport.is_closing():
                self._transport.write(data)
        self._transport.close()
        await self._lost

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
    client = RfbClient(connection, address)
    try:
        async with asyncio.timeout(timeout):
            await _open(address, client)
    except TimeoutError:
        raise HandshakeTimeout(f"connecting to {address} timed out after {timeout:g} s") from None
    try:
        await client.handshake(timeout)
    except BaseException:
        await client.close()
        raise
    return client
