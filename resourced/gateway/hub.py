"""One guest console's host end, shared by every client: the console hub.

A `ConsoleHub` keeps the connection to a QEMU character device (a chardev Unix
socket QEMU listens on, or a PTY) open for as long as the gateway runs, whether
or not any client has the console open, reconnecting if it drops. Output goes
into a ring of recent bytes, addressed by absolute offsets, so that each
subscriber reads at its own pace from its own offset (fan-out without copies per
client) and a late subscriber can replay history. Input from clients is written
through, and buffered (bounded by the credit clients were given) while the host
end is down.

The ring is the list of chunks as they came from the host end (immutable `bytes`
objects, not copied into a buffer), each with the absolute offset just past it.
Trimming drops whole chunks from the front; the oldest chunk still held may
begin before `oldest` (its first bytes are no longer readable, but are not
copied away either). So a chunk costs no copy on its way in, and a reader that
is caught up gets the very chunk object back from `read()`. Runs of tiny chunks
(keystroke echoes) are joined once every reader has had them, so that their
bookkeeping does not cost many times their size.

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
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable

from resourced.consoles import ConsoleSpec, EndpointType
from resourced.errors import ResourcedError

log = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 64 * 1024
#: Most bytes one read from a PTY brings.
READ_SIZE = 64 * 1024
#: Most bytes one read from a chardev socket brings (the size of the buffer the
#: transport reads into).
UNIX_READ_SIZE = 256 * 1024
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
#: Input held for a host end that is down, at most (clients hold the rest).
MAX_PENDING_INPUT = 1024 * 1024
#: Output kept beyond the ring for readers that are behind: the most one read
#: from the host end brings (reading pauses once a reader is a ring behind, but
#: the chunk that took it there is already in).
READ_SLACK = max(READ_SIZE, UNIX_READ_SIZE)
#: Chunks dropped from the ring's front are forgotten in batches of at least this
#: many (a list's front cannot be deleted from in O(1)).
_COMPACT_AT = 64
#: Every this many new chunks, if together they are at most `_MERGE_MAX` bytes
#: (keystroke echoes, a slow UART), they are joined into one: a chunk costs some
#: 100 bytes of bookkeeping, and a ring of one-byte chunks should not cost 100
#: times its size. A reader that keeps up has had them by then.
_MERGE_RUN = 64
_MERGE_MAX = 4096
#: How long a reader a whole ring behind may hold the console back before it is
#: left to overrun (seconds).
DEFAULT_STALL_TIMEOUT = 5.0


class Overrun(ResourcedError):
    """A reader asked for output the ring no longer holds."""


Listener = Callable[["ConsoleHub"], None]


class ConsoleHub:
    """A console's host end with its ring of recent output.

    The ring keeps at least the newest `ring_size` bytes (all of them while
    fewer came), and beyond that what the slowest reader not given up on still
    needs, up to `ring_size + READ_SLACK` bytes: `oldest` is exact to the byte.
    It is trimmed once the listeners have been told of a chunk, so by where the
    readers are after reading it. In memory it holds those bytes plus the part
    of its oldest chunk that is already before `oldest`, so at most
    `ring_size + READ_SLACK` plus one chunk (as received, or up to `_MERGE_MAX`
    bytes of small ones joined).
    """

    def __init__(self, console_id: int, spec: ConsoleSpec, ring_size: int = DEFAULT_RING_SIZE):
        if ring_size <= 0:
            raise ValueError("ring size must be positive")
        self.console_id = console_id
        self.spec = spec
        self.ring_size = ring_size
        # The ring: chunks as received, and the absolute offset just past each.
        # Entries before `_head` were dropped (and set to b"" to free them).
        self._chunks: list[bytes] = []
        self._ends: list[int] = []
        self._head = 0
        self._oldest = 0
        #: Chunks from this index on have not been considered for `_merge()`.
        self._merge_from = 0
        #: Absolute offset just past the newest byte ever received.
        self.total = 0
        self.connected = False
        self.last_error: str | None = None
        self._listeners: set[Listener] = set()
        #: `_listeners` as a tuple, called in turn on output (a snapshot, so that
        #: a listener may unsubscribe while being called, with no copy per chunk).
        self._to_notify: tuple[Listener, ...] = ()
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
        return self._oldest

    def read(self, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes from absolute `offset`; `Overrun` if already dropped.

        Costs no copy when the bytes asked for are exactly one chunk as received
        (what a reader that keeps up asks for), one when they lie within a chunk.
        """
        if offset < self._oldest:
            raise Overrun(
                f"console {self.name}: output from offset {offset} was dropped "
                f"(the ring of {self.ring_size} bytes now starts at {self._oldest})"
            )
        total = self.total
        if offset >= total or limit <= 0:
            return b""
        chunks = self._chunks
        chunk = chunks[-1]
        start = offset - total + len(chunk)  # `offset` within the newest chunk
        if start >= 0:  # a reader that keeps up: no search
            return chunk[start : start + limit]  # the chunk itself if it is all of it
        ends = self._ends
        first = bisect_right(ends, offset, self._head)  # the chunk holding `offset`
        chunk = chunks[first]
        end = ends[first]
        start = offset - end + len(chunk)
        stop = offset + limit
        if stop <= end:
            return chunk[start : start + limit]  # the chunk itself if it is all of it
        # It spans chunks: one copy, by join.
        count = len(ends)
        last = bisect_left(ends, stop, first + 1)  # the chunk holding the last byte
        if last == count:
            last -= 1
            tail: bytes | memoryview = chunks[last]
        else:
            tail = memoryview(chunks[last])[: stop - ends[last] + len(chunks[last])]
        return b"".join((memoryview(chunk)[start:], *chunks[first + 1 : last], tail))

    def _received(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)  # `read()` hands chunks out: they must be immutable
        total = self.total + len(data)
        self.total = total
        self._chunks.append(data)
        self._ends.append(total)
        for listener in self._to_notify:  # `_notify()`, inline: this is the hot path
            try:
                listener(self)
            except Exception:  # one bad subscriber must not stop the console
                log.exception("console %s: subscriber failed", self.name)
        # The readers have read and said how far they got. Keep the ring's worth,
        # and beyond it what a reader still needs, up to one read's slack: reading
        # pauses once a reader is a ring behind, but one chunk from the event loop
        # can be larger than the ring.
        positions = self._positions
        if not positions:
            slowest = None
        elif not self._given_up:
            slowest = min(positions.values())
        else:
            slowest = self._slowest()
        ring_size = self.ring_size
        keep_from = total - ring_size
        if slowest is not None and slowest < keep_from:
            keep_from = max(slowest, keep_from - READ_SLACK)
        if keep_from > self._oldest:
            self._oldest = keep_from
            ends = self._ends
            head = self._head
            if ends[head] <= keep_from:  # whole chunks to drop (never the newest)
                chunks = self._chunks
                while ends[head] <= keep_from:
                    chunks[head] = b""
                    head += 1
                if head >= _COMPACT_AT and head * 2 >= len(ends):
                    del chunks[:head]
                    del ends[:head]
                    self._merge_from = max(self._merge_from - head, 0)
                    head = 0
                self._head = head
        if len(self._ends) - self._merge_from >= _MERGE_RUN:
            self._merge()
        # `_check_pressure()`, inline, with the `slowest` already found.
        if slowest is None or total - slowest < ring_size // 2:
            if self._paused:
                self._set_paused(False)
        elif total - slowest >= ring_size and not self._paused:
            self._set_paused(True)

    def _merge(self) -> None:
        """Join the chunks from `_merge_from` on into one, if they are small."""
        chunks = self._chunks
        ends = self._ends
        first = max(self._merge_from, self._head)
        count = len(ends)
        if count - first < 2:
            self._merge_from = first
        elif ends[-1] - ends[first] + len(chunks[first]) <= _MERGE_MAX:
            chunks[first:] = [b"".join(chunks[first:])]
            ends[first:] = [ends[-1]]
            self._merge_from = first + 1
        else:
            self._merge_from = count

    def _held(self) -> int:
        """Bytes the ring holds in memory (at least `total - oldest`)."""
        return sum(map(len, self._chunks))  # those dropped are b"" until compacted

    def subscribe(self, listener: Listener, position: int | None = None) -> None:
        """Call `listener(hub)` whenever output arrives or the host end changes state.

        A listener that also reads output reports how far it got with
        `advance()`; reading from the host end pauses while such a reader is a
        whole ring behind (the way a serial line is flow-controlled), for at most
        `stall_timeout` seconds, after which that reader is left to overrun.
        """
        self._listeners.add(listener)
        self._to_notify = tuple(self._listeners)
        if position is not None:
            self._positions[listener] = position
            self._check_pressure()

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        self._to_notify = tuple(self._listeners)
        self._drain_waiters.discard(listener)
        self._positions.pop(listener, None)
        self._given_up.discard(listener)
        self._check_pressure()

    def advance(self, listener: Listener, position: int) -> None:
        """A reader has taken output up to absolute offset `position`."""
        if listener in self._positions:
            self._positions[listener] = position
            given_up = self._given_up
            if given_up and listener in given_up and self.total - position < self.ring_size // 2:
                given_up.discard(listener)  # caught up after all
            if self._paused:
                self._check_pressure()

    def _slowest(self) -> int | None:
        given_up = self._given_up
        behind = [p for listener, p in self._positions.items() if listener not in given_up]
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

    def _notify(self, listeners: Iterable[Listener]) -> None:
        """Call each of `listeners` (a snapshot: a set may change meanwhile)."""
        for listener in tuple(listeners):
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
        self._notify(self._to_notify)

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
        # an mmap and munmap each time. Its size bounds one read (READ_SLACK).
        self._view = memoryview(bytearray(UNIX_READ_SIZE))
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
