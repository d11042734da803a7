"""A private session bus per test, with resourced installed for D-Bus activation.

`session` starts a real `dbus-daemon` whose service directory holds the files
`resourced install-user-service --prefix` wrote, so the service is started by
activation exactly as on a desktop (a plain dbus-daemon runs `Exec=`). Its
config directory is the test's own (XDG_CONFIG_HOME in the daemon's
environment, which activated services inherit). `gateway_guest` is the demo
guest (real QEMU under TCG) behind a real gateway process on a Unix socket. A missing
dbus-daemon or QEMU fails these tests; they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.demo.tour import bus_config

BUS_NAME = "org.resourced.Resourced1"
ROOT = "/org/resourced/Resourced1"
TIMEOUT = 60.0
VENV_BIN = Path(sys.executable).parent


@dataclass
class Session:
    """A private session bus with resourced activatable on it."""

    directory: Path
    address: str
    config_dir: Path
    env: dict[str, str]
    daemon: subprocess.Popen[bytes]

    def write_config(self, text: str) -> None:
        """The service's config.toml; no libvirt connection unless `text` names some."""
        if "[libvirt]" not in text:
            text += "\n[libvirt]\nuris = []\n"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "config.toml").write_text(text)

    async def client(self, negotiate_unix_fd: bool = True) -> MessageBus:
        bus = MessageBus(
            bus_address=self.address, bus_type=BusType.SESSION, negotiate_unix_fd=negotiate_unix_fd
        )
        return await bus.connect()

    def run(
        self, *argv: str, timeout: float = TIMEOUT, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """A command with this bus as its session bus (busctl --user, resourcectl)."""
        return subprocess.run(
            list(argv),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,  # type: ignore[call-overload]
        )

    def busctl(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.run("busctl", "--user", *args, timeout=timeout)

    def resourcectl(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.run(str(VENV_BIN / "resourcectl"), *args, timeout=timeout)

    def service_pid(self) -> int | None:
        result = self.busctl("status", BUS_NAME, timeout=10)
        for line in result.stdout.splitlines():
            if line.startswith("PID="):
                return int(line[4:])
        return None


def _kill_service_processes(directory: Path) -> None:
    """Any resourced still running for this bus (activated processes outlive the daemon)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes()
            if (
                str(directory).encode() in environ
                and b"resourced" in (entry / "cmdline").read_bytes()
            ):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def session() -> Iterator[Session]:
    directory = Path(tempfile.mkdtemp(prefix="rsd-bus-", dir="/tmp"))
    os.chmod(directory, 0o755)  # a test connects as `nobody` too
    socket_path = directory / "bus"
    prefix = directory / "share"
    config_home = directory / "config"
    runtime = directory / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ)
    env.update(
        DBUS_SESSION_BUS_ADDRESS=f"unix:path={socket_path}",
        XDG_CONFIG_HOME=str(config_home),
        XDG_RUNTIME_DIR=str(runtime),
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    install = subprocess.run(
        [str(VENV_BIN / "resourced"), "install-user-service", "--prefix", str(prefix)],
        env={**env, "DBUS_SESSION_BUS_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert install.returncode == 0, install.stderr
    config = directory / "bus.conf"
    config.write_text(bus_config(socket_path, prefix / "dbus-1" / "services", any_user=True))
    daemon_binary = shutil.which("dbus-daemon")
    assert daemon_binary is not None, "dbus-daemon is not installed (Debian package dbus-daemon)"
    log = (directory / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [daemon_binary, f"--config-file={config}", "--nofork", "--nopidfile"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        for _ in range(int(TIMEOUT / 0.05)):
            if socket_path.exists():
                break
            assert daemon.poll() is None, (directory / "daemon.log").read_text()
            subprocess.run(["sleep", "0.05"], check=True)
        os.chmod(socket_path, 0o777)
        session = Session(
            directory, f"unix:path={socket_path}", config_home / "resourced", env, daemon
        )
        session.write_config("")
        yield session
    finally:
        daemon.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(10)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        _kill_service_processes(directory)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class GatewayGuest:
    """The demo guest (QEMU) and the gateway in front of it, at `address`.

    The gateway is a process of its own: the tests call `busctl` and friends
    blocking, which would stop a gateway on the test's own loop just when the
    service needs it.
    """

    guest: QemuGuest
    process: subprocess.Popen[bytes]
    address: str
    directory: Path


def start_gateway(
    guest: QemuGuest, directory: Path, name: str = "gw"
) -> tuple[subprocess.Popen[bytes], str]:
    """`resourced-gateway` in front of `guest` (serial0 and monitor), listening on a
    Unix socket in `directory`; returns once it listens."""
    path = directory / f"{name}.sock"
    with (directory / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "resourced-gateway"),
                *("--vnc", f"unix:{guest.vnc_path}", "--listen", f"unix:{path}"),
                *("--socket-mode", "666"),
                *("--console", f"serial0=unix:{guest.serial_path}"),
                *("--console", f"monitor=unix:{guest.monitor_path}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert process.poll() is None, (directory / f"{name}.log").read_text()
        assert time.monotonic() < deadline, "the gateway did not listen"
        time.sleep(0.05)
    return process, f"unix:{path}"


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def gateway_guest() -> AsyncIterator[GatewayGuest]:
    """The demo guest behind a gateway at `unix:...` (serial0 and monitor)."""
    async with demo_behind_gateway() as gateway_guest:
        yield gateway_guest


@contextlib.asynccontextmanager
async def demo_behind_gateway() -> AsyncIterator[GatewayGuest]:
    """A demo guest behind its own gateway (for tests that need more than one).

    QEMU starts paused and runs once the gateway has its serial port, so the
    guest's banner is in the gateway's history.
    """
    directory = Path(tempfile.mkdtemp(prefix="rsd-gw-", dir="/tmp"))
    guest = QemuGuest(GuestConfig(workdir=directory / "guest", start_paused=True))
    process: subprocess.Popen[bytes] | None = None
    try:
        await guest.start(timeout=TIMEOUT)
        process, address = await asyncio.to_thread(start_gateway, guest, directory)
        await guest.wait_chardev_connected("serial0", TIMEOUT)
        await guest.resume()
        yield GatewayGuest(guest, process, address, directory)
    finally:
        if process is not None:
            await asyncio.to_thread(stop_process, process)
        await guest.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def call(
    bus: MessageBus,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[object] | None = None,
) -> Message:
    """A method call to the service; the reply (METHOD_RETURN or ERROR) as it came."""
    reply = await asyncio.wait_for(
        bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        ),
        TIMEOUT,
    )
    assert reply is not None
    return reply


def ok(reply: Message) -> list[object]:
    assert reply.message_type is MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return list(reply.body)


def read_fd_until(fd: int, wanted: bytes, seen: bytes = b"") -> bytes:
    """Read a blocking fd (with a deadline) until `wanted` is in what came."""
    deadline = time.monotonic() + TIMEOUT
    while wanted not in seen:
        assert time.monotonic() < deadline, f"did not see {wanted!r}, only {seen!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"EOF before {wanted!r}; had {seen!r}"
            seen += chunk
    return seen


def type_until_echoed(sock: socket.socket, text: bytes) -> None:
    """Type `text` until the guest echoes it (bytes typed while the console is
    down may be lost in QEMU)."""
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    while text not in seen:
        assert time.monotonic() < deadline, f"no echo of {text!r}; saw {seen!r}"
        sock.sendall(text)
        end = time.monotonic() + 1.0
        while text not in seen and time.monotonic() < end:
            ready, _, _ = select.select([sock], [], [], 0.2)
            if ready:
                chunk = sock.recv(4096)
                assert chunk, f"EOF; saw {seen!r}"
                seen += chunk
