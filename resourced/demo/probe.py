"""The README's "run" job: the demo guest, reached through the gateway.

Starts the demo guest (QEMU under TCG: a boot sector that beeps at 440 Hz,
writes a banner to its serial port and echoes what it receives) and the console
gateway in front of its VNC server. Then, through the gateway's one VNC
connection, it reads the serial banner (replayed from history), types on the
serial console and reads the echo, asks the QEMU monitor for the VM status,
prints the server's name, size and security, records the beep to a WAV file and
prints the measured byte rate, level and pitch. Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from resourced.cli import failing_as, run_command
from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.demo.qemu import GuestConfig, GuestError, QemuGuest
from resourced.errors import ResourcedError
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.rfb.__main__ import _print_report, build_parser, probe
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.consoles import ConsoleData, Consoles
from resourced.rfb.server import ServerSecurity

DEMO_NAME = "resourced demo guest"
TIMEOUT = 60.0


def demo_gateway_config(guest: QemuGuest) -> GatewayConfig:
    """The gateway in front of the demo guest: its VNC socket, no VNC password (a
    private socket), its serial port and QEMU's monitor as consoles."""
    unix = EndpointType.UNIX
    return GatewayConfig(
        upstream=f"unix:{guest.vnc_path}",
        security=ServerSecurity(allow_none=True),
        consoles=[
            ConsoleSpec("serial0", ConsoleKind.SERIAL, Endpoint(unix, str(guest.serial_path))),
            ConsoleSpec("monitor", ConsoleKind.MONITOR, Endpoint(unix, str(guest.monitor_path))),
        ],
    )


async def _read_until(
    client: RfbClient, console_id: int, done: Callable[[bytes], bool]
) -> tuple[bytes, bool]:
    """Console output until `done(output)`; whether the first of it was history."""
    seen = b""
    history = False
    async with asyncio.timeout(TIMEOUT):
        while not done(seen):
            event = await client.next_event()
            if isinstance(event, ConsoleData) and event.console_id == console_id:
                history = history or (event.history and not seen)
                seen += event.data
            client.flush()
    return seen, history


async def _console_tour(address: str) -> None:
    consoles = Consoles()
    client = await connect(address, extensions=[consoles], timeout=TIMEOUT)
    async with client:
        async with asyncio.timeout(TIMEOUT):
            while not consoles.announced:
                await client.next_event()
        listing = ", ".join(f"{c.name} ({c.kind.label})" for c in consoles.consoles)
        print(f"consoles:  {listing}")
        serial = consoles.by_name("serial0")
        monitor = consoles.by_name("monitor")
        assert serial is not None
        assert monitor is not None
        consoles.open(serial.console_id)
        client.flush()
        banner, replayed = await _read_until(client, serial.console_id, lambda out: b"\n" in out)
        note = " (replayed from the gateway's history)" if replayed else ""
        print(f"serial0:   {banner.decode(errors='replace').strip()}{note}")
        typed = b"hello from resourced"
        consoles.write(serial.console_id, typed)
        echo, _ = await _read_until(client, serial.console_id, lambda out: typed in out)
        shown = echo.decode(errors="replace")
        print(f"serial0:   typed {typed.decode()!r}, the guest echoed {shown!r}")
        consoles.open(monitor.console_id, history=False)
        client.flush()
        async with asyncio.timeout(TIMEOUT):
            while not consoles.is_open(monitor.console_id):
                await client.next_event()
        consoles.write(monitor.console_id, b"info status\n")
        answer, _ = await _read_until(
            client, monitor.console_id, lambda out: b"\n" in out.partition(b"VM status")[2]
        )
        status = answer.partition(b"VM status")[2].split(b"\r")[0]
        print(f"monitor:   info status -> VM status{status.decode(errors='replace')}")


async def run(wav: Path, duration: float) -> None:
    with tempfile.TemporaryDirectory(prefix="rsd-demo-", dir="/tmp") as workdir:
        # Start paused: the guest writes its banner once the gateway listens.
        config = GuestConfig(
            workdir=Path(workdir), extra_args=("-name", DEMO_NAME), start_paused=True
        )
        async with QemuGuest(config) as guest:
            gateway = Gateway(demo_gateway_config(guest))
            await gateway.start()
            try:
                await guest.wait_chardev_connected("serial0", TIMEOUT)
                banner_seen = asyncio.Event()
                serial_hub = next(iter(gateway.hubs.values()))
                serial_hub.subscribe(lambda hub: banner_seen.set() if hub.total else None)
                await guest.resume()
                # Let the banner reach the gateway before any viewer exists: the
                # viewer then gets it from the gateway's history.
                await asyncio.wait_for(banner_seen.wait(), TIMEOUT)
                path = str(Path(workdir) / "gateway.sock")
                await gateway.listen_unix(path)
                print(f"guest:     QEMU under TCG, its VNC server at unix:{guest.vnc_path}")
                print(f"gateway:   unix:{path} (one VNC connection carries everything below)")
                await _console_tour(f"unix:{path}")
                args = build_parser().parse_args(
                    ["probe", f"unix:{path}", "--audio", str(wav), "--duration", str(duration)]
                )
                _print_report(await probe(args))
            finally:
                await gateway.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resourced.demo.probe", description=__doc__)
    parser.add_argument("--wav", type=Path, default=Path("out/demo-beep.wav"))
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)

    def body() -> int:
        with failing_as(f"cannot make the directory for {args.wav}"):
            args.wav.parent.mkdir(parents=True, exist_ok=True)
        try:
            asyncio.run(run(args.wav, args.duration))
        except ResourcedError:
            raise  # HandshakeTimeout is a TimeoutError too, with its own words
        except TimeoutError:
            raise GuestError("the guest did not answer in time") from None
        return 0

    return run_command("resourced demo", body)


if __name__ == "__main__":
    sys.exit(main())
