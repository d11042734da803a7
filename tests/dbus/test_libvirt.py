"""libvirt guests in the service, against the real libvirtd: a TCG domain with no
gateway appears by itself, its console comes through libvirt's console stream
(while we hold it, another session such as `virsh console` is refused), its VNC connection through
openGraphicsFD; destroyed, its open consoles get EOF and its State changes;
started again, it comes back."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from resourced.audio import AudioFormat, SampleFormat, analyse
from resourced.demo.bootsector import tone_frequency
from tests.dbus.conftest import (
    BUS_NAME,
    ROOT,
    TIMEOUT,
    Session,
    call,
    ok,
    read_fd_until,
    type_until_echoed,
)
from tests.libvirtd import (
    PTY_CONSOLE_AND_VNC,
    SYSTEM_URI,
    boot_image,
    demo_domain_xml,
    other_console_refusal,
)

GUEST = f"{BUS_NAME}.Guest"
CONSOLE = f"{BUS_NAME}.Console"
AUDIO = f"{BUS_NAME}.Audio"
PROPERTIES = "org.freedesktop.DBus.Properties"


@pytest.fixture
def domain(system_conn: Any) -> Iterator[Any]:
    """A persistent TCG domain (defined, started): a pty serial console and VNC."""
    directory, image = boot_image("rsd-lvd-")
    name = f"rsd-svc-{uuid.uuid4().hex[:10]}"
    xml = demo_domain_xml(name, image, PTY_CONSOLE_AND_VNC)
    dom = system_conn.defineXML(xml)
    dom.create()
    try:
        yield dom
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
        shutil.rmtree(directory, ignore_errors=True)


async def guest_path(bus: MessageBus, name: str) -> str | None:
    (objects,) = ok(
        await call(bus, ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    )
    for path, interfaces in objects.items():
        props = interfaces.get(GUEST)
        if props is not None and props["Name"].value == name:
            return str(path)
    return None


async def activated_guest(session: Session, bus: MessageBus, name: str) -> str:
    """Activate the service (a call to it) and wait for the guest named `name`: its path."""
    result = session.busctl("get-property", BUS_NAME, ROOT, f"{BUS_NAME}.Manager", "Version")
    assert result.returncode == 0, result.stderr
    path: str | None = None
    async with asyncio.timeout(TIMEOUT):
        while (path := await guest_path(bus, name)) is None:
            await asyncio.sleep(0.1)
    return path


async def prop(bus: MessageBus, path: str, interface: str, name: str) -> Any:
    (value,) = ok(await call(bus, path, PROPERTIES, "Get", "ss", [interface, name]))
    return value.value


async def wait_prop(bus: MessageBus, path: str, interface: str, name: str, wanted: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while await prop(bus, path, interface, name) != wanted:
            await asyncio.sleep(0.1)


async def test_libvirt_guest_with_console_stream(session: Session, domain: Any) -> None:
    session.write_config(f'[libvirt]\nuris = ["{SYSTEM_URI}"]\n[guests]\nidle-timeout = 2\n')
    name = domain.name()
    bus = await session.client()
    try:
        path = await activated_guest(session, bus, name)
        assert await prop(bus, path, GUEST, "Source") == SYSTEM_URI
        assert await prop(bus, path, GUEST, "Uuid") == domain.UUIDString()
        consoles = await prop(bus, path, GUEST, "Consoles")
        serial = f"{path}/consoles/serial0"
        assert serial in consoles
        assert await prop(bus, serial, CONSOLE, "Source") == "libvirt"
        assert SYSTEM_URI in (await prop(bus, ROOT, f"{BUS_NAME}.Manager", "LibvirtConnections"))

        # The console through libvirt's stream, as an fd: type, see the echo.
        reply = await call(bus, serial, CONSOLE, "Open", "a{sv}", [{}])
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        app = socket.socket(fileno=reply.unix_fds[reply.body[0]])
        app.setblocking(True)
        try:
            await wait_prop(bus, serial, CONSOLE, "Available", True)
            app.sendall(b"through-libvirt")
            await asyncio.to_thread(read_fd_until, app.fileno(), b"through-libvirt")

            # libvirt's own arbitration: another session (as `virsh console`
            # opens one) is refused while we hold it.
            refusal = await asyncio.to_thread(other_console_refusal, name)
            assert refusal is not None, "libvirt let a second session in"
            assert "Active console session exists" in refusal, refusal

            # The VNC connection comes through openGraphicsFD (no password, no TCP).
            ok(await call(bus, path, GUEST, "Connect", "a{sv}", [{}]))
            assert await prop(bus, path, GUEST, "State") == "connected"

            # Destroyed: the open console gets EOF, State says stopped.
            await asyncio.to_thread(domain.destroy)
            app.settimeout(TIMEOUT)
            data = b"x"
            while data:
                data = await asyncio.to_thread(app.recv, 4096)
            await wait_prop(bus, path, GUEST, "State", "stopped")
        finally:
            app.close()

        # Started again: the guest is back, its console works again.
        await asyncio.to_thread(domain.create)
        async with asyncio.timeout(TIMEOUT):
            while await prop(bus, path, GUEST, "State") == "stopped":
                await asyncio.sleep(0.1)
        assert serial in await prop(bus, path, GUEST, "Consoles")  # kept across the restart
        reply = await call(bus, serial, CONSOLE, "Open", "a{sv}", [{}])
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        with socket.socket(fileno=reply.unix_fds[reply.body[0]]) as again:
            again.setblocking(True)
            await wait_prop(bus, serial, CONSOLE, "Available", True)
            # Typed until echoed whole: bytes sent before the guest set its UART
            # up are lost in the guest, not by us.
            await asyncio.to_thread(type_until_echoed, again, b"after-restart")

        # Undefined: the guest goes away.
        await asyncio.to_thread(domain.destroy)
        await asyncio.to_thread(domain.undefine)
        async with asyncio.timeout(TIMEOUT):
            while await guest_path(bus, name) is not None:
                await asyncio.sleep(0.1)
    finally:
        bus.disconnect()


def sound_domain_xml(name: str, image: Path) -> str:
    """A transient TCG domain whose PC speaker plays into the audiodev that its
    VNC display captures (libvirt 9 cannot say pcspk itself: a QEMU argument)."""
    xml = demo_domain_xml(
        name,
        image,
        """\
    <graphics type='vnc'>
      <listen type='socket'/>
      <audio id='1'/>
    </graphics>
    <audio id='1' type='none'/>
    <video>
      <model type='vga'/>
    </video>""",
    )
    xml = xml.replace(
        "<domain type='qemu'>",
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
    )
    return xml.replace(
        "</domain>",
        "  <qemu:commandline>\n"
        "    <qemu:arg value='-machine'/>\n"
        "    <qemu:arg value='pcspk-audiodev=audio1'/>\n"
        "  </qemu:commandline>\n</domain>",
    )


async def test_libvirt_guest_sound_through_open_graphics_fd(
    session: Session, system_conn: Any
) -> None:
    """A libvirt guest's sound comes through its openGraphicsFD connection: the
    service records its PC speaker's tone."""
    directory, image = boot_image("rsd-lvs-")
    name = f"rsd-snd-{uuid.uuid4().hex[:10]}"
    domain = await asyncio.to_thread(system_conn.createXML, sound_domain_xml(name, image), 0)
    session.write_config(f'[libvirt]\nuris = ["{SYSTEM_URI}"]\n[audio]\nautostart = false\n')
    target = session.directory / "libvirt.wav"
    bus = await session.client()
    try:
        path: str | None = None
        async with asyncio.timeout(TIMEOUT):
            while (path := await guest_path(bus, name)) is None:
                await asyncio.sleep(0.1)
        assert path is not None
        ok(await call(bus, path, AUDIO, "Record", "sa{sv}", [str(target), {}]))
        assert await prop(bus, path, AUDIO, "Available") is True
        async with asyncio.timeout(TIMEOUT):
            while not target.exists() or target.stat().st_size < 44 + 2 * 48000 * 4:
                await asyncio.sleep(0.1)
        (written,) = ok(await call(bus, path, AUDIO, "StopRecording", "a{sv}", [{}]))
        assert written == str(target)
    finally:
        bus.disconnect()
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(domain.destroy)
    with wave.open(str(target), "rb") as wav:
        fmt = AudioFormat(SampleFormat.S16, wav.getnchannels(), wav.getframerate())
        measured = analyse(wav.readframes(wav.getnframes()), fmt)
    shutil.rmtree(directory, ignore_errors=True)
    assert measured.seconds >= 2.0
    assert abs(measured.frequency_hz - tone_frequency(440)) < 0.02 * tone_frequency(440), measured


async def test_channels_and_devices_libvirt_cannot_open(session: Session, system_conn: Any) -> None:
    """A `<channel>` on a Unix socket comes through virDomainOpenChannel (libvirt's
    arbitration applies: another client is refused while we hold it); what
    libvirt's console API cannot open at all (a `<serial>` on a Unix socket, a
    `<channel>` on a PTY) is not listed, and the service's log says why, instead of
    a console whose every Open fails."""
    directory, image = boot_image("rsd-lvc-")
    name = f"rsd-chan-{uuid.uuid4().hex[:10]}"
    devices = f"""\
    <serial type='pty'><target port='0'/></serial>
    <serial type='unix'>
      <source mode='bind' path='{directory}/serial1.sock'/><target port='1'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='{directory}/agent.sock'/>
      <target type='virtio' name='org.resourced.test.0'/>
    </channel>
    <channel type='pty'><target type='virtio' name='org.resourced.pty.0'/></channel>
    <graphics type='vnc'><listen type='socket'/></graphics>"""
    session.write_config(f'[libvirt]\nuris = ["{SYSTEM_URI}"]\n')
    dom = system_conn.createXML(demo_domain_xml(name, image, devices), 0)
    bus = await session.client()
    try:
        path = await activated_guest(session, bus, name)
        listed = await prop(bus, path, GUEST, "Consoles")
        consoles = sorted(str(console).rsplit("/", 1)[1] for console in listed)
        assert consoles == ["org_2eresourced_2etest_2e0", "serial0"], consoles
        channel = f"{path}/consoles/org_2eresourced_2etest_2e0"
        assert await prop(bus, channel, CONSOLE, "Kind") == "channel"
        reply = await call(bus, channel, CONSOLE, "Open", "a{sv}", [{}])
        assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
        with socket.socket(fileno=reply.unix_fds[reply.body[0]]):
            await wait_prop(bus, channel, CONSOLE, "Available", True)
            other = libvirt.open(SYSTEM_URI)
            try:
                stream = other.newStream(0)
                with pytest.raises(libvirt.libvirtError, match="Active channel stream exists"):
                    await asyncio.to_thread(
                        other.lookupByName(name).openChannel, "org.resourced.test.0", stream, 0
                    )
            finally:
                other.close()
        log = (session.directory / "daemon.log").read_text()
        for device in ("serial1 (serial on a Unix socket)", "channel on a PTY"):
            assert device in log, log[-3000:]
    finally:
        bus.disconnect()
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        shutil.rmtree(directory, ignore_errors=True)
