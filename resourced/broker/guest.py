"""A guest as the broker holds it: its one connection, its consoles, their clients.

A `Guest` owns a `GuestLink` (the RFB connection, on demand) and a
`BrokerConsole` per console the guest has. A console's output always goes
into its hub's ring while the connection is up, whether or not anyone has it
open; desktop apps and scripts are the hub's readers (`resourced.sinks.console`).
The console list comes from the server's console extension (HELLO, ADDED,
REMOVED) and stays published while the connection is idle, so a script can
open a console of a guest nobody is connected to: that connects.

Consoles from libvirt's console stream (guests with no gateway) plug in here
the same way, with a different hub source; `origin` tells which.

Nothing here knows D-Bus: observers are told of changes, callers get
`resourced.errors` exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from resourced.broker.audio import AudioSettings, GuestAudio, PlaybackFactory
from resourced.broker.link import Connector, GuestLink, LinkObserver, LinkState
from resourced.broker.rfbsource import RfbConsoleSource
from resourced.consoles import ConsoleKind
from resourced.consoles.hub import DEFAULT_RING_SIZE, ConsoleHub
from resourced.consoles.sources import ConsoleSource
from resourced.errors import BrokerError, Busy, NoSuchConsole, NotConnected
from resourced.rfb.aio import RfbClient
from resourced.rfb.consoles import (
    ConsoleAdded,
    ConsoleClosed,
    ConsoleCredit,
    ConsoleData,
    ConsoleInfo,
    ConsoleOpened,
    ConsoleRemoved,
    Consoles,
    ConsolesAnnounced,
)
from resourced.rfb.extension import Extension
from resourced.rfb.messages import FramebufferUpdate, FramebufferUpdateRequest
from resourced.sinks.console import ConsoleClient, PtyClient, StreamClient

log = logging.getLogger(__name__)

#: How long an operation waits for the console list after connecting (seconds).
ANNOUNCE_TIMEOUT = 10.0
#: How long Write/ReadHistory/Open wait for a console's host end (seconds).
ATTACH_TIMEOUT = 10.0
#: How long a console reader a ring behind may hold the console back (seconds).
DEFAULT_STALL_TIMEOUT = 2.0

_hub_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class GuestSettings:
    """Tunables for one guest (from the config file)."""

    idle_timeout: float = 30.0
    #: Below D-Bus's default 25 s call timeout, so a caller gets our reason.
    connect_timeout: float = 20.0
    history: int = DEFAULT_RING_SIZE
    stall_timeout: float = DEFAULT_STALL_TIMEOUT


class GuestObserver:
    """What the D-Bus face (or a test) learns of a guest. Override what you need."""

    def guest_changed(self, guest: Guest) -> None:
        """State, LastError or the console list changed."""

    def console_added(self, console: BrokerConsole) -> None:
        """A console appeared."""

    def console_removed(self, console: BrokerConsole) -> None:
        """A console went away (its clients were closed)."""

    def console_changed(self, console: BrokerConsole) -> None:
        """Available or OpenCount changed."""

    def audio_changed(self, guest: Guest) -> None:
        """Something of the guest's sound changed (`guest.audio`)."""


class Demand(Protocol):
    """What keeps a console's host end attached: held while anyone uses it."""

    def hold(self) -> None: ...

    def release(self) -> None: ...


class BrokerSource(ConsoleSource, Protocol):
    """A hub source as the broker drives it (RFB extension or libvirt stream)."""

    #: Bytes of replayed history still to come (0 when the source replays none).
    history_left: int
    #: Why the last attempt to attach failed (a `Busy`, a `NotConnected`...), or None.
    failure: BrokerError | None

    def detach(self, reason: str) -> None: ...


class BrokerConsole:
    """One console of a guest: its hub, and the clients reading it.

    `origin` is "rfb" (the RFB console extension of the guest's connection) or
    "libvirt" (libvirt's console stream); `demand` is what a client holds while
    it has the console open: the guest's connection, or the libvirt stream.
    """

    def __init__(
        self,
        guest: Guest,
        name: str,
        kind: ConsoleKind,
        origin: str,
        source: BrokerSource,
        demand: Demand,
    ) -> None:
        self.guest = guest
        self.name = name
        self.kind = kind
        self.origin = origin
        self.source = source
        self.demand = demand
        self.hub = ConsoleHub(next(_hub_ids), name, kind, source, guest.settings.history)
        self.hub.stall_timeout = guest.settings.stall_timeout
        self.clients: set[ConsoleClient] = set()
        self.exclusive: ConsoleClient | None = None
        self._available = False
        self.hub.subscribe(self._hub_changed)
        self.hub.start()

    @property
    def available(self) -> bool:
        """The console's host end is attached now."""
        return self.hub.connected

    @property
    def open_count(self) -> int:
        return len(self.clients)

    def _hub_changed(self, _hub: ConsoleHub) -> None:
        if self.hub.connected != self._available:
            self._available = self.hub.connected
            self.guest.notify_console_changed(self)

    async def wait_available(self, timeout: float = ATTACH_TIMEOUT) -> None:
        """Wait for the host end; `NotConnected` if it does not come in time."""
        if self.hub.connected:
            return
        try:
            async with asyncio.timeout(timeout):
                while not self.hub.connected:
                    if self.source.failure is not None:
                        raise self.source.failure
                    await _next_change(self.hub, 0.2)
        except TimeoutError:
            if self.source.failure is not None:
                raise self.source.failure from None
            raise NotConnected(
                f"console {self.name} of guest {self.guest.name} is not reachable now"
                + (f" ({self.guest.link.last_error})" if self.guest.link.last_error else "")
            ) from None

    def add_client(self, client: ConsoleClient, *, exclusive: bool, force: bool) -> None:
        """Admit a client under the exclusivity rules; it holds the connection.

        `force` closes every other client first (as `virsh console --force`);
        otherwise `Busy` if someone holds the console exclusively, or if
        `exclusive` is asked while others have it open.
        """
        if force:
            for other in list(self.clients):
                other.close("forced away by another open")
        elif self.exclusive is not None:
            raise Busy(f"console {self.name} of guest {self.guest.name} is open exclusively")
        elif exclusive and self.clients:
            raise Busy(
                f"console {self.name} of guest {self.guest.name} is open "
                f"{len(self.clients)} time(s); exclusive open refused (use force)"
            )
        self.clients.add(client)
        if exclusive:
            self.exclusive = client
        self.demand.hold()
        client.when_closed(self._client_closed)
        self.guest.notify_console_changed(self)

    def _client_closed(self, client: ConsoleClient, reason: str) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        if self.exclusive is client:
            self.exclusive = None
        log.info(
            "console %s/%s: %s client closed (%s)", self.guest.name, self.name, client.kind, reason
        )
        self.demand.release()
        self.guest.notify_console_changed(self)

    def pty(self, path: str) -> PtyClient | None:
        for client in self.clients:
            if isinstance(client, PtyClient) and client.path == path:
                return client
        return None

    def history(self, max_bytes: int) -> bytes:
        """The newest `max_bytes` of what the ring holds."""
        start = max(self.hub.oldest, self.hub.total - max_bytes)
        out = bytearray()
        while start < self.hub.total:
            chunk = self.hub.read(start, self.hub.total - start)
            out += chunk
            start += len(chunk)
        return bytes(out)

    async def close(self, reason: str) -> None:
        for client in list(self.clients):
            client.close(reason)
        await self.hub.close()


class Guest(LinkObserver):
    """One guest: name, where it is, its connection and its consoles."""

    def __init__(
        self,
        name: str,
        connector: Connector,
        *,
        source: str = "vnc",
        address: str = "",
        uuid: str = "",
        settings: GuestSettings | None = None,
        console_origin: str = "rfb",
        audio_settings: AudioSettings | None = None,
        playback_factory: PlaybackFactory | None = None,
    ) -> None:
        self.name = name
        #: Added at run time and not remembered: keeps the service from idle exit.
        self.ephemeral = False
        #: Where consoles come from: "rfb" (the connection's console extension)
        #: or "libvirt" (the caller adds them with `set_consoles`).
        self.console_origin = console_origin
        self.source = source
        self.address = address
        self.uuid = uuid
        self.settings = settings or GuestSettings()
        self.observers: list[GuestObserver] = []
        self.consoles: dict[str, BrokerConsole] = {}
        self._ext: Consoles | None = None
        self._by_id: dict[int, RfbConsoleSource] = {}
        self._announced: asyncio.Event = asyncio.Event()
        #: Whether the server speaks the console extension (None: not known yet).
        self.consoles_offered: bool | None = None
        self.link = GuestLink(
            name,
            connector,
            self._extensions,
            self,
            idle_timeout=self.settings.idle_timeout,
            connect_timeout=self.settings.connect_timeout,
        )
        self.audio = GuestAudio(
            name,
            self.link,
            audio_settings or AudioSettings(),
            playback_factory,
            lambda: self._notify("audio_changed", self),
        )
        for event_type, handler in (
            (ConsolesAnnounced, self._on_announced),
            (ConsoleAdded, self._on_added),
            (ConsoleRemoved, self._on_removed),
            (ConsoleOpened, self._on_opened),
            (ConsoleData, self._on_data),
            (ConsoleClosed, self._on_closed),
            (ConsoleCredit, self._on_credit),
            (FramebufferUpdate, self._on_update),
        ):
            self.link.route(event_type, handler)

    @property
    def state(self) -> LinkState:
        return self.link.state

    @property
    def last_error(self) -> str:
        return self.link.last_error

    def _extensions(self) -> Sequence[Extension]:
        audio = self.audio.extension()
        if self.console_origin != "rfb":
            self._ext = None
            return [audio]
        self._ext = Consoles()
        return [self._ext, audio]

    # --- notifications ------------------------------------------------------------

    def _notify(self, method: str, *args: Any) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("guest %s: observer failed", self.name)

    def notify_console_changed(self, console: BrokerConsole) -> None:
        self._notify("console_changed", console)

    # --- LinkObserver ------------------------------------------------------------

    def link_state_changed(self, state: LinkState, error: str) -> None:
        self._notify("guest_changed", self)

    def link_up(self, client: RfbClient) -> None:
        # A server answers this after it has handled our SetEncodings, so a
        # gateway's console HELLO and QEMU's audio acknowledgement come first; an
        # update with neither before it says the server has no such extension.
        client.send(FramebufferUpdateRequest(False, 0, 0, 1, 1))

    def _on_update(self, _event: FramebufferUpdate) -> None:
        self.audio.server_answered()
        if self.console_origin == "rfb" and not self._announced.is_set():
            self.consoles_offered = False
            self._announced.set()

    def link_down(self, reason: str) -> None:
        self.audio.link_down()
        self._announced.clear()
        self.consoles_offered = None
        self._by_id.clear()
        for console in self.consoles.values():
            console.source.detach(f"the guest's connection closed ({reason})")
        self._ext = None

    # --- console events ----------------------------------------------------------

    def _on_announced(self, event: ConsolesAnnounced) -> None:
        self.consoles_offered = True
        names = {info.name for info in event.consoles}
        for name in [n for n in self.consoles if n not in names]:
            self._drop_console(name, "the guest no longer has it")
        for info in event.consoles:
            self._attach(info)
        self._announced.set()

    def _on_added(self, event: ConsoleAdded) -> None:
        self._attach(event.info)

    def _on_removed(self, event: ConsoleRemoved) -> None:
        source = self._by_id.pop(event.console_id, None)
        if source is not None:
            for name, console in list(self.consoles.items()):
                if console.source is source:
                    self._drop_console(name, "the guest removed it")

    def _attach(self, info: ConsoleInfo) -> None:
        client = self.link.client
        if client is None or self._ext is None:
            return
        console = self.consoles.get(info.name)
        if console is None:
            source = RfbConsoleSource(self.name, info.name)
            console = BrokerConsole(self, info.name, info.kind, "rfb", source, self.link)
            self.consoles[info.name] = console
            self._notify("console_added", console)
            self._notify("guest_changed", self)
        announced: BrokerSource = console.source
        if not isinstance(announced, RfbConsoleSource):
            return  # a console libvirt gives us: the stream stays its source
        self._by_id[info.console_id] = announced
        # History only into an empty ring nobody reads yet, so nothing shows twice.
        history = console.hub.total == 0
        announced.attach(client, self._ext, info.console_id, history)

    def _drop_console(self, name: str, reason: str) -> None:
        console = self.consoles.pop(name, None)
        if console is None:
            return
        for client in list(console.clients):
            client.close(reason)
        console.source.detach(reason)
        asyncio.get_running_loop().create_task(console.hub.close())
        self._notify("console_removed", console)
        self._notify("guest_changed", self)

    def _on_opened(self, event: ConsoleOpened) -> None:
        source = self._by_id.get(event.console_id)
        if source is not None:
            source.on_opened(event)

    def _on_data(self, event: ConsoleData) -> None:
        source = self._by_id.get(event.console_id)
        if source is not None:
            source.on_data(event)

    def _on_closed(self, event: ConsoleClosed) -> None:
        source = self._by_id.get(event.console_id)
        if source is not None:
            source.on_closed(event)

    def _on_credit(self, event: ConsoleCredit) -> None:
        source = self._by_id.get(event.console_id)
        if source is not None:
            source.on_credit(event)

    # --- consoles given by the owner (libvirt) -----------------------------------------

    def set_consoles(self, wanted: Sequence[tuple[str, ConsoleKind, Any]]) -> None:
        """The consoles the guest has now, as (name, kind, source) for new ones;
        each source is also its console's demand (see `BrokerConsole`). Consoles
        not listed go away (their clients see EOF)."""
        names = {name for name, _kind, _source in wanted}
        for name in [n for n in self.consoles if n not in names]:
            self._drop_console(name, "the guest no longer has it")
        for name, kind, source in wanted:
            if name in self.consoles:
                continue
            console = BrokerConsole(self, name, kind, self.console_origin, source, source)
            self.consoles[name] = console
            self._notify("console_added", console)
            self._notify("guest_changed", self)

    def set_running(self, running: bool) -> None:
        """The guest started or stopped (libvirt says so). Stopped: its consoles'
        clients get EOF, its connection closes and stays closed until it runs again."""
        if not running:
            for console in self.consoles.values():
                for client in list(console.clients):
                    client.close("the guest stopped")
        for console in self.consoles.values():
            set_stopped = getattr(console.source, "set_stopped", None)
            if set_stopped is not None:
                set_stopped(not running)
        self.link.set_stopped(not running)

    # --- what callers ask for ------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (it stays up for the idle timeout); `NotConnected` on failure."""
        self.link.reset_failure()
        self.link.hold()
        try:
            await self._connected_with_consoles()
        finally:
            self.link.release()

    async def disconnect(self) -> None:
        """Close the connection now; open consoles are closed (their clients see EOF)."""
        for console in self.consoles.values():
            for client in list(console.clients):
                client.close("the guest was disconnected")
        await self.link.close()
        self.link.set_stopped(False)

    async def _connected_with_consoles(self) -> None:
        await self.link.wait_connected()
        if self.console_origin != "rfb":
            return
        try:
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                await self._announced.wait()
        except TimeoutError:
            # A server without the console extension never announces: no consoles.
            pass

    async def console(self, name: str) -> BrokerConsole:
        """The console `name`, connecting first if it is not known yet."""
        console = self.consoles.get(name)
        if console is not None:
            return console
        if self.console_origin == "rfb" and (
            self.link.client is None or not self._announced.is_set()
        ):
            self.link.hold()
            try:
                await self._connected_with_consoles()
            finally:
                self.link.release()
        console = self.consoles.get(name)
        if console is None:
            known = ", ".join(sorted(self.consoles)) or "none"
            why = ""
            if self.consoles_offered is False:
                why = "; its VNC server has no console extension (put our gateway in front of it)"
            raise NoSuchConsole(
                f"guest {self.name} has no console {name!r} (its consoles: {known}){why}"
            )
        return console

    async def _attached(self, name: str) -> BrokerConsole:
        """The console with its host end attached (connecting if needed)."""
        console = await self.console(name)
        console.demand.hold()
        try:
            if console.origin == "rfb":
                await self.link.wait_connected()
            await console.wait_available()
        finally:
            console.demand.release()
        return console

    async def open_stream(
        self, name: str, *, history: bool, read_only: bool, exclusive: bool, force: bool
    ) -> int:
        """A new stream client; the app's end of its socketpair (the caller closes it)."""
        console = await self._attached(name)
        client, theirs = StreamClient.pair(console.hub, history=history, read_only=read_only)
        try:
            console.add_client(client, exclusive=exclusive, force=force)
        except BaseException:
            client.close("refused")
            os.close(theirs)
            raise
        await client.attach()
        return theirs

    async def open_pty(
        self,
        name: str,
        *,
        history: bool,
        read_only: bool,
        exclusive: bool,
        force: bool,
        idle_timeout: float,
    ) -> str:
        """A new PTY client; the slave's path."""
        console = await self._attached(name)
        client = PtyClient(
            console.hub, history=history, read_only=read_only, idle_timeout=idle_timeout
        )
        try:
            console.add_client(client, exclusive=exclusive, force=force)
        except BaseException:
            client.close("refused")
            raise
        client.start()
        return client.path

    def close_pty(self, path: str) -> bool:
        for console in self.consoles.values():
            client = console.pty(path)
            if client is not None:
                client.close("ClosePty")
                return True
        return False

    async def write(self, name: str, data: bytes) -> None:
        """Send input to a console now; `NotConnected` if its host end is down."""
        console = await self._attached(name)
        if console.exclusive is not None:
            raise Busy(f"console {name} of guest {self.name} is open exclusively")
        if not console.hub.connected:
            raise NotConnected(f"console {name} of guest {self.name} is not reachable now")
        console.hub.write(data)

    async def read_history(self, name: str, max_bytes: int) -> bytes:
        """What the console's ring holds (the newest `max_bytes`), after any replay."""
        console = await self._attached(name)
        source = console.source
        try:
            async with asyncio.timeout(ATTACH_TIMEOUT):
                while source.history_left and console.hub.connected:
                    await _next_change(console.hub)
        except TimeoutError:
            pass
        return console.history(max_bytes)

    async def send_break(self, name: str) -> bool:
        console = await self._attached(name)
        return console.hub.send_break()

    async def close(self) -> None:
        for console in list(self.consoles.values()):
            await console.close("the guest was removed")
        self.consoles.clear()
        await self.audio.close()
        await self.link.close()


async def _next_change(hub: ConsoleHub, timeout: float | None = None) -> None:
    """Wait until the hub reports anything (output or a state change), or `timeout`."""
    changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def listener(_hub: ConsoleHub) -> None:
        if not changed.done():
            changed.set_result(None)

    hub.subscribe(listener)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed, timeout)
    finally:
        hub.unsubscribe(listener)
