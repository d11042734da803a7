"""Where a console's output comes from: its host end, behind one small protocol.

A `ConsoleSource` attaches to one host end, keeps it attached (reattaching
after a loss is its own business), and reports to a `SourceHandler` (a
`ConsoleHub`): attached, a chunk of output, input backlog gone, lost. Here are
the two the gateway reads from QEMU: `ChardevSocketSource` (a chardev Unix
socket QEMU listens on) and `PtySource` (a PTY). Others (a console of the RFB
extension, a libvirt stream) implement the same protocol elsewhere.

A source keeps no history and knows no readers; it holds no input for a host
end that is down (the hub does).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import termios
import tty
from collections.abc import Callable
from typing import Protocol

from resourced.consoles import ptylock
from resourced.consoles.ring import READ_SLACK
from resourced.consoles.spec import Endpoint, EndpointType

log = logging.getLogger(__name__)

#: Most bytes one read from a PTY brings.
PTY_READ_SIZE = 64 * 1024
#: Most bytes one read from a chardev socket brings (the size of the buffer the
#: transport reads into).
UNIX_READ_SIZE = 256 * 1024
assert max(PTY_READ_SIZE, UNIX_READ_SIZE) <= READ_SLACK  # one chunk fits the ring's slack
#: Waits between attempts to reattach (the last one repeats).
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class SourceHandler(Protocol):
    """What a source reports to (implemented by `ConsoleHub`)."""

    def source_connected(self) -> None:
        """The host end is attached: `write()` may be called."""

    def source_data(self, data: bytes) -> None:
        """Output from the host end: immutable bytes, the handler keeps the object.

        At most `READ_SLACK` bytes a call (the ring's slack is one chunk).
        """

    def source_drained(self) -> None:
        """The source's input backlog reached 0."""

    def source_lost(self, reason: str) -> None:
        """The host end is gone, or an attempt to attach failed (the source may
        reattach later and call `source_connected` again)."""


class ConsoleSource(Protocol):
    """A console's host end. Every method but `close()` is called from the event
    loop's thread and does not block."""

    #: For logs, e.g. "unix:/run/ser.sock".
    description: str

    def start(self, handler: SourceHandler) -> None:
        """Begin attaching; report through `handler`; reattach after a loss."""

    def write(self, data: bytes) -> None:
        """Input for the host end; only called while connected."""

    @property
    def input_backlog(self) -> int:
        """Bytes accepted, not yet taken by the host end."""

    def pause_reading(self) -> None:
        """Deliver no `source_data` until `resume_reading()` (across a reattach too)."""

    def resume_reading(self) -> None: ...

    def send_break(self) -> bool:
        """A serial break; False when the host end cannot carry one."""

    async def close(self) -> None:
        """Detach for good: no more reports after this."""


def source_for(endpoint: Endpoint) -> ConsoleSource:
    """The source for a host end given on the gateway's command line or by libvirt."""
    if endpoint.type is EndpointType.UNIX:
        return ChardevSocketSource(endpoint.path)
    return PtySource(endpoint.path)


class _Reattaching(abc.ABC):
    """The reattach loop both sources share: attach, wait for the loss, report it,
    wait a little longer each failed attempt, again."""

    description: str

    def __init__(self) -> None:
        self._handler: SourceHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._reading_paused = False

    def start(self, handler: SourceHandler) -> None:
        if self._task is None and not self._closed:
            self._handler = handler
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"console-source {self.description}"
            )

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._detach()

    async def _run(self) -> None:
        assert self._handler is not None
        attempt = 0
        while not self._closed:
            try:
                await self._attached()
                attempt = 0
                error = "the host end closed"
            except OSError as err:
                error = f"{self.description}: {err.strerror or err}"
            self._detach()
            if self._closed:
                return
            if attempt == 0 or attempt == len(RECONNECT_DELAYS):
                log.warning("console source %s: %s; reattaching", self.description, error)
            self._handler.source_lost(error)
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            attempt += 1

    @abc.abstractmethod
    async def _attached(self) -> None:
        """Attach, report it, and return once the host end is gone."""

    @abc.abstractmethod
    def _detach(self) -> None:
        """Let go of the host end (after it is gone, or at close)."""


class ChardevSocketSource(_Reattaching):
    """A QEMU chardev Unix socket (`-chardev socket,server=on,wait=off`), which
    QEMU listens on: connected to, and reconnected to when it drops."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.description = f"unix:{path}"
        self._transport: asyncio.Transport | None = None

    @property
    def input_backlog(self) -> int:
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._transport is not None:
            self._transport.resume_reading()

    def send_break(self) -> bool:
        return False  # a chardev socket carries bytes only

    async def _attached(self) -> None:
        handler = self._handler
        assert handler is not None
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_unix_connection(
            lambda: _ChardevProtocol(handler), self.path
        )
        # No write buffering threshold: "drained" then means really empty, which
        # is when clients get their input credit back.
        transport.set_write_buffer_limits(high=0)
        self._transport = transport
        if self._reading_paused:
            transport.pause_reading()
        handler.source_connected()
        try:
            await protocol.closed
        finally:
            self._transport = None
            transport.close()

    def _detach(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class _ChardevProtocol(asyncio.BufferedProtocol):
    """Feeds a handler straight from the event loop's callbacks: no task wake-up
    per chunk, which is most of a keystroke's round trip."""

    def __init__(self, handler: SourceHandler) -> None:
        self.handler = handler
        # recv_into one buffer: a fresh 256 KiB bytes object per read would cost
        # an mmap and munmap each time. Its size bounds one read (READ_SLACK).
        self._view = memoryview(bytearray(UNIX_READ_SIZE))
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.handler.source_data(bytes(self._view[:nbytes]))

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            if exc is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(exc)

    def pause_writing(self) -> None:
        pass  # the hub looks at the backlog itself

    def resume_writing(self) -> None:
        self.handler.source_drained()  # with a high-water mark of 0: empty


class PtySource(_Reattaching):
    """A PTY (what libvirt's `<serial type='pty'>` gives): opened in raw mode, and
    reopened when QEMU closes its side (EIO). While open it holds the device's
    lock file in `lock_dir` (`resourced.consoles.ptylock`, libvirt's convention),
    and it does not open a PTY whose lock a live process holds: it says so, and
    tries again until that process is done."""

    def __init__(self, path: str, lock_dir: str = ptylock.LOCK_DIR) -> None:
        super().__init__()
        self.path = path
        self.lock_dir = lock_dir
        self.description = f"pty:{path}"
        self._fd: int | None = None
        self._reader: Callable[[], None] | None = None
        self._out = bytearray()

    @property
    def input_backlog(self) -> int:
        return len(self._out)

    def write(self, data: bytes) -> None:
        if self._fd is not None:
            self._out += data
            self._flush()

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._fd is not None and self._reader is not None:
            asyncio.get_running_loop().add_reader(self._fd, self._reader)

    def send_break(self) -> bool:
        if self._fd is None:
            return False
        with contextlib.suppress(OSError):
            termios.tcsendbreak(self._fd, 0)
        return True

    async def _attached(self) -> None:
        lock = ptylock.acquire(self.path, self.lock_dir)
        try:
            await self._attached_locked()
        finally:
            ptylock.release(lock)

    async def _attached_locked(self) -> None:
        handler = self._handler
        assert handler is not None
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        # Raw mode: no echo, no line editing, no CR/LF translation by the tty layer
        # between the guest's UART and our clients.
        with contextlib.suppress(termios.error):
            tty.setraw(fd, termios.TCSANOW)
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, PTY_READ_SIZE)
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
            handler.source_data(data)

        self._fd = fd
        self._reader = readable
        if not self._reading_paused:
            loop.add_reader(fd, readable)
        try:
            handler.source_connected()
            await closed
        finally:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            self._fd = None
            self._reader = None
            self._out.clear()  # for a host end that is gone
            os.close(fd)

    def _flush(self) -> None:
        fd = self._fd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        try:
            while self._out:
                written = os.write(fd, self._out)
                del self._out[:written]
        except BlockingIOError:
            pass
        except OSError as err:
            if err.errno != errno.EIO:
                log.warning("console source %s: write failed: %s", self.description, err)
            self._out.clear()
        if self._out:
            loop.add_writer(fd, self._flush)
        else:
            loop.remove_writer(fd)
            if self._handler is not None:
                self._handler.source_drained()

    def _detach(self) -> None:
        pass  # `_attached()` closes the PTY on its way out, also when cancelled
