"""The gateway reaches a libvirt domain's PTY consoles through libvirt's console
API, against the real libvirtd and a real (TCG) QEMU, with another program
opening the console the way `virsh console` does (issue #9, item 4).

While the gateway holds serial0, the other program is refused by libvirt
("Active console session exists") and the viewer loses none of the guest's echo;
a forced open (`virsh console --force`) takes it away, and the viewer is told
(CLOSED, backend error, with the reason); once that session ends the gateway
takes the console again, without forcing, and the viewer opens it again and types.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from resourced.consoles.ptylock import lock_path
from resourced.demo.bootsector import build_boot_sector
from resourced.gateway.libvirt import lookup_domain
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.consoles import (
    CloseReason,
    ConsoleClosed,
    ConsoleData,
    ConsoleInfo,
    ConsoleOpened,
    Consoles,
)
from tests.integration.test_libvirt_gateway_discovery import IO_TIMEOUT, GatewayProcess
from tests.libvirtd import (
    PTY_CONSOLE_AND_VNC,
    SYSTEM_URI,
    OtherConsoleSession,
    boot_image,
    demo_domain_xml,
    other_console_refusal,
)

pytestmark = pytest.mark.integration


#: 240 bytes for the guest to echo (no byte may go missing).
TYPED = b"".join(b"line-%02d-abcdefghijklmnopq " % n for n in range(10))[:240]


@pytest.fixture
def pty_domain(system_conn: Any) -> Iterator[tuple[str, Path]]:
    """A transient TCG domain with a PTY serial console; its name and a directory."""
    directory, image = boot_image("rsd-lvc-")
    name = f"rsd-con-{uuid.uuid4().hex[:10]}"
    domain = system_conn.createXML(demo_domain_xml(name, image, PTY_CONSOLE_AND_VNC), 0)
    try:
        yield name, directory
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()
        shutil.rmtree(directory, ignore_errors=True)


class Viewer:
    """A viewer with the console extension, reading events as they come."""

    def __init__(self, client: RfbClient, consoles: Consoles) -> None:
        self.client = client
        self.consoles = consoles
        self.seen = b""
        self.closed: list[ConsoleClosed] = []

    @classmethod
    async def connect(cls, path: Path) -> Viewer:
        consoles = Consoles()
        client = await connect(f"unix:{path}", extensions=[consoles], timeout=IO_TIMEOUT)
        viewer = cls(client, consoles)
        async with asyncio.timeout(IO_TIMEOUT):
            while not consoles.announced:
                await client.next_event()
        return viewer

    def serial0(self) -> ConsoleInfo:
        info = self.consoles.by_name("serial0")
        assert info is not None, self.consoles.consoles
        return info

    async def pump(self, seconds: float) -> None:
        """Read events for up to `seconds` (less if the connection has none)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    event = await self.client.next_event()
                    if isinstance(event, ConsoleData):
                        self.seen += event.data
                    elif isinstance(event, ConsoleClosed):
                        self.closed.append(event)
                    self.client.flush()

    async def open_serial0(self) -> None:
        console_id = self.serial0().console_id
        self.consoles.open(console_id, history=False)
        self.client.flush()
        async with asyncio.timeout(IO_TIMEOUT):
            while not isinstance(await self.client.next_event(), ConsoleOpened):
                pass

    async def type_until_echoed(self, text: bytes) -> None:
        """Type `text` until the guest echoes it (it may still be in its BIOS,
        which swallows what reaches its UART)."""
        console_id = self.serial0().console_id
        async with asyncio.timeout(IO_TIMEOUT):
            while text not in self.seen:
                self.consoles.write(console_id, text)
                self.client.flush()
                await self.pump(1.0)

    async def echoed(self, text: bytes) -> None:
        """Type `text` once; every byte of it must come back."""
        start = len(self.seen)
        self.consoles.write(self.serial0().console_id, text)
        self.client.flush()
        async with asyncio.timeout(IO_TIMEOUT):
            while text not in self.seen[start:]:
                await self.pump(0.5)
                assert not self.closed, self.closed


async def test_another_console_session_is_refused_while_the_gateway_holds_it(
    pty_domain: tuple[str, Path],
) -> None:
    name, directory = pty_domain
    gateway = GatewayProcess(name, directory / "gw.sock")
    try:
        await gateway.start()
        await gateway.logged("console serial0: attached to")
        viewer = await Viewer.connect(gateway.listen)
        async with viewer.client:
            await viewer.open_serial0()
            await viewer.type_until_echoed(b"booted")
            refusal = await asyncio.to_thread(other_console_refusal, name)
            assert refusal is not None, "libvirt let a second session in"
            assert "Active console session exists" in refusal, refusal
            # The viewer still gets every byte the guest echoes.
            await viewer.echoed(TYPED)
    finally:
        await gateway.stop()


async def test_a_forced_console_session_closes_it_with_a_reason_and_it_comes_back(
    pty_domain: tuple[str, Path],
) -> None:
    name, directory = pty_domain
    gateway = GatewayProcess(name, directory / "gw.sock")
    forcing: OtherConsoleSession | None = None
    try:
        await gateway.start()
        await gateway.logged("console serial0: attached to")
        viewer = await Viewer.connect(gateway.listen)
        async with viewer.client:
            await viewer.open_serial0()
            await viewer.type_until_echoed(b"booted")
            mark = len(gateway.lines)
            # A forcing session (`virsh console --force`), ended below.
            forcing = await asyncio.to_thread(OtherConsoleSession, name)
            refusal = await asyncio.to_thread(lambda: forcing.open(force=True))
            assert refusal is None, refusal
            async with asyncio.timeout(IO_TIMEOUT):
                while not viewer.closed:
                    await viewer.pump(0.5)
            (closed,) = viewer.closed
            assert closed.console_id == viewer.serial0().console_id
            assert closed.reason is CloseReason.BACKEND_ERROR
            assert "libvirt closed the console" in closed.message, closed
            # While the other session holds it, the gateway does not force it back.
            await gateway.logged("never forced away", mark)
            await asyncio.to_thread(forcing.close)
            forcing = None
            # Once that session ends, the gateway takes the console again by itself.
            await gateway.logged("console serial0: attached to libvirt console serial0", mark)
            viewer.closed.clear()
            await viewer.open_serial0()
            await viewer.echoed(TYPED)
    finally:
        if forcing is not None:
            await asyncio.to_thread(forcing.close)
        await gateway.stop()


def lock_holder(path: str) -> int | None:
    """The PID a lock file holds (None: no lock file)."""
    try:
        with open(path) as file:
            return int(file.read())
    except FileNotFoundError:
        return None


class PtyGatewayProcess(GatewayProcess):
    """`python -m resourced.gateway --vnc ... --console serial0=pty:PATH`: a PTY
    given directly, not found through libvirt."""

    def __init__(self, vnc: str, pty: str, listen: Path) -> None:
        super().__init__("", listen)
        self.vnc = vnc
        self.pty = pty

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "resourced.gateway",
            "--vnc",
            self.vnc,
            "--console",
            f"serial0=pty:{self.pty}",
            "--listen",
            f"unix:{self.listen}",
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read_log())
        await self.logged("listening on unix:")


async def test_pty_given_directly_honours_libvirts_lock_file(
    system_conn: Any, pty_domain: tuple[str, Path]
) -> None:
    """libvirt locks a PTY while a console session has it (/var/lock/LCK.._pts_N,
    libvirtd's PID): the gateway does not open it then, and says why; once the
    session ends it opens it, under a lock of its own, which libvirt honours in
    turn: another session (as `virsh console` opens one) is refused."""
    name, directory = pty_domain
    resources = await asyncio.to_thread(lookup_domain, SYSTEM_URI, name)
    (serial0,) = [spec for spec in resources.consoles if spec.name == "serial0"]
    pty = serial0.endpoint.path
    assert resources.vnc is not None
    assert resources.vnc.socket_path is not None
    domain = await asyncio.to_thread(system_conn.lookupByName, name)
    stream = await asyncio.to_thread(system_conn.newStream, 0)
    await asyncio.to_thread(domain.openConsole, None, stream, 0)
    lock = lock_path(pty)
    libvirtd_pid = lock_holder(lock)
    assert libvirtd_pid is not None, "libvirt made no lock file: this test needs one"
    gateway = PtyGatewayProcess(f"unix:{resources.vnc.socket_path}", pty, directory / "gw.sock")
    try:
        await gateway.start()
        await gateway.logged(f"{pty} is locked by lock file {lock}, held by process {libvirtd_pid}")
        mark = len(gateway.lines)
        await asyncio.to_thread(stream.abort)  # the session ends: libvirt unlocks
        await gateway.logged(f"console serial0: attached to pty:{pty}", mark)
        assert gateway.process is not None
        assert lock_holder(lock) == gateway.process.pid
        refusal = await asyncio.to_thread(other_console_refusal, name)
        assert refusal is not None, "libvirt let a session in past our lock file"
        assert "is locked by lock file" in refusal, refusal
        viewer = await Viewer.connect(gateway.listen)
        async with viewer.client:
            await viewer.open_serial0()
            await viewer.type_until_echoed(b"booted")
            await viewer.echoed(TYPED)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(stream.abort)
        await gateway.stop()
    assert lock_holder(lock) is None  # the gateway removed its lock on the way out


CHANNEL_PTY = """\
    <channel type='pty'>
      <target type='virtio' name='org.resourced.test.0'/>
    </channel>"""


async def test_a_channel_on_a_pty_is_opened_under_libvirts_lock_file(
    system_conn: Any, pty_domain: tuple[str, Path]
) -> None:
    """libvirt's console API cannot open a `<channel>` on a PTY (openConsole does
    not find channels, openChannel takes Unix sockets only), so the gateway opens
    its PTY itself under libvirt's lock file, as it does a `pty:` console, while
    serial0 still goes through libvirt: the channel is attached and opens for a
    viewer, and its lock file holds the gateway's PID."""
    name, directory = pty_domain
    image = directory / "chan.img"
    image.write_bytes(build_boot_sector())
    image.chmod(0o644)
    channel_domain = f"{name}-chan"
    devices = PTY_CONSOLE_AND_VNC + "\n" + CHANNEL_PTY
    domain = await asyncio.to_thread(
        system_conn.createXML, demo_domain_xml(channel_domain, image, devices), 0
    )
    gateway = GatewayProcess(channel_domain, directory / "gw.sock")
    try:
        resources = await asyncio.to_thread(lookup_domain, SYSTEM_URI, channel_domain)
        (channel,) = [spec for spec in resources.consoles if spec.name == "org.resourced.test.0"]
        pty = channel.endpoint.path
        await gateway.start()
        await gateway.logged(f"console org.resourced.test.0: attached to pty:{pty}")
        await gateway.logged("console serial0: attached to libvirt console serial0")
        assert gateway.process is not None
        assert lock_holder(lock_path(pty)) == gateway.process.pid
        assert not [line for line in gateway.lines if "cannot open console" in line]
        viewer = await Viewer.connect(gateway.listen)
        async with viewer.client:
            info = viewer.consoles.by_name("org.resourced.test.0")
            assert info is not None, viewer.consoles.consoles
            viewer.consoles.open(info.console_id, history=False)
            viewer.client.flush()
            async with asyncio.timeout(IO_TIMEOUT):
                while not isinstance(await viewer.client.next_event(), ConsoleOpened):
                    pass
    finally:
        await gateway.stop()
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(domain.destroy)
    assert lock_holder(lock_path(pty)) is None
