"""Text on the wire as the peers make it: non-ASCII passwords, names and reasons.

Issue #9: a VNC password outside ASCII must key DES with the password's UTF-8
bytes, as QEMU and gtk-vnc do, on both sides of the gateway; a desktop name
comes through as the server wrote it; a server's failure reason is shown without
the NUL QEMU ends it with. The peers are real: QEMU 7.2 (password set over QMP),
gtk-vnc's gvnccapture, and our commands run as subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import struct
import sys
import termios
from pathlib import Path

import pytest

from resourced.demo.qemu import QemuGuest
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.rfb.aio import connect
from resourced.rfb.constants import VeNCryptSubtype
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.server import ServerSecurity
from resourced.rfb.tls import TlsCredentials
from tests.certs import make_pki
from tests.integration.conftest import MakeGuest
from tests.integration.test_gateway import free_port

TIMEOUT = 60.0
#: 8 bytes of UTF-8 (p, ä, s, s, w, ö): all of it keys DES, nothing cut.
PASSWORD = "pässwö"


async def run_probe(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.rfb",
        "probe",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # The password file is UTF-8 whatever the locale says (here ASCII: C
        # locale, Python's UTF-8 mode off).
        env={**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"},
    )
    async with asyncio.timeout(TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def gvnccapture(port: int, out: Path, password: str) -> tuple[int, str]:
    """gtk-vnc's gvnccapture, typing `password` at its prompt as a person would.

    It prints "Password: ", turns the terminal's echo off (discarding what was
    typed before) and reads a line: so the password is typed on a pseudo-terminal
    once echo is off.
    """
    master, slave = os.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            "gvnccapture",
            f"127.0.0.1:{port - 5900}",
            str(out),
            stdin=slave,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        os.close(slave)
        slave = -1
        assert process.stdout is not None
        output = b""
        async with asyncio.timeout(TIMEOUT):
            while b"Password: " not in output:
                chunk = await process.stdout.read(4096)
                assert chunk, f"gvnccapture asked for no password: {output!r}"
                output += chunk
            # A terminal's mode changes without an event: poll it.
            while termios.tcgetattr(master)[3] & termios.ECHO:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            os.write(master, password.encode() + b"\n")
            output += await process.stdout.read()
            await process.wait()
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def password_guest(make_guest: MakeGuest, **overrides: object) -> QemuGuest:
    guest = await make_guest(vnc_password=True, **overrides)
    await guest.set_vnc_password(PASSWORD)  # QMP change-vnc-password: JSON, so UTF-8
    return guest


async def test_probe_password_file_against_qemu(make_guest: MakeGuest, guest_dir: Path) -> None:
    guest = await password_guest(make_guest)
    secret = guest_dir / "password"
    secret.write_bytes(PASSWORD.encode() + b"\n")  # as `echo pässwö > F` leaves it
    code, out, err = await run_probe(f"unix:{guest.vnc_path}", "--password-file", str(secret))
    assert code == 0, err
    assert "security:  VNC_AUTH" in out

    # Wrong: QEMU's reason, without the NUL it counts in its length.
    secret.write_bytes("pässwo".encode())
    code, out, err = await run_probe(f"unix:{guest.vnc_path}", "--password-file", str(secret))
    assert code == 1
    assert err.splitlines() == [
        "resourced probe: the server rejected our credentials (VNC_AUTH): Authentication failed"
    ]

    # Set over the human monitor instead: the bytes typed there are the password.
    await hmp(guest, "change vnc password ößé€")
    secret.write_bytes("ößé€\n".encode())
    code, out, err = await run_probe(f"unix:{guest.vnc_path}", "--password-file", str(secret))
    assert code == 0, err
    assert "security:  VNC_AUTH" in out


async def hmp(guest: QemuGuest, command: str) -> None:
    """One command on QEMU's human monitor (its -monitor unix socket)."""
    reader, writer = await asyncio.open_unix_connection(str(guest.monitor_path))
    try:
        async with asyncio.timeout(TIMEOUT):
            await reader.readuntil(b"(qemu) ")
            writer.write(command.encode() + b"\n")
            answer = await reader.readuntil(b"(qemu) ")
    finally:
        writer.close()
    assert b"rror" not in answer, answer


async def test_gvnccapture_takes_the_same_password_from_qemu(
    make_guest: MakeGuest, tmp_path: Path
) -> None:
    """The peers' convention itself: gtk-vnc types the password's UTF-8 to QEMU."""
    port = free_port()
    await password_guest(make_guest, vnc_tcp_port=port)
    code, output = await gvnccapture(port, tmp_path / "direct.png", PASSWORD)
    assert code == 0, output
    assert "Connected to" in output


async def test_gateway_with_non_ascii_passwords_on_both_sides(
    make_guest: MakeGuest, guest_dir: Path, tmp_path: Path
) -> None:
    """The gateway command: QEMU's password from --vnc-password-file, the viewers'
    from --password-file, both non-ASCII; gvnccapture gets through with it, our
    probe too, and a password one character off is refused."""
    guest = await password_guest(make_guest)
    # 12 bytes of UTF-8: the key is the first 8, which end inside 日, as QEMU and
    # gtk-vnc cut it.
    viewers_password = "clé→日本"
    (guest_dir / "qemu-pw").write_text(PASSWORD + "\n", encoding="utf-8")
    (guest_dir / "viewer-pw").write_text(viewers_password + "\n", encoding="utf-8")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.gateway",
        "--vnc",
        f"unix:{guest.vnc_path}",
        "--vnc-password-file",
        str(guest_dir / "qemu-pw"),
        "--password-file",
        str(guest_dir / "viewer-pw"),
        "--listen",
        f"127.0.0.1:{port}",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"},
    )
    assert process.stderr is not None
    log = b""
    try:
        async with asyncio.timeout(TIMEOUT):
            while b"listening on 127.0.0.1" not in log:
                line = await process.stderr.readline()
                assert line, f"the gateway exited: {log.decode(errors='replace')}"
                log += line
        code, output = await gvnccapture(port, tmp_path / "through.png", viewers_password)
        assert code == 0, output
        assert "Connected to" in output
        assert (tmp_path / "through.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        (guest_dir / "mine").write_text(viewers_password, encoding="utf-8")
        code, out, err = await run_probe(
            f"127.0.0.1::{port}", "--password-file", str(guest_dir / "mine")
        )
        assert code == 0, err
        assert "security:  VNC_AUTH" in out

        # One character different within the first 8 bytes: refused.
        code, output = await gvnccapture(port, tmp_path / "refused.png", "clé?日本")
        assert code == 1
        assert "Connected to" not in output
    finally:
        process.terminate()
        async with asyncio.timeout(TIMEOUT):
            await process.wait()


async def test_desktop_name_from_qemu_passes_through(
    make_guest: MakeGuest, guest_dir: Path
) -> None:
    """QEMU sends "QEMU (NAME)" with -name's UTF-8; the probe reports it whole,
    straight from QEMU and through the gateway, which sends it on as UTF-8."""
    guest = await make_guest(extra_args=("-name", "gäst ☃"))
    code, out, err = await run_probe(f"unix:{guest.vnc_path}", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "QEMU (gäst ☃)"
    # On an ASCII terminal the text report shows it escaped rather than failing.
    code, out, err = await run_probe(f"unix:{guest.vnc_path}")
    assert code == 0, err
    assert "server:    QEMU (g\\xe4st \\u2603)\n" in out

    gateway = Gateway(
        GatewayConfig(upstream=f"unix:{guest.vnc_path}", security=ServerSecurity(allow_none=True))
    )
    await gateway.start()
    try:
        await gateway.listen_unix(str(guest_dir / "gw.sock"))
        code, out, err = await run_probe(f"unix:{guest_dir / 'gw.sock'}", "--json")
    finally:
        await gateway.close()
    assert code == 0, err
    assert json.loads(out)["name"] == "QEMU (gäst ☃)"


async def test_vencrypt_plain_sends_utf8_credentials(guest_dir: Path) -> None:
    """VeNCrypt Plain (rfbproto 7.2.19) carries the user name and password as
    length-prefixed bytes: UTF-8, as gtk-vnc sends them. No server we run speaks
    Plain, so a scripted one (real TLS, certificates from tests.certs) reads them."""
    pki = make_pki(guest_dir / "pki")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"RFB 003.008\n")
            await reader.readexactly(12)
            writer.write(b"\x01\x13")  # VeNCrypt
            await reader.readexactly(1)
            writer.write(b"\x00\x02")
            await reader.readexactly(2)
            writer.write(b"\x00" + b"\x01" + struct.pack("!I", VeNCryptSubtype.X509_PLAIN))
            await reader.readexactly(4)
            writer.write(b"\x01")
            await writer.drain()
            await writer.start_tls(context)
            user_length, password_length = struct.unpack("!II", await reader.readexactly(8))
            received.append(await reader.readexactly(user_length))
            received.append(await reader.readexactly(password_length))
            writer.write(struct.pack("!I", 0))
            await reader.readexactly(1)  # ClientInit
            name = "Plain ☃".encode()
            writer.write(struct.pack("!HH", 64, 48) + RGBX8888.serialize())
            writer.write(struct.pack("!I", len(name)) + name)
            await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    path = guest_dir / "plain.sock"
    server = await asyncio.start_unix_server(handler, str(path))
    async with server:
        client = await connect(
            f"unix:{path}",
            username="jürgen",
            password=PASSWORD,
            tls=TlsCredentials(ca_file=pki.ca_cert, server_name="localhost"),
            server_name="localhost",
            timeout=TIMEOUT,
        )
        async with client:
            assert client.info is not None
            assert client.info.security == "VENCRYPT/X509_PLAIN"
            assert client.info.name == "Plain ☃"
    assert received == ["jürgen".encode(), PASSWORD.encode()]


async def test_control_characters_in_a_name_are_not_printed_raw(
    make_guest: MakeGuest, guest_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A desktop name holding an escape sequence reaches the probe's JSON as it
    is, but the probe's text report and the gateway's log show it escaped."""
    guest = await make_guest(extra_args=("-name", "vm\x1b[2J"))
    code, out, err = await run_probe(f"unix:{guest.vnc_path}", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "QEMU (vm\x1b[2J)"
    code, out, err = await run_probe(f"unix:{guest.vnc_path}")
    assert code == 0, err
    assert "server:    QEMU (vm\\x1b[2J)\n" in out
    assert "\x1b" not in out

    caplog.set_level(logging.INFO, logger="resourced.gateway")
    gateway = Gateway(
        GatewayConfig(upstream=f"unix:{guest.vnc_path}", security=ServerSecurity(allow_none=True))
    )
    await gateway.start()
    try:
        await gateway.listen_unix(str(guest_dir / "gw.sock"))
        client = await connect(f"unix:{guest_dir / 'gw.sock'}", timeout=TIMEOUT)
        async with client:
            assert client.info is not None
            assert client.info.name == "QEMU (vm\x1b[2J)"  # relayed unchanged
    finally:
        await gateway.close()
    connected = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
    assert connected
    assert connected[0].endswith("(QEMU (vm\\x1b[2J))")
