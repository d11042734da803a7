"""`python -m resourced.rfb probe ADDRESS`: connect to a VNC server and report on it.

Prints the server's name, size, protocol version and the security used; with
`--audio FILE.wav` it also records the guest's sound (QEMU audio extension) and
prints its byte rate, level and pitch. A tool for trying the RFB client by hand,
not a viewer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from resourced.audio import AudioFormat, SampleFormat, analyse
from resourced.cli import read_password_file, run_command
from resourced.errors import ConfigurationError, ResourcedError
from resourced.rfb.aio import connect
from resourced.rfb.qemu import AudioData, AudioEnd, AudioSupported, QemuAudio
from resourced.rfb.security import TlsMode
from resourced.rfb.text import printable
from resourced.rfb.tls import TlsCredentials
from resourced.sinks.wav import WavFileSink


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m resourced.rfb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="connect, print what the server is, optionally record")
    probe.add_argument(
        "address", help="unix:PATH, /PATH, host:display, host::port, vnc://host:port or fd:N"
    )
    probe.add_argument("--password-file", type=Path, help="file holding the VNC password")
    probe.add_argument("--username", help="user name for VeNCrypt Plain")
    probe.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        default="auto",
        help="auto: verified TLS when offered; require: refuse anything else; never",
    )
    probe.add_argument("--ca-cert", type=Path, help="CA certificate (default: where gtk-vnc looks)")
    probe.add_argument("--client-cert", type=Path, help="client certificate (PEM)")
    probe.add_argument("--client-key", type=Path, help="client private key (PEM)")
    probe.add_argument("--crl", type=Path, help="certificate revocation list (PEM)")
    probe.add_argument("--tls-server-name", help="name the server certificate must carry")
    probe.add_argument(
        "--anonymous-tls",
        action="store_true",
        help="with --tls require, also accept anonymous (unauthenticated) TLS",
    )
    probe.add_argument("--timeout", type=float, default=30.0, help="handshake timeout (s)")
    probe.add_argument("--audio", type=Path, metavar="FILE.wav", help="record the guest's audio")
    probe.add_argument("--duration", type=float, default=3.0, help="seconds of audio to record")
    probe.add_argument(
        "--audio-timeout",
        type=float,
        default=15.0,
        help="seconds past --duration to wait for audio before giving up",
    )
    probe.add_argument("--sample-format", choices=[f.value for f in SampleFormat], default="s16")
    probe.add_argument("--channels", type=int, choices=[1, 2], default=2)
    probe.add_argument("--rate", type=int, default=44100)
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _credentials(args: argparse.Namespace) -> TlsCredentials | None:
    found = TlsCredentials.discover()
    if not any([args.ca_cert, args.client_cert, args.client_key, args.crl, args.tls_server_name]):
        return None
    return TlsCredentials(
        ca_file=args.ca_cert or found.ca_file,
        client_cert=args.client_cert or (None if args.client_key else found.client_cert),
        client_key=args.client_key or (None if args.client_cert else found.client_key),
        crl_file=args.crl or found.crl_file,
        server_name=args.tls_server_name,
    )


async def probe(args: argparse.Namespace) -> dict[str, Any]:
    password = None
    if args.password_file is not None:
        password = read_password_file(args.password_file)
    try:
        fmt = AudioFormat(SampleFormat(args.sample_format), args.channels, args.rate)
    except ValueError as err:
        raise ConfigurationError(f"bad audio format: {err}") from None
    audio = QemuAudio(fmt) if args.audio else None
    client = await connect(
        args.address,
        timeout=args.timeout,
        password=password,
        username=args.username,
        tls_mode=TlsMode(args.tls),
        tls=_credentials(args),
        allow_anonymous_tls=args.anonymous_tls,
        server_name=args.tls_server_name,
        extensions=[audio] if audio else [],
    )
    info = client.info
    assert info is not None
    report: dict[str, Any] = {
        "address": str(client.address),
        "name": info.name,
        "width": info.width,
        "height": info.height,
        "protocol": info.version,
        "security": info.security,
        "tls": info.tls_version,
        "bits_per_pixel": info.pixel_format.bits_per_pixel,
    }
    try:
        if audio is not None:
            report["audio"] = await _record(
                client, audio, fmt, args.audio, args.duration, args.audio_timeout
            )
    finally:
        await client.close()
    return report


async def _record(
    client: Any,
    audio: QemuAudio,
    fmt: AudioFormat,
    path: Path,
    duration: float,
    patience: float,
) -> dict[str, Any]:
    sink = WavFileSink(path, fmt)
    pcm = bytearray()
    first = last = 0.0
    first_size = 0
    try:
        async with asyncio.timeout(duration + patience):
            while True:
                event = await client.next_event()
                if isinstance(event, AudioSupported) and not audio.enabled:
                    audio.enable()
                elif isinstance(event, AudioData):
                    now = time.monotonic()
                    if not pcm:
                        first, first_size = now, len(event.data)
                    last = now
                    pcm += event.data
                    sink.write(event.data)
                    if now - first >= duration:
                        break
                elif isinstance(event, AudioEnd) and pcm:
                    break
    except TimeoutError:
        # A server that stopped in the middle of a message (a FramebufferUpdate
        # that never ends) explains the silence, whatever audio's state: say so
        # rather than blame a missing feature the server never got to announce.
        stalled = client.connection.message_in_progress
        if stalled is not None:
            raise ResourcedError(
                f"timed out after {duration + patience:g} s waiting for audio, inside {stalled}: "
                "the server stopped sending in the middle of it"
            ) from None
        if not audio.supported:
            raise ResourcedError("the server does not support QEMU audio") from None
        if not pcm:
            raise ResourcedError("audio is enabled but the guest sent none (paused?)") from None
    finally:
        sink.close()
        if not pcm:  # a WAV file of no sound would only mislead: leave none behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    measured = analyse(bytes(pcm), fmt)
    span = last - first
    rate = (len(pcm) - first_size) / span if span > 0 else 0.0
    return {
        "file": str(path),
        "format": str(fmt),
        "bytes": len(pcm),
        "seconds": round(measured.seconds, 3),
        "byte_rate": round(rate),
        "expected_byte_rate": fmt.byte_rate,
        "rms_dbfs": round(measured.rms_dbfs, 1) if math.isfinite(measured.rms_dbfs) else None,
        "peak_dbfs": round(measured.peak_dbfs, 1) if math.isfinite(measured.peak_dbfs) else None,
        "pitch_hz": round(measured.frequency_hz, 1),
    }


def _print_report(report: dict[str, Any]) -> None:
    security = report["security"] + (f" ({report['tls']})" if report["tls"] else "")
    print(f"server:    {printable(report['name'])}")
    print(f"address:   {report['address']}")
    print(f"protocol:  RFB {report['protocol']}")
    print(f"security:  {security}")
    print(f"size:      {report['width']}x{report['height']}, {report['bits_per_pixel']} bpp")
    audio = report.get("audio")
    if audio:
        print(f"audio:     {audio['format']}, {audio['bytes']:,} bytes in {audio['seconds']} s")
        print(
            f"byte rate: {audio['byte_rate']:,} B/s (format says {audio['expected_byte_rate']:,})"
        )
        rms = "silence" if audio["rms_dbfs"] is None else f"RMS {audio['rms_dbfs']} dBFS"
        print(f"level:     {rms}, peak {audio['peak_dbfs']} dBFS")
        print(f"pitch:     {audio['pitch_hz']} Hz")
        print(f"saved:     {audio['file']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        report = asyncio.run(probe(args))
        if args.json:
            print(json.dumps(report))
        else:
            _print_report(report)
        return 0

    return run_command("resourced probe", body)


if __name__ == "__main__":
    sys.exit(main())
