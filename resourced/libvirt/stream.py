"""A guest console through libvirt's console stream, as a console hub's source.

`LibvirtConsoleSource` opens a domain's console with `virDomainOpenConsole` (a
`<serial>`, `<console>` or `<parallel>` on a PTY) or `virDomainOpenChannel` (a
`<channel>` on a Unix socket: the only devices each of them opens, in libvirt
9.0) on a non-blocking `virStream` while someone needs it (`hold()`; released
`idle_timeout` seconds after the last `release()`), which is how local guests
get consoles with no gateway. libvirt lets one client hold a console at a time:
while we hold it, `virsh console` gets "Active console session exists"; we
never force it away from someone else (opening it then fails with `Busy`, and
we try again every `RETRY_DELAY` seconds while held), and when another client
forces it from us (`virsh console --force`) the hub is told why and we try
again, without forcing, until that session ends.

Threads: libvirt's blocking calls (opening the console, aborting the stream)
run on the libvirt thread (`resourced.libvirt.thread`); the stream's
non-blocking `send`/`recv`, its event callbacks and the fields marked "events
loop" belong to the loop libvirt's events run on; the hub and the rest live on
the service's loop. In the service those two loops are the same
(`run_events_on`), and a keystroke goes to libvirt and its echo to the hub with
no thread hop: that is most of what a console costs over libvirt's bare stream.
Where libvirt's events run on the libvirt thread (the gateway), output crosses
with `call_soon_threadsafe` and input the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from resourced.consoles.sources import SourceHandler
from resourced.errors import BrokerError, Busy, NotConnected
from resourced.libvirt import thread

log = logging.getLogger(__name__)

#: Most bytes one `recv` takes from the stream.
READ_SIZE = 64 * 1024
#: What `recv` asks for after a read that came short (a keystroke's echo).
SMALL_READ_SIZE = 1024
#: Seconds between attempts to get a console someone else holds.
RETRY_DELAY = 2.0

#: Why the stream ended, as far as we can tell: libvirt says no more than "stream
#: had I/O failure" when another client forces the console away.
_ENDED = (
    "libvirt closed the console (the guest stopped, or another client forced it "
    "away with virsh console --force)"
)

#: The libvirt domain, looked up on the libvirt thread (`NotConnected` if it cannot be).
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
        channel: bool = False,
    ) -> None:
        """`device` is libvirt's alias of the device (`serial0`, `channel0`);
        `channel`: it is a `<channel>`, opened with `virDomainOpenChannel`."""
        self._libvirt = libvirt
        self._conn = conn
        self._domain = domain
        self.device = device
        self.channel = channel
        self.description = f"libvirt {'channel' if channel else 'console'} {device}"
        self.idle_timeout = idle_timeout
        self.history_left = 0  # libvirt replays nothing
        self.failure: BrokerError | None = None
        self._loop = asyncio.get_running_loop()
        self._handler: SourceHandler | None = None
        self._attached = False
        self._generation = 0  # which attachment a message from the libvirt thread is about
        self._holds = 0
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._backlog = 0  # input handed to the libvirt thread, not yet sent
        self._closed = False
        self._stopped = False  # the domain is not running
        self._events_loop = thread.events_loop()
        #: libvirt's events run on this loop: no thread between the stream and the hub.
        self._direct = self._events_loop is self._loop
        # events loop
        self._stream: Any = None
        self._pending = bytearray()
        self._reading = True
        self._watching = 0  # the stream events asked for
        self._read_size = SMALL_READ_SIZE

    # --- demand ------------------------------------------------------------------

    def hold(self) -> None:
        self._holds += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._ensure_attaching()

    def release(self) -> None:
        self._holds = max(0, self._holds - 1)
        if self._holds == 0 and self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._holds == 0:
            self.detach("nobody uses it")

    def set_stopped(self, stopped: bool) -> None:
        """The domain stopped (let go of the stream) or runs again (attach if held)."""
        self._stopped = stopped
        self.failure = None
        if stopped:
            self.detach("the guest stopped")
        elif self._holds:
            self._ensure_attaching()

    # --- ConsoleSource --------------------------------------------------------------

    def start(self, handler: SourceHandler) -> None:
        self._handler = handler

    def write(self, data: bytes) -> None:
        if not self._attached:
            return  # the hub holds input while we are not attached
        self._backlog += len(data)
        if type(data) is not bytes:
            data = bytes(data)  # it may wait in `_pending` or cross threads: ours
        if self._direct:  # `_to_stream`, inline: a keystroke's way to libvirt
            self._send(self._generation, data)
        else:
            self._events_loop.call_soon_threadsafe(self._send, self._generation, data)

    @property
    def input_backlog(self) -> int:
        return self._backlog

    def pause_reading(self) -> None:
        self._to_stream(self._set_reading, self._generation, False)

    def resume_reading(self) -> None:
        self._to_stream(self._set_reading, self._generation, True)

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

    # --- attaching (service loop) -------------------------------------------------------

    def _ensure_attaching(self) -> None:
        if self._closed or self._stopped or self._attached:
            return
        if self._task is None or self._task.done():
            self.failure = None  # a new attempt: an old failure says nothing about it
            self._task = self._loop.create_task(
                self._attach_loop(), name=f"libvirt-console-{self.device}"
            )

    async def _attach_loop(self) -> None:
        while self._holds and not self._attached and not self._closed and not self._stopped:
            try:
                await self._attach()
                self.failure = None
                return
            except BrokerError as err:
                self.failure = err
                log.info("%s: %s; trying again in %g s", self.description, err, RETRY_DELAY)
            await asyncio.sleep(RETRY_DELAY)

    async def _attach(self) -> None:
        domain = await self._domain()
        self._generation += 1
        generation = self._generation
        if not self._direct:
            await thread.call(self._open_and_watch, domain, generation)
        else:
            opening = asyncio.ensure_future(thread.call(self._open, domain))
            try:
                stream = await asyncio.shield(opening)
            except asyncio.CancelledError:
                opening.add_done_callback(self._abandon)
                raise
            self._watch(stream, generation)
        self._attached = True
        self._backlog = 0
        log.info(
            "%s: attached (%s)",
            self.description,
            "on this loop" if self._direct else "through the libvirt thread",
        )
        if self._handler is not None:
            self._handler.source_connected()

    def detach(self, reason: str) -> None:
        if not self._attached:
            return
        self._attached = False
        self._generation += 1
        self._backlog = 0
        self._to_stream(self._close_stream)
        if self._handler is not None:
            self._handler.source_lost(reason)

    # --- between the loops ------------------------------------------------------------------

    def _to_stream(self, function: Callable[..., None], *args: Any) -> None:
        """`function(*args)` on the events loop: now if that is this loop."""
        if self._direct:
            function(*args)
        else:
            self._events_loop.call_soon_threadsafe(function, *args)

    def _to_hub(self, function: Callable[..., None], *args: Any) -> None:
        """`function(*args)` on the service's loop: now if that is the events loop."""
        if self._direct:
            function(*args)
        else:
            self._loop.call_soon_threadsafe(function, *args)

    # --- from the events loop (service loop) --------------------------------------------

    def _data(self, generation: int, chunks: Iterable[bytes]) -> None:
        if generation != self._generation or self._handler is None:
            return
        for chunk in chunks:
            self._handler.source_data(chunk)

    def _sent(self, generation: int, count: int) -> None:
        if generation != self._generation:
            return
        self._backlog = max(0, self._backlog - count)
        if self._backlog == 0 and self._handler is not None:
            self._handler.source_drained()

    def _lost(self, generation: int, reason: str) -> None:
        if generation != self._generation:
            return
        log.info("%s: %s", self.description, reason)
        self.detach(reason)
        if self._holds and not self._closed and not self._stopped:
            self._ensure_attaching()

    # --- opening (libvirt thread) and closing --------------------------------------------------

    def _open(self, domain: Any) -> Any:
        """A non-blocking stream on the console (`Busy` if another client has it)."""
        libvirt = self._libvirt
        conn = self._conn()
        if conn is None:
            raise NotConnected("libvirt is not connected")
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            if self.channel:
                domain.openChannel(self.device, stream, 0)
            else:
                domain.openConsole(self.device, stream, 0)
        except libvirt.libvirtError as error:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            message = str(error.get_error_message() or error)
            # libvirt's words (src/conf/virchrdev.c) for a device another client holds.
            if "Active console session exists" in message:
                raise Busy(
                    f"another program has console {self.device} open through libvirt "
                    "(virsh console?); it is never forced away from it"
                ) from None
            if "Active channel stream exists" in message:
                raise Busy(
                    f"another program has channel {self.device} open through libvirt; "
                    "it is never forced away from it"
                ) from None
            raise NotConnected(f"cannot open console {self.device}: {message}") from None
        return stream

    def _open_and_watch(self, domain: Any, generation: int) -> None:
        """`_open` and `_watch`, where the libvirt thread is the events loop."""
        self._close_stream()
        self._watch(self._open(domain), generation)

    def _abandon(self, opening: asyncio.Future[Any]) -> None:
        """A stream opened for an attempt that was cancelled meanwhile: let it go."""
        if not opening.cancelled() and opening.exception() is None:
            thread.post(self._abort, opening.result())

    def _abort(self, stream: Any) -> None:
        """libvirt thread: `virStreamAbort` waits for libvirtd's answer."""
        with contextlib.suppress(self._libvirt.libvirtError):
            stream.abort()

    # --- the stream (events loop) ----------------------------------------------------------------

    def _watch(self, stream: Any, generation: int) -> None:
        self._close_stream()
        self._stream = stream
        self._pending.clear()
        self._reading = True
        self._watching = self._events()
        stream.eventAddCallback(self._watching, self._on_event, generation)

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        self._pending.clear()
        if stream is None:
            return
        with contextlib.suppress(self._libvirt.libvirtError):
            stream.eventRemoveCallback()
        thread.post(self._abort, stream)

    def _events(self) -> int:
        libvirt = self._libvirt
        events = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        if self._reading:
            events |= libvirt.VIR_STREAM_EVENT_READABLE
        if self._pending:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        return int(events)

    def _update_events(self) -> None:
        events = self._events()
        if self._stream is not None and events != self._watching:
            self._watching = events
            with contextlib.suppress(self._libvirt.libvirtError):
                self._stream.eventUpdateCallback(events)

    def _set_reading(self, generation: int, reading: bool) -> None:
        self._reading = reading
        self._update_events()
        if reading:  # what came while paused (later: the hub may be mid-call here)
            self._events_loop.call_soon(self._read, generation)

    def _on_event(self, stream: Any, events: int, generation: int) -> None:
        if stream is not self._stream:
            return
        libvirt = self._libvirt
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            self._read(generation)
        if events & libvirt.VIR_STREAM_EVENT_WRITABLE:
            self._flush(generation)
        if self._stream is stream and events & (
            libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        ):
            self._fail(generation, _ENDED)

    def _fail(self, generation: int, reason: str) -> None:
        self._close_stream()
        self._to_hub(self._lost, generation, reason)

    def _read(self, generation: int) -> None:
        """What the stream has for us: until a read comes short (libvirt calls again
        while the stream holds more), or the hub pauses reading."""
        libvirt = self._libvirt
        stream = self._stream
        chunks: list[bytes] = []
        failure = None
        size = self._read_size
        while self._reading and stream is self._stream and stream is not None:
            try:
                data = stream.recv(size)
            except libvirt.libvirtError as error:
                failure = f"{_ENDED}: {error.get_error_message()}"
                break
            if data == -2:  # nothing more now
                break
            if not isinstance(data, bytes) or not data:
                failure = "libvirt ended the console stream"
                break
            if self._direct:  # to the hub now: it may pause reading
                if generation == self._generation and self._handler is not None:
                    self._handler.source_data(data)
            else:
                chunks.append(data)
            if len(data) < size:
                # libvirt-python zero-fills a buffer of `size` per call: small
                # while the console is typed on, large while it pours out.
                self._read_size = SMALL_READ_SIZE
                break
            size = self._read_size = READ_SIZE
        if chunks:
            self._loop.call_soon_threadsafe(self._data, generation, chunks)
        if failure is not None and stream is self._stream:
            self._fail(generation, failure)

    def _send(self, generation: int, data: bytes) -> None:
        stream = self._stream
        if stream is None:
            return
        if not self._pending:  # the usual case: all of it at once, no copy
            try:
                sent = stream.send(data)
            except self._libvirt.libvirtError as error:
                self._fail(generation, f"{_ENDED}: {error.get_error_message()}")
                return
            if sent == len(data):
                if self._direct:  # `_to_hub`, inline
                    self._sent(generation, sent)
                else:
                    self._loop.call_soon_threadsafe(self._sent, generation, sent)
                return
            data = data[max(sent, 0) :]
            if sent > 0:
                self._to_hub(self._sent, generation, sent)
        self._pending += data
        self._flush(generation)

    def _flush(self, generation: int) -> None:
        stream = self._stream
        if stream is None:
            return
        libvirt = self._libvirt
        sent_now = 0
        while self._pending:
            try:
                sent = stream.send(bytes(self._pending[:READ_SIZE]))
            except libvirt.libvirtError as error:
                self._fail(generation, f"{_ENDED}: {error.get_error_message()}")
                return
            if sent == -2 or sent <= 0:
                break
            del self._pending[:sent]
            sent_now += sent
        self._update_events()
        if sent_now:
            self._to_hub(self._sent, generation, sent_now)
