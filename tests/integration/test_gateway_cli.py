"""`resourced-gateway` as a command, in front of real QEMU: what an admin runs."""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
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


def connects_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """Try to connect to `path` as user nobody, group nogroup (the tests run as root,
    whom socket permissions do not stop)."""
    probe = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    # Debian's python3, which nobody may run (the venv's may live under /root).
    return subprocess.run(
        ["/usr/bin/python3", "-c", probe, str(path)],
        user="nobody",
        group="nogroup",
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


async def test_socket_permissions_say_who_may_connect(make_guest: MakeGuest) -> None:
    """By default only the gateway's user may connect to its Unix socket;
    `--socket-mode 660 --socket-group G` lets group G in as well."""
    guest = await make_guest()
    shared = Path(tempfile.mkdtemp(prefix="rsd-perm-", dir="/tmp"))
    os.chmod(shared, 0o755)  # others may reach the sockets; the sockets' modes decide
    nogroup = grp.getgrnam("nogroup").gr_gid
    processes: list[asyncio.subprocess.Process] = []
    try:
        for name, options in (
            ("private.sock", []),
            ("group.sock", ["--socket-mode", "660", "--socket-group", "nogroup"]),
        ):
            process = await run_gateway(
                "--vnc", f"unix:{guest.vnc_path}", "--listen", f"unix:{shared / name}", *options
            )
            processes.append(process)
            assert process.stderr is not None
            log = b""
            async with asyncio.timeout(TIMEOUT):
                while b"listening on unix:" not in log:
                    line = await process.stderr.readline()
                    assert line, f"the gateway exited early: {log.decode()}"
                    log += line
        private, group = os.stat(shared / "private.sock"), os.stat(shared / "group.sock")
        assert stat.S_ISSOCK(private.st_mode)
        assert stat.S_IMODE(private.st_mode) == 0o600
        assert stat.S_IMODE(group.st_mode) == 0o660
        assert group.st_gid == nogroup
        refused = await asyncio.to_thread(connects_as_nobody, shared / "private.sock")
        assert refused.returncode != 0
        assert "PermissionError" in refused.stderr
        allowed = await asyncio.to_thread(connects_as_nobody, shared / "group.sock")
        assert allowed.returncode == 0, allowed.stderr
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(TIMEOUT):
                await process.communicate()
        shutil.rmtree(shared, ignore_errors=True)
    assert all(process.returncode == 0 for process in processes)


async def test_unknown_socket_group_is_a_clear_error(
    make_guest: MakeGuest, guest_dir: Path
) -> None:
    guest = await make_guest()
    process = await run_gateway(
        "--vnc",
        f"unix:{guest.vnc_path}",
        "--listen",
        f"unix:{guest_dir / 'gw.sock'}",
        "--socket-group",
        "no-such-group-here",
    )
    async with asyncio.timeout(TIMEOUT):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert b"no group named 'no-such-group-here'" in err
    assert b"Traceback" not in err
