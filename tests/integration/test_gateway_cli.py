"""`resourced-gateway` as a command, in front of real QEMU: what an admin runs."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from resourced.demo.bootsector import DEFAULT_BANNER
from resourced.rfb.aio import connect
from resourced.rfb.consoles import ConsoleData, Consoles, ConsolesAnnounced
from tests.integration.conftest import MakeGuest

TIMEOUT = 60.0


async def run_gateway(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resourced.gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_refuses_tcp_without_authentication(make_guest: MakeGuest) -> None:
    guest = await make_guest()
    process = await run_gateway("--vnc", f"unix:{guest.vnc_path}", "--listen", "127.0.0.1:5999")
    async with asyncio.timeout(TIMEOUT):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert b"refusing to listen on TCP" in err
    assert b"--insecure" in err
    assert b"Traceback" not in err


async def test_gateway_command_serves_console_and_stops_cleanly(
    make_guest: MakeGuest, guest_dir: Path
) -> None:
    guest = await make_guest(start_paused=True)
    listen = guest_dir / "gw.sock"
    log = b""
    process = await run_gateway(
        "--vnc",
        f"unix:{guest.vnc_path}",
        "--listen",
        f"unix:{listen}",
        "--console",
        f"serial0=unix:{guest.serial_path}",
        "--console",
        f"monitor=unix:{guest.monitor_path}",
    )
    try:
        await guest.wait_chardev_connected("serial0", TIMEOUT)
        await guest.resume()
        assert process.stderr is not None
        async with asyncio.timeout(TIMEOUT):
            while b"listening on unix:" not in log:
                line = await process.stderr.readline()
                assert line, f"the gateway exited early: {log.decode()}"
                log += line
        consoles = Consoles()
        client = await connect(f"unix:{listen}", extensions=[consoles], timeout=TIMEOUT)
        seen = b""
        async with client, asyncio.timeout(TIMEOUT):
            while DEFAULT_BANNER not in seen:
                event = await client.next_event()
                if isinstance(event, ConsolesAnnounced):
                    info = consoles.by_name("serial0")
                    assert info is not None
                    consoles.open(info.console_id)
                    client.flush()
                elif isinstance(event, ConsoleData):
                    seen += event.data
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            _, err = await process.communicate()
    err = log + err
    assert process.returncode == 0, err.decode()
    assert b"console serial0: attached" in err
    assert not listen.exists()  # the socket is removed on the way out
