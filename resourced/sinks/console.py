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
import collections
import contextlib
import errno
import itertools
import logging
import mmap
import os
import pty
import socket
import termios
import tty
from collections.abc import Callable
from typing import Any

from resourced.consoles.hub import ConsoleHub, Overrun

log = logging.getLogger(__name__)

#: Most output bytes taken from the ring per write to the client.
CHUNK = 64 * 1024
#: Input accepted and not yet taken by the host end before we stop reading input.
INPUT_HIGH_WATER = 64 * 1024
#: Output taken from the ring and not yet taken by a stream client's socket, at
#: most, before more waits in the ring (the chunks are held as they are, not copied).
STREAM_HIGH_WATER = 256 * 1024
#: Most pieces one `sendmsg` to a stream client gathers.
SENDMSG_PIECES = 64
#: Most input bytes read from a stream client's socket at a time.
STREAM_READ_SIZE = 256 * 1024
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


class StreamClient(ConsoleClient):
    """A console on our end of a stream socketpair; the app holds the other end.

    It does its own non-blocking I/O on the socket, with no asyncio transport in
    between. Output goes from the hub's ring straight to `send` while the socket
    takes it all (a keystroke's echo: one call); once it does not, the chunks
    taken from the ring wait as they are (the ring's own objects, never copied or
    joined) up to `STREAM_HIGH_WATER` bytes, and go out many at a time with one
    `sendmsg` each time the socket is writable. Beyond that the ring holds the
    rest, and holds the console back if the app falls a whole ring behind. Input
    is read into one buffer of ours.
    """

    kind = "fd"

    def __init__(self, hub: ConsoleHub, sock: socket.socket, *, history: bool, read_only: bool):
        ConsoleClient.__init__(self, hub, history=history, read_only=read_only)
        self._sock = sock
        self._fd = sock.fileno()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # our reader is on the loop
        #: Output taken from the ring that the socket has not taken yet, oldest
        #: first (the first one may be a view of what is left of a chunk).
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._out_size = 0
        self._writer_armed = False  # waiting for the socket to take `_out`
        self._app_gone = False  # the app closed its end: nothing more to send
        # Input is read into this one buffer: a fresh bytes object per read (what
        # a plain transport does, 256 KiB) would cost an mmap and munmap per
        # keystroke (see bench/README.md, "Findings"). Made on the first read;
        # mapped, not a (zero-filled) bytearray: only what reads reach is resident.
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
        if self.closed:  # closed before it was attached: nothing to hook
            return
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self.start()
        self._input_held = True  # not read yet: `_check_input` decides
        self._check_input()

    # --- input ------------------------------------------------------------------------

    def _readable(self) -> None:
        if self._view is None:
            self._view = memoryview(mmap.mmap(-1, STREAM_READ_SIZE))
        try:
            count = self._sock.recv_into(self._view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._app_gone = True
            self.close(f"connection lost: {err}")
            return
        if count == 0:
            self._app_gone = True
            self.close("the app closed its end")
            return
        self._input(bytes(self._view[:count]))  # a copy: the buffer is read into again

    def _set_input_reading(self, reading: bool) -> None:
        # A read-only client never reads: our own SHUT_RD reads as EOF at once.
        if self.closed or self.read_only or self._loop is None or reading == self._reading:
            return
        self._reading = reading
        if reading:
            self._loop.add_reader(self._fd, self._readable)
        else:
            self._loop.remove_reader(self._fd)

    # --- output: ConsoleClient ---------------------------------------------------------

    def _can_write(self) -> bool:
        return self._out_size < STREAM_HIGH_WATER and not self.closed

    def _write(self, data: bytes) -> int:
        if self._out:  # the socket is full: it waits its turn (`_writable`)
            self._out.append(data)
            self._out_size += len(data)
            return len(data)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:  # the app closed its end (EPIPE, ECONNRESET)
            self._app_gone = True
            self.close(f"connection lost: {err}")
            return 0
        if sent < len(data):
            rest = memoryview(data)[sent:]
            self._out.append(rest)
            self._out_size += len(rest)
            self._arm_writer()
        return len(data)

    def _arm_writer(self) -> None:
        if not self._writer_armed and self._loop is not None:
            self._writer_armed = True
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        out = self._out
        try:
            sent = self._sock.sendmsg(list(itertools.islice(out, SENDMSG_PIECES)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._app_gone = True
            out.clear()
            self._out_size = 0
            if self.closed:
                self._finish()
            else:
                self.close(f"connection lost: {err}")
            return
        self._out_size -= sent
        while sent:
            first = out[0]
            if sent < len(first):
                out[0] = memoryview(first)[sent:]
                break
            sent -= len(first)
            out.popleft()
        if not out:
            self._writer_armed = False
            assert self._loop is not None
            self._loop.remove_writer(self._fd)
            if self.closed:
                self._finish()
                return
        if not self.closed:
            self._pump()

    # --- closing ------------------------------------------------------------------------

    def _close_io(self) -> None:
        loop = self._loop
        if loop is not None and self._reading:
            self._reading = False
            loop.remove_reader(self._fd)
        if self._app_gone or loop is None:
            self._finish()
            return
        # The console went away (or we were forced off): what the socket had not
        # taken yet, and what the ring still holds for us, go out first, then EOF.
        with contextlib.suppress(Overrun):
            rest = self.hub.read(self.offset, self.hub.total - self.offset)
            if rest:
                self._out.append(rest)
        if self._out:
            self._arm_writer()
        else:
            self._finish()

    def _finish(self) -> None:
        if self._writer_armed and self._loop is not None:
            self._writer_armed = False
            self._loop.remove_writer(self._fd)
        self._out.clear()
        self._out_size = 0
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
