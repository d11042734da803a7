"""Below and around the RFB messages the gateway must behave like QEMU's VNC server.

What a viewer can tell apart besides the messages themselves: TLS records and
versions (QEMU's gnutls server sends no session tickets; TigerVNC 1.12 hung on
ours; checked against QEMU itself with a hand-driven TLS client), how long the
server waits (QEMU sets no handshake deadline, so a person may take their time
over the password prompt), what a half-close means (the viewer has left), and
socket options (QEMU turns Nagle off). Each test
meets the gateway with a viewer nobody here wrote: TigerVNC's `vncviewer` under
Xvfb over VeNCrypt X509, gtk-vnc's `gvnccapture` typing its password late on a
terminal, beside real QEMU under TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import shutil
import socket
import ssl
import struct
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from resourced.demo.qemu import QemuGuest
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.rfb.aio import connect
from resourced.rfb.server import ServerSecurity
from resourced.rfb.tls import server_context
from tests.certs import Pki, make_pki
from tests.integration.conftest import MakeGuest
from tests.integration.test_gateway import free_port

TIMEOUT = 60.0
PASSWORD = "s3cret"
VNCVIEWER = "/usr/bin/vncviewer"
XVFB = "/usr/bin/Xvfb"
GVNCCAPTURE = "/usr/bin/gvnccapture"


@pytest.fixture
def pki(guest_dir: Path) -> Pki:
    # TigerVNC checks a Unix socket's path against the certificate as a host name
    # (a mismatch is a dialog, which would hang under Xvfb): name it too.
    return make_pki(guest_dir / "pki", server_names=("localhost", str(guest_dir / "gw.sock")))


@pytest.fixture
async def gateways() -> AsyncIterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        await gateway.close()


async def start_gateway(gateways: list[Gateway], config: GatewayConfig) -> Gateway:
    gateway = Gateway(config)
    gateways.append(gateway)
    await gateway.start()
    return gateway


async def query_vnc_clients(guest: QemuGuest) -> int:
    """How many clients QEMU's VNC server has (QMP query-vnc, `info vnc`'s source)."""
    info = await guest.qmp("query-vnc")
    return len(info.get("clients", []))


# ---------------------------------------------------------------------------
# The X screen, read back from Xvfb's -fbdir file, and QEMU's own screendump
# ---------------------------------------------------------------------------


@dataclass
class Image:
    width: int
    height: int
    pixels: bytes  # RGB, 3 bytes a pixel, rows top to bottom

    def at(self, x: int, y: int) -> bytes:
        i = (y * self.width + x) * 3
        return self.pixels[i : i + 3]

    def lit(self) -> list[tuple[int, int]]:
        """Where the pixels are not black (the text on a text-mode screen)."""
        black = b"\0\0\0"
        return [
            (x, y) for y in range(self.height) for x in range(self.width) if self.at(x, y) != black
        ]


def read_xwd(path: Path) -> Image:
    """Xvfb's screen file (XWD): a header of CARD32s in the server's byte order,
    colour map entries of 12 bytes, then rows of 32-bit pixels with their masks."""
    data = path.read_bytes()
    order = ">" if struct.unpack_from(">I", data, 4)[0] == 7 else "<"  # file_version 7
    header = struct.unpack_from(order + "20I", data, 0)
    header_size, width, height = header[0], header[4], header[5]
    byte_order, bits_per_pixel, bytes_per_line = header[7], header[11], header[12]
    masks, ncolors = header[14:17], header[19]
    assert bits_per_pixel == 32, f"Xvfb screen of depth {bits_per_pixel}: start it with x24"
    assert masks == (0xFF0000, 0xFF00, 0xFF), masks
    start = header_size + 12 * ncolors
    pixel = struct.Struct("<I" if byte_order == 0 else ">I")
    out = bytearray()
    for y in range(height):
        row = start + y * bytes_per_line
        for x in range(width):
            value = pixel.unpack_from(data, row + 4 * x)[0]
            out += bytes(((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF))
    return Image(width, height, bytes(out))


def read_ppm(path: Path) -> Image:
    """QEMU's screendump: binary PPM (P6) with maxval 255."""
    data = path.read_bytes()
    magic, size, maxval, pixels = data.split(b"\n", 3)
    assert (magic, maxval) == (b"P6", b"255")
    width, height = map(int, size.split())
    return Image(width, height, pixels[: width * height * 3])


def shows(screen: Image, guest: Image) -> float:
    """The share of the guest screen's lit pixels that the X screen shows, in the
    same colour, once the two are aligned on their top-left lit pixel (the
    viewer's window may sit anywhere on the X screen). 0 when nothing is lit."""
    guest_lit = guest.lit()
    screen_lit = screen.lit()
    if len(guest_lit) < 100 or not screen_lit:
        return 0.0
    dx = min(x for x, _ in screen_lit) - min(x for x, _ in guest_lit)
    dy = min(y for _, y in screen_lit) - min(y for _, y in guest_lit)
    same = 0
    for x, y in guest_lit:
        sx, sy = x + dx, y + dy
        if 0 <= sx < screen.width and 0 <= sy < screen.height:
            same += screen.at(sx, sy) == guest.at(x, y)
    return same / len(guest_lit)


@dataclass
class Display:
    name: str  # for DISPLAY
    screen_file: Path


@pytest.fixture
def xvfb(guest_dir: Path) -> Iterator[Display]:
    """A private X server whose screen can be read back (Xvfb -fbdir)."""
    assert shutil.which(XVFB), f"{XVFB} (Debian package xvfb) is missing"
    fbdir = guest_dir / "fb"
    fbdir.mkdir()
    read, write = os.pipe()
    # -displayfd: Xvfb picks a free display itself and says which (no races with
    # other tests' X servers); -br: a black root, so only windows are lit.
    command = [XVFB, "-displayfd", str(write), "-screen", "0", "1024x768x24"]
    command += ["-fbdir", str(fbdir), "-nolisten", "tcp", "-br"]
    process = subprocess.Popen(
        command,
        pass_fds=[write],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as announced:
            number = announced.readline().strip()
        assert number.isdigit(), f"Xvfb did not start (exit status {process.poll()})"
        yield Display(f":{number}", fbdir / "Xvfb_screen0")
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)


async def wait_until_shown(guest: QemuGuest, display: Display, work: Path) -> float:
    """Wait until the X screen shows QEMU's screen (a TCG guest may still be
    printing); return the last share seen."""
    share = 0.0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        dump = work / "guest.ppm"
        await guest.qmp("screendump", filename=str(dump))
        share = shows(read_xwd(display.screen_file), read_ppm(dump))
        if share >= 0.95:
            break
        await asyncio.sleep(0.5)
    return share


# ---------------------------------------------------------------------------
# TigerVNC over VeNCrypt X509: the session works end to end
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subtype", "password", "transport"),
    [("X509Vnc", PASSWORD, "tcp"), ("X509None", None, "tcp"), ("X509Vnc", PASSWORD, "unix")],
)
async def test_tigervnc_over_tls(
    make_guest: MakeGuest,
    gateways: list[Gateway],
    pki: Pki,
    xvfb: Display,
    guest_dir: Path,
    caplog: pytest.LogCaptureFixture,
    subtype: str,
    password: str | None,
    transport: str,
) -> None:
    """TigerVNC 1.12 finishes VeNCrypt X509* with the gateway, over TCP and over
    its Unix socket, and shows the guest's screen: QEMU's own screendump appears,
    pixel for pixel, on the viewer's X screen.
    (With TLS 1.3 session tickets it hung waiting for the challenge.)"""
    assert shutil.which(VNCVIEWER), f"{VNCVIEWER} (Debian package tigervnc-viewer) is missing"
    caplog.set_level(logging.INFO, logger="resourced.gateway")
    guest = await make_guest(audio=False)
    security = ServerSecurity(
        vnc_password=password, tls_context=server_context(pki.server_cert, pki.server_key)
    )
    config = GatewayConfig(upstream=f"unix:{guest.vnc_path}", security=security)
    gateway = await start_gateway(gateways, config)
    if transport == "tcp":
        port = free_port()
        await gateway.listen_tcp("127.0.0.1", port)
        address = f"127.0.0.1::{port}"
    else:
        address = str(guest_dir / "gw.sock")  # vncviewer takes a socket's path as is
        await gateway.listen_unix(address)
    home = guest_dir / "home"  # TigerVNC keeps its settings and known hosts there
    home.mkdir()
    env = dict(os.environ, DISPLAY=xvfb.name, HOME=str(home))
    if password is not None:
        env["VNC_PASSWORD"] = password  # what its password dialog would have asked
    log_path = guest_dir / "vncviewer.log"
    with log_path.open("wb") as log:
        viewer = await asyncio.create_subprocess_exec(
            VNCVIEWER,
            "-SecurityTypes",
            subtype,
            "-X509CA",
            str(pki.ca_cert),
            "-NoJPEG",  # lossless, so the pixels can be compared
            "-Log",
            "*:stderr:30",
            address,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
    try:
        share = await wait_until_shown(guest, xvfb, guest_dir)
        viewer_log = log_path.read_text(errors="replace")
        assert share >= 0.95, f"the viewer shows {share:.0%} of the guest's screen:\n{viewer_log}"
        assert viewer.returncode is None, viewer_log
        assert await query_vnc_clients(guest) == 1  # the gateway's own connection
        relayed = [r.getMessage() for r in caplog.records if "connected to unix:" in r.getMessage()]
        assert len(relayed) == 1, relayed
        # TLS 1.3, where the tickets were sent after the handshake.
        (session,) = gateway.sessions
        assert session.server.tls_version == "TLSv1.3"
    finally:
        if viewer.returncode is None:
            viewer.terminate()
        async with asyncio.timeout(TIMEOUT):
            await viewer.wait()


# ---------------------------------------------------------------------------
# TLS records and versions, side by side with QEMU's (gnutls)
# ---------------------------------------------------------------------------


@dataclass
class TlsSeen:
    version: str | None  # None: the server refused the version
    ticket: bool
    first: bytes  # the first 4 bytes inside TLS (X509None: the SecurityResult)


async def x509_none_tls(path: Path, version: ssl.TLSVersion, ca: Path) -> TlsSeen:
    """Reach VeNCrypt X509None on the Unix socket `path` by hand, then do TLS at
    exactly `version` and read the SecurityResult inside it."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        async with asyncio.timeout(TIMEOUT):
            await reader.readexactly(12)
            writer.write(b"RFB 003.008\n")
            count = (await reader.readexactly(1))[0]
            assert 19 in await reader.readexactly(count)
            writer.write(b"\x13")
            assert await reader.readexactly(2) == b"\0\x02"
            writer.write(b"\0\x02")
            assert await reader.readexactly(2) == b"\0\x01"
            assert await reader.readexactly(4) == (260).to_bytes(4, "big")  # X509None
            writer.write((260).to_bytes(4, "big"))
            assert await reader.readexactly(1) == b"\x01"
            context = ssl.create_default_context(cafile=ca)
            context.check_hostname = False  # a Unix socket has no name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is
                context.minimum_version = context.maximum_version = version
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL try TLS 1.0/1.1
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing)
            plain = b""
            while len(plain) < 4:
                try:
                    tls.do_handshake()
                    plain += tls.read(4 - len(plain))
                except ssl.SSLWantReadError:
                    writer.write(outgoing.read())
                    data = await reader.read(65536)
                    if not data:
                        return TlsSeen(None, False, b"")
                    incoming.write(data)
                except ssl.SSLError:
                    return TlsSeen(None, False, b"")
            assert tls.session is not None
            return TlsSeen(tls.version(), tls.session.has_ticket, plain)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_tls_like_qemu(make_guest: MakeGuest, gateways: list[Gateway], pki: Pki) -> None:
    """No session tickets from either, in TLS 1.2 or 1.3. QEMU's gnutls also takes
    TLS 1.0 and 1.1, the gateway does not: the one difference kept (no maintained
    viewer needs them, and OpenSSL allows them only at security level 0)."""
    guest = await make_guest(audio=False, tls_dir=pki.server_dir)
    security = ServerSecurity(tls_context=server_context(pki.server_cert, pki.server_key))
    gateway = await start_gateway(
        gateways, GatewayConfig(upstream=f"unix:{guest.vnc_path}", security=security)
    )
    path = guest.workdir / "gw.sock"
    await gateway.listen_unix(str(path))
    ok = b"\0\0\0\0"
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        for server in (guest.vnc_path, path):
            assert await x509_none_tls(server, version, pki.ca_cert) == TlsSeen(name, False, ok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # naming TLS 1.1 is, too
        old = ssl.TLSVersion.TLSv1_1
    assert await x509_none_tls(guest.vnc_path, old, pki.ca_cert) == TlsSeen("TLSv1.1", False, ok)
    assert (await x509_none_tls(path, old, pki.ca_cert)).version is None


# ---------------------------------------------------------------------------
# A person typing the password late: QEMU waits, and so must the gateway
# ---------------------------------------------------------------------------


async def gvnccapture_typing_late(port: int, output: Path, delay: float) -> tuple[int, str]:
    """gvnccapture to 127.0.0.1:port, its password typed on its terminal `delay`
    seconds after it starts (it reads the password from a terminal only)."""
    assert shutil.which(GVNCCAPTURE), f"{GVNCCAPTURE} (Debian package gvncviewer) is missing"
    master, slave = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            GVNCCAPTURE,
            f"127.0.0.1:{port - 5900}",
            str(output),
            stdin=slave,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        os.close(slave)
        slave = -1
        assert process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            # It asks once the server's challenge is in: from here a person is typing.
            prompt = await process.stdout.readuntil(b"Password:")
        await asyncio.sleep(delay)
        os.write(master, PASSWORD.encode() + b"\n")
        async with asyncio.timeout(TIMEOUT):
            rest, _ = await process.communicate()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert process.returncode is not None
    return process.returncode, (prompt + rest).decode(errors="replace")


async def test_password_typed_after_the_handshake_timeout(
    make_guest: MakeGuest, gateways: list[Gateway], guest_dir: Path
) -> None:
    """The handshake deadline does not count the time a person spends at the
    password prompt: QEMU (which has no deadline) and the gateway both accept a
    password typed well after the gateway's `handshake_timeout`."""
    handshake_timeout = 2.0
    late = 2.5 * handshake_timeout
    qemu_port = free_port()  # 6000 and up: a VNC display number for QEMU
    guest = await make_guest(audio=False, vnc_password=True, vnc_tcp_port=qemu_port)
    await guest.set_vnc_password(PASSWORD)
    config = GatewayConfig(
        upstream=f"127.0.0.1::{qemu_port}",
        upstream_password=PASSWORD,
        security=ServerSecurity(vnc_password=PASSWORD),
        handshake_timeout=handshake_timeout,
    )
    gateway = await start_gateway(gateways, config)
    gateway_port = free_port()
    await gateway.listen_tcp("127.0.0.1", gateway_port)

    for name, port in (("qemu", qemu_port), ("gateway", gateway_port)):
        shot = guest_dir / f"{name}.png"
        status, said = await gvnccapture_typing_late(port, shot, late)
        assert status == 0, f"{name}: {said}"
        assert shot.read_bytes().startswith(b"\x89PNG"), name


async def test_a_silent_viewer_is_still_cut_off(
    make_guest: MakeGuest, gateways: list[Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """Before the challenge nobody is typing: a viewer that goes quiet there is
    disconnected after `handshake_timeout` (a fake peer: real viewers do not stall)."""
    caplog.set_level(logging.WARNING, logger="resourced.gateway")
    guest = await make_guest(audio=False)
    config = GatewayConfig(
        upstream=f"unix:{guest.vnc_path}",
        security=ServerSecurity(vnc_password=PASSWORD),
        handshake_timeout=1.0,
    )
    gateway = await start_gateway(gateways, config)
    path = guest.workdir / "gw.sock"
    await gateway.listen_unix(str(path))
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(12) == b"RFB 003.008\n"
            writer.write(b"RFB 003.008\n")  # ...and then nothing: no security type
            assert await reader.readexactly(2) == b"\x01\x02"
            assert await reader.read() == b""  # cut off
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "handshake not finished within 1 s" in m and "choice of security type" in m
        for m in messages
    ), messages


async def test_auth_timeout_bounds_the_wait_when_asked(
    make_guest: MakeGuest, gateways: list[Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """`auth_timeout` (--auth-timeout) limits the wait for the person when set."""
    caplog.set_level(logging.WARNING, logger="resourced.gateway")
    guest = await make_guest(audio=False)
    config = GatewayConfig(
        upstream=f"unix:{guest.vnc_path}",
        security=ServerSecurity(vnc_password=PASSWORD),
        handshake_timeout=TIMEOUT,
        auth_timeout=1.0,
    )
    gateway = await start_gateway(gateways, config)
    path = guest.workdir / "gw.sock"
    await gateway.listen_unix(str(path))
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        async with asyncio.timeout(TIMEOUT):
            await reader.readexactly(12)
            writer.write(b"RFB 003.008\n\x02")  # VNC Authentication
            await reader.readexactly(2 + 16)  # the types, then the challenge
            assert await reader.read() == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert any(
        "the viewer's user did not answer within 1 s" in r.getMessage() for r in caplog.records
    )


# ---------------------------------------------------------------------------
# A viewer's half-close
# ---------------------------------------------------------------------------


async def half_close_after_server_init(address: str) -> bytes:
    """Do a None-security handshake by hand on `address` (a Unix socket), shut
    down our sending side, and return all the server sends after that."""
    reader, writer = await asyncio.open_unix_connection(address)
    try:
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(12) == b"RFB 003.008\n"
            writer.write(b"RFB 003.008\n")
            count = (await reader.readexactly(1))[0]
            security_types = await reader.readexactly(count)
            assert 1 in security_types, f"security None not offered: {list(security_types)}"
            writer.write(b"\x01")  # None
            assert await reader.readexactly(4) == b"\0\0\0\0"
            writer.write(b"\x01")  # ClientInit, shared
            head = await reader.readexactly(24)
            await reader.readexactly(int.from_bytes(head[20:24], "big"))  # the name
            writer.write_eof()
            return await reader.read()  # until the server closes its side too
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_half_close_ends_the_session_as_with_qemu(
    make_guest: MakeGuest, gateways: list[Gateway]
) -> None:
    """A viewer that shuts down its sending side is gone for QEMU, which closes
    the connection; the gateway does the same, and lets go of QEMU."""
    guest = await make_guest(audio=False)
    assert await half_close_after_server_init(str(guest.vnc_path)) == b""
    config = GatewayConfig(
        upstream=f"unix:{guest.vnc_path}", security=ServerSecurity(allow_none=True)
    )
    gateway = await start_gateway(gateways, config)
    path = guest.workdir / "gw.sock"
    await gateway.listen_unix(str(path))
    assert await half_close_after_server_init(str(path)) == b""
    async with asyncio.timeout(TIMEOUT):
        # QEMU offers its client list, not an event: poll it.
        while gateway.sessions or await query_vnc_clients(guest):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------
# Socket options
# ---------------------------------------------------------------------------


async def test_socket_options_match_qemu(make_guest: MakeGuest, gateways: list[Gateway]) -> None:
    """QEMU turns Nagle off on every VNC client socket (ui/vnc.c, vnc_listen_io:
    qio_channel_set_delay(false)) and sets no TCP keepalive; so does the gateway,
    on the viewer's socket and on its own to QEMU."""
    qemu_port = free_port()  # 6000 and up: a VNC display number for QEMU
    await make_guest(audio=False, vnc_tcp_port=qemu_port)
    config = GatewayConfig(
        upstream=f"127.0.0.1::{qemu_port}", security=ServerSecurity(allow_none=True)
    )
    gateway = await start_gateway(gateways, config)
    port = free_port()
    await gateway.listen_tcp("127.0.0.1", port)
    client = await connect(f"127.0.0.1::{port}", timeout=TIMEOUT)
    try:
        (session,) = gateway.sessions
        assert session.upstream is not None
        # The transports' own sockets (private attributes: the options are what is tested).
        viewer_side = session._transport.get_extra_info("socket")  # type: ignore[union-attr]
        qemu_side = session.upstream._transport.get_extra_info("socket")  # type: ignore[union-attr]
        for sock in (viewer_side, qemu_side):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        await client.close()
