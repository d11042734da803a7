"""`python -m resourced.demo`: run the demo guest until Ctrl-C or SIGTERM.

Starts one guest (see `resourced.demo.qemu`) in a fresh temporary directory
unless --workdir is given, prints where its VNC, serial, monitor and QMP
sockets are, and stops QEMU cleanly on SIGINT/SIGTERM. It is a convenience for
trying resourced by hand, not a VM manager.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from resourced.cli import failing_as, run_command
from resourced.demo.bootsector import DEFAULT_BANNER
from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.errors import ConfigurationError


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resourced.demo",
        description="Run the resourced demo guest under QEMU until interrupted.",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="directory for the image and sockets (kept); default: a temporary one (removed)",
    )
    parser.add_argument("--tone-hz", type=int, default=440, help="PC-speaker tone (default 440)")
    parser.add_argument(
        "--banner",
        default=DEFAULT_BANNER.decode(),
        help="text the guest prints on boot (a CRLF is not added)",
    )
    parser.add_argument("--no-audio", action="store_true", help="no PC-speaker audio over VNC")
    return parser.parse_args(argv)


async def _run(config: GuestConfig) -> int:
    guest = QemuGuest(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        with failing_as("cannot start the guest"):
            await guest.start()
        print(f"VNC socket:     {guest.vnc_path}")
        print(f"serial socket:  {guest.serial_path}")
        print(f"monitor socket: {guest.monitor_path}")
        print(f"QMP socket:     {guest.qmp_path}")
        print("Running; press Ctrl-C to stop.", flush=True)
        exited = asyncio.create_task(guest.wait())
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        stopping.cancel()
        # A terminal's Ctrl-C reaches QEMU too (same process group), so QEMU
        # may have exited because of the very signal we were asked to stop on.
        if not stop_requested.is_set():
            returncode = guest.returncode
            print(f"QEMU exited on its own with status {returncode}", file=sys.stderr)
            print(guest.stderr_text(), file=sys.stderr, end="")
            return 1
        return 0
    finally:
        await guest.stop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_command("resourced demo", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    temporary = args.workdir is None
    if temporary:
        with failing_as("cannot make a temporary directory"):
            workdir = Path(tempfile.mkdtemp(prefix="resourced-demo-"))
    else:
        workdir = args.workdir
    try:
        try:
            config = GuestConfig(
                workdir=workdir,
                banner=args.banner.encode(),
                tone_hz=args.tone_hz,
                audio=not args.no_audio,
            )
        except ValueError as error:  # the tone or banner given is out of range
            raise ConfigurationError(str(error)) from None
        return asyncio.run(_run(config))
    finally:
        if temporary:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
