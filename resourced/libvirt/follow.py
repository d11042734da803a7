"""Following a libvirt connection: its domains with VNC graphics are the broker's guests.

A `LibvirtFollower` opens a libvirt URI (`qemu:///system`, `qemu:///session`,
`qemu+ssh://host/system`...), lists its domains and keeps the broker's guests
in step through libvirt's events: a domain with VNC graphics is a guest named
after it (source = the URI), whose state follows the domain's (stopped while
shut off, back when it starts), whose consoles are its serial, console and
channel devices through libvirt's console stream (`resourced.libvirt.stream`;
devices libvirt's console API cannot open are left out, with a warning),
and whose VNC connection is `virDomainOpenGraphicsFD` for a local URI (no
password or TCP) or the address and password in the domain XML for a remote
one (through ssh for a VNC server that listens on its host's loopback only:
`resourced.libvirt.tunnel`). A domain that is undefined (or a transient one
that stops) goes away. If libvirtd goes away, the follower reconnects and looks
at every domain again.

Every blocking libvirt call happens on the libvirt thread
(`resourced.libvirt.thread`); the follower itself, the guests, and libvirt's
events (`run_events_on`, so that a console stream needs no thread hop) live on
the service's loop, which no libvirt call ever blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from resourced.broker.broker import Broker
from resourced.broker.guest import Guest
from resourced.consoles import ConsoleKind, EndpointType
from resourced.errors import AuthenticationFailed, NotConnected, ResourcedError
from resourced.gateway.libvirt import DomainResources, _libvirt, _message, parse_domain_xml
from resourced.libvirt import thread
from resourced.libvirt.stream import LibvirtConsoleSource
from resourced.libvirt.tunnel import SshForward, VncRoute, vnc_route
from resourced.rfb.aio import Address, RfbClient, connect
from resourced.rfb.constants import Encoding
from resourced.rfb.extension import Extension

log = logging.getLogger(__name__)

#: Seconds between attempts to reach libvirtd.
RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: Seconds before a running domain whose XML lacks a console is looked at again.
RECHECK_DELAY = 1.0
#: Remote URIs: a keepalive probe every 5 s, given up after 3 unanswered. A
#: local one has none: its Unix socket ends when libvirtd does, and libvirt
#: restarts the keepalive timer on every message, two per console keystroke.
KEEPALIVE = (5, 3)


def is_local(uri: str) -> bool:
    """A URI whose libvirtd runs here (no host part, over its Unix socket, which
    alone can pass fds): `openGraphicsFD` works."""
    parts = urlsplit(uri)
    return not parts.hostname and parts.scheme.partition("+")[2] in ("", "unix")


class LibvirtFollower:
    """One libvirt connection and the guests it contributes (module docstring)."""

    def __init__(self, uri: str, broker: Broker) -> None:
        self.uri = uri
        self.broker = broker
        self._libvirt = _libvirt()
        self._conn: Any = None
        self._guests: dict[str, Guest] = {}  # domain UUID -> guest
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._callbacks: list[int] = []
        self._updates: dict[str, asyncio.Task[None]] = {}
        #: (domain UUID, console) pairs already logged as out of libvirt's reach.
        self._unreachable: set[tuple[str, str]] = set()
        self._loop = asyncio.get_running_loop()
        thread.run_events_on(self._loop)  # before the first connection: the service's loop
        self.first_sync = self._loop.create_future()
        self.last_error = ""
        #: Followed at run time (`AddLibvirt`), not from the config: keeps the
        #: service from idle exit.
        self.ephemeral = False

    @property
    def guests(self) -> list[Guest]:
        return list(self._guests.values())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._follow(), name=f"libvirt {self.uri}"
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for uuid in list(self._guests):
            await self._remove(uuid)
        await self._disconnect()

    async def _run(self, function: Any, *args: Any) -> Any:
        """A libvirt call, on the libvirt thread."""
        return await thread.call(function, *args)

    # --- the connection ------------------------------------------------------------

    async def _follow(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                await self._sync()
            except ResourcedError as err:
                self.last_error = str(err)
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                if not self.first_sync.done():
                    # The caller says it, and whether anyone tries again (a URI
                    # given to AddLibvirt that does not open is dropped).
                    self.first_sync.set_exception(err)
                    self.first_sync.exception()  # retrieved: the caller may not wait
                elif attempt == 0:
                    log.warning("libvirt %s: %s; trying again in %g s", self.uri, err, delay)
                attempt += 1
                await self._disconnect()
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self.last_error = ""
            if not self.first_sync.done():
                self.first_sync.set_result(None)
            assert self._lost is not None
            await self._lost
            log.warning("libvirt %s: lost the connection; reconnecting", self.uri)
            await self._disconnect()

    async def _connect(self) -> None:
        libvirt = self._libvirt
        try:
            conn = await self._run(libvirt.open, self.uri)
        except libvirt.libvirtError as error:
            raise NotConnected(
                f"cannot connect to libvirt at {self.uri}: {_message(error)}"
            ) from None
        self._lost = asyncio.get_running_loop().create_future()
        if not is_local(self.uri):
            with contextlib.suppress(libvirt.libvirtError):
                await self._run(conn.setKeepAlive, *KEEPALIVE)
        try:
            await self._run(conn.registerCloseCallback, self._on_close, None)
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device),
            ):
                self._callbacks.append(
                    await self._run(conn.domainEventRegisterAny, None, event_id, callback, None)
                )
        except libvirt.libvirtError as error:
            with contextlib.suppress(libvirt.libvirtError):
                await self._run(conn.close)
            raise NotConnected(f"cannot follow events at {self.uri}: {_message(error)}") from None
        self._conn = conn
        log.info("libvirt %s: connected", self.uri)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        libvirt = self._libvirt
        for callback_id in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                await self._run(conn.domainEventDeregisterAny, callback_id)
        self._callbacks.clear()
        with contextlib.suppress(libvirt.libvirtError):
            await self._run(conn.unregisterCloseCallback)
        with contextlib.suppress(libvirt.libvirtError):
            await self._run(conn.close)

    # libvirt's callbacks come on the loop its events run on (this one, unless something
    # in the process chose the libvirt thread's first): hand them to the service's loop.

    def _on_close(self, _conn: Any, _reason: int, _opaque: Any) -> None:
        self._loop.call_soon_threadsafe(self._closed_by_libvirt)

    def _closed_by_libvirt(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # --- domains -------------------------------------------------------------------

    async def _sync(self) -> None:
        libvirt = self._libvirt
        try:
            domains = await self._run(self._conn.listAllDomains, 0)
        except libvirt.libvirtError as error:
            raise NotConnected(f"cannot list domains at {self.uri}: {_message(error)}") from None
        seen = set()
        for domain in domains:
            with contextlib.suppress(libvirt.libvirtError):
                seen.add(await self._run(domain.UUIDString))
                await self._update(domain)
        for uuid in [u for u in self._guests if u not in seen]:
            await self._remove(uuid)

    def _on_lifecycle(self, _conn: Any, domain: Any, event: int, _detail: int, _o: Any) -> None:
        undefined = event == self._libvirt.VIR_DOMAIN_EVENT_UNDEFINED
        with contextlib.suppress(self._libvirt.libvirtError):
            uuid = domain.UUIDString()
            self._loop.call_soon_threadsafe(self._schedule, uuid, domain, undefined)

    def _on_device(self, _conn: Any, domain: Any, _alias: str, _opaque: Any) -> None:
        with contextlib.suppress(self._libvirt.libvirtError):
            uuid = domain.UUIDString()
            self._loop.call_soon_threadsafe(self._schedule, uuid, domain, False)

    def _schedule(self, uuid: str, domain: Any, undefined: bool, settled: bool = False) -> None:
        """Look at a domain again (one look at a time per domain, the latest wins)."""
        previous = self._updates.get(uuid)

        async def look() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            try:
                if undefined:
                    await self._remove(uuid)
                else:
                    await self._update(domain, settled)
            except Exception:
                log.exception("libvirt %s: updating domain %s failed", self.uri, uuid)

        task = asyncio.get_running_loop().create_task(look())
        self._updates[uuid] = task
        task.add_done_callback(
            lambda t: self._updates.pop(uuid, None) if self._updates.get(uuid) is t else None
        )

    async def _update(self, domain: Any, settled: bool = False) -> None:
        libvirt = self._libvirt
        uuid = await self._run(domain.UUIDString)
        try:
            xml = await self._run(self._xml, domain)
            running = bool(await self._run(domain.isActive))
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                await self._remove(uuid)  # a transient domain that stopped
                return
            raise
        resources = parse_domain_xml(xml)
        guest = self._guests.get(uuid)
        if resources.vnc is None:
            if guest is not None:
                await self._remove(uuid)
            return
        if guest is None:
            if any(other.uuid == uuid for other in self.broker.guests.values()):
                # The same domain through another URI (root's qemu:///session and
                # qemu:///system reach one libvirtd): the first URI keeps it.
                return
            guest = self._new_guest(uuid, resources)
        if running:
            # An inactive domain's XML has no PTY paths: its consoles are kept (as
            # unavailable) rather than withdrawn and published again at each restart.
            wanted = self._consoles(uuid, resources, running)
            missing = set(guest.consoles) - {name for name, _kind, _source in wanted}
            if missing and not settled:
                # Right after a start the live XML may not show a PTY's path yet:
                # keep those consoles and look again once it has settled.
                for name in missing:
                    console = guest.consoles[name]
                    if isinstance(console.source, LibvirtConsoleSource):
                        wanted.append((name, console.kind, console.source))
                self._loop.call_later(RECHECK_DELAY, self._schedule, uuid, domain, False, True)
            guest.set_consoles(wanted)
            # A VNC port libvirt allocates can differ at each start.
            guest.set_address(_describe(self.uri, resources))
        guest.set_running(running)

    def _xml(self, domain: Any) -> str:
        libvirt = self._libvirt
        try:
            return str(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
        except libvirt.libvirtError as error:
            if error.get_error_code() not in (
                libvirt.VIR_ERR_OPERATION_DENIED,
                libvirt.VIR_ERR_ACCESS_DENIED,
            ):
                raise
        return str(domain.XMLDesc(0))

    def _new_guest(self, uuid: str, resources: DomainResources) -> Guest:
        name = resources.name
        if name in self.broker.guests:  # another connection has one of that name
            name = f"{name}@{urlsplit(self.uri).hostname or self.uri}"
        address = _describe(self.uri, resources)
        guest = Guest(
            name,
            self._connector(uuid),
            source=self.uri,
            address=address,
            uuid=uuid,
            settings=self.broker.settings,
            console_origin="libvirt",
            audio_settings=self.broker.audio_settings,
            playback_factory=self.broker.playback_factory,
        )
        self._guests[uuid] = guest
        self.broker.add_guest(guest)
        return guest

    def _consoles(
        self, uuid: str, resources: DomainResources, running: bool
    ) -> list[tuple[str, Any, LibvirtConsoleSource]]:
        guest = self._guests[uuid]
        out: list[tuple[str, Any, LibvirtConsoleSource]] = []
        for spec in resources.consoles:
            alias = resources.aliases.get(spec.name)
            if alias is None:
                continue  # libvirt can open only devices it names
            channel = spec.kind is ConsoleKind.CHANNEL
            # What libvirt's console API opens: virDomainOpenConsole a PTY that
            # is not a channel, virDomainOpenChannel a channel on a Unix socket.
            wanted_type = EndpointType.UNIX if channel else EndpointType.PTY
            if spec.endpoint.type is not wanted_type:
                if (uuid, spec.name) not in self._unreachable:
                    self._unreachable.add((uuid, spec.name))
                    # Once per device and run: the user's only clue why it is missing.
                    log.warning(
                        "%s: domain %s: %s (%s on a %s) is not listed: libvirt's console"
                        " API cannot open it (resourced-gateway reaches it)",
                        self.uri,
                        resources.name,
                        spec.name,
                        spec.kind.name.lower(),
                        "PTY" if spec.endpoint.type is EndpointType.PTY else "Unix socket",
                    )
                continue
            existing = guest.consoles.get(spec.name)
            if existing is not None and isinstance(existing.source, LibvirtConsoleSource):
                out.append((spec.name, spec.kind, existing.source))
                continue
            source = LibvirtConsoleSource(
                self._libvirt,
                lambda: self._conn,
                self._lookup(uuid),
                alias,
                idle_timeout=self.broker.settings.idle_timeout,
                channel=channel,
            )
            out.append((spec.name, spec.kind, source))
        return out

    def _lookup(self, uuid: str) -> Any:
        async def lookup() -> Any:
            conn = self._conn
            if conn is None:
                raise NotConnected(f"libvirt at {self.uri} is not connected")
            try:
                return await self._run(conn.lookupByUUIDString, uuid)
            except self._libvirt.libvirtError as error:
                raise NotConnected(f"the domain is gone: {_message(error)}") from None

        return lookup

    def _connector(self, uuid: str) -> Any:
        lookup = self._lookup(uuid)
        libvirt = self._libvirt

        async def connector(extensions: Sequence[Extension]) -> RfbClient:
            domain = await lookup()
            if is_local(self.uri):
                try:
                    fd = await self._run(
                        domain.openGraphicsFD, 0, libvirt.VIR_DOMAIN_OPEN_GRAPHICS_SKIPAUTH
                    )
                except libvirt.libvirtError as error:
                    raise NotConnected(f"openGraphicsFD failed: {_message(error)}") from None
                try:
                    return await connect(
                        Address("fd", fd=fd), extensions=list(extensions), encodings=(Encoding.RAW,)
                    )
                finally:
                    os.close(fd)  # connect() works on its own copy
            resources = parse_domain_xml(await self._run(self._xml, domain))
            vnc = resources.vnc
            if vnc is not None and vnc.socket_path is not None:
                raise NotConnected(
                    f"the domain's VNC server listens on a Unix socket on its host "
                    f"({vnc.socket_path}), which cannot be reached from here: let it "
                    "listen on TCP"
                )
            if vnc is None or vnc.port is None:
                raise NotConnected(
                    "the domain's VNC server has no TCP port (yet: is the domain running?)"
                )
            route = vnc_route(self.uri, vnc.host, vnc.port)
            password = vnc.password
            looked_up = False
            if password is None and self.broker.password_lookup is not None:
                password = await self.broker.password_lookup(uuid, self.uri)
                looked_up = True
            try:
                return await _connect_vnc(route, password, extensions)
            except AuthenticationFailed as err:
                if vnc.password is not None:
                    raise
                where = (
                    "nor does the Secret Service hold one for it (virt-manager's entry, "
                    f"uuid {uuid}, hvuri {self.uri})"
                    if looked_up
                    else "and there is no Secret Service to ask"
                )
                raise AuthenticationFailed(
                    f"{err}; libvirt did not give the guest's VNC password (this connection "
                    f"may not read secure XML), {where}: add the guest with AddGuest and a "
                    "password"
                ) from None

        return connector

    async def _remove(self, uuid: str) -> None:
        guest = self._guests.pop(uuid, None)
        if guest is not None and self.broker.guests.get(guest.name) is guest:
            await self.broker.remove_guest(guest.name)


async def _connect_vnc(
    route: VncRoute, password: str | None, extensions: Sequence[Extension]
) -> RfbClient:
    """A remote guest's VNC server over TCP, or through ssh (`resourced.libvirt.tunnel`)."""
    options: dict[str, Any] = {
        "password": password,
        "extensions": list(extensions),
        "encodings": (Encoding.RAW,),
    }
    if not route.ssh:
        return await connect(Address("tcp", host=route.host, port=route.port), **options)
    forward = await SshForward.start(route.ssh)
    try:
        client = await connect(Address("fd", fd=forward.fd), server_name=route.host, **options)
    except AuthenticationFailed:
        forward.release_fd()  # the server answered: ssh did its part
        raise
    except ResourcedError as err:
        raise await forward.failed(err) from None
    except BaseException:
        forward.kill()
        raise
    forward.release_fd()  # connect() works on its own copy; ssh ends when it closes
    return client


def _describe(uri: str, resources: DomainResources) -> str:
    """The guest's `Address` property: where its VNC server is, without secrets."""
    vnc = resources.vnc
    if is_local(uri):
        return f"{uri} domain {resources.name} (openGraphicsFD)"
    if vnc is not None and vnc.port is not None:
        with contextlib.suppress(NotConnected):
            return str(vnc_route(uri, vnc.host, vnc.port))
    return f"{uri} domain {resources.name}"
