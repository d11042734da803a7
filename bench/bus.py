"""A private session bus with the resourced service activatable on it, for benchmarks.

`PrivateBus` starts a real `dbus-daemon` whose service directory holds the
files `resourced install-user-service --prefix` wrote, so the service is
started by D-Bus activation exactly as on a desktop (a plain dbus-daemon runs
the activation file's `Exec=`), with config and runtime directories of its
own. It is the set-up of `tests/dbus/conftest.py`, outside pytest, plus what a
benchmark needs: the service's PID (from the bus), its CPU time and memory
from `/proc`, and a stop that ends the service too (an activated process
outlives its bus).

It is not a test fixture and asserts nothing about the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from resourced.demo.tour import bus_config

BUS_NAME = "org.resourced.Resourced1"
ROOT = "/org/resourced/Resourced1"
MANAGER = f"{BUS_NAME}.Manager"
CONSOLE = f"{BUS_NAME}.Console"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
VENV_BIN = Path(sys.executable).parent


class ServiceCallError(Exception):
    """The service answered a call with an error (or not at all)."""


class PrivateBus:
    """A `dbus-daemon` in `directory` with resourced activatable (see the module docstring).

    `bytecode_cache`: where the activated service keeps its compiled bytecode
    (`PYTHONPYCACHEPREFIX`). This machine's environment sets
    `PYTHONDONTWRITEBYTECODE`, so without a cache every start would compile
    the whole package from source, which no installed service does; with one,
    only the first start does.
    """

    def __init__(self, directory: Path, *, bytecode_cache: Path | None = None) -> None:
        self.directory = directory
        self.socket_path = directory / "bus"
        self.address = f"unix:path={self.socket_path}"
        self.config_dir = directory / "config" / "resourced"
        self.log_path = directory / "daemon.log"
        env = dict(os.environ)
        env.update(
            DBUS_SESSION_BUS_ADDRESS=self.address,
            XDG_CONFIG_HOME=str(directory / "config"),
            XDG_RUNTIME_DIR=str(directory / "run"),
            PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        )
        if bytecode_cache is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(bytecode_cache)
        self.env = env
        self._daemon: subprocess.Popen[bytes] | None = None
        self._service_pids: set[int] = set()

    def write_config(self, text: str) -> None:
        """The service's `config.toml` (read when it starts)."""
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "config.toml").write_text(text)

    async def start(self, timeout: float = 30.0) -> None:
        """Install the activation files, start the daemon, wait for its socket."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "run").mkdir(mode=0o700, exist_ok=True)
        prefix = self.directory / "share"
        install = await asyncio.to_thread(
            subprocess.run,
            [str(VENV_BIN / "resourced"), "install-user-service", "--prefix", str(prefix)],
            env={**self.env, "DBUS_SESSION_BUS_ADDRESS": ""},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if install.returncode != 0:
            raise RuntimeError(f"resourced install-user-service failed: {install.stderr}")
        config = self.directory / "bus.conf"
        config.write_text(
            bus_config(self.socket_path, prefix / "dbus-1" / "services", any_user=True)
        )
        binary = shutil.which("dbus-daemon")
        if binary is None:
            raise RuntimeError("dbus-daemon is not installed (Debian package dbus-daemon)")
        with self.log_path.open("wb") as log:
            self._daemon = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [binary, f"--config-file={config}", "--nofork", "--nopidfile"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            async with asyncio.timeout(timeout):
                while not await asyncio.to_thread(self._accepts):
                    if self._daemon.poll() is not None:
                        raise RuntimeError(f"dbus-daemon exited: {self.log()}")
                    await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()  # no daemon left behind
            raise

    def _accepts(self) -> bool:
        """Whether the daemon accepts connections yet (its socket appears before it
        listens)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def log(self) -> str:
        """The daemon's stderr, where the activated service's own output goes too."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    async def client(self) -> MessageBus:
        """A new connection to this bus, with fd passing."""
        bus = MessageBus(bus_address=self.address, bus_type=BusType.SESSION, negotiate_unix_fd=True)
        return await bus.connect()

    async def service_pid(self, bus: MessageBus) -> int:
        """The PID of the process owning the service's name."""
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionUnixProcessID",
                signature="s",
                body=[BUS_NAME],
            )
        )
        body = checked(reply, "GetConnectionUnixProcessID")
        pid = int(body[0])
        self._service_pids.add(pid)
        return pid

    async def stop(self) -> None:
        """Stop the service (SIGTERM, then SIGKILL) and the daemon."""
        if self._daemon is not None and self._daemon.poll() is None:
            with contextlib.suppress(Exception):  # the service may not be running
                async with asyncio.timeout(5):
                    bus = await self.client()
                    try:
                        await self.service_pid(bus)
                    finally:
                        bus.disconnect()
        for pid in self._service_pids:
            await _end(pid)
        daemon = self._daemon
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            try:
                await asyncio.to_thread(daemon.wait, 10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                await asyncio.to_thread(daemon.wait)


async def _end(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):  # up to 10 s for a clean stop
            await asyncio.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)


async def name_has_owner(bus: MessageBus) -> bool:
    """Whether the service's name is owned now (asking does not activate it)."""
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="NameHasOwner",
            signature="s",
            body=[BUS_NAME],
        )
    )
    return bool(checked(reply, "NameHasOwner")[0])


def checked(reply: Message | None, what: str) -> list[Any]:
    """The body of a METHOD_RETURN; `ServiceCallError` with the error otherwise."""
    if reply is None:
        raise ServiceCallError(f"{what}: no reply")
    if reply.message_type is MessageType.ERROR:
        raise ServiceCallError(f"{what}: {reply.error_name}: {reply.body}")
    return list(reply.body)


async def call(
    bus: MessageBus,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    timeout: float = 60.0,
) -> Message:
    """A method call to the service; its reply (a METHOD_RETURN or an ERROR)."""
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
        timeout,
    )
    if reply is None:
        raise ServiceCallError(f"{member}: no reply")
    return reply


def console_path(guest: str, console: str) -> str:
    """The object path of a console (names of plain letters and digits only)."""
    return f"{ROOT}/guests/{guest}/consoles/{console}"


async def add_guest(bus: MessageBus, name: str, address: str, timeout: float = 60.0) -> str:
    reply = await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", [name, address, {}], timeout)
    return str(checked(reply, "AddGuest")[0])


async def open_console(
    bus: MessageBus, path: str, options: dict[str, Any] | None = None, timeout: float = 60.0
) -> int:
    """`Console.Open`: the fd it returns (ours to close)."""
    reply = await call(bus, path, CONSOLE, "Open", "a{sv}", [options or {}], timeout)
    index = checked(reply, "Open")[0]
    fds = list(reply.unix_fds)
    mine = fds.pop(index)
    for fd in fds:  # there are none; if there were, they are ours too
        os.close(fd)
    return int(mine)


async def published_consoles(bus: MessageBus, timeout: float = 60.0) -> set[str]:
    """The object paths of every console the service publishes now."""
    reply = await call(bus, ROOT, OBJECT_MANAGER, "GetManagedObjects", timeout=timeout)
    objects = checked(reply, "GetManagedObjects")[0]
    return {path for path, interfaces in objects.items() if CONSOLE in interfaces}


async def wait_consoles(bus: MessageBus, paths: set[str], timeout: float) -> None:
    """Poll until every console in `paths` is published."""
    async with asyncio.timeout(timeout):
        while not paths <= await published_consoles(bus, timeout):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the state is in another process


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process `pid`, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
