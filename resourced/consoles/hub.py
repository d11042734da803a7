"""One guest console shared by every reader: the console hub.

A `ConsoleHub` joins a console's host end (a `ConsoleSource`: a chardev socket,
a PTY, a console of the RFB extension, a libvirt stream) to its ring of recent
output (`Ring`), and fans the output out to its readers: a gateway session, an
fd client, a PTY. The source stays attached for the hub's lifetime, whether or
not anyone reads, so output written while nobody is attached is kept (up to the
ring's size) for the next reader. Input from readers is written through, and
held (up to `MAX_PENDING_INPUT`) while the host end is down.

The hub is the asyncio owner of the pure ring: it tells its listeners of each
chunk, pauses and resumes the source as the ring decides, and arms the ring's
stall timer on the event loop's clock. It knows nothing of RFB or D-Bus: its
readers translate.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable

from resourced.consoles.ring import DEFAULT_RING_SIZE, DEFAULT_STALL_TIMEOUT, Overrun, Ring
from resourced.consoles.sources import ConsoleSource, source_for
from resourced.consoles.spec import ConsoleKind, ConsoleSpec

__all__ = [
    "DEFAULT_RING_SIZE",
    "DEFAULT_STALL_TIMEOUT",
    "MAX_PENDING_INPUT",
    "ConsoleHub",
    "Listener",
    "Overrun",
]

log = logging.getLogger(__name__)

#: Input held for a host end that is down, at most (readers hold the rest).
MAX_PENDING_INPUT = 1024 * 1024
#: Reattachments remembered (`ConsoleHub.reattached`), at most.
MAX_REATTACHED = 256

Listener = Callable[["ConsoleHub"], None]


class ConsoleHub:
    """A console's source with its ring of recent output, and the readers of both.

    Listeners (`subscribe()`) are called with the hub whenever output arrives or
    the host end attaches or is lost. A listener given a position is also a
    reader: it reads with `read()` and reports how far it got with `advance()`,
    and reading from the host end pauses while a reader is a whole ring behind
    (the way a serial line is flow-controlled), for at most `stall_timeout`
    seconds, after which that reader is left to overrun. See `Ring` for what is
    kept and for how long.
    """

    #: Up to `limit` bytes from absolute `offset`; `Overrun` if already dropped.
    #: The ring's own `read()`: a reader that keeps up gets each chunk, as
    #: received, with no copy (and no call in between: readers call it per chunk).
    read: Callable[[int, int], bytes]
    #: `advance(listener, position)`: a reader has taken output up to absolute
    #: offset `position`. While the ring is not paused, a reader advancing cannot
    #: change that (only new output or a new reader can), so this is the ring's
    #: own `advance()`, called per chunk with no call in between; while it is
    #: paused, the hub's, which resumes the source once the readers caught up.
    advance: Callable[[Listener, int], object]

    def __init__(
        self,
        console_id: int,
        name: str,
        kind: ConsoleKind,
        source: ConsoleSource,
        ring_size: int = DEFAULT_RING_SIZE,
    ) -> None:
        self.console_id = console_id
        self.name = name
        self.kind = kind
        self.source = source
        #: What the hub was made from, if from a spec (`from_spec()`).
        self.spec: ConsoleSpec | None = None
        self._ring: Ring[Listener] = Ring(ring_size, label=f"console {name}")
        self.read = self._ring.read
        self.advance = self._ring.advance
        #: Absolute offset just past the newest byte ever received: the ring's, as
        #: a plain attribute (readers look at it per chunk).
        self.total = 0
        #: Names this hub's offsets to readers on other connections (the console
        #: extension's stream identity): random and nonzero, so a new hub (another
        #: process's, a console made again) counts from 0 under another name. It
        #: stays when the host end attaches again: the offsets go on.
        # os.urandom, as secrets.randbits would: importing secrets costs every start ~5 ms.
        self.stream_id = int.from_bytes(os.urandom(8), "big") or 1
        self.connected = False
        self.last_error: str | None = None
        #: Absolute offsets at which the host end attached again after an earlier
        #: attachment (a guest restarted), oldest first, none older than the
        #: ring's oldest byte: what comes before one is the previous attachment's.
        self.reattached: list[int] = []
        self._ever_connected = False
        self._listeners: set[Listener] = set()
        #: `_listeners` as a tuple, called in turn on output (a snapshot, so that
        #: a listener may unsubscribe while being called, with no copy per chunk).
        self._to_notify: tuple[Listener, ...] = ()
        self._drain_waiters: set[Listener] = set()
        self._pending_input = bytearray()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._started = False
        self._closed = False
        self._connected_event = asyncio.Event()

    @classmethod
    def from_spec(
        cls,
        console_id: int,
        spec: ConsoleSpec,
        ring_size: int = DEFAULT_RING_SIZE,
        source: ConsoleSource | None = None,
    ) -> ConsoleHub:
        """A hub for a console given on the gateway's command line or by libvirt
        (reached through `source`, or else the endpoint the spec names)."""
        if source is None:
            source = source_for(spec.endpoint)
        hub = cls(console_id, spec.name, spec.kind, source, ring_size)
        hub.spec = spec
        return hub

    # --- output, read by offset -----------------------------------------------------------

    @property
    def ring_size(self) -> int:
        return self._ring.size

    @property
    def oldest(self) -> int:
        """Absolute offset of the oldest byte still in the ring."""
        return self._ring.oldest

    @property
    def paused(self) -> bool:
        """Whether reading from the host end is paused for a reader behind."""
        return self._ring.paused

    @property
    def stall_timeout(self) -> float:
        """Seconds a reader a whole ring behind may hold the console back."""
        return self._ring.stall_timeout

    @stall_timeout.setter
    def stall_timeout(self, seconds: float) -> None:
        self._ring.stall_timeout = seconds
        if self._ring.paused:
            self._arm_stall_timer()

    def subscribe(self, listener: Listener, position: int | None = None) -> None:
        """Call `listener(hub)` whenever output arrives or the host end changes state;
        with a `position`, it is also a reader from that absolute offset."""
        self._listeners.add(listener)
        self._to_notify = tuple(self._listeners)
        if position is not None and self._ring.add_reader(listener, position):
            self._pause_changed()

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        self._to_notify = tuple(self._listeners)
        self._drain_waiters.discard(listener)
        if self._ring.remove_reader(listener):
            self._pause_changed()

    def _advance_paused(self, listener: Listener, position: int) -> None:
        if self._ring.advance(listener, position):
            self._pause_changed()

    def _pause_changed(self) -> None:
        if self._ring.paused:
            self.source.pause_reading()
            self.advance = self._advance_paused  # a reader advancing may resume it
        else:
            self.source.resume_reading()
            self.advance = self._ring.advance
        self._arm_stall_timer()

    def _arm_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        deadline = self._ring.deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            if deadline == -float("inf"):  # a new stall: its clock starts now
                self._ring.expire(loop.time())
                deadline = self._ring.deadline()
                assert deadline is not None
            self._stall_timer = loop.call_at(deadline, self._stall_expired)

    def _stall_expired(self) -> None:
        self._stall_timer = None
        paused = self._ring.paused
        laggards = self._ring.expire(asyncio.get_running_loop().time())
        if laggards:
            log.warning(
                "console %s: %d reader(s) stalled it for %g s; going on without them",
                self.name,
                len(laggards),
                self.stall_timeout,
            )
        if self._ring.paused != paused:
            self._pause_changed()
        else:
            self._arm_stall_timer()

    def _notify(self, listeners: Iterable[Listener]) -> None:
        """Call each of `listeners` (a snapshot: a set may change meanwhile)."""
        for listener in tuple(listeners):
            try:
                listener(self)
            except Exception:  # one bad reader must not stop the console
                log.exception("console %s: subscriber failed", self.name)

    # --- SourceHandler: what the source reports -------------------------------------------

    def source_connected(self) -> None:
        log.info("console %s: attached to %s", self.name, self.source.description)
        if self._ever_connected:
            marks = self.reattached
            while marks and (marks[0] < self.oldest or len(marks) >= MAX_REATTACHED):
                del marks[0]
            if not marks or marks[-1] != self.total:
                marks.append(self.total)
        self._ever_connected = True
        self.connected = True
        self.last_error = None
        if self._pending_input:
            self.source.write(bytes(self._pending_input))
            self._pending_input.clear()
        self._connected_event.set()
        self._notify(self._to_notify)
        self._check_drained()

    def source_data(self, data: bytes) -> None:
        ring = self._ring
        ring.append(data)
        self.total = ring.total
        for listener in self._to_notify:  # `_notify()`, inline: this is the hot path
            try:
                listener(self)
            except Exception:  # one bad reader must not stop the console
                log.exception("console %s: subscriber failed", self.name)
        # The readers have read and said how far they got: the ring keeps what
        # they still need.
        if ring.trim():
            self._pause_changed()

    def source_drained(self) -> None:
        self._check_drained()

    def source_lost(self, reason: str) -> None:
        self.connected = False
        self.last_error = reason
        self._connected_event.clear()
        self._notify(self._to_notify)
        self._check_drained()  # what the source had not passed on is gone with it

    # --- input ------------------------------------------------------------------------------

    @property
    def input_backlog(self) -> int:
        """Input bytes accepted but not yet taken by the host end."""
        return len(self._pending_input) + self.source.input_backlog

    def write(self, data: bytes) -> None:
        """Pass reader input on (or hold it while the host end is down)."""
        if self.connected:
            self.source.write(data)
        elif len(self._pending_input) + len(data) > MAX_PENDING_INPUT:
            log.warning("console %s: host end down, input dropped", self.name)
        else:
            self._pending_input += data

    def when_drained(self, listener: Listener) -> None:
        """Call `listener(hub)` once the input backlog is 0 again."""
        if self.input_backlog == 0:
            listener(self)
        else:
            self._drain_waiters.add(listener)

    def _check_drained(self) -> None:
        if self._drain_waiters and self.input_backlog == 0:
            waiters, self._drain_waiters = self._drain_waiters, set()
            self._notify(waiters)

    def send_break(self) -> bool:
        """A serial break, if the host end can carry one (a PTY can, a chardev
        socket cannot); returns whether it could."""
        if self.connected and self.source.send_break():
            return True
        log.info("console %s: break not possible over %s", self.name, self.source.description)
        return False

    # --- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin attaching the source (once)."""
        if not self._started and not self._closed:
            self._started = True
            self.source.start(self)

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    async def close(self) -> None:
        self._closed = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        await self.source.close()
