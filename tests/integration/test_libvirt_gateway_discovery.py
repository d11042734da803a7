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
import sys
import tempfile
import time
import uuid
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
from resourced.rfb.consoles import ConsoleData, ConsoleOpened, Consoles, ConsolesAnnounced
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
    listen = domain_dir / "gw.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.gateway",
        "--libvirt",
        SYSTEM_URI,
        "--domain",
        running_domain.name,
        "--listen",
        f"unix:{listen}",
        stderr=asyncio.subprocess.PIPE,
    )
    log = b""
    try:
        assert process.stderr is not None
        async with asyncio.timeout(IO_TIMEOUT):
            while b"listening on unix:" not in log:
                line = await process.stderr.readline()
                assert line, f"the gateway exited early: {log.decode()}"
                log += line
        consoles = Consoles()
        client = await connect(f"unix:{listen}", extensions=[consoles], timeout=IO_TIMEOUT)
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
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(IO_TIMEOUT):
            _, err = await process.communicate()
    assert process.returncode == 0, (log + err).decode()
