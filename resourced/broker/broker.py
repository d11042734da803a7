"""The set of guests the service knows, and how each is reached.

`Broker` holds the guests by name: added by address (`add_vnc_guest`, a VNC
server, typically our gateway) or, later, found through libvirt. It builds
each guest's connector from its address and credentials, tells observers when
guests come and go, and says whether anything is in use (for idle exit).

No D-Bus here: the face in `resourced.dbus` maps its calls onto these.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resourced.broker.audio import AudioSettings, PlaybackFactory
from resourced.broker.guest import Guest, GuestSettings
from resourced.broker.link import Connector
from resourced.errors import ConfigurationError, NoSuchGuest, NotConnected, ResourcedError
from resourced.rfb.aio import RfbClient, connect, parse_address
from resourced.rfb.constants import Encoding
from resourced.rfb.extension import Extension
from resourced.rfb.security import TlsMode
from resourced.rfb.tls import TlsCredentials

log = logging.getLogger(__name__)

#: Guest names: what a person types in `resourcectl console NAME`.
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f/]{1,200}$")


@dataclass(frozen=True, slots=True)
class VncOptions:
    """How to reach and authenticate to one VNC server (AddGuest's options)."""

    password: str | None = None
    tls: TlsMode = TlsMode.AUTO
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_server_name: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def credentials(self) -> TlsCredentials | None:
        if self.ca_cert is None and self.client_cert is None:
            return None  # found where gtk-vnc looks (ClientConnection's default)
        found = TlsCredentials.discover()
        return TlsCredentials(
            ca_file=self.ca_cert or found.ca_file,
            client_cert=self.client_cert or found.client_cert,
            client_key=self.client_key or found.client_key,
            crl_file=found.crl_file,
            server_name=self.tls_server_name,
        )


def address_connector(address: str, options: VncOptions) -> Connector:
    """A connector for a VNC address (`unix:PATH`, `HOST:DISPLAY`, `HOST::PORT`, `vnc://`)."""
    parsed = parse_address(address)  # ConfigurationError now, not at connect time
    if parsed.kind == "fd":
        raise ConfigurationError("a guest cannot be added by fd: the fd would be used up")

    async def connector(extensions: Sequence[Extension]) -> RfbClient:
        tls = options.credentials()
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs["tls"] = tls
        if options.tls_server_name is not None:
            kwargs["server_name"] = options.tls_server_name
        return await connect(
            parsed,
            password=options.password,
            tls_mode=options.tls,
            encodings=(Encoding.RAW,),  # no display through the broker yet
            extensions=list(extensions),
            **kwargs,
        )

    return connector


class BrokerObserver:
    """Told of guests coming and going. Override what you need."""

    def guest_added(self, guest: Guest) -> None:
        """A guest appeared."""

    def guest_removed(self, guest: Guest) -> None:
        """A guest went away (its consoles were closed)."""

    def libvirt_changed(self) -> None:
        """The set of libvirt connections followed changed."""


class Broker:
    """Every guest the service knows, by name."""

    def __init__(
        self,
        settings: GuestSettings | None = None,
        audio_settings: AudioSettings | None = None,
        playback_factory: PlaybackFactory | None = None,
    ) -> None:
        self.settings = settings or GuestSettings()
        self.audio_settings = audio_settings or AudioSettings()
        #: Makes each guest's stream on the sound server (None: no sound server).
        self.playback_factory = playback_factory
        self.guests: dict[str, Guest] = {}
        self.observers: list[BrokerObserver] = []
        #: libvirt URI -> its follower (`resourced.libvirt.follow.LibvirtFollower`).
        self.libvirt: dict[str, Any] = {}
        #: Finds a guest's VNC password by (domain UUID, libvirt URI) where the
        #: desktop keeps it (the service sets it to the Secret Service lookup).
        self.password_lookup: Callable[[str, str], Awaitable[str | None]] | None = None

    async def add_libvirt(self, uri: str, *, wait: float = 30.0, keep: bool = False) -> list[Guest]:
        """Follow a libvirt connection; the guests it has once first looked at.

        Raises `NotConnected` if libvirt cannot be reached within `wait` seconds;
        the connection is then forgotten, unless `keep` (the config file's URIs
        are kept and retried: libvirtd may start later).
        """
        from resourced.libvirt.follow import LibvirtFollower  # it builds on this module

        follower = self.libvirt.get(uri)
        if follower is None:
            follower = LibvirtFollower(uri, self)
            self.libvirt[uri] = follower
            follower.start()
            for observer in list(self.observers):
                observer.libvirt_changed()
        try:
            await asyncio.wait_for(asyncio.shield(follower.first_sync), wait)
        except (ResourcedError, TimeoutError) as err:
            if not keep:
                await self.remove_libvirt(uri)
            reason = str(err) or f"libvirt at {uri} did not answer within {wait:g} s"
            raise NotConnected(reason) from None
        guests: list[Guest] = follower.guests
        return guests

    async def remove_libvirt(self, uri: str) -> None:
        follower = self.libvirt.pop(uri, None)
        if follower is not None:
            await follower.close()
            for observer in list(self.observers):
                observer.libvirt_changed()

    def guest(self, name: str) -> Guest:
        guest = self.guests.get(name)
        if guest is None:
            raise NoSuchGuest(f"no guest named {name!r}")
        return guest

    def add_vnc_guest(
        self, name: str, address: str, options: VncOptions, *, ephemeral: bool = False
    ) -> Guest:
        """A guest reached at a VNC address; `ConfigurationError` for a bad name or address.

        `ephemeral`: known only to this run of the service (not in the config), so
        the service does not idle-exit while it has one (it would be forgotten).
        """
        if not _NAME_RE.match(name):
            raise ConfigurationError(
                f"bad guest name {name!r}: 1 to 200 characters, no '/' and no control characters"
            )
        if name in self.guests:
            raise ConfigurationError(f"there is already a guest named {name!r}")
        guest = Guest(
            name,
            address_connector(address, options),
            source="vnc",
            address=str(parse_address(address)),
            settings=self.settings,
            audio_settings=self.audio_settings,
            playback_factory=self.playback_factory,
        )
        guest.ephemeral = ephemeral
        self.add_guest(guest)
        return guest

    def add_guest(self, guest: Guest) -> None:
        """Publish a guest made elsewhere (a libvirt follower)."""
        if guest.name in self.guests:
            raise ConfigurationError(f"there is already a guest named {guest.name!r}")
        self.guests[guest.name] = guest
        log.info("guest %s added (%s %s)", guest.name, guest.source, guest.address)
        for observer in list(self.observers):
            observer.guest_added(guest)

    async def remove_guest(self, name: str) -> None:
        guest = self.guest(name)
        del self.guests[name]
        await guest.close()
        log.info("guest %s removed", name)
        for observer in list(self.observers):
            observer.guest_removed(guest)

    def in_use(self) -> bool:
        """Whether any guest is connected or has a console open (idle exit waits)."""
        for guest in self.guests.values():
            if guest.ephemeral or guest.link.client is not None or guest.link.holds:
                return True
            if any(console.clients for console in guest.consoles.values()):
                return True
        return False

    async def close(self) -> None:
        for uri in list(self.libvirt):
            await self.remove_libvirt(uri)
        for name in list(self.guests):
            await self.remove_guest(name)
