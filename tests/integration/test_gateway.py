"""The gateway in front of real QEMU (TCG), reached with our own client.

Each test starts its own guest and its own in-process gateway. QEMU starts
paused; the guest runs once the gateway is attached to its serial port, so the
banner lands in the gateway's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from resourced.audio import analyse
from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.demo.bootsector import DEFAULT_BANNER, tone_frequency
from resourced.demo.qemu import QemuGuest
from resourced.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    RemoteProtocolError,
    TlsError,
)
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.gateway.session import CONSOLE_HIGH_WATER
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.consoles import (
    MAX_CONSOLE_DATA,
    CloseReason,
    ConsoleAdded,
    ConsoleClosed,
    ConsoleData,
    ConsoleMark,
    ConsoleOpened,
    ConsoleRemoved,
    Consoles,
    ConsolesAnnounced,
    MarkKind,
    Resumed,
    StreamPosition,
)
from resourced.rfb.events import ServerClosed
from resourced.rfb.qemu import AudioData, QemuAudio
from resourced.rfb.server import ServerSecurity
from resourced.rfb.tls import TlsCredentials
from tests.certs import Pki, make_pki
from tests.integration.conftest import MakeGuest

TIMEOUT = 60.0
OPEN_SECURITY = ServerSecurity(allow_none=True)


@dataclass
class Rig:
    guest: QemuGuest
    gateway: Gateway
    address: str


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(make_guest: MakeGuest, guest_dir: Path) -> AsyncIterator[MakeRig]:
    gateways: list[Gateway] = []

    async def make(
        *,
        security: ServerSecurity = OPEN_SECURITY,
        history: int = 64 * 1024,
        guest_options: dict[str, Any] | None = None,
        tcp: bool = False,
        **config_options: Any,
    ) -> Rig:
        guest = await make_guest(start_paused=True, **(guest_options or {}))
        consoles = [
            ConsoleSpec(
                "serial0", ConsoleKind.SERIAL, Endpoint(EndpointType.UNIX, str(guest.serial_path))
            ),
            ConsoleSpec(
                "monitor", ConsoleKind.MONITOR, Endpoint(EndpointType.UNIX, str(guest.monitor_path))
            ),
        ]
        if guest.config.vnc_tcp_port is not None:
            upstream = f"127.0.0.1::{guest.config.vnc_tcp_port}"
        else:
            upstream = f"unix:{guest.vnc_path}"
        gateway = Gateway(
            GatewayConfig(
                upstream=upstream,
                security=security,
                consoles=consoles,
                history=history,
                **config_options,
            )
        )
        gateways.append(gateway)
        await gateway.start()
        await guest.wait_chardev_connected("serial0", TIMEOUT)
        await guest.resume()
        if tcp:
            await gateway.listen_tcp("127.0.0.1", free_port())
            address = f"127.0.0.1::{next(iter(gateway.tcp_ports))}"
        else:
            path = str(guest.workdir / "gw.sock")
            await gateway.listen_unix(path)
            address = f"unix:{path}"
        return Rig(guest, gateway, address)

    try:
        yield make
    finally:
        for gateway in gateways:
            await gateway.close()


def free_port() -> int:
    for port in range(6000, 6900):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class Viewer:
    """Our client with the console and audio extensions, and what it received."""

    def __init__(self, client: RfbClient, consoles: Consoles, audio: QemuAudio | None) -> None:
        self.client = client
        self.consoles = consoles
        self.audio = audio
        self.output: dict[int, bytearray] = {}
        self.history: dict[int, bytearray] = {}
        self.closed: dict[int, ConsoleClosed] = {}
        self.opened: dict[int, ConsoleOpened] = {}
        self.audio_chunks: list[tuple[float, int]] = []
        self.audio_pcm = bytearray()
        self.events: list[Any] = []

    def id(self, name: str) -> int:
        info = self.consoles.by_name(name)
        assert info is not None, f"no console {name}"
        return info.console_id

    async def pump(self, until: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while not until():
                event = await self.client.next_event()
                self.events.append(event)
                if isinstance(event, ConsoleData):
                    target = self.history if event.history else self.output
                    target.setdefault(event.console_id, bytearray()).extend(event.data)
                elif isinstance(event, ConsoleOpened):
                    self.opened[event.console_id] = event
                elif isinstance(event, ConsoleClosed):
                    self.closed[event.console_id] = event
                elif isinstance(event, AudioData):
                    self.audio_chunks.append((time.monotonic(), len(event.data)))
                    self.audio_pcm += event.data
                self.client.flush()

    async def open(self, name: str, **options: Any) -> int:
        await self.pump(lambda: self.consoles.announced)
        console_id = self.id(name)
        self.consoles.open(console_id, **options)
        self.client.flush()
        await self.pump(lambda: console_id in self.opened)
        return console_id

    def write(self, console_id: int, data: bytes) -> None:
        assert self.consoles.write(console_id, data) == len(data)
        self.client.flush()

    def seen(self, console_id: int) -> bytes:
        return bytes(self.history.get(console_id, b"")) + bytes(self.output.get(console_id, b""))

    async def close(self) -> None:
        await self.client.close()


async def viewer(rig: Rig, *, audio: bool = False, **options: Any) -> Viewer:
    consoles = Consoles()
    extensions: list[Any] = [consoles]
    qemu_audio = QemuAudio() if audio else None
    if qemu_audio is not None:
        extensions.append(qemu_audio)
    client = await connect(rig.address, extensions=extensions, timeout=TIMEOUT, **options)
    return Viewer(client, consoles, qemu_audio)


async def test_banner_echo_and_monitor_through_the_gateway(make_rig: MakeRig) -> None:
    rig = await make_rig()
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        names = {(c.name, c.kind) for c in v.consoles.consoles}
        assert names == {("serial0", ConsoleKind.SERIAL), ("monitor", ConsoleKind.MONITOR)}
        serial = await v.open("serial0")
        await v.pump(lambda: DEFAULT_BANNER in v.seen(serial))
        v.write(serial, b"typed through the gateway")
        await v.pump(lambda: b"typed through the gateway" in v.output.get(serial, b""))
        monitor = await v.open("monitor")
        v.write(monitor, b"info status\n")
        await v.pump(lambda: b"VM status: running" in v.seen(monitor))
        v.consoles.close(serial)
        v.client.flush()
        await v.pump(lambda: serial in v.closed)
        assert v.closed[serial].reason is CloseReason.REQUESTED
    finally:
        await v.close()


async def test_late_viewer_gets_history(make_rig: MakeRig) -> None:
    rig = await make_rig()
    first = await viewer(rig)
    try:
        serial = await first.open("serial0")
        await first.pump(lambda: DEFAULT_BANNER in first.seen(serial))
        first.write(serial, b"before the late one")
        await first.pump(lambda: b"before the late one" in first.seen(serial))
    finally:
        await first.close()
    late = await viewer(rig)
    try:
        serial = await late.open("serial0")
        await late.pump(lambda: b"before the late one" in late.history.get(serial, b""))
        assert late.opened[serial].history_length >= len(DEFAULT_BANNER)
        assert bytes(late.history[serial]).startswith(DEFAULT_BANNER)
        # Without history, only what comes after.
        fresh = await viewer(rig)
        try:
            fresh_serial = await fresh.open("serial0", history=False)
            assert fresh.opened[fresh_serial].history_length == 0
            late.write(serial, b"X")
            await fresh.pump(lambda: b"X" in fresh.output.get(fresh_serial, b""))
            assert fresh.seen(fresh_serial) == b"X"
        finally:
            await fresh.close()
    finally:
        await late.close()


async def test_two_viewers_share_a_console(make_rig: MakeRig) -> None:
    rig = await make_rig()
    a, b = await viewer(rig), await viewer(rig)
    try:
        sa, sb = await a.open("serial0"), await b.open("serial0")
        await a.pump(lambda: DEFAULT_BANNER in a.seen(sa))
        a.write(sa, b"from-a")
        b.write(sb, b"from-b")
        # Each sees both: its own echo and the other's (fan-out of output,
        # fan-in of input).
        for who, console in ((a, sa), (b, sb)):
            await who.pump(
                lambda who=who, console=console: (
                    b"from-a" in who.seen(console) and b"from-b" in who.seen(console)
                )
            )
    finally:
        await a.close()
        await b.close()


async def test_audio_through_the_gateway(make_rig: MakeRig) -> None:
    rig = await make_rig()
    v = await viewer(rig, audio=True)
    try:
        await v.pump(lambda: len(v.audio_chunks) > 0)
        start = len(v.audio_pcm)
        t0 = v.audio_chunks[-1][0]
        await v.pump(lambda: v.audio_chunks[-1][0] - t0 >= 1.5)
        t1 = v.audio_chunks[-1][0]
        rate = (len(v.audio_pcm) - start) / (t1 - t0)
        assert v.audio is not None
        fmt = v.audio.format
        assert rate == pytest.approx(fmt.byte_rate, rel=0.15)
        assert analyse(bytes(v.audio_pcm[start:]), fmt).frequency_hz == pytest.approx(
            tone_frequency(440), abs=8
        )
    finally:
        await v.close()


async def test_unread_console_stalls_nothing_else(make_rig: MakeRig) -> None:
    """A console whose reader grants no credit holds back only itself: audio and the
    other console on the same connection keep flowing; granting later loses nothing."""
    rig = await make_rig()
    slow = await viewer(rig, audio=True)
    typist = await viewer(rig)
    try:
        window = 64
        stalled = await slow.open("serial0", window=window, auto_credit=False)
        typed = await typist.open("serial0")
        await typist.pump(lambda: DEFAULT_BANNER in typist.seen(typed))
        payload = bytes(range(65, 91)) * 20  # 520 bytes the guest echoes back
        for offset in range(0, len(payload), 64):
            typist.write(typed, payload[offset : offset + 64])
        await typist.pump(lambda: payload in typist.output.get(typed, b""))
        # The slow viewer got exactly its window, and no more, while its audio flows...
        await slow.pump(lambda: len(slow.seen(stalled)) >= window)
        chunks_before = len(slow.audio_chunks)
        monitor = await slow.open("monitor")
        slow.write(monitor, b"info status\n")
        await slow.pump(
            lambda: (
                b"VM status: running" in slow.seen(monitor)
                and len(slow.audio_chunks) > chunks_before + 20
            )
        )
        assert len(slow.seen(stalled)) == window
        # ...and once it reads, everything arrives, in order.
        slow.consoles.grant(stalled, 4096)
        slow.client.flush()
        await slow.pump(lambda: payload in slow.seen(stalled))
        assert slow.seen(stalled).startswith(DEFAULT_BANNER)
    finally:
        await slow.close()
        await typist.close()


async def test_overrun_closes_only_the_slow_console(make_rig: MakeRig) -> None:
    rig = await make_rig(history=256)
    slow, typist = await viewer(rig), await viewer(rig)
    try:
        stalled = await slow.open("serial0", window=16, auto_credit=False, history=False)
        typed = await typist.open("serial0", history=False)
        payload = b"0123456789abcdef" * 40  # 640 bytes echoed: more than the 256-byte ring
        await typist.pump(lambda: rig.gateway.hubs[typed].total >= len(DEFAULT_BANNER))
        for offset in range(0, len(payload), 64):
            typist.write(typed, payload[offset : offset + 64])
        await typist.pump(lambda: payload in typist.output.get(typed, b""))
        await slow.pump(lambda: stalled in slow.closed)
        assert slow.closed[stalled].reason is CloseReason.OVERRUN
        assert typed not in typist.closed
    finally:
        await slow.close()
        await typist.close()


async def test_host_end_gone_closes_the_console_with_a_reason(make_rig: MakeRig) -> None:
    """QEMU moves serial0's chardev to another socket (`chardev-change`, typed on
    the monitor through the gateway): the gateway's connection to it is gone, and
    the viewer that had serial0 open gets CLOSED, backend error, saying so. The
    console stays listed; once the chardev is back where the gateway looks, the
    viewer opens it again and types."""
    rig = await make_rig()
    v = await viewer(rig)
    try:
        serial = await v.open("serial0")
        await v.pump(lambda: DEFAULT_BANNER in v.seen(serial))
        monitor = await v.open("monitor", history=False)
        elsewhere = rig.guest.workdir / "moved.sock"
        original = rig.guest.serial_path
        v.write(
            monitor, f"chardev-change serial0 socket,path={elsewhere},server=on,wait=off\n".encode()
        )
        await v.pump(lambda: serial in v.closed)
        closed = v.closed[serial]
        assert closed.reason is CloseReason.BACKEND_ERROR
        assert "host end went away" in closed.message, closed
        assert v.consoles.by_name("serial0") is not None  # still listed
        # Where v's output of serial0 stopped: the host end attaches again there.
        left_at = StreamPosition(
            v.opened[serial].stream_id, v.opened[serial].replay_from + len(v.seen(serial))
        )
        del v.opened[serial]
        serial = await v.open("serial0", history=False)
        v.write(
            monitor, f"chardev-change serial0 socket,path={original},server=on,wait=off\n".encode()
        )
        # Typed until echoed: what reaches QEMU before the gateway is back on the
        # chardev is held by the gateway, but the first byte after a chardev-change
        # may be lost inside QEMU.
        async with asyncio.timeout(TIMEOUT):
            while b"back again" not in v.output.get(serial, b""):
                v.write(serial, b"back again")
                with contextlib.suppress(TimeoutError):
                    await v.pump(lambda: b"back again" in v.output.get(serial, b""), timeout=1.0)
        # A viewer that asks for marks gets one in the history, where the host end
        # attached again: the banner before it, the new echo after it.
        late = await viewer(rig)
        try:
            again = await late.open("serial0", marks=True)
            await late.pump(lambda: b"back again" in late.seen(again))
            (mark,) = [e for e in late.events if isinstance(e, ConsoleMark)]
            assert mark.kind is MarkKind.REATTACHED
            assert "attached again" in mark.message
            before = late.events[: late.events.index(mark)]
            after = late.events[late.events.index(mark) :]
            data_before = b"".join(e.data for e in before if isinstance(e, ConsoleData))
            data_after = b"".join(e.data for e in after if isinstance(e, ConsoleData))
            assert DEFAULT_BANNER in data_before
            assert b"back again" not in data_before
            assert b"back again" in data_after
        finally:
            await late.close()
        # A viewer that resumes from where v stopped gets the mark first: the
        # point is its resume point, and it has the output before it.
        resumer = await viewer(rig)
        try:
            again = await resumer.open("serial0", marks=True, resume=left_at)
            assert resumer.opened[again].resumed is Resumed.EXACT
            await resumer.pump(lambda: b"back again" in resumer.seen(again))
            (mark,) = [e for e in resumer.events if isinstance(e, ConsoleMark)]
            assert mark.kind is MarkKind.REATTACHED
            replayed = [e for e in resumer.events if isinstance(e, ConsoleMark | ConsoleData)]
            assert replayed[0] == mark
            assert DEFAULT_BANNER not in resumer.seen(again)
        finally:
            await resumer.close()
    finally:
        await v.close()


async def test_consoles_come_and_go(make_rig: MakeRig, tmp_path: Path) -> None:
    """ADDED and REMOVED while connected, with a local socket peer as the chardev;
    output written while nobody had it open is replayed (up to the ring)."""
    rig = await make_rig()
    peer_path = str(rig.guest.workdir / "extra.sock")
    peer_writers: list[asyncio.StreamWriter] = []
    attached = asyncio.Event()

    async def on_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_writers.append(writer)
        attached.set()
        writer.write(b"written while nobody listened\n")
        await writer.drain()
        while data := await reader.read(4096):
            writer.write(data.upper())

    server = await asyncio.start_unix_server(on_peer, peer_path)
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        spec = ConsoleSpec("channel0", ConsoleKind.CHANNEL, Endpoint(EndpointType.UNIX, peer_path))
        hub = await rig.gateway.add_console(spec)
        await v.pump(lambda: any(isinstance(e, ConsoleAdded) for e in v.events))
        await asyncio.wait_for(attached.wait(), TIMEOUT)
        await v.pump(lambda: hub.total > 0)
        channel = await v.open("channel0")
        v.write(channel, b"shout")
        await v.pump(lambda: b"SHOUT" in v.output.get(channel, b""))
        assert v.history[channel] == b"written while nobody listened\n"
        await rig.gateway.remove_console("channel0")
        await v.pump(lambda: any(isinstance(e, ConsoleRemoved) for e in v.events))
        assert v.closed[channel].reason is CloseReason.REMOVED
        assert v.consoles.by_name("channel0") is None
    finally:
        await v.close()
        server.close()
        for writer in peer_writers:
            writer.close()


async def test_pty_console(make_rig: MakeRig) -> None:
    """A PTY host end (what libvirt's <serial type='pty'> gives), with a real pty pair."""
    rig = await make_rig()
    master, slave = os.openpty()
    tty.setraw(master)
    os.set_blocking(master, False)
    slave_path = os.ttyname(slave)
    os.close(slave)
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        await rig.gateway.add_console(
            ConsoleSpec("serial9", ConsoleKind.SERIAL, Endpoint(EndpointType.PTY, slave_path))
        )
        await v.pump(lambda: v.consoles.by_name("serial9") is not None)
        hub = next(h for h in rig.gateway.hubs.values() if h.name == "serial9")
        await asyncio.wait_for(hub.wait_connected(), TIMEOUT)
        pty_id = await v.open("serial9")
        os.write(master, b"from the pty side")
        await v.pump(lambda: b"from the pty side" in v.seen(pty_id))
        v.write(pty_id, b"to the pty side")
        received = b""
        async with asyncio.timeout(TIMEOUT):
            while b"to the pty side" not in received:
                await asyncio.sleep(0.02)
                with contextlib.suppress(BlockingIOError):
                    received += os.read(master, 4096)
    finally:
        await v.close()
        os.close(master)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def server_context(pki: Pki, verify_clients: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if verify_clients:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(pki.ca_cert))
    return context


async def test_gateway_tls_and_password(make_rig: MakeRig, pki: Pki) -> None:
    security = ServerSecurity(vnc_password="gw-pass", tls_context=server_context(pki, True))
    rig = await make_rig(security=security, tcp=True)
    creds = TlsCredentials(
        ca_file=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key
    )
    v = await viewer(rig, tls=creds, password="gw-pass")
    try:
        assert v.client.info is not None
        assert v.client.info.security == "VENCRYPT/X509_VNC"
        serial = await v.open("serial0")
        await v.pump(lambda: DEFAULT_BANNER in v.seen(serial))
    finally:
        await v.close()
    with pytest.raises(AuthenticationFailed):
        await viewer(rig, tls=creds, password="wrong")
    with pytest.raises(TlsError, match="not trusted"):
        await viewer(rig, tls=TlsCredentials(ca_file=pki.other_ca_cert), password="gw-pass")


async def test_viewer_without_consoles_is_a_plain_proxy(make_rig: MakeRig) -> None:
    """A viewer that does not ask for consoles never sees a console message."""
    rig = await make_rig()
    audio = QemuAudio()
    client = await connect(rig.address, extensions=[audio], timeout=TIMEOUT)
    try:
        pcm = 0
        async with asyncio.timeout(TIMEOUT):
            while pcm < 44100:
                event = await client.next_event()
                if isinstance(event, AudioData):
                    pcm += len(event.data)
                assert not isinstance(event, ConsolesAnnounced)
    finally:
        await client.close()


async def test_bad_viewer_is_disconnected_with_a_reason(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """A viewer sending a console message without having asked for the extension,
    then garbage: disconnected with a logged reason; the gateway serves others."""
    rig = await make_rig()
    caplog.set_level(logging.WARNING, logger="resourced.gateway")
    path = rig.address.removeprefix("unix:")
    reader, writer = await asyncio.open_unix_connection(path)
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.write(b"RFB 003.008\n")
    assert await reader.readexactly(2) == b"\x01\x01"
    writer.write(b"\x01")
    assert await reader.readexactly(4) == b"\0\0\0\0"
    writer.write(b"\x01")  # ClientInit
    await reader.readexactly(24)  # ServerInit up to the name length
    writer.write(b"\xff\x02\x00" + struct.pack("!IIIB", 1, 100, 100, 1))
    async with asyncio.timeout(TIMEOUT):
        while await reader.read(65536):
            pass  # the gateway closes the connection
    writer.close()
    assert any("never asked for them" in r.getMessage() for r in caplog.records)
    v = await viewer(rig)
    try:
        serial = await v.open("serial0")
        await v.pump(lambda: DEFAULT_BANNER in v.seen(serial))
    finally:
        await v.close()


async def gvnccapture(host: str, port: int, out: Path) -> bytes:
    """A screenshot by gtk-vnc's gvnccapture (a viewer we did not write); TCP only."""
    process = await asyncio.create_subprocess_exec(
        "gvnccapture",
        f"{host}:{port - 5900}",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(TIMEOUT):
        output, _ = await process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")
    return await asyncio.to_thread(out.read_bytes)


async def test_gvnccapture_sees_the_same_display(make_rig: MakeRig, tmp_path: Path) -> None:
    """Display pass-through: gtk-vnc's screenshot through the gateway equals its
    screenshot taken straight from QEMU (the guest hides its cursor, so a still
    screen is byte-for-byte the same PNG)."""
    qemu_port = free_port()
    rig = await make_rig(guest_options={"vnc_tcp_port": qemu_port}, tcp=True)
    v = await viewer(rig)
    try:  # wait until the guest has drawn its banner
        serial = await v.open("serial0")
        await v.pump(lambda: DEFAULT_BANNER in v.seen(serial))
    finally:
        await v.close()
    gateway_port = next(iter(rig.gateway.tcp_ports))
    direct = await gvnccapture("127.0.0.1", qemu_port, tmp_path / "direct.png")
    through = await gvnccapture("127.0.0.1", gateway_port, tmp_path / "gateway.png")
    assert direct[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack("!II", direct[16:24])
    assert (width, height) == (720, 400)  # VGA text mode
    assert through == direct


class _Flag(logging.Handler):
    """Sets an event when a log record containing `text` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.text in message:
            self.event.set()


async def test_viewer_that_stops_reading_is_dropped(make_rig: MakeRig) -> None:
    """Memory per viewer is bounded: a viewer that takes audio but never reads is
    throttled, then disconnected with a logged reason; others carry on."""
    rig = await make_rig(write_high_water=64 * 1024, slow_client_timeout=2.0)
    flag = _Flag("viewer stopped reading")
    logger = logging.getLogger("resourced.gateway")
    logger.addHandler(flag)
    try:
        stuck = await connect(rig.address, extensions=[QemuAudio()], timeout=TIMEOUT)
        # Let the audio ack arrive and enable audio, then never read again.
        async with asyncio.timeout(TIMEOUT):
            while not isinstance(await stuck.next_event(), AudioData):
                pass
        await asyncio.wait_for(flag.event.wait(), TIMEOUT)
        # The stuck viewer, reading again, finds the connection closed behind what
        # was queued for it.
        with pytest.raises((ConnectionClosed, RemoteProtocolError)):  # noqa: PT012
            async with asyncio.timeout(TIMEOUT):
                while not isinstance(await stuck.next_event(), ServerClosed):
                    pass
                await stuck.next_event()
        healthy = await viewer(rig)
        try:
            serial = await healthy.open("serial0")
            await healthy.pump(lambda: DEFAULT_BANNER in healthy.seen(serial))
        finally:
            await healthy.close()
        await stuck.close()
    finally:
        logger.removeHandler(flag)


async def test_console_output_for_a_stalled_viewer_waits_in_the_hub(make_rig: MakeRig) -> None:
    """A viewer that stops reading while a console floods it: the gateway queues at
    most CONSOLE_HIGH_WATER (plus one message) for it, QEMU's display is not held
    back for that, the hub stops reading the host end, and once the viewer reads
    again every byte arrives, in order."""
    rig = await make_rig()
    peer_path = str(rig.guest.workdir / "flood.sock")
    payload = bytes(range(251)) * (4 * 1024 * 1024 // 251)  # ~4 MiB, not a power of two
    peer_writers: list[asyncio.StreamWriter] = []

    async def on_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_writers.append(writer)
        await reader.readexactly(1)  # the viewer's "go"
        writer.write(payload)
        await writer.drain()

    server = await asyncio.start_unix_server(on_peer, peer_path)
    v = await viewer(rig)
    try:
        await v.pump(lambda: v.consoles.announced)
        spec = ConsoleSpec("flood0", ConsoleKind.CHANNEL, Endpoint(EndpointType.UNIX, peer_path))
        hub = await rig.gateway.add_console(spec)
        hub.stall_timeout = TIMEOUT  # this reader comes back: it must not be given up on
        await v.pump(lambda: v.consoles.by_name("flood0") is not None)
        flood = await v.open("flood0", window=8 * 1024 * 1024, history=False)
        (session,) = rig.gateway.sessions
        v.client.pause_reading()
        v.write(flood, b"!")
        async with asyncio.timeout(TIMEOUT):
            while not hub.paused:  # noqa: ASYNC110 (a hub offers no event for this)
                await asyncio.sleep(0.01)
        assert session._transport is not None
        queued = session._transport.get_write_buffer_size()
        assert queued <= CONSOLE_HIGH_WATER + MAX_CONSOLE_DATA + 16
        assert not session._upstream_held  # display and audio still flow to it
        assert hub.total < len(payload)  # the rest waits in the peer and the kernel
        v.client.resume_reading()
        await v.pump(lambda: len(v.output.get(flood, b"")) >= len(payload))
        assert v.output[flood] == payload
        assert flood not in v.closed
    finally:
        await v.close()
        server.close()
        for writer in peer_writers:
            writer.close()


async def test_a_viewer_resumes_where_it_left_off(make_rig: MakeRig) -> None:
    """Stream positions against the real gateway and QEMU: a viewer that comes
    back asks for what came after its last byte and gets exactly that; once the
    ring no longer holds it, it is told how much it lost; an old client (no
    positions) gets a plain OPENED with everything held."""
    rig = await make_rig(history=256)
    typist = await viewer(rig)
    first = await viewer(rig)
    try:
        typed = await typist.open("serial0", history=False)
        serial = await first.open("serial0")
        opened = first.opened[serial]
        assert opened.stream_id != 0
        assert opened.position is not None
        await first.pump(lambda: DEFAULT_BANNER in first.seen(serial))
        typist.write(typed, b"one")
        await first.pump(lambda: first.seen(serial).endswith(b"one"))
        left_at = StreamPosition(opened.stream_id, opened.replay_from + len(first.seen(serial)))
        await first.close()

        # Printed while it is away; it comes back for exactly that.
        typist.write(typed, b"two")
        await typist.pump(lambda: typist.seen(typed).endswith(b"onetwo"))
        back = await viewer(rig)
        try:
            serial = await back.open("serial0", resume=left_at)
            await back.pump(lambda: back.seen(serial) == b"two")
            assert back.opened[serial].resumed is Resumed.EXACT
            assert back.opened[serial].stream_id == left_at.stream_id
            assert back.opened[serial].replay_from == left_at.offset
            left_at = StreamPosition(left_at.stream_id, left_at.offset + 3)
        finally:
            await back.close()

        # More than the ring holds while it is away: told how much is lost.
        for _ in range(4):
            typist.write(typed, b"x" * 99 + b".")
            await typist.pump(lambda: typist.seen(typed).endswith(b"."))
            typist.output[typed].clear()
        late = await viewer(rig)
        try:
            serial = await late.open("serial0", resume=left_at)
            answer = late.opened[serial]
            assert answer.resumed is Resumed.GAP
            assert answer.replay_from - left_at.offset == 400 - answer.history_length
            await late.pump(lambda: len(late.seen(serial)) == answer.history_length)
            assert late.seen(serial).endswith(b"x" * 99 + b".")
        finally:
            await late.close()

        # A client without positions (an older one) gets OPENED, with all held.
        old = await viewer(rig)
        try:
            await old.pump(lambda: old.consoles.announced)
            old.consoles.positions = False  # as if it never read HELLO's flag
            serial = await old.open("serial0")
            assert old.opened[serial].stream_id == 0
            assert old.opened[serial].history_length == answer.end - answer.start
        finally:
            await old.close()
    finally:
        await typist.close()
