"""The RFB client against real QEMU (TCG): audio, encodings, auth and TLS.

Every test runs its own guest (the demo boot sector: a 440 Hz PC-speaker tone)
and connects through the real asyncio transport.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from resourced.audio import AudioFormat, SampleFormat, analyse
from resourced.demo.bootsector import tone_frequency
from resourced.demo.qemu import QemuGuest
from resourced.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    SecurityNegotiationFailed,
    TlsError,
)
from resourced.rfb import (
    AudioBegin,
    AudioData,
    AudioSupported,
    Connected,
    DesktopResized,
    FramebufferUpdate,
    FramebufferUpdateRequest,
    QemuAudio,
    QemuLedState,
    TlsCredentials,
    TlsMode,
)
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.constants import PIXEL_ENCODINGS, Encoding
from tests.certs import Pki, make_pki
from tests.integration.conftest import MakeGuest

EVENT_TIMEOUT = 60.0
TONE = tone_frequency(440)


async def collect_audio(
    client: RfbClient, seconds: float, *, after_begin: bool = False
) -> tuple[bytes, float, AudioFormat, list[Any]]:
    """Audio bytes for `seconds` after the first chunk; the measured byte rate; format."""
    pcm = bytearray()
    seen: list[Any] = []
    first = last = 0.0
    first_size = 0
    fmt: AudioFormat | None = None
    waiting = after_begin
    async with asyncio.timeout(seconds + EVENT_TIMEOUT):
        while True:
            event = await client.next_event()
            seen.append(type(event).__name__)
            if isinstance(event, AudioBegin):
                waiting = False
            if isinstance(event, AudioData) and not waiting:
                now = time.monotonic()
                if not pcm:
                    first, first_size, fmt = now, len(event.data), event.format
                assert event.format == fmt
                pcm += event.data
                last = now
                if now - first >= seconds:
                    break
    assert fmt is not None
    return bytes(pcm), (len(pcm) - first_size) / (last - first), fmt, seen


def vnc_address(guest: QemuGuest) -> str:
    return f"unix:{guest.vnc_path}"


@pytest.mark.parametrize(
    "fmt",
    [
        AudioFormat(SampleFormat.S16, 2, 44100),
        AudioFormat(SampleFormat.U8, 1, 22050),
        AudioFormat(SampleFormat.S32, 2, 48000),
    ],
    ids=str,
)
async def test_audio_from_real_qemu(make_guest: MakeGuest, fmt: AudioFormat) -> None:
    guest = await make_guest()
    audio = QemuAudio(fmt)
    async with await connect(vnc_address(guest), extensions=[audio]) as client:
        assert client.info is not None
        assert client.info.security == "NONE"
        pcm, rate, got_format, seen = await collect_audio(client, 2.0)
    assert "AudioSupported" in seen
    assert got_format == fmt
    # QEMU's "none" audio backend is paced by the host clock: the byte rate is
    # frequency x channels x sample size, give or take scheduling on a busy box.
    assert rate == pytest.approx(fmt.byte_rate, rel=0.15)
    measured = analyse(pcm, fmt)
    assert measured.frequency_hz == pytest.approx(TONE, abs=8)
    assert measured.peak_dbfs > -20  # a loud square wave, not silence


async def test_format_change_takes_effect_at_begin(make_guest: MakeGuest) -> None:
    guest = await make_guest()
    first = AudioFormat(SampleFormat.S16, 2, 44100)
    second = AudioFormat(SampleFormat.U8, 1, 8000)
    audio = QemuAudio(first)
    async with await connect(vnc_address(guest), extensions=[audio]) as client:
        await collect_audio(client, 0.5)
        audio.set_format(second)
        client.flush()
        pcm, rate, fmt, _ = await collect_audio(client, 1.5, after_begin=True)
    assert fmt == second
    assert rate == pytest.approx(second.byte_rate, rel=0.15)
    assert analyse(pcm, fmt).frequency_hz == pytest.approx(TONE, abs=8)


async def test_audio_disabled_until_asked(make_guest: MakeGuest) -> None:
    guest = await make_guest()
    audio = QemuAudio(auto_enable=False)
    async with await connect(vnc_address(guest), extensions=[audio]) as client:
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not isinstance(await client.next_event(), AudioSupported):
                pass
        assert not audio.enabled
        audio.enable()
        client.flush()
        pcm, _, fmt, _ = await collect_audio(client, 0.5)
    assert fmt == AudioFormat()
    assert pcm


async def test_led_state_and_framebuffer_size(make_guest: MakeGuest) -> None:
    guest = await make_guest()
    leds = QemuLedState()
    async with await connect(vnc_address(guest), extensions=[leds]) as client:
        assert client.info is not None
        width, height = client.info.width, client.info.height
        assert (width, height) != (0, 0)
        client.send(FramebufferUpdateRequest(False, 0, 0, width, height))
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not isinstance(await client.next_event(), FramebufferUpdate):
                pass
        assert leds.state is not None


async def full_update(client: RfbClient) -> FramebufferUpdate:
    """Request the whole screen; return the first update holding pixel rectangles."""
    conn = client.connection
    client.send(FramebufferUpdateRequest(False, 0, 0, conn.width, conn.height))
    async with asyncio.timeout(EVENT_TIMEOUT):
        while True:
            event = await client.next_event()
            if isinstance(event, DesktopResized):
                client.send(FramebufferUpdateRequest(False, 0, 0, conn.width, conn.height))
            if isinstance(event, FramebufferUpdate) and any(
                r.header.encoding in PIXEL_ENCODINGS for r in event.rectangles
            ):
                return event


@pytest.mark.parametrize(
    "encodings",
    [
        (Encoding.RAW,),
        (Encoding.COPY_RECT, Encoding.RRE),
        (Encoding.HEXTILE,),
        (Encoding.ZLIB,),
        (Encoding.TIGHT,),
        (Encoding.ZRLE,),
    ],
    ids=lambda encs: "+".join(Encoding(e).name for e in encs),
)
async def test_framebuffer_updates_are_framed(
    make_guest: MakeGuest, encodings: Sequence[int]
) -> None:
    """QEMU's real rectangles, in each encoding, frame exactly: two full updates in a row
    parse (a framing error would desynchronise the second), and cover the screen."""
    guest = await make_guest()
    async with await connect(vnc_address(guest), encodings=encodings) as client:
        for _ in range(2):
            update = await full_update(client)
            conn = client.connection
            area = sum(
                r.header.width * r.header.height
                for r in update.rectangles
                if r.header.encoding in PIXEL_ENCODINGS
            )
            used = {r.header.encoding for r in update.rectangles}
            assert used & PIXEL_ENCODINGS <= set(encodings) | {Encoding.RAW}
            assert area >= conn.width * conn.height


async def test_password_auth(make_guest: MakeGuest) -> None:
    guest = await make_guest(vnc_password=True)
    await guest.set_vnc_password("s3cret")
    async with await connect(vnc_address(guest), password="s3cret") as client:
        assert client.info is not None
        assert client.info.security == "VNC_AUTH"
    with pytest.raises(AuthenticationFailed, match="rejected our credentials"):
        await connect(vnc_address(guest), password="wrong")
    with pytest.raises(AuthenticationFailed, match="requires a VNC password"):
        await connect(vnc_address(guest))


async def test_tls_required_but_not_offered(make_guest: MakeGuest) -> None:
    guest = await make_guest()
    with pytest.raises(SecurityNegotiationFailed, match="TLS was required"):
        await connect(vnc_address(guest), tls_mode=TlsMode.REQUIRE)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


async def test_x509_tls_with_audio(make_guest: MakeGuest, pki: Pki) -> None:
    guest = await make_guest(tls_dir=pki.server_dir)
    creds = TlsCredentials(ca_file=pki.ca_cert, server_name="localhost")
    audio = QemuAudio()
    client = await connect(
        vnc_address(guest), tls_mode=TlsMode.REQUIRE, tls=creds, extensions=[audio]
    )
    async with client:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/X509_NONE"
        assert client.info.tls_version in ("TLSv1.2", "TLSv1.3")
        pcm, rate, fmt, _ = await collect_audio(client, 1.0)
    assert rate == pytest.approx(fmt.byte_rate, rel=0.15)
    assert analyse(pcm, fmt).frequency_hz == pytest.approx(TONE, abs=8)


async def test_x509_wrong_ca_is_refused(make_guest: MakeGuest, pki: Pki) -> None:
    guest = await make_guest(tls_dir=pki.server_dir)
    creds = TlsCredentials(ca_file=pki.other_ca_cert)
    with pytest.raises(TlsError, match="not trusted"):
        await connect(vnc_address(guest), tls=creds)


async def test_x509_wrong_server_name_is_refused(make_guest: MakeGuest, pki: Pki) -> None:
    guest = await make_guest(tls_dir=pki.server_dir)
    creds = TlsCredentials(ca_file=pki.ca_cert, server_name="not-the-server.example")
    with pytest.raises(TlsError, match="not trusted"):
        await connect(vnc_address(guest), tls=creds)


async def test_x509_vnc_password_inside_tls(make_guest: MakeGuest, pki: Pki) -> None:
    guest = await make_guest(tls_dir=pki.server_dir, vnc_password=True)
    await guest.set_vnc_password("inside")
    creds = TlsCredentials(ca_file=pki.ca_cert)
    async with await connect(vnc_address(guest), tls=creds, password="inside") as client:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/X509_VNC"
    with pytest.raises(AuthenticationFailed):
        await connect(vnc_address(guest), tls=creds, password="outside")


async def test_x509_client_certificate(make_guest: MakeGuest, pki: Pki) -> None:
    guest = await make_guest(tls_dir=pki.server_dir, tls_verify_client=True)
    good = TlsCredentials(
        ca_file=pki.ca_cert, client_cert=pki.client_cert, client_key=pki.client_key
    )
    async with await connect(vnc_address(guest), tls=good) as client:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/X509_NONE"
    for bad in (
        TlsCredentials(ca_file=pki.ca_cert),
        TlsCredentials(
            ca_file=pki.ca_cert,
            client_cert=pki.other_client_cert,
            client_key=pki.other_client_key,
        ),
    ):
        with pytest.raises((TlsError, ConnectionClosed)):
            await connect(vnc_address(guest), tls=bad, timeout=EVENT_TIMEOUT)


async def test_gtk_vnc_certificate_locations(
    make_guest: MakeGuest, pki: Pki, tmp_path: Path
) -> None:
    """Credentials laid out as for virt-viewer under ~/.pki are found and used."""
    home = tmp_path / "home"
    (home / ".pki/CA").mkdir(parents=True)
    (home / ".pki/libvirt-vnc/private").mkdir(parents=True)
    (home / ".pki/CA/cacert.pem").write_bytes(pki.ca_cert.read_bytes())
    (home / ".pki/libvirt-vnc/clientcert.pem").write_bytes(pki.client_cert.read_bytes())
    (home / ".pki/libvirt-vnc/private/clientkey.pem").write_bytes(pki.client_key.read_bytes())
    found = TlsCredentials.discover(dirs=[tmp_path / "no-such-etc-pki", home / ".pki"])
    assert found.ca_file == home / ".pki/CA/cacert.pem"
    assert found.client_cert == home / ".pki/libvirt-vnc/clientcert.pem"
    assert found.client_key == home / ".pki/libvirt-vnc/private/clientkey.pem"
    guest = await make_guest(tls_dir=pki.server_dir, tls_verify_client=True)
    async with await connect(vnc_address(guest), tls=found, tls_mode=TlsMode.REQUIRE) as client:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/X509_NONE"


def free_port() -> int:
    # Ports for QEMU's display numbering: above 5900, and free right now.
    for port in range(5990, 6900):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port between 5990 and 6900")


async def test_tcp_with_tls_checks_the_host_name(make_guest: MakeGuest, pki: Pki) -> None:
    guest = await make_guest(tls_dir=pki.server_dir, vnc_tcp_port=free_port())
    port = guest.config.vnc_tcp_port
    creds = TlsCredentials(ca_file=pki.ca_cert)
    async with await connect(f"127.0.0.1::{port}", tls=creds) as client:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/X509_NONE"
    with pytest.raises(TlsError, match="not trusted"):
        # The certificate names localhost and 127.0.0.1, not 127.0.0.2.
        await connect(f"127.0.0.1::{port}", tls=creds, server_name="127.0.0.2")


async def test_already_connected_fd(make_guest: MakeGuest) -> None:
    guest = await make_guest()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(guest.vnc_path))
    try:
        async with await connect(f"fd:{sock.fileno()}", extensions=[QemuAudio()]) as client:
            assert isinstance(client.info, Connected)
            pcm, _, _, _ = await collect_audio(client, 0.3)
            assert pcm
    finally:
        sock.close()


async def test_probe_command_records_the_beep(make_guest: MakeGuest, tmp_path: Path) -> None:
    guest = await make_guest()
    wav_path = tmp_path / "beep.wav"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.rfb",
        "probe",
        vnc_address(guest),
        "--audio",
        str(wav_path),
        "--duration",
        "1.5",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(EVENT_TIMEOUT + 30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["name"] == "QEMU"  # QEMU's desktop name when no -name is given
    assert report["security"] == "NONE"
    assert report["audio"]["byte_rate"] == pytest.approx(176400, rel=0.15)
    assert report["audio"]["pitch_hz"] == pytest.approx(TONE, abs=8)
    with wave.open(str(wav_path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, 44100)
        assert wav.getnframes() >= 44100


async def test_probe_command_reports_errors_cleanly(make_guest: MakeGuest) -> None:
    guest = await make_guest(vnc_password=True)
    await guest.set_vnc_password("s3cret")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.rfb",
        "probe",
        vnc_address(guest),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(EVENT_TIMEOUT):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert b"requires a VNC password" in err
    assert b"Traceback" not in err


async def test_probe_finds_virt_viewer_certificates_in_home(
    make_guest: MakeGuest, pki: Pki, tmp_path: Path
) -> None:
    """The probe, run with a HOME laid out as remote-viewer users have it (CA in
    ~/.pki/CA/, client certificate and key in ~/.pki/libvirt/), finds them by
    itself and passes a QEMU that requires a client certificate."""
    home = tmp_path / "home"
    (home / ".pki/CA").mkdir(parents=True)
    (home / ".pki/libvirt/private").mkdir(parents=True)
    (home / ".pki/CA/cacert.pem").write_bytes(pki.ca_cert.read_bytes())
    (home / ".pki/libvirt/clientcert.pem").write_bytes(pki.client_cert.read_bytes())
    (home / ".pki/libvirt/private/clientkey.pem").write_bytes(pki.client_key.read_bytes())
    guest = await make_guest(tls_dir=pki.server_dir, tls_verify_client=True, audio=False)

    async def probe() -> tuple[int | None, bytes, bytes]:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "resourced.rfb", "probe", vnc_address(guest)),
            *("--tls", "require", "--json"),
            env={**os.environ, "HOME": str(home)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(EVENT_TIMEOUT + 30):
            out, err = await process.communicate()
        return process.returncode, out, err

    returncode, out, err = await probe()
    assert returncode == 0, err.decode()
    assert json.loads(out)["security"] == "VENCRYPT/X509_NONE"
    # Without the client certificate QEMU refuses: it was the one from HOME.
    (home / ".pki/libvirt/clientcert.pem").unlink()
    returncode, _, err = await probe()
    assert returncode == 1, err.decode()
    assert b"Traceback" not in err


async def test_anonymous_tls(make_guest: MakeGuest) -> None:
    """QEMU's tls-creds-anon: encrypted, unauthenticated; used in AUTO mode, refused
    by REQUIRE unless anonymous TLS is allowed explicitly."""
    guest = await make_guest(tls_anonymous=True, vnc_password=True)
    await guest.set_vnc_password("anon")
    async with await connect(vnc_address(guest), password="anon") as client:
        assert client.info is not None
        assert client.info.security == "VENCRYPT/TLS_VNC"
        assert client.info.tls_version == "TLSv1.2"
    with pytest.raises(SecurityNegotiationFailed, match="not certificate-verified"):
        await connect(vnc_address(guest), password="anon", tls_mode=TlsMode.REQUIRE)
    client = await connect(
        vnc_address(guest), password="anon", tls_mode=TlsMode.REQUIRE, allow_anonymous_tls=True
    )
    await client.close()
