"""Where a console goes on the desktop: a stream socket (an fd over D-Bus) or a PTY.

Each `ConsoleClient` is one reader of a console hub (`resourced.consoles.hub`):
it takes output from its own offset in the hub's ring, at its own pace (the hub
holds the console back for a reader that is a whole ring behind, for at most
the hub's stall timeout, then leaves it behind and the client is closed as
overrun), and passes input to the hub. Input is accepted only while the
console's host end is attached: otherwise the client stops reading its input
(it waits in the kernel, nothing is dropped) until the host end is back.

- `StreamClient`: our end of a `socketpair`; the other end goes to the app.
  Closing either end ends it (the app sees EOF when the console goes away).
- `PtyClient`: a pseudo-terminal whose slave path is given to a script; it
  stays while anything has the path open, and `idle_timeout` seconds after
  the last close it goes away.

These know nothing of D-Bus; they are told the hub, not the guest.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import mmap
import os
import pty
import socket
import termios
import tty
from collections.abc import Callable
from typing import Any, cast

from resourced.consoles.hub import ConsoleHub, Overrun

log = logging.getLogger(__name__)

#: Most output bytes taken from the ring per write to the client.
CHUNK = 64 * 1024
#: Input accepted and not yet taken by the host end before we stop reading input.
INPUT_HIGH_WATER = 64 * 1024
#: Output queued in our transport for a stream client before we wait for it.
STREAM_HIGH_WATER = 256 * 1024
#: Most input bytes read from a stream client's socket at a time.
STREAM_READ_SIZE = 64 * 1024
#: How often a PTY nobody has open is checked for a new opener (seconds).
PTY_POLL_INTERVAL = 0.2

Closed = Callable[["ConsoleClient", str], None]


class ConsoleClient(abc.ABC):
    """One reader of a console hub (see the module docstring)."""

    kind = "client"

    def __init__(self, hub: ConsoleHub, *, history: bool, read_only: bool) -> None:
        self.hub = hub
        self.read_only = read_only
        self.offset = hub.oldest if history else hub.total
        self.closed = False
        self.close_reason = ""
        self._on_closed: list[Closed] = []
        self._input_held = False  # input reading paused until the host end takes more

    def when_closed(self, callback: Closed) -> None:
        """Call `callback(client, reason)` once, when the client ends."""
        if self.closed:
            callback(self, self.close_reason)
        else:
            self._on_closed.append(callback)

    def start(self) -> None:
        self.hub.subscribe(self._hub_changed, self.offset)
        self._pump()

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.hub.unsubscribe(self._hub_changed)
        self._close_io()
        callbacks, self._on_closed = self._on_closed, []
        for callback in callbacks:
            try:
                callback(self, reason)
            except Exception:
                log.exception("console %s: close callback failed", self.hub.name)

    # --- output -------------------------------------------------------------------

    def _hub_changed(self, _hub: ConsoleHub) -> None:
        if self.closed:
            return
        if self._input_held and self.hub.connected:
            self._check_input()
        self._pump()

    def _pump(self) -> None:
        if self.closed:
            return
        hub = self.hub
        start = self.offset
        try:
            while self.offset < hub.total and self._can_write():
                chunk = hub.read(self.offset, CHUNK)
                written = self._write(chunk)
                self.offset += written
                if written < len(chunk):
                    break
            if self.offset != start:
                hub.advance(self._hub_changed, self.offset)
            if self.offset < hub.oldest:
                raise Overrun("fell a whole ring behind")
        except Overrun as err:
            log.warning("console %s: %s client %s; closed", hub.name, self.kind, err)
            self.close("overrun")

    @abc.abstractmethod
    def _can_write(self) -> bool:
        """Whether the client takes output now."""

    @abc.abstractmethod
    def _write(self, data: bytes) -> int:
        """Hand output to the client; how much it took."""

    @abc.abstractmethod
    def _close_io(self) -> None:
        """Close the client's side (the app or terminal then sees EOF or a hangup)."""

    # --- input ----------------------------------------------------------------------

    def _input(self, data: bytes) -> None:
        if self.read_only or not data:
            return
        self.hub.write(data)
        self._check_input()

    def _check_input(self) -> None:
        """Hold input while the host end is down or is behind with what we gave it."""
        hold = not self.hub.connected or self.hub.input_backlog > INPUT_HIGH_WATER
        if hold != self._input_held:
            self._input_held = hold
            self._set_input_reading(not hold)
        if hold and self.hub.connected:
            self.hub.when_drained(lambda _hub: self._check_input())

    @abc.abstractmethod
    def _set_input_reading(self, reading: bool) -> None:
        """Start or stop taking input from the client."""


class StreamClient(ConsoleClient, asyncio.BufferedProtocol):
    """A console on our end of a stream socketpair; the app holds the other end."""

    kind = "fd"

    def __init__(self, hub: ConsoleHub, sock: socket.socket, *, history: bool, read_only: bool):
        ConsoleClient.__init__(self, hub, history=history, read_only=read_only)
        self._sock = sock
        self._transport: asyncio.Transport | None = None
        self._write_paused = False
        # Input is read into this one buffer: a plain Protocol's transport reads
        # with recv(256 KiB), whose fresh bytes object costs an mmap and munmap
        # per keystroke (see bench/README.md, "Findings"). Made on the first read.
        self._view: memoryview | None = None

    @classmethod
    def pair(cls, hub: ConsoleHub, *, history: bool, read_only: bool) -> tuple[StreamClient, int]:
        """A new client and the app's end of the socketpair, as an fd the caller owns."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if read_only:
            # The app's writes then fail (EPIPE) instead of vanishing.
            ours.shutdown(socket.SHUT_RD)
        return cls(hub, ours, history=history, read_only=read_only), theirs.detach()

    async def attach(self) -> None:
        """Hook our end to the event loop and start reading the console."""
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: self, self._sock)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)
        self.start()
        self._check_input()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._view is None:
            # Mapped, not a (zero-filled) bytearray: only what reads reach is resident.
            self._view = memoryview(mmap.mmap(-1, STREAM_READ_SIZE))
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._view is not None
        self._input(bytes(self._view[:nbytes]))  # a copy: the buffer is read into again

    def eof_received(self) -> bool:
        if self.read_only:
            return True  # our own SHUT_RD reads as EOF: keep writing
        self.close("the app closed its end")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.close("the app closed its end" if exc is None else f"connection lost: {exc}")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    # ConsoleClient

    def _can_write(self) -> bool:
        return (
            not self._write_paused
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def _write(self, data: bytes) -> int:
        assert self._transport is not None
        self._transport.write(data)
        return len(data)

    def _set_input_reading(self, reading: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self.read_only:
            return
        if reading and not transport.is_reading():
            transport.resume_reading()
        elif not reading and transport.is_reading():
            transport.pause_reading()

    def _close_io(self) -> None:
        if self._transport is not None:
            self._transport.close()  # flushes what is queued, then closes: the app sees EOF
        else:
            self._sock.close()


class PtyClient(ConsoleClient):
    """A console on a pseudo-terminal: the slave's path is for scripts and terminals.

    We hold only the master. While nothing has the slave open, output stays in
    the hub's ring (this client then holds nothing back) and input cannot come;
    `idle_timeout` seconds after the last opener closed it (or after it was
    made, if nobody opens it), the client closes. 0 means never.
    """

    kind = "pty"

    def __init__(
        self, hub: ConsoleHub, *, history: bool, read_only: bool, idle_timeout: float
    ) -> None:
        ConsoleClient.__init__(self, hub, history=history, read_only=read_only)
        self.idle_timeout = idle_timeout
        master, slave = pty.openpty()
        self.path = os.ttyname(slave)
        # The tty layer must not echo, edit lines or translate CR/LF between the
        # guest and the terminal program: the program sets its own modes.
        tty.setraw(slave, termios.TCSANOW)
        os.chmod(self.path, 0o600)
        os.close(slave)  # we keep only the master: EIO on it says nobody has the slave
        os.set_blocking(master, False)
        self._master = master
        self._out = b""  # output taken from the ring, not yet accepted by the master
        self._peer_open = False
        self._writer_armed = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        # Until someone opens the slave, this client holds nothing back.
        self.hub.subscribe(self._hub_changed)
        self._peer_closed()

    # --- who has the slave open ----------------------------------------------------

    def _peer_closed(self) -> None:
        self._peer_open = False
        self._loop.remove_reader(self._master)
        self._disarm_writer()
        self.hub.unsubscribe(self._hub_changed)
        self.hub.subscribe(self._hub_changed)  # no position: no back-pressure
        if self.idle_timeout > 0 and self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self.idle_timeout, self._idle_expired)
        self._poll_timer = self._loop.call_later(PTY_POLL_INTERVAL, self._poll)

    def _poll(self) -> None:
        self._poll_timer = None
        if self.closed:
            return
        try:
            data = os.read(self._master, CHUNK)
        except BlockingIOError:
            self._peer_opened()  # no EIO: a terminal has the slave open
            return
        except OSError as err:
            if err.errno != errno.EIO:
                self.close(f"pty failed: {err.strerror}")
                return
            self._poll_timer = self._loop.call_later(PTY_POLL_INTERVAL, self._poll)
            return
        self._peer_opened()
        self._input(data)

    def _peer_opened(self) -> None:
        self._peer_open = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.offset = max(self.offset, self.hub.oldest)
        self.hub.unsubscribe(self._hub_changed)
        self.hub.subscribe(self._hub_changed, self.offset)
        self._input_held = True  # _check_input decides
        self._check_input()
        self._pump()

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self._peer_open:
            self.close(f"nothing had it open for {self.idle_timeout:g} s")

    # --- I/O --------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data = os.read(self._master, CHUNK)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno == errno.EIO:
                self._peer_closed()
            else:
                self.close(f"pty failed: {err.strerror}")
            return
        self._input(data)

    def _set_input_reading(self, reading: bool) -> None:
        if not self._peer_open or self.closed:
            return
        if reading:
            self._loop.add_reader(self._master, self._readable)
        else:
            self._loop.remove_reader(self._master)

    def _can_write(self) -> bool:
        return self._peer_open and not self._out

    def _write(self, data: bytes) -> int:
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError as err:
            if err.errno == errno.EIO:
                self._peer_closed()
                return 0
            raise
        if written < len(data):
            # The rest waits for the terminal; it was taken from the ring already.
            self._out = data[written:]
            self._arm_writer()
        return len(data)

    def _arm_writer(self) -> None:
        if not self._writer_armed:
            self._writer_armed = True
            self._loop.add_writer(self._master, self._writable)

    def _disarm_writer(self) -> None:
        if self._writer_armed:
            self._writer_armed = False
            self._loop.remove_writer(self._master)

    def _writable(self) -> None:
        try:
            written = os.write(self._master, self._out)
        except BlockingIOError:
            return
        except OSError:
            self._out = b""
            self._peer_closed()
            return
        self._out = self._out[written:]
        if not self._out:
            self._disarm_writer()
            self._pump()

    def _close_io(self) -> None:
        for timer in (self._idle_timer, self._poll_timer):
            if timer is not None:
                timer.cancel()
        self._loop.remove_reader(self._master)
        self._disarm_writer()
        with contextlib.suppress(OSError):
            os.close(self._master)


def describe(client: ConsoleClient) -> dict[str, Any]:
    """What `resourcectl status` shows of a client."""
    info: dict[str, Any] = {"kind": client.kind, "read-only": client.read_only}
    if isinstance(client, PtyClient):
        info["path"] = client.path
    return info
