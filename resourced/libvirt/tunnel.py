"""Where a remote libvirt guest's VNC server is reached from here, and the ssh
tunnel for one that listens only on its host's loopback.

A domain's `<graphics type='vnc'>` listens where the XML says: libvirt's
default (`vnc_listen` in qemu.conf) is 127.0.0.1, which only the host itself
can reach. For such a guest on a `qemu+ssh://` (or `+libssh`, `+libssh2`)
URI we do what virt-viewer does: reach it through the same ssh, with
`ssh -W LISTEN:PORT` (ssh's stdio forwarding: nothing but sshd is needed on
the far side), built from the URI as libvirt's own ssh transport is (user,
port, `keyfile`, `no_verify`, `command` for the ssh binary, and `known_hosts`
for the libssh transports). A guest listening on a wildcard address is reached
at the URI's host, one listening on a specific address at that address.
Over a transport with no ssh (tls, tcp) a loopback-only guest cannot be
reached, and `vnc_route` says so.

What this is not: an ssh client. The `ssh` binary (OpenSSH) makes the
connection with the user's own agent, keys and configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from resourced.errors import NotConnected

log = logging.getLogger(__name__)

#: libvirt transports that run ssh (the URI scheme's part after `+`).
SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
#: Most bytes of ssh's own messages (stderr) kept for an error.
MAX_SSH_MESSAGE = 4096
#: Seconds ssh gets to say why it failed, once the connection over it has.
SSH_EXIT_WAIT = 5.0

#: What waits for each ssh to end (a task nobody holds may be collected mid-wait).
_reapers: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class VncRoute:
    """How to reach a remote guest's VNC server: at `host`:`port` over TCP, or,
    with `ssh` set (the command), at `host`:`port` as seen from the libvirt host."""

    host: str
    port: int
    ssh: tuple[str, ...] = ()

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.ssh:
            return f"{host}::{self.port} through ssh to {self.ssh[-1]}"
        return f"{host}::{self.port}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def _is_wildcard(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    return False


def vnc_route(uri: str, listen: str | None, port: int) -> VncRoute:
    """Where the VNC server of a guest on the remote `uri`, listening on `listen`
    (None: the XML names no address) at `port`, is reached (module docstring).
    `NotConnected` if it cannot be."""
    parts = urlsplit(uri)
    uri_host = parts.hostname
    if not uri_host:
        raise NotConnected(f"{uri} names no host to reach the guest's VNC server at")
    if listen and is_loopback(listen):
        argv = ssh_forward_argv(uri, listen, port)
        if argv is None:
            raise NotConnected(
                f"the guest's VNC server listens on {listen} of {uri_host} only, which "
                f"cannot be reached from here over {parts.scheme}: use a qemu+ssh:// URI "
                "(the VNC connection then goes through ssh), or let the VNC server listen "
                "on an address this machine can reach"
            )
        return VncRoute(listen, port, tuple(argv))
    if listen and not _is_wildcard(listen):
        return VncRoute(listen, port)
    return VncRoute(uri_host, port)


def ssh_forward_argv(uri: str, target: str, port: int) -> list[str] | None:
    """`ssh ... -W TARGET:PORT -- HOST` as libvirt would run ssh for `uri`; None if
    the URI's transport is not ssh."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if transport not in SSH_TRANSPORTS or not parts.hostname:
        return None
    params = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    # libvirt's libssh transports use their own client, not the `command` binary.
    command = params.get("command") if transport == "ssh" else None
    argv = [command or "ssh"]
    if parts.port is not None:
        argv += ["-p", str(parts.port)]
    if parts.username:
        argv += ["-l", unquote(parts.username)]
    if params.get("keyfile"):
        argv += ["-i", params["keyfile"]]
    if params.get("known_hosts"):
        argv += ["-o", f"UserKnownHostsFile={params['known_hosts']}"]
    if _flag(params, "no_verify") or params.get("known_hosts_verify") == "ignore":
        argv += ["-o", "StrictHostKeyChecking=no"]
    if _flag(params, "no_tty"):
        argv += ["-o", "BatchMode=yes"]
    forward = f"[{target}]" if ":" in target else target
    argv += ["-T", "-e", "none", "-W", f"{forward}:{port}", "--", parts.hostname]
    return argv


def _flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "0") not in ("", "0")


class SshForward:
    """A running `ssh -W`: `fd` is our end of the socket it forwards (the caller
    connects on its own copy and then calls `release_fd`)."""

    def __init__(self, process: asyncio.subprocess.Process, fd: int, host: str) -> None:
        self.process = process
        self.fd = fd
        self.host = host
        self._stderr = bytearray()
        self._watch = asyncio.get_running_loop().create_task(self._reap())
        _reapers.add(self._watch)
        self._watch.add_done_callback(_reapers.discard)

    @classmethod
    async def start(cls, argv: tuple[str, ...] | list[str]) -> SshForward:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # no signal of ours (a terminal's ^C) reaches it
            )
        except OSError as err:
            ours.close()
            raise NotConnected(f"cannot run {argv[0]} for the VNC connection: {err}") from None
        finally:
            theirs.close()
        return cls(process, ours.detach(), argv[-1])

    def release_fd(self) -> None:
        """Our copy of the socket: the connection has its own now."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def kill(self) -> None:
        self.release_fd()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def _reap(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        while chunk := await stderr.read(1024):
            self._stderr += chunk
            del self._stderr[:-MAX_SSH_MESSAGE]
        code = await self.process.wait()
        if code:
            log.info("ssh to %s for a VNC connection ended with %d: %s", self.host, code, self.said)

    @property
    def said(self) -> str:
        return self._stderr.decode(errors="replace").strip() or "(nothing)"

    async def failed(self, error: Exception) -> NotConnected:
        """The connection over it failed with `error`: why, in ssh's words if ssh
        failed (it exits non-zero), else in the connection's."""
        self.release_fd()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._watch), SSH_EXIT_WAIT)
        if self.process.returncode is None:
            self.kill()
            await self._watch
        elif self.process.returncode != 0:
            return NotConnected(
                f"ssh to {self.host} could not forward the VNC connection "
                f"(exit {self.process.returncode}): {self.said}"
            )
        return NotConnected(f"{error} (through ssh to {self.host})")
