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
#: Output kept beyond the ring for readers that are behind: the most one read
#: from the event loop brings (asyncio reads Unix sockets 256 KiB at a time).
READ_SLACK = 256 * 1024
#: How long a reader a whole ring behind may hold the console back before it is
#: left to overrun (seconds).
DEFAULT_STALL_TIMEOUT = 5.0


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
        self._transport: asyncio.Transport | None = None
        self._pty_fd: int | None = None
        # Back-pressure: where each reader is, readers given up on, and whether
        # reading from the host end is paused.
        self._positions: dict[Listener, int] = {}
        self._given_up: set[Listener] = set()
        self._paused = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self.stall_timeout = DEFAULT_STALL_TIMEOUT
        self._pty_out = bytearray()
        self._pty_reader: Callable[[], None] | None = None
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
        self.total += len(data)
        # Keep the ring's worth, and beyond it what a reader still needs, up to
        # one read's slack: reading pauses once a reader is a ring behind, but
        # one chunk from the event loop can be larger than the ring.
        keep = self.ring_size
        slowest = self._slowest()
        if slowest is not None:
            keep = min(max(keep, self.total - slowest), self.ring_size + READ_SLACK)
        if len(self._ring) > keep:
            del self._ring[: len(self._ring) - keep]
        self._notify(self._listeners)
        self._check_pressure()

    def subscribe(self, listener: Listener, position: int | None = None) -> None:
        """Call `listener(hub)` whenever output arrives or the host end changes state.

        A listener that also reads output reports how far it got with
        `advance()`; reading from the host end pauses while such a reader is a
        whole ring behind (the way a serial line is flow-controlled), for at most
        `stall_timeout` seconds, after which that reader is left to overrun.
        """
        self._listeners.add(listener)
        if position is not None:
            self._positions[listener] = position
            self._check_pressure()

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        self._drain_waiters.discard(listener)
        self._positions.pop(listener, None)
        self._given_up.discard(listener)
        self._check_pressure()

    def advance(self, listener: Listener, position: int) -> None:
        """A reader has taken output up to absolute offset `position`."""
        if listener in self._positions:
            self._positions[listener] = position
            if listener in self._given_up and self.total - position < self.ring_size // 2:
                self._given_up.discard(listener)  # caught up after all
            if self._paused:
                self._check_pressure()

    def _slowest(self) -> int | None:
        behind = [p for listener, p in self._positions.items() if listener not in self._given_up]
        return min(behind) if behind else None

    def _check_pressure(self) -> None:
        slowest = self._slowest()
        if slowest is None or self.total - slowest < self.ring_size // 2:
            self._set_paused(False)
        elif self.total - slowest >= self.ring_size:
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        if paused:
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(self.stall_timeout, self._stall_expired)
            self._apply_pause()
        else:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            self._apply_pause()

    def _stall_expired(self) -> None:
        self._stall_timer = None
        slowest = self._slowest()
        laggards = {
            listener
            for listener, p in self._positions.items()
            if slowest is not None and self.total - p >= self.ring_size // 2
        }
        log.warning(
            "console %s: %d reader(s) stalled it for %g s; going on without them",
            self.name,
            len(laggards),
            self.stall_timeout,
        )
        self._given_up |= laggards
        self._paused = False
        self._apply_pause()
        self._check_pressure()

    def _apply_pause(self) -> None:
        if self._transport is not None:
            if self._paused:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()
        elif self._pty_fd is not None:
            loop = asyncio.get_running_loop()
            if self._paused:
                loop.remove_reader(self._pty_fd)
            elif self._pty_reader is not None:
                loop.add_reader(self._pty_fd, self._pty_reader)

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
        if self._transport is not None:
            backlog += self._transport.get_write_buffer_size()
        return backlog

    def write(self, data: bytes) -> None:
        """Pass client input on (or hold it while the host end is down)."""
        if self._transport is not None:
            self._transport.write(data)
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
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_unix_connection(
            lambda: _ChardevProtocol(self), self.spec.endpoint.path
        )
        # No write buffering threshold: "drained" then means really empty, which
        # is when clients get their input credit back.
        transport.set_write_buffer_limits(high=0)
        self._transport = transport
        log.info("console %s: attached to %s", self.name, self.spec.endpoint)
        self._set_connected(True)
        if self._pending_input:
            transport.write(bytes(self._pending_input))
            self._pending_input.clear()
        self._apply_pause()
        try:
            await protocol.closed
        finally:
            self._transport = None
            transport.close()

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
        self._pty_reader = readable
        self._pty_out += self._pending_input
        self._pending_input.clear()
        if not self._paused:
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
            self._pty_reader = None
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
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _ChardevProtocol(asyncio.BufferedProtocol):
    """Feeds a hub straight from the event loop's callbacks: no task wake-up per
    chunk, which is most of a keystroke's round trip."""

    def __init__(self, hub: ConsoleHub) -> None:
        self.hub = hub
        # recv_into one buffer: a fresh 256 KiB bytes object per read would cost
        # an mmap and munmap each time.
        self._view = memoryview(bytearray(READ_SLACK))
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.hub._received(bytes(self._view[:nbytes]))

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            if exc is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(exc)

    def pause_writing(self) -> None:
        pass  # the hub looks at the buffer size itself

    def resume_writing(self) -> None:
        self.hub._check_drained()
