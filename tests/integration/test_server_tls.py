"""`ServerConnection` behind real sockets, met by real clients.

A few lines of asyncio glue (in this file only: read, `receive_data`, events,
write `data_to_send`) put the sans-IO server on a Unix or TCP socket. Our own
asyncio client (`resourced.rfb.aio.connect`) then runs VeNCrypt X509Vnc against
it with real certificates, and gets the right error for a wrong password and for
a server certificate from a CA it does not trust. Debian's `gvnccapture`
(gtk-vnc, the library behind virt-viewer) takes a screenshot from a None-security
server that answers update requests with one Raw rectangle of a solid colour;
the PNG it writes must be 64x48 and of that colour.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from resourced.errors import AuthenticationFailed, ResourcedError, TlsError
from resourced.rfb.aio import connect
from resourced.rfb.encodings import RectangleHeader
from resourced.rfb.messages import (
    FramebufferUpdate,
    FramebufferUpdateRequest,
    KeyEvent,
    Rectangle,
)
from resourced.rfb.pixelformat import RGBX8888, PixelFormat
from resourced.rfb.server import (
    ClientCertificateRejected,
    ClientClosed,
    ClientInitReceived,
    ServerConnection,
    ServerSecurity,
    State,
)
from resourced.rfb.tls import TlsCredentials
from tests.certs import Pki, make_pki

WIDTH, HEIGHT = 64, 48
NAME = "resourced gateway test"
COLOUR = (0x20, 0xA0, 0xF0)
PASSWORD = "s3cret"
TIMEOUT = 10.0

# ---------------------------------------------------------------------------
# The glue: one ServerConnection per accepted socket
# ---------------------------------------------------------------------------


@dataclass
class Session:
    """What one served connection saw."""

    events: list[Any] = field(default_factory=list)
    error: ResourcedError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def solid_pixel(pixel_format: PixelFormat, colour: tuple[int, int, int]) -> bytes:
    """One pixel of `colour` in a true-colour `pixel_format` (rfbproto 7.4)."""
    assert pixel_format.true_colour, "a colour-mapped client would need SetColourMapEntries"
    red, green, blue = colour
    value = (
        (red * pixel_format.red_max // 255) << pixel_format.red_shift
        | (green * pixel_format.green_max // 255) << pixel_format.green_shift
        | (blue * pixel_format.blue_max // 255) << pixel_format.blue_shift
    )
    return value.to_bytes(
        pixel_format.bytes_per_pixel, "big" if pixel_format.big_endian else "little"
    )


def answer(conn: ServerConnection, event: Any) -> None:
    """What the gateway would do: ServerInit once authenticated, and a whole-screen
    Raw rectangle of one colour for every non-incremental update request."""
    if isinstance(event, ClientInitReceived):
        conn.send_server_init(WIDTH, HEIGHT, RGBX8888, NAME)
    elif isinstance(event, FramebufferUpdateRequest) and not event.incremental:
        assert conn.pixel_format is not None
        body = solid_pixel(conn.pixel_format, COLOUR) * (WIDTH * HEIGHT)
        rect = Rectangle(RectangleHeader(0, 0, WIDTH, HEIGHT, 0), body)
        conn.send_raw(FramebufferUpdate((rect,)).serialize())


async def serve_connection(
    conn: ServerConnection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: Session,
) -> None:
    try:
        writer.write(conn.data_to_send())
        while conn.state is not State.CLOSED:
            data = await reader.read(65536)
            conn.receive_data(data)
            try:
                for event in conn.events():
                    session.events.append(event)
                    answer(conn, event)
            finally:
                # Even when the connection just failed: the viewer must still get
                # the failed SecurityResult or the TLS alert.
                writer.write(conn.data_to_send())
                await writer.drain()
            if not data:
                break
    except ResourcedError as err:
        session.error = err
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        session.done.set()


Serve = Callable[[ServerSecurity], Awaitable[tuple[str, list[Session]]]]


@pytest.fixture
async def serve(guest_dir: Path) -> AsyncIterator[Serve]:
    """Start a Unix-socket server; return its `unix:` address and its sessions."""
    servers: list[asyncio.Server] = []

    async def start(security: ServerSecurity) -> tuple[str, list[Session]]:
        path = guest_dir / f"s{len(servers)}.sock"
        sessions: list[Session] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            session = Session()
            sessions.append(session)
            await serve_connection(ServerConnection(security), reader, writer, session)

        servers.append(await asyncio.start_unix_server(handler, str(path)))
        return f"unix:{path}", sessions

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def finished(sessions: list[Session]) -> Session:
    assert len(sessions) == 1
    async with asyncio.timeout(TIMEOUT):
        await sessions[0].done.wait()
    return sessions[0]


# ---------------------------------------------------------------------------
# Our asyncio client against it, over VeNCrypt X509Vnc
# ---------------------------------------------------------------------------


@pytest.fixture
def pki(guest_dir: Path) -> Pki:
    return make_pki(guest_dir / "pki")


def tls_security(pki: Pki) -> ServerSecurity:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki.ca_cert)
    return ServerSecurity(vnc_password=PASSWORD, tls_context=context)


def client_tls(pki: Pki, ca: Path | None = None, *, cert: bool = True) -> TlsCredentials:
    return TlsCredentials(
        ca_file=ca or pki.ca_cert,
        server_name="localhost",
        client_cert=pki.client_cert if cert else None,
        client_key=pki.client_key if cert else None,
    )


async def test_x509_vnc_succeeds(serve: Serve, pki: Pki) -> None:
    address, sessions = await serve(tls_security(pki))
    client = await connect(address, tls=client_tls(pki), password=PASSWORD, timeout=TIMEOUT)
    try:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/X509_VNC"
        assert client.info.tls_version is not None
        assert (client.info.width, client.info.height, client.info.name) == (WIDTH, HEIGHT, NAME)
        client.send(KeyEvent(True, 0xFF0D))
        client.connection.request_update()
        async with asyncio.timeout(TIMEOUT):
            update = await client.next_event()
        assert isinstance(update, FramebufferUpdate)
        assert update.rectangles[0].body == solid_pixel(RGBX8888, COLOUR) * (WIDTH * HEIGHT)
    finally:
        await client.close()
    session = await finished(sessions)
    assert session.error is None
    assert session.events[0] == ClientInitReceived(True)
    assert KeyEvent(True, 0xFF0D) in session.events
    assert session.events[-1] == ClientClosed()


async def test_wrong_password(serve: Serve, pki: Pki) -> None:
    address, sessions = await serve(tls_security(pki))
    with pytest.raises(AuthenticationFailed, match="Authentication failed"):
        await connect(address, tls=client_tls(pki), password="guess", timeout=TIMEOUT)
    session = await finished(sessions)
    assert isinstance(session.error, AuthenticationFailed)


async def test_wrong_ca(serve: Serve, pki: Pki) -> None:
    address, sessions = await serve(tls_security(pki))
    with pytest.raises(TlsError, match="not trusted"):
        await connect(
            address, tls=client_tls(pki, pki.other_ca_cert), password=PASSWORD, timeout=TIMEOUT
        )
    session = await finished(sessions)
    assert session.error is not None  # the client's alert, or its leaving mid-handshake


async def test_missing_client_certificate(serve: Serve, pki: Pki) -> None:
    address, sessions = await serve(tls_security(pki))
    with pytest.raises(ResourcedError):
        await connect(address, tls=client_tls(pki, cert=False), password=PASSWORD, timeout=TIMEOUT)
    session = await finished(sessions)
    assert isinstance(session.error, ClientCertificateRejected)


# ---------------------------------------------------------------------------
# gtk-vnc's gvnccapture against it
# ---------------------------------------------------------------------------

GVNCCAPTURE = "/usr/bin/gvnccapture"


def read_png(data: bytes) -> tuple[int, int, list[list[tuple[int, ...]]]]:
    """Width, height and RGB(A) rows of an 8-bit RGB or RGBA PNG (enough for this)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos = 8
    chunks: dict[bytes, list[bytes]] = {}
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos)
        chunk_type = data[pos + 4 : pos + 8]
        chunks.setdefault(chunk_type, []).append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(
        "!IIBBBBB", chunks[b"IHDR"][0]
    )
    assert (depth, interlace) == (8, 0)
    channels = {2: 3, 6: 4}[colour_type]
    raw = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = width * channels
    rows: list[list[tuple[int, ...]]] = []
    previous = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        # Each row starts with its filter type (PNG spec, section 9).
        kind, row = line[0], bytearray(line[1:])
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up, up_left = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                row[i] = (row[i] + pred) & 0xFF
        rows.append([tuple(row[x : x + channels]) for x in range(0, stride, channels)])
        previous = row
    return width, height, rows


async def test_gvnccapture_takes_a_screenshot(guest_dir: Path) -> None:
    assert shutil.which(GVNCCAPTURE), f"{GVNCCAPTURE} (Debian package gvncviewer) is missing"
    sessions: list[Session] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session()
        sessions.append(session)
        conn = ServerConnection(ServerSecurity(allow_none=True))
        await serve_connection(conn, reader, writer, session)

    # gvnccapture takes only HOST:DISPLAY (TCP port 5900 + DISPLAY), no Unix
    # socket; ephemeral ports lie above 5900, so any free one is a display.
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        assert port >= 5900, f"ephemeral port {port} is below 5900: no display number for it"
        output = guest_dir / "shot.png"
        process = await asyncio.create_subprocess_exec(
            GVNCCAPTURE,
            f"127.0.0.1:{port - 5900}",
            str(output),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(30):
                log, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, log.decode(errors="replace")
        session = await finished(sessions)
    finally:
        server.close()
        await server.wait_closed()

    assert session.error is None, session.error
    assert isinstance(session.events[0], ClientInitReceived)  # gvnccapture asks exclusive
    assert any(isinstance(e, FramebufferUpdateRequest) for e in session.events)
    data = output.read_bytes()
    # The PNG header itself: signature, then IHDR's width and height.
    assert data[12:16] == b"IHDR"
    assert struct.unpack("!II", data[16:24]) == (WIDTH, HEIGHT)
    width, height, rows = read_png(data)
    assert (width, height) == (WIDTH, HEIGHT)
    assert {pixel[:3] for row in rows for pixel in row} == {COLOUR}
