"""A guest console through libvirt's console stream, as a console hub's source.

`LibvirtConsoleSource` opens a domain's console with `virDomainOpenConsole` on a
non-blocking `virStream` while someone needs it (`hold()`; released
`idle_timeout` seconds after the last `release()`), which is how local guests
get consoles with no gateway. libvirt lets one client hold a console at a time:
while we hold it, `virsh console` gets "Active console session exists"; we
never force it away from someone else, and when another client forces it from
us (`virsh console --force`) the hub is told why and we try again, without
forcing, until that session ends.

The stream is driven by libvirt's event loop registered on the service's own
asyncio loop (`libvirtaio`): its callbacks, `recv` and `send` of a non-blocking
stream run there without blocking; the calls that do block (opening the
console, aborting the stream) run in the loop's thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from resourced.consoles.sources import SourceHandler
from resourced.errors import BrokerError, Busy, NotConnected

log = logging.getLogger(__name__)

#: Most bytes one `recv` takes from the stream.
READ_SIZE = 64 * 1024
#: Seconds between attempts to get the console back after someone forced it away.
RETRY_DELAY = 2.0

#: Looks the domain up (blocking: run in a thread) and returns the libvirt domain.
DomainLookup = Callable[[], Awaitable[Any]]


class LibvirtConsoleSource:
    """One console device of a libvirt domain (see the module docstring)."""

    def __init__(
        self,
        libvirt: Any,
        conn: Callable[[], Any],
        domain: DomainLookup,
        device: str,
        *,
        idle_timeout: float,
    ) -> None:
        self._libvirt = libvirt
        self._conn = conn
        self._domain = domain
        self.device = device
        self.description = f"libvirt console {device}"
        self.idle_timeout = idle_timeout
        self.history_left = 0  # libvirt replays nothing
        self.failure: BrokerError | None = None
        self._handler: SourceHandler | None = None
        self._stream: Any = None
        self._holds = 0
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._pending = bytearray()
        self._reading = True
        self._closed = False
        self._stopped = False  # the domain is not running

    # --- demand ------------------------------------------------------------------

    def hold(self) -> None:
        self._holds += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._ensure_attaching()

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)
        if self._holds == 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._holds == 0:
            self.detach("nobody uses it")

    def set_stopped(self, stopped: bool) -> None:
        """The domain stopped (let go of the stream) or runs again (attach if held)."""
        self._stopped = stopped
        if stopped:
            self.detach("the guest stopped")
        elif self._holds:
            self._ensure_attaching()

    # --- ConsoleSource --------------------------------------------------------------

    def start(self, handler: SourceHandler) -> None:
        self._handler = handler

    def write(self, data: bytes) -> None:
        self._pending += data
        self._flush()

    @property
    def input_backlog(self) -> int:
        return len(self._pending)

    def pause_reading(self) -> None:
        self._reading = False
        self._update_events()

    def resume_reading(self) -> None:
        self._reading = True
        self._update_events()
        self._readable()  # what arrived while paused

    def send_break(self) -> bool:
        return False  # a libvirt console stream carries bytes only

    async def close(self) -> None:
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.detach("closed")

    # --- attaching ------------------------------------------------------------------

    def _ensure_attaching(self) -> None:
        if self._closed or self._stopped or self._stream is not None:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._attach_loop(), name=f"libvirt-console-{self.device}"
            )

    async def _attach_loop(self) -> None:
        while self._holds and self._stream is None and not self._closed and not self._stopped:
            try:
                await self._attach()
                self.failure = None
                return
            except BrokerError as err:
                self.failure = err
                log.info("%s: %s; trying again in %g s", self.description, err, RETRY_DELAY)
            await asyncio.sleep(RETRY_DELAY)

    async def _attach(self) -> None:
        libvirt = self._libvirt
        conn = self._conn()
        if conn is None:
            raise NotConnected("libvirt is not connected")
        domain = await self._domain()
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, domain.openConsole, self.device, stream, 0)
        except libvirt.libvirtError as error:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            message = str(error.get_error_message() or error)
            if "Active console session exists" in message:
                raise Busy(
                    f"another program has console {self.device} open through libvirt "
                    "(virsh console?); it is never forced away from it"
                ) from None
            raise NotConnected(f"cannot open console {self.device}: {message}") from None
        self._stream = stream
        self._reading = True
        stream.eventAddCallback(self._events(), self._on_event, None)
        log.info("%s: attached", self.description)
        if self._handler is not None:
            self._handler.source_connected()
        self._flush()

    def detach(self, reason: str) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        libvirt = self._libvirt
        with contextlib.suppress(libvirt.libvirtError):
            stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        if self._handler is not None:
            self._handler.source_lost(reason)

    def _lost(self, reason: str) -> None:
        log.info("%s: %s", self.description, reason)
        self.detach(reason)
        if self._holds and not self._closed and not self._stopped:
            self._ensure_attaching()

    # --- the stream --------------------------------------------------------------------

    def _events(self) -> int:
        libvirt = self._libvirt
        events = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        if self._reading:
            events |= libvirt.VIR_STREAM_EVENT_READABLE
        if self._pending:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        return int(events)

    def _update_events(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._stream.eventUpdateCallback(self._events())

    def _on_event(self, _stream: Any, events: int, _opaque: Any) -> None:
        libvirt = self._libvirt
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            self._readable()
        if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
            self._flush()
        if self._stream is not None and events & (
            libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        ):
            self._lost("libvirt closed the console (the guest stopped, or someone forced it away)")

    def _readable(self) -> None:
        libvirt = self._libvirt
        while self._stream is not None and self._reading:
            try:
                data = self._stream.recv(READ_SIZE)
            except libvirt.libvirtError as error:
                self._lost(f"reading the console failed: {error.get_error_message()}")
                return
            if data == -2:  # nothing more now
                return
            if not isinstance(data, bytes) or not data:
                self._lost("libvirt ended the console stream")
                return
            if self._handler is not None:
                self._handler.source_data(data)

    def _flush(self) -> None:
        stream = self._stream
        if stream is None:
            return
        libvirt = self._libvirt
        while self._pending:
            try:
                sent = stream.send(bytes(self._pending[:READ_SIZE]))
            except libvirt.libvirtError as error:
                self._lost(f"writing to the console failed: {error.get_error_message()}")
                return
            if sent == -2 or sent <= 0:
                break
            del self._pending[:sent]
        self._update_events()
        if not self._pending and self._handler is not None:
            self._handler.source_drained()
