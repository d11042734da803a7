"""lookup_domain against a real libvirtd running a real (TCG) QEMU domain.

The `libvirtd` fixture uses the running daemon or starts virtlogd + libvirtd as
root (see tests/libvirtd.py); if that fails the tests fail, they are never
skipped. Each test creates a transient domain with a unique name that boots the
demo boot sector from a floppy, and destroys it at teardown whatever happened.
Every wait polls a condition under a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.demo.bootsector import build_boot_sector
from resourced.gateway.libvirt import NoSuchGuest, lookup_domain
from resourced.rfb.aio import connect
from resourced.rfb.consoles import (
    ConsoleAdded,
    ConsoleData,
    ConsoleOpened,
    ConsoleRemoved,
    Consoles,
    ConsolesAnnounced,
)
from tests.libvirtd import (
    SYSTEM_URI,
    LibvirtdUnavailable,
    demo_domain_xml,
    ensure_libvirtd,
    ensure_qemu_runs_as_root,
)

pytestmark = pytest.mark.integration

IO_TIMEOUT = 60.0
RFB_GREETING = b"RFB 003.008\n"
VNC_PASSWORD = "gwsecr8"  # libvirt refuses VNC passwords over 8 characters


@dataclass(frozen=True)
class RunningDomain:
    name: str
    uuid: str
    serial_socket: Path


@pytest.fixture(scope="module")
def libvirtd() -> None:
    try:
        ensure_libvirtd()
    except LibvirtdUnavailable as error:
        pytest.fail(f"no libvirtd to test against: {error}", pytrace=False)


@pytest.fixture
def domain_dir() -> Iterator[Path]:
    # Short (Unix socket paths), and traversable in case QEMU runs as libvirt-qemu.
    path = Path(tempfile.mkdtemp(prefix="rsd-lv-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def domain_xml(name: str, image: Path, serial_socket: Path) -> str:
    return demo_domain_xml(
        name,
        image,
        f"""\
    <serial type='unix'>
      <source mode='bind' path='{serial_socket}'/>
      <target port='0'/>
    </serial>
    <serial type='pty'>
      <target port='1'/>
    </serial>
    <graphics type='vnc' passwd='{VNC_PASSWORD}'>
      <listen type='socket'/>
    </graphics>
    <video>
      <model type='vga'/>
    </video>""",
    )


@pytest.fixture
def system_conn(libvirtd: None) -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda *_args: None, None)
    conn = libvirt.open(SYSTEM_URI)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def running_domain(system_conn: Any, domain_dir: Path) -> Iterator[RunningDomain]:
    name = f"rsd-gw-{uuid.uuid4().hex[:12]}"
    image = domain_dir / "boot.img"
    image.write_bytes(build_boot_sector())
    image.chmod(0o644)
    serial_socket = domain_dir / "ser.sock"
    domain = system_conn.createXML(domain_xml(name, image, serial_socket), 0)
    try:
        yield RunningDomain(name, domain.UUIDString(), serial_socket)
    finally:
        # Transient: destroying it also makes libvirt forget it. Already gone is fine.
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()


def wait_for(condition: Any, what: str, timeout: float = IO_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_lookup_finds_serials_and_vnc_of_a_running_domain(running_domain: RunningDomain) -> None:
    resources = lookup_domain(SYSTEM_URI, running_domain.name)

    assert resources.name == running_domain.name
    assert resources.uuid == running_domain.uuid
    consoles = {spec.name: spec for spec in resources.consoles}
    # libvirt adds a <console> mirroring serial0: it must not show up twice.
    assert sorted(consoles) == ["serial0", "serial1"], resources.consoles
    assert consoles["serial0"] == ConsoleSpec(
        "serial0",
        ConsoleKind.SERIAL,
        Endpoint(EndpointType.UNIX, str(running_domain.serial_socket)),
    )
    serial1 = consoles["serial1"]
    assert serial1.kind is ConsoleKind.SERIAL
    assert serial1.endpoint.type is EndpointType.PTY
    assert serial1.endpoint.path.startswith("/dev/pts/")
    assert stat.S_ISCHR(os.stat(serial1.endpoint.path).st_mode)

    vnc = resources.vnc
    assert vnc is not None
    assert vnc.socket_path is not None
    assert vnc.host is None
    assert vnc.port is None
    # qemu:///system as root may read secrets: VIR_DOMAIN_XML_SECURE gave the password.
    assert vnc.password == VNC_PASSWORD
    socket_path = vnc.socket_path
    wait_for(lambda: os.path.exists(socket_path), f"VNC socket {socket_path}")
    with connect_unix(socket_path) as sock:
        assert recv_exactly(sock, len(RFB_GREETING)) == RFB_GREETING


def test_unix_serial_found_is_the_guests_com1(running_domain: RunningDomain) -> None:
    resources = lookup_domain(SYSTEM_URI, running_domain.name)
    (serial0,) = [spec for spec in resources.consoles if spec.name == "serial0"]
    # The demo guest echoes COM1: poke it until the guest has booted and answers.
    marker = b"resourced-gw"
    received = b""
    deadline = time.monotonic() + IO_TIMEOUT
    with connect_unix(serial0.endpoint.path) as sock:
        sock.settimeout(1.0)
        while marker not in received:
            if time.monotonic() > deadline:
                pytest.fail(f"no echo from the guest's COM1 in {IO_TIMEOUT:.0f} s: {received!r}")
            sock.sendall(marker)
            with contextlib.suppress(TimeoutError):
                chunk = sock.recv(4096)
                if not chunk:
                    pytest.fail(f"QEMU closed the serial socket; got {received!r}")
                received += chunk


def test_lookup_by_uuid_on_an_open_connection(
    running_domain: RunningDomain, system_conn: Any
) -> None:
    by_name = lookup_domain(SYSTEM_URI, running_domain.name)
    by_uuid = lookup_domain(SYSTEM_URI, running_domain.uuid, conn=system_conn)
    assert by_uuid == by_name
    assert system_conn.isAlive() == 1


def test_missing_domain_on_the_real_daemon(libvirtd: None) -> None:
    with pytest.raises(NoSuchGuest):
        lookup_domain(SYSTEM_URI, f"rsd-gw-missing-{uuid.uuid4().hex[:12]}")


def test_destroyed_domain_is_no_longer_found(system_conn: Any, domain_dir: Path) -> None:
    name = f"rsd-gw-{uuid.uuid4().hex[:12]}"
    image = domain_dir / "boot.img"
    image.write_bytes(build_boot_sector())
    domain = system_conn.createXML(domain_xml(name, image, domain_dir / "ser.sock"), 0)
    try:
        assert lookup_domain(SYSTEM_URI, name).name == name
    finally:
        domain.destroy()
    with pytest.raises(NoSuchGuest):
        lookup_domain(SYSTEM_URI, name)


def test_qemu_conf_edit_is_idempotent_and_respects_existing_settings(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# user = "libvirt-qemu"\n#group = "libvirt-qemu"\nvnc_listen = "::1"')
    assert ensure_qemu_runs_as_root(conf) == ['user = "root"', 'group = "root"']
    edited = conf.read_text()
    assert edited.startswith(
        '# user = "libvirt-qemu"\n#group = "libvirt-qemu"\nvnc_listen = "::1"\n'
    )
    assert edited.endswith('user = "root"\ngroup = "root"\n')
    assert ensure_qemu_runs_as_root(conf) == []
    assert conf.read_text() == edited

    own = tmp_path / "own.conf"
    own.write_text('  user = "qemu"\n')
    assert ensure_qemu_runs_as_root(own) == ['group = "root"']
    assert ensure_qemu_runs_as_root(tmp_path / "missing.conf") == [
        'user = "root"',
        'group = "root"',
    ]


async def test_gateway_command_fronts_a_libvirt_domain(
    running_domain: RunningDomain, domain_dir: Path
) -> None:
    """`resourced-gateway --libvirt qemu:///system --domain NAME`: VNC socket, its
    password and the serial consoles all come from libvirt; a viewer types on
    serial0 through the gateway and the guest echoes."""
    gateway = GatewayProcess(running_domain.name, domain_dir / "gw.sock")
    try:
        await gateway.start()
        consoles = Consoles()
        client = await connect(f"unix:{gateway.listen}", extensions=[consoles], timeout=IO_TIMEOUT)
        seen = b""
        async with client, asyncio.timeout(IO_TIMEOUT):
            while b"via libvirt" not in seen:
                event = await client.next_event()
                if isinstance(event, ConsolesAnnounced):
                    names = sorted(c.name for c in event.consoles)
                    assert names == ["serial0", "serial1"]  # unix and pty serials
                    serial0 = consoles.by_name("serial0")
                    assert serial0 is not None
                    consoles.open(serial0.console_id, history=False)
                elif isinstance(event, ConsoleOpened):
                    consoles.write(event.console_id, b"via libvirt")
                elif isinstance(event, ConsoleData):
                    seen += event.data
                client.flush()
    finally:
        await gateway.stop()


class GatewayProcess:
    """`python -m resourced.gateway --libvirt ... --domain NAME`, with its log read
    as it comes (the log is how the tests see what the gateway decided)."""

    def __init__(self, domain: str, listen: Path) -> None:
        self.domain = domain
        self.listen = listen
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "resourced.gateway",
            "--libvirt",
            SYSTEM_URI,
            "--domain",
            self.domain,
            "--listen",
            f"unix:{self.listen}",
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read_log())
        await self.logged("listening on unix:")
        await self.logged("through libvirt events")

    async def _read_log(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace"))

    async def logged(self, text: str, start: int = 0) -> int:
        """Wait until a line from `start` on contains `text`; the index after it."""
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                for index in range(start, len(self.lines)):
                    if text in self.lines[index]:
                        return index + 1
                if self.process is not None and self.process.returncode is not None:
                    pytest.fail(f"the gateway exited: {''.join(self.lines)}")
                await asyncio.sleep(0.05)

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    async def stop(self) -> None:
        """SIGTERM; it must exit with status 0."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(IO_TIMEOUT):
            await self.process.wait()
            if self._reader is not None:
                await self._reader
        assert self.process.returncode == 0, "".join(self.lines)


async def test_gateway_follows_the_domain_through_a_restart(
    running_domain: RunningDomain, system_conn: Any, domain_dir: Path
) -> None:
    """No SIGHUP: libvirt's events tell the gateway that the domain was destroyed
    and started again. Viewers from then on reach the new QEMU (its VNC socket is a
    new path) and type on serial0 again; the consoles are re-read from the new XML."""
    before = lookup_domain(SYSTEM_URI, running_domain.name)
    gateway = GatewayProcess(running_domain.name, domain_dir / "gw.sock")
    recreated: Any = None
    try:
        await gateway.start()
        # serial1, a PTY, is reached through libvirt's console API.
        await gateway.logged("console serial1: attached to libvirt console serial1")
        mark = len(gateway.lines)
        await asyncio.to_thread(system_conn.lookupByName(running_domain.name).destroy)
        xml = domain_xml(running_domain.name, domain_dir / "boot.img", running_domain.serial_socket)
        recreated = await asyncio.to_thread(system_conn.createXML, xml, 0)
        after = await asyncio.to_thread(lookup_domain, SYSTEM_URI, running_domain.name)
        assert after.vnc is not None
        assert before.vnc is not None
        assert after.vnc.socket_path != before.vnc.socket_path  # libvirt's per-run directory
        await gateway.logged(f"VNC server is now at unix:{after.vnc.socket_path}", mark)
        await gateway.logged("reloaded consoles from libvirt", mark)

        consoles = Consoles()
        client = await connect(f"unix:{gateway.listen}", extensions=[consoles], timeout=IO_TIMEOUT)
        seen = b""
        async with client, asyncio.timeout(IO_TIMEOUT):
            while consoles.by_name("serial0") is None:
                await client.next_event()
            assert sorted(c.name for c in consoles.consoles) == ["serial0", "serial1"]
            serial0 = consoles.by_name("serial0")
            assert serial0 is not None
            consoles.open(serial0.console_id, history=False)
            client.flush()
            # The new guest may still be in its BIOS, which swallows what reaches its
            # UART: type until the boot sector is there to echo.
            while b"after the restart" not in seen:
                if consoles.is_open(serial0.console_id):
                    consoles.write(serial0.console_id, b"after the restart")
                    client.flush()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        while b"after the restart" not in seen:
                            event = await client.next_event()
                            if isinstance(event, ConsoleData):
                                seen += event.data
                            client.flush()
        # The same device of the new QEMU (a new PTY path), taken again through libvirt.
        await gateway.logged("console serial1: attached to libvirt console serial1", mark)
    finally:
        if recreated is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(recreated.destroy)
        await gateway.stop()


USB_SERIAL = "<serial type='pty'><target type='usb-serial' port='2'/></serial>"


def usb_serial_alias(domain: Any) -> str:
    """The alias libvirt gave the plugged USB serial port (what unplugging names)."""
    root = ET.fromstring(domain.XMLDesc(0))
    for serial in root.iterfind("./devices/serial"):
        target, alias = serial.find("target"), serial.find("alias")
        if target is not None and target.get("type") == "usb-serial" and alias is not None:
            return str(alias.get("name"))
    raise AssertionError("no USB serial port in the live XML")


async def test_gateway_publishes_hot_plugged_consoles(
    running_domain: RunningDomain, system_conn: Any, domain_dir: Path
) -> None:
    """A serial port plugged into the running domain (a USB serial adapter on a PTY)
    reaches a connected viewer as ADDED, with no SIGHUP; unplugged, as REMOVED.
    SIGHUP still re-reads the domain on demand."""
    gateway = GatewayProcess(running_domain.name, domain_dir / "gw.sock")
    domain = system_conn.lookupByName(running_domain.name)
    try:
        await gateway.start()
        consoles = Consoles()
        client = await connect(f"unix:{gateway.listen}", extensions=[consoles], timeout=IO_TIMEOUT)
        async with client, asyncio.timeout(IO_TIMEOUT):
            while not consoles.announced:
                await client.next_event()
            assert sorted(c.name for c in consoles.consoles) == ["serial0", "serial1"]
            await asyncio.to_thread(
                domain.attachDeviceFlags, USB_SERIAL, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
            while not isinstance(event := await client.next_event(), ConsoleAdded):
                pass
            assert event.info.name == "serial2"
            assert consoles.by_name("serial2") is not None
            await asyncio.to_thread(
                domain.detachDeviceAlias, usb_serial_alias(domain), libvirt.VIR_DOMAIN_AFFECT_LIVE
            )
            while not isinstance(event := await client.next_event(), ConsoleRemoved):
                pass
            assert event.console_id not in {c.console_id for c in consoles.consoles}
            assert consoles.by_name("serial2") is None
        mark = len(gateway.lines)
        gateway.signal(signal.SIGHUP)
        await gateway.logged("reloaded consoles from libvirt", mark)
    finally:
        await gateway.stop()


def stop_libvirtd() -> None:
    """SIGTERM the running libvirtd and wait until it is gone (domains keep running:
    libvirtd finds its QEMUs again when it starts)."""
    pids = [
        int(pid)
        for pid in subprocess.run(
            ["pgrep", "-x", "libvirtd"], capture_output=True, text=True, check=False
        ).stdout.split()
    ]
    assert pids, "no libvirtd process to stop"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), "libvirtd to exit")


async def test_gateway_reconnects_to_libvirtd(
    running_domain: RunningDomain, system_conn: Any, domain_dir: Path
) -> None:
    """libvirtd restarts (an upgrade, a crash): the gateway notices, keeps serving,
    connects again once libvirtd is back, and follows the domain as before (a
    serial port plugged in afterwards reaches a viewer as ADDED).

    It stops the machine's libvirtd and starts it again (`ensure_libvirtd`); the
    domains survive, as they do in production."""
    gateway = GatewayProcess(running_domain.name, domain_dir / "gw.sock")
    try:
        await gateway.start()
        mark = len(gateway.lines)
        await asyncio.to_thread(stop_libvirtd)
        await gateway.logged("lost the connection to libvirt", mark)
        await asyncio.to_thread(ensure_libvirtd)
        await gateway.logged("through libvirt events", mark)
        consoles = Consoles()
        client = await connect(f"unix:{gateway.listen}", extensions=[consoles], timeout=IO_TIMEOUT)
        async with client, asyncio.timeout(IO_TIMEOUT):
            while not consoles.announced:
                await client.next_event()
            conn = await asyncio.to_thread(libvirt.open, SYSTEM_URI)
            try:
                domain = await asyncio.to_thread(conn.lookupByName, running_domain.name)
                await asyncio.to_thread(
                    domain.attachDeviceFlags, USB_SERIAL, libvirt.VIR_DOMAIN_AFFECT_LIVE
                )
            finally:
                conn.close()
            while not isinstance(event := await client.next_event(), ConsoleAdded):
                pass
            assert event.info.name == "serial2"
    finally:
        await asyncio.to_thread(ensure_libvirtd)  # whatever happened, leave it running
        await asyncio.to_thread(destroy_domain, running_domain.name)
        await gateway.stop()


def destroy_domain(name: str) -> None:
    """Destroy a domain over a new connection (the fixture's died with libvirtd)."""
    conn = libvirt.open(SYSTEM_URI)
    try:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(name).destroy()
    finally:
        conn.close()


async def test_non_ascii_vnc_password_from_libvirt(system_conn: Any, domain_dir: Path) -> None:
    """libvirt hands QEMU the `passwd` of the domain XML as UTF-8; the password
    libvirt gives us back opens QEMU's VNC server with our client (issue #9)."""
    password = "pässwö"  # 8 bytes of UTF-8, 6 characters
    name = f"rsd-pw-{uuid.uuid4().hex[:12]}"
    image = domain_dir / "boot.img"
    image.write_bytes(build_boot_sector())
    image.chmod(0o644)
    devices = f"""\
    <graphics type='vnc' passwd='{password}'>
      <listen type='socket'/>
    </graphics>
    <video>
      <model type='vga'/>
    </video>"""
    xml = demo_domain_xml(name, image, devices)
    domain = await asyncio.to_thread(system_conn.createXML, xml, 0)
    try:
        resources = await asyncio.to_thread(lookup_domain, SYSTEM_URI, name)
        assert resources.vnc is not None
        assert resources.vnc.password == password
        socket_path = resources.vnc.socket_path
        assert socket_path is not None
        await asyncio.to_thread(
            wait_for, lambda: os.path.exists(socket_path), f"VNC socket {socket_path}"
        )
        client = await connect(f"unix:{socket_path}", password=password, timeout=IO_TIMEOUT)
        async with client:
            assert client.info is not None
            assert client.info.security == "VNC_AUTH"
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(domain.destroy)
