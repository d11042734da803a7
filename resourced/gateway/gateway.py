"""The gateway: a VNC server in front of QEMU's that adds the console extension.

`Gateway` owns the console hubs (one per guest console, kept attached for the
gateway's lifetime) and accepts viewers on TCP or Unix sockets; each viewer gets a
`Session` (`resourced.gateway.session`) with its own upstream connection to
QEMU's VNC server. Consoles can be added and removed while viewers are connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from resourced.consoles import ConsoleSpec
from resourced.consoles.hub import DEFAULT_RING_SIZE, ConsoleHub
from resourced.consoles.sources import ConsoleSource
from resourced.errors import ConfigurationError
from resourced.gateway.session import Session
from resourced.rfb.consoles import ConsoleInfo
from resourced.rfb.server import ServerSecurity

log = logging.getLogger(__name__)

#: Who may connect to a Unix socket the gateway listens on: its owner only.
DEFAULT_SOCKET_MODE = 0o600


@dataclass
class GatewayConfig:
    """What the gateway fronts and how it lets viewers in."""

    #: QEMU's VNC server: `unix:PATH` or `host::port` (see `resourced.rfb.aio.parse_address`).
    upstream: str
    security: ServerSecurity
    upstream_password: str | None = None
    consoles: list[ConsoleSpec] = field(default_factory=list)
    history: int = DEFAULT_RING_SIZE
    #: Seconds a viewer has for the handshake steps it takes on its own (version,
    #: security type, TLS handshake, ClientInit); also the limit for reaching QEMU.
    handshake_timeout: float = 30.0
    #: Seconds the gateway waits for an answer that may need the viewer's user
    #: (the VNC password after the challenge, a look at the certificate after
    #: TLS). None: as long as it takes, as QEMU waits.
    auth_timeout: float | None = None
    #: A viewer that has not read for this long with output queued is disconnected.
    slow_client_timeout: float = 30.0
    #: Bytes queued to one viewer before the gateway waits for it (then the timeout runs).
    write_high_water: int = 4 * 1024 * 1024


class Gateway:
    """Console hubs plus the listening sockets; sessions come and go."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.hubs: dict[int, ConsoleHub] = {}
        self._ids = itertools.count(1)
        self._servers: list[asyncio.Server] = []
        self.sessions: set[Session] = set()
        self._unix_paths: list[tuple[str, int, int]] = []  # path, device, inode
        for spec in config.consoles:
            self._new_hub(spec)

    def _new_hub(self, spec: ConsoleSpec, source: ConsoleSource | None = None) -> ConsoleHub:
        if any(hub.name == spec.name for hub in self.hubs.values()):
            raise ConfigurationError(f"two consoles named {spec.name}")
        hub = ConsoleHub.from_spec(next(self._ids), spec, self.config.history, source)
        self.hubs[hub.console_id] = hub
        return hub

    @staticmethod
    def info(hub: ConsoleHub) -> ConsoleInfo:
        return ConsoleInfo(hub.console_id, hub.kind, hub.name, history=True)

    def console_infos(self) -> list[ConsoleInfo]:
        return [self.info(hub) for hub in self.hubs.values()]

    async def start(self) -> None:
        for hub in self.hubs.values():
            hub.start()

    async def add_console(
        self, spec: ConsoleSpec, source: ConsoleSource | None = None
    ) -> ConsoleHub:
        """Publish one more console to every viewer (ADDED); its host end is
        `source`, or else the one `spec`'s endpoint names."""
        hub = self._new_hub(spec, source)
        hub.start()
        for session in list(self.sessions):
            session.console_added(hub)
        return hub

    async def remove_console(self, name: str) -> None:
        """Withdraw a console: CLOSED for its openers, then REMOVED for every viewer."""
        for console_id, hub in list(self.hubs.items()):
            if hub.name == name:
                del self.hubs[console_id]
                for session in list(self.sessions):
                    session.console_removed(hub)
                await hub.close()
                return
        raise ConfigurationError(f"no console named {name}")

    async def listen_unix(
        self, path: str, *, mode: int = DEFAULT_SOCKET_MODE, group: int | None = None
    ) -> asyncio.Server:
        """Listen on a Unix socket with permissions `mode` and group `group` (a gid).

        Connecting needs write permission on the socket, so `mode` says who may
        be a viewer. The socket is bound with no permissions for anyone but the
        owner and only then opened up, so nobody can connect in between.
        """
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(umask)
            bound = os.stat(path)
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(lambda: Session(self), sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        self._unix_paths.append((path, bound.st_dev, bound.st_ino))
        self._servers.append(server)
        log.info("gateway: listening on unix:%s (mode %04o)", path, mode)
        return server

    async def listen_tcp(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Session(self), host, port)
        self._servers.append(server)
        log.info("gateway: listening on %s:%d", host, port)
        return server

    @property
    def tcp_ports(self) -> Iterable[int]:
        for server in self._servers:
            for sock in server.sockets:
                address = sock.getsockname()
                if isinstance(address, tuple):
                    yield int(address[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.shutdown()
        for server in self._servers:
            await server.wait_closed()
        for hub in self.hubs.values():
            await hub.close()
        for path, device, inode in self._unix_paths:
            # Only our own socket: not whatever was put at the path since.
            with contextlib.suppress(FileNotFoundError):
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (device, inode):
                    os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Make way for a socket at `path`: remove a stale socket left there (by a
    gateway that did not exit cleanly), refuse to replace anything else. A file
    that is not a socket may be someone's data, and a socket someone answers on
    belongs to a server that is running (a second gateway would take its
    viewers' address from it without either one saying so)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise FileExistsError(errno.EEXIST, "something other than a socket is there (not replaced)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a listener with a full backlog must not block us
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        return
    except BlockingIOError:
        pass  # a listener, busy
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening on it")
