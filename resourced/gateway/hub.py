"""One guest console's host end, shared by every client: the console hub.

A `ConsoleHub` keeps the connection to a QEMU character device (a chardev Unix
socket QEMU listens on, or a PTY) open for as long as the gateway runs, whether
or not any client has the console open, reconnecting if it drops. Output goes
into a ring buffer of recent bytes, addressed by absolute offsets, so that each
subscriber reads at its own pace from its own offset (fan-out without copies per
client) and a late subscriber can replay history. Input from clients is written
through, and buffered (bounded by the credit clients were given) while the host
end is down.

It knows nothing of RFB: sessions subscribe to it and translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import termios
import tty
from collections.abc import Callable

from resourced.consoles import ConsoleSpec, EndpointType
from resourced.errors import ResourcedError

log = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 64 * 1024
READ_SIZE = 64 * 1024
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
#: Input held for a host end that is down, at most (clients hold the rest).
MAX_PENDING_INPUT = 1024 * 1024


class Overrun(ResourcedError):
    """A reader asked for output the ring no longer holds."""


Listener = Callable[["ConsoleHub"], None]


class ConsoleHub:
    """A console's host end with its ring of recent output."""

    def __init__(self, console_id: int, spec: ConsoleSpec, ring_size: int = DEFAULT_RING_SIZE):
        if ring_size <= 0:
            raise ValueError("ring size must be positive")
        self.console_id = console_id
        self.spec = spec
        self.ring_size = ring_size
        self._ring = bytearray()
        #: Absolute offset just past the newest byte ever received.
        self.total = 0
        self.connected = False
        self.last_error: str | None = None
        self._listeners: set[Listener] = set()
        self._drain_waiters: set[Listener] = set()
        self._pending_input = bytearray()
        self._writer: asyncio.StreamWriter | None = None
        self._pty_fd: int | None = None
        self._pty_out = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._connected_event = asyncio.Event()

    @property
    def name(self) -> str:
        return self.spec.name

    # --- output, read by offset ---------------------------------------------------

    @property
    def oldest(self) -> int:
        """Absolute offset of the oldest byte still in the ring."""
        return self.total - len(self._ring)

    def read(self, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes from absolute `offset`; `Overrun` if already dropped."""
        if offset < self.oldest:
            raise Overrun(
                f"console {self.name}: output from offset {offset} was dropped "
                f"(the ring of {self.ring_size} bytes now starts at {self.oldest})"
            )
        start = offset - self.oldest
        return bytes(self._ring[start : start + limit])

    def _received(self, data: bytes) -> None:
        self._ring += data
        if len(self._ring) > self.ring_size:
            del self._ring[: len(self._ring) - self.ring_size]
        self.total += len(data)
        self._notify(self._listeners)

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(hub)` whenever output arrives or the host end changes state."""
        self._listeners.add(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        self._drain_waiters.discard(listener)

    def _notify(self, listeners: set[Listener]) -> None:
        for listener in list(listeners):
            try:
                listener(self)
            except Exception:  # one bad subscriber must not stop the console
                log.exception("console %s: subscriber failed", self.name)

    # --- input ----------------------------------------------------------------------

    @property
    def input_backlog(self) -> int:
        """Input bytes accepted but not yet handed to the host end's kernel buffer."""
        backlog = len(self._pending_input) + len(self._pty_out)
        if self._writer is not None:
            backlog += self._writer.transport.get_write_buffer_size()
        return backlog

    def write(self, data: bytes) -> None:
        """Pass client input on (or hold it while the host end is down)."""
        if self._writer is not None:
            self._writer.write(data)
        elif self._pty_fd is not None:
            self._pty_out += data
            self._flush_pty()
        else:
            if len(self._pending_input) + len(data) > MAX_PENDING_INPUT:
                log.warning("console %s: host end down, input dropped", self.name)
                return
            self._pending_input += data

    def when_drained(self, listener: Listener) -> None:
        """Call `listener(hub)` once the input backlog is small again."""
        if self.input_backlog == 0:
            listener(self)
        else:
            self._drain_waiters.add(listener)
            if self._writer is not None:
                asyncio.get_running_loop().create_task(self._wait_drain())

    async def _wait_drain(self) -> None:
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        self._check_drained()

    def _check_drained(self) -> None:
        if self.input_backlog == 0 and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, set()
            self._notify(waiters)

    def send_break(self) -> None:
        """A serial break: real on a PTY; a chardev socket has no way to carry one."""
        if self._pty_fd is not None:
            with contextlib.suppress(OSError):
                termios.tcsendbreak(self._pty_fd, 0)
        else:
            log.info("console %s: break not possible over a chardev socket", self.name)

    # --- the host end -------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"console-{self.name}"
            )

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._disconnect()

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        self.connected = connected
        self.last_error = error
        if connected:
            self._connected_event.set()
        else:
            self._connected_event.clear()
        self._notify(self._listeners)

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            try:
                if self.spec.endpoint.type is EndpointType.UNIX:
                    await self._run_unix()
                else:
                    await self._run_pty()
                attempt = 0
                error = "the host end closed"
            except OSError as err:
                error = f"{self.spec.endpoint}: {err.strerror or err}"
            if self._closed:
                return
            if attempt == 0 or attempt == len(RECONNECT_DELAYS):
                log.warning("console %s: %s; reconnecting", self.name, error)
            self._disconnect()
            self._set_connected(False, error)
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            attempt += 1

    async def _run_unix(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.spec.endpoint.path)
        self._writer = writer
        log.info("console %s: attached to %s", self.name, self.spec.endpoint)
        self._set_connected(True)
        if self._pending_input:
            writer.write(bytes(self._pending_input))
            self._pending_input.clear()
        try:
            while data := await reader.read(READ_SIZE):
                self._received(data)
        finally:
            self._writer = None
            writer.close()

    async def _run_pty(self) -> None:
        fd = os.open(self.spec.endpoint.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        # Raw mode: no echo, no line editing, no CR/LF translation by the tty layer
        # between the guest's UART and our clients.
        with contextlib.suppress(termios.error):
            tty.setraw(fd, termios.TCSANOW)
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as err:
                # EIO: the other side (QEMU) closed the PTY master.
                if not closed.done():
                    closed.set_exception(err)
                return
            if not data:
                if not closed.done():
                    closed.set_result(None)
                return
            self._received(data)

        self._pty_fd = fd
        self._pty_out += self._pending_input
        self._pending_input.clear()
        loop.add_reader(fd, readable)
        log.info("console %s: attached to %s", self.name, self.spec.endpoint)
        self._set_connected(True)
        self._flush_pty()
        try:
            await closed
        finally:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            self._pty_fd = None
            os.close(fd)

    def _flush_pty(self) -> None:
        fd = self._pty_fd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        try:
            while self._pty_out:
                written = os.write(fd, self._pty_out)
                del self._pty_out[:written]
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno != errno.EIO:
                log.warning("console %s: write failed: %s", self.name, err)
            self._pty_out.clear()
        if self._pty_out:
            loop.add_writer(fd, self._flush_pty)
        else:
            loop.remove_writer(fd)
            self._check_drained()

    def _disconnect(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
