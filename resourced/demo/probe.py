"""The README's "run" job until the D-Bus service exists: probe the demo guest.

Starts the demo guest (QEMU under TCG: a boot sector that beeps at 440 Hz and
writes a banner to its serial port), connects to its VNC server with our RFB
client, prints the server's name, size and security, records its beep to a WAV
file and prints the measured byte rate, level and pitch, then stops the guest.
With `--address` it probes that VNC server instead of starting a guest.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.errors import ResourcedError
from resourced.rfb.__main__ import _print_report, build_parser, probe

DEMO_NAME = "resourced demo guest"


async def run(wav: Path, duration: float) -> None:
    with tempfile.TemporaryDirectory(prefix="rsd-demo-", dir="/tmp") as workdir:
        # Start paused so the serial banner is not written before we listen.
        config = GuestConfig(
            workdir=Path(workdir), extra_args=("-name", DEMO_NAME), start_paused=True
        )
        async with QemuGuest(config) as guest:
            reader, writer = await guest.open_serial()
            await guest.resume()
            async with asyncio.timeout(60):
                banner = await reader.readuntil(b"\n")
            writer.close()
            print(f"demo guest: QEMU running, VNC at unix:{guest.vnc_path}")
            print(f"serial:    {banner.decode(errors='replace').strip()}")
            args = build_parser().parse_args(
                [
                    "probe",
                    f"unix:{guest.vnc_path}",
                    "--audio",
                    str(wav),
                    "--duration",
                    str(duration),
                ]
            )
            _print_report(await probe(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resourced.demo.probe", description=__doc__)
    parser.add_argument("--wav", type=Path, default=Path("out/demo-beep.wav"))
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    args.wav.parent.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(run(args.wav, args.duration))
    except ResourcedError as err:
        print(f"resourced demo: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
