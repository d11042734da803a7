"""A remote libvirt URI in the service, for real: `qemu+ssh://` through a private
sshd on localhost (tests/sshd.py) to the machine's own libvirtd, as a user
reaches a virtualisation host. The domain's VNC server listens on TCP with a
password, as a remote guest's must (openGraphicsFD cannot cross ssh: "Receiving
file descriptors is not supported on this socket"), on 127.0.0.1 as libvirt's
default `vnc_listen` has it: only the host itself reaches that, so the service
goes through ssh (`ssh -W`), as virt-viewer does.

What it proves, through the real service on a private bus: `AddLibvirt` with
the URI publishes the domain as a guest (named after it, or NAME@HOST when a
guest has that name already; `Source` the URI, `Address` HOST::PORT from the
XML); its console comes through libvirt's stream over ssh (an fd echo, while
another session is refused); its VNC connection opens through ssh with the
password libvirt gives in the secure XML (the server refuses a client without
it); destroying the domain ends the console (EOF) and marks the guest stopped;
starting it brings it back, at the VNC port it has then. The config file's
`[libvirt] uris` does the same without a call. A URI added with `AddLibvirt`
keeps an idle service up (it is not remembered); one the config names does not.
Faults: every ssh session cut under an open console (the follower logs in
again, the console and the VNC connection come back); a VNC server sshd will not
forward to (NotConnected in ssh's words, the console unaffected); a key the host
refuses (AddLibvirt is NotConnected, nothing followed); a VNC server on a Unix
socket (NotConnected saying so, the console unaffected). And
`qemu+unix:///system`, local despite its `+`, uses openGraphicsFD.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from resourced.errors import AuthenticationFailed
from resourced.rfb.aio import connect
from tests.dbus.conftest import (
    BUS_NAME,
    ROOT,
    TIMEOUT,
    Session,
    call,
    ok,
    type_until_echoed,
)
from tests.dbus.test_libvirt import guest_path, prop, wait_prop
from tests.libvirtd import (
    PTY_CONSOLE_AND_VNC,
    SYSTEM_URI,
    boot_image,
    demo_domain_xml,
    other_console_refusal,
)
from tests.sshd import PrivateSshd, private_sshd

GUEST = f"{BUS_NAME}.Guest"
CONSOLE = f"{BUS_NAME}.Console"
MANAGER = f"{BUS_NAME}.Manager"
PASSWORD = "rsd-vnc1"  # VNC Authentication uses at most 8 characters


def devices(listen: str) -> str:
    """A PTY serial console, and VNC on TCP `listen` (a port libvirt picks) with a password."""
    return f"""\
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc' port='-1' autoport='yes' passwd='{PASSWORD}'>
      <listen type='address' address='{listen}'/>
    </graphics>
    <video>
      <model type='vga'/>
    </video>"""


@pytest.fixture
def sshd() -> Iterator[PrivateSshd]:
    directory = Path(tempfile.mkdtemp(prefix="rsd-ssh-", dir="/tmp"))
    try:
        with private_sshd(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def defined_domain(system_conn: Any, listen: str | None) -> Iterator[Any]:
    """A persistent TCG domain (defined, started) whose VNC server listens on
    `listen` (None: on a Unix socket)."""
    directory, image = boot_image("rsd-lvr-")
    name = f"rsd-rem-{uuid.uuid4().hex[:10]}"
    xml = devices(listen) if listen is not None else PTY_CONSOLE_AND_VNC
    dom = system_conn.defineXML(demo_domain_xml(name, image, xml))
    try:
        dom.create()
        yield dom
    finally:
        # On a connection of its own: the test's may be dead if libvirtd restarted.
        conn = libvirt.open(SYSTEM_URI)
        try:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).destroy()
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).undefine()
        finally:
            conn.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def domain(system_conn: Any) -> Iterator[Any]:
    """VNC on 127.0.0.1, libvirt's default listen address."""
    with defined_domain(system_conn, "127.0.0.1") as dom:
        yield dom


def vnc_port(domain: Any) -> int:
    """The TCP port the running domain's VNC server has (from its live XML)."""
    graphics = ET.fromstring(domain.XMLDesc(0)).find("devices/graphics[@type='vnc']")
    assert graphics is not None
    port = int(graphics.get("port", "-1"))
    assert port > 0, ET.tostring(graphics)
    return port


async def wait_guest(bus: MessageBus, name: str) -> str:
    path: str | None = None
    async with asyncio.timeout(TIMEOUT):
        while (path := await guest_path(bus, name)) is None:
            await asyncio.sleep(0.1)
    assert path is not None
    return path


async def echo_through_console(bus: MessageBus, console: str, text: bytes) -> None:
    """Open the console as an fd and type until the guest echoes `text`."""
    reply = await call(bus, console, CONSOLE, "Open", "a{sv}", [{}])
    assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    with socket.socket(fileno=reply.unix_fds[reply.body[0]]) as app:
        app.setblocking(True)
        await wait_prop(bus, console, CONSOLE, "Available", True)
        # Typed until echoed whole: bytes sent before the guest set its UART up
        # are lost in the guest, not by us.
        await asyncio.to_thread(type_until_echoed, app, text)


async def test_remote_uri_through_ssh(session: Session, sshd: PrivateSshd, domain: Any) -> None:
    session.write_config("[service]\nidle-exit = 1\n[guests]\nidle-timeout = 2\n")
    uri = sshd.libvirt_uri()
    name = domain.name()
    bus = await session.client()
    logins = sshd.sessions_accepted()
    try:
        (paths,) = ok(await call(bus, ROOT, MANAGER, "AddLibvirt", "sa{sv}", [uri, {}]))
        path = await guest_path(bus, name)
        assert path is not None
        assert path in paths
        assert sshd.sessions_accepted() > logins, sshd.log.read_text()  # it went through ssh
        assert uri in await prop(bus, ROOT, MANAGER, "LibvirtConnections")
        assert await prop(bus, path, GUEST, "Source") == uri
        assert await prop(bus, path, GUEST, "Uuid") == domain.UUIDString()
        port = await asyncio.to_thread(vnc_port, domain)
        address = f"127.0.0.1::{port} through ssh to 127.0.0.1"
        assert await prop(bus, path, GUEST, "Address") == address
        serial = f"{path}/consoles/serial0"
        assert serial in await prop(bus, path, GUEST, "Consoles")
        assert await prop(bus, serial, CONSOLE, "Source") == "libvirt"

        # Followed at run time, not from the config: the service does not exit
        # when idle while it follows the URI (it would forget it).
        pid = session.service_pid()
        assert pid is not None
        await asyncio.sleep(3)  # idle-exit is 1 s: it would have gone by now
        assert session.service_pid() == pid

        # The console through libvirt's stream over ssh, as an fd.
        reply = await call(bus, serial, CONSOLE, "Open", "a{sv}", [{}])
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        app = socket.socket(fileno=reply.unix_fds[reply.body[0]])
        app.setblocking(True)
        try:
            await wait_prop(bus, serial, CONSOLE, "Available", True)
            await asyncio.to_thread(type_until_echoed, app, b"over-ssh")
            # The service holds it: libvirt refuses another session meanwhile.
            refusal = await asyncio.to_thread(other_console_refusal, name)
            assert refusal is not None, "libvirt let a second session in"
            assert "Active console session exists" in refusal, refusal

            # VNC over TCP: the server refuses a client without the password...
            with pytest.raises(AuthenticationFailed):
                await connect(f"127.0.0.1::{port}", timeout=TIMEOUT)
            # ...and the service gets in, through ssh, with the one in the secure XML.
            ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
            assert await prop(bus, path, GUEST, "State") == "connected"
            assert await prop(bus, path, GUEST, "LastError") == ""
            assert sshd.forwardings_to("127.0.0.1", port) >= 1, sshd.log.read_text()

            # Destroyed: the open console reads EOF, State says stopped.
            await asyncio.to_thread(domain.destroy)
            app.settimeout(TIMEOUT)
            data = b"x"
            while data:
                data = await asyncio.to_thread(app.recv, 4096)
            await wait_prop(bus, path, GUEST, "State", "stopped")
        finally:
            app.close()

        # Started again: the guest is back at the port its VNC server has now
        # (another one: the old one is taken meanwhile, so libvirt skips it).
        with contextlib.ExitStack() as taken:
            with contextlib.suppress(OSError):  # someone took it already: as good
                taken.enter_context(socket.create_server(("127.0.0.1", port)))
            await asyncio.to_thread(domain.create)
        async with asyncio.timeout(TIMEOUT):
            while await prop(bus, path, GUEST, "State") == "stopped":
                await asyncio.sleep(0.1)
        old_port, port = port, await asyncio.to_thread(vnc_port, domain)
        assert port != old_port
        await wait_prop(bus, path, GUEST, "Address", f"127.0.0.1::{port} through ssh to 127.0.0.1")
        await echo_through_console(bus, serial, b"after-restart")
        ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
        assert await prop(bus, path, GUEST, "State") == "connected"
        assert sshd.forwardings_to("127.0.0.1", port) >= 1, sshd.log.read_text()

        # No longer followed: the guest goes away, and the idle service exits.
        ok(await call(bus, ROOT, MANAGER, "RemoveLibvirt", "sa{sv}", [uri, {}]))
        assert await guest_path(bus, name) is None
        async with asyncio.timeout(TIMEOUT):
            while await asyncio.to_thread(session.service_pid) is not None:
                await asyncio.sleep(0.1)
    finally:
        bus.disconnect()


async def test_remote_uri_from_config(session: Session, sshd: PrivateSshd, domain: Any) -> None:
    """The config file's URI is followed at start; a guest of the domain's name
    already there (the config's own) makes the remote one NAME@HOST."""
    uri = sshd.libvirt_uri()
    name = domain.name()
    session.write_config(
        "[service]\nidle-exit = 1\n"
        f'[libvirt]\nuris = ["{uri}"]\n'
        "[guests]\nidle-timeout = 1\n"
        f'[[guest]]\nname = "{name}"\naddress = "unix:{session.directory}/no-such.sock"\n'
    )
    bus = await session.client()
    logins = sshd.sessions_accepted()
    try:
        result = session.busctl("get-property", BUS_NAME, ROOT, MANAGER, "Version")
        assert result.returncode == 0, result.stderr  # activated
        path = await wait_guest(bus, f"{name}@127.0.0.1")
        assert await prop(bus, path, GUEST, "Source") == uri
        assert await prop(bus, path, GUEST, "Uuid") == domain.UUIDString()
        assert uri in await prop(bus, ROOT, MANAGER, "LibvirtConnections")
        await echo_through_console(bus, f"{path}/consoles/serial0", b"from-config")
        ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
        assert await prop(bus, path, GUEST, "State") == "connected"
        assert sshd.sessions_accepted() > logins, sshd.log.read_text()
        # The config names the URI: the service exits when idle (it comes back
        # following it).
        async with asyncio.timeout(TIMEOUT):
            while await asyncio.to_thread(session.service_pid) is not None:
                await asyncio.sleep(0.1)
    finally:
        bus.disconnect()


async def test_remote_vnc_that_ssh_will_not_forward(
    session: Session, sshd: PrivateSshd, system_conn: Any
) -> None:
    """The host's sshd refuses to forward to the guest's VNC server (ours allows
    127.0.0.1 only; this guest listens on 127.0.0.2): Connect is NotConnected in
    ssh's words, and the guest's console, which needs no forwarding, still works."""
    session.write_config("[guests]\nidle-timeout = 2\n")
    uri = sshd.libvirt_uri()
    bus = await session.client()
    try:
        with defined_domain(system_conn, "127.0.0.2") as domain:
            ok(await call(bus, ROOT, MANAGER, "AddLibvirt", "sa{sv}", [uri, {}]))
            path = await wait_guest(bus, domain.name())
            port = await asyncio.to_thread(vnc_port, domain)
            address = f"127.0.0.2::{port} through ssh to 127.0.0.1"
            assert await prop(bus, path, GUEST, "Address") == address
            reply = await call(bus, path, GUEST, "Connect", "a{sv}", [{}])
            assert reply.message_type is MessageType.ERROR, reply.body
            assert reply.error_name == f"{BUS_NAME}.Error.NotConnected", reply.body
            assert "could not forward the VNC connection" in reply.body[0], reply.body
            assert "administratively prohibited" in reply.body[0], reply.body
            assert sshd.forwardings_to("127.0.0.2", port) >= 1, sshd.log.read_text()
            await echo_through_console(bus, f"{path}/consoles/serial0", b"no-vnc-needed")
    finally:
        bus.disconnect()


async def test_remote_connection_cut_under_an_open_console(
    session: Session, sshd: PrivateSshd, domain: Any
) -> None:
    """Every ssh session cut (libvirt's and the VNC tunnel's, as a network cut
    would): the guest stays, the follower logs in again, the console an app has
    open works again on the same fd, and the held VNC connection comes back."""
    session.write_config("[guests]\nidle-timeout = 60\n")
    uri = sshd.libvirt_uri()
    bus = await session.client()
    try:
        ok(await call(bus, ROOT, MANAGER, "AddLibvirt", "sa{sv}", [uri, {}]))
        path = await wait_guest(bus, domain.name())
        serial = f"{path}/consoles/serial0"
        port = await asyncio.to_thread(vnc_port, domain)
        reply = await call(bus, serial, CONSOLE, "Open", "a{sv}", [{}])
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        with socket.socket(fileno=reply.unix_fds[reply.body[0]]) as app:
            app.setblocking(True)
            await wait_prop(bus, serial, CONSOLE, "Available", True)
            await asyncio.to_thread(type_until_echoed, app, b"before-cut")
            ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
            assert await prop(bus, path, GUEST, "State") == "connected"
            logins = sshd.sessions_accepted()

            assert await asyncio.to_thread(sshd.cut_sessions) > 0

            async with asyncio.timeout(TIMEOUT):
                while sshd.sessions_accepted() <= logins:  # logged in again
                    await asyncio.sleep(0.1)
            await asyncio.to_thread(type_until_echoed, app, b"after-cut")
            await wait_prop(bus, path, GUEST, "State", "connected")
            assert sshd.forwardings_to("127.0.0.1", port) >= 2, sshd.log.read_text()
            assert await guest_path(bus, domain.name()) == path
    finally:
        bus.disconnect()


async def test_local_uri_with_unix_transport(session: Session, domain: Any) -> None:
    """`qemu+unix:///system` names its transport but is local: the VNC connection
    is openGraphicsFD (it was taken for remote and had no host to reach)."""
    uri = "qemu+unix:///system"
    bus = await session.client()
    try:
        ok(await call(bus, ROOT, MANAGER, "AddLibvirt", "sa{sv}", [uri, {}]))
        path = await wait_guest(bus, domain.name())
        assert await prop(bus, path, GUEST, "Source") == uri
        address = await prop(bus, path, GUEST, "Address")
        assert address.endswith("(openGraphicsFD)"), address
        ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
        assert await prop(bus, path, GUEST, "State") == "connected"
    finally:
        bus.disconnect()


async def test_remote_vnc_on_a_unix_socket(
    session: Session, sshd: PrivateSshd, system_conn: Any
) -> None:
    """A remote guest whose VNC server listens on a Unix socket: Connect is
    NotConnected saying so; its console, through libvirt, works."""
    session.write_config("[guests]\nidle-timeout = 2\n")
    uri = sshd.libvirt_uri()
    bus = await session.client()
    try:
        with defined_domain(system_conn, None) as domain:
            ok(await call(bus, ROOT, MANAGER, "AddLibvirt", "sa{sv}", [uri, {}]))
            path = await wait_guest(bus, domain.name())
            reply = await call(bus, path, GUEST, "Connect", "a{sv}", [{}])
            assert reply.error_name == f"{BUS_NAME}.Error.NotConnected", reply.body
            assert "listens on a Unix socket" in reply.body[0], reply.body
            await echo_through_console(bus, f"{path}/consoles/serial0", b"socket-vnc")
    finally:
        bus.disconnect()


async def test_remote_login_refused(session: Session, sshd: PrivateSshd) -> None:
    """A key the host does not accept: AddLibvirt is NotConnected in libvirt's
    and ssh's words, and the URI is not followed."""
    stranger = sshd.directory / "stranger_key"
    await asyncio.to_thread(
        subprocess.run,
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    uri = sshd.libvirt_uri().replace(str(sshd.client_key), str(stranger))
    assert str(stranger) in uri
    bus = await session.client()
    try:
        reply = await call(bus, ROOT, MANAGER, "AddLibvirt", "sa{sv}", [uri, {}])
        assert reply.error_name == f"{BUS_NAME}.Error.NotConnected", reply.body
        assert "Permission denied (publickey)" in reply.body[0], reply.body
        assert uri not in await prop(bus, ROOT, MANAGER, "LibvirtConnections")
    finally:
        bus.disconnect()
