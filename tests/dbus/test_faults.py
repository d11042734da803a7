"""Faults under open consoles, all real: the gateway (its own process,
`resourced-gateway`) killed and started again at the same socket, QEMU killed
and started again behind a gateway that stays, and the service's connection to
a gateway that stays cut under it. An app's fd (Console.Open) and a PTY stay
open through all of them; what the service shows meanwhile (State, Available,
NotConnected) is checked as a subscribed client sees it. Output a gateway got
while the service was away reaches the service once it is back (the console
extension's stream positions): a new gateway's whole history, or what the same
gateway got after the last byte the service had, neither lost nor repeated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.consoles import ConsoleData, ConsoleOpened, Consoles
from tests.dbus.conftest import BUS_NAME, ROOT, TIMEOUT, VENV_BIN, Session, call, ok
from tests.dbus.signals import Signals, get_property
from tests.dbus.test_service import BANNER

MANAGER = f"{BUS_NAME}.Manager"
GUEST = f"{BUS_NAME}.Guest"
CONSOLE = f"{BUS_NAME}.Console"
ERROR = f"{BUS_NAME}.Error."
DEMO = f"{ROOT}/guests/demo"
SERIAL = f"{DEMO}/consoles/serial0"
#: The link's reconnection delays grow to 10 s: a new gateway is found within
#: that plus a connection, on a loaded machine.
RECONNECT_BOUND = 30.0


class GatewayProcess:
    """`resourced-gateway` in front of a demo guest's sockets, in its own process."""

    def __init__(self, guest_dir: Path, socket_path: Path) -> None:
        self.guest_dir = guest_dir
        self.socket_path = socket_path
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = socket_path.with_suffix(".log")

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self) -> None:
        assert self.process is None
        binary = VENV_BIN / "resourced-gateway"
        assert binary.exists(), f"{binary} is not installed (run scripts/setup)"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    "--vnc",
                    f"unix:{self.guest_dir / 'vnc.sock'}",
                    "--listen",
                    self.address,
                    "--console",
                    f"serial0=unix:{self.guest_dir / 'ser.sock'}",
                    "--console",
                    f"monitor=unix:{self.guest_dir / 'mon.sock'}",
                    "-v",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + TIMEOUT
        while True:  # a stale socket of a killed gateway refuses until the new one binds
            assert self.process.poll() is None, self.log_path.read_text()
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.socket_path))
                return
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not listen in time"
                time.sleep(0.05)
            finally:
                probe.close()

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(TIMEOUT)


@pytest.fixture
def workdir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="rsd-fault-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def chardev_attached(guest: QemuGuest, label: str) -> None:
    """Wait until something (the gateway) is connected to a chardev of QEMU's."""

    async def attached() -> bool:
        chardevs = await guest.qmp("query-chardev")
        (chardev,) = [c for c in chardevs if c["label"] == label]
        return not str(chardev["filename"]).startswith("disconnected:")

    async with asyncio.timeout(TIMEOUT):
        while not await attached():
            await asyncio.sleep(0.05)


async def run_once_serial_attached(guest: QemuGuest) -> None:
    """Resume a guest started paused once something reads its serial chardev: QEMU
    drops serial output nobody reads, and the banner is written once, at boot."""
    await chardev_attached(guest, "serial0")
    await guest.resume()


@pytest.fixture
async def guest(workdir: Path) -> AsyncIterator[QemuGuest]:
    guest = QemuGuest(GuestConfig(workdir=workdir / "guest", start_paused=True))
    await guest.start(timeout=TIMEOUT)
    try:
        yield guest
    finally:
        await guest.stop()


@pytest.fixture
async def gateway(workdir: Path, guest: QemuGuest) -> AsyncIterator[GatewayProcess]:
    gateway = GatewayProcess(guest.workdir, workdir / "gw.sock")
    gateway.start()
    try:
        await run_once_serial_attached(guest)
        yield gateway
    finally:
        gateway.kill()


class Reader:
    """Everything an fd has given so far, read on a thread with deadlines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.seen = b""

    async def until(self, wanted: bytes, after: int = 0) -> None:
        """Read until `wanted` shows up at or after offset `after` of what came."""
        await asyncio.to_thread(self._read_until, wanted, after)

    def _read_until(self, wanted: bytes, after: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.seen.find(wanted, after) < 0:
            assert time.monotonic() < deadline, f"no {wanted!r} after {after}: {self.seen!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"EOF before {wanted!r}; had {self.seen!r}"
                self.seen += chunk


async def open_fd(bus: MessageBus, path: str) -> socket.socket:
    reply = await call(bus, path, CONSOLE, "Open", "a{sv}", [{}])
    sock = socket.socket(fileno=reply.unix_fds[ok(reply)[0]])
    sock.setblocking(True)
    return sock


async def test_gateway_killed_under_an_open_fd_and_pty(
    session: Session, gateway: GatewayProcess
) -> None:
    bus = await session.client()
    signals = await Signals(bus).start()
    app = pty_fd = None
    try:
        ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway.address, {}]))
        await signals.wait_property(SERIAL, CONSOLE, "Available", True)
        app = await open_fd(bus, SERIAL)
        (pty_path,) = ok(await call(bus, SERIAL, CONSOLE, "OpenPty", "a{sv}", [{}]))
        pty_fd = os.open(str(pty_path), os.O_RDWR | os.O_NOCTTY)
        fd_seen, pty_seen = Reader(app.fileno()), Reader(pty_fd)
        await fd_seen.until(BANNER)
        await pty_seen.until(BANNER)
        app.sendall(b"before-fault")
        await fd_seen.until(b"before-fault")
        await pty_seen.until(b"before-fault")

        # The gateway dies: the guest reconnects, the console is unavailable,
        # Write says NotConnected; the fd and the PTY stay open.
        mark = signals.mark()
        gateway.kill()
        await signals.wait_property(DEMO, GUEST, "State", "reconnecting", since=mark)
        await signals.wait_property(SERIAL, CONSOLE, "Available", False, since=mark)
        assert await get_property(bus, SERIAL, CONSOLE, "Available") is False
        assert await get_property(bus, DEMO, GUEST, "LastError") != ""
        reply = await call(bus, SERIAL, CONSOLE, "Write", "aya{sv}", [b"lost?", {}])
        assert reply.error_name == ERROR + "NotConnected", (reply.error_name, reply.body)
        assert "serial0" in reply.body[0] or "demo" in reply.body[0], reply.body
        # Typed meanwhile: held (the service stops reading the fd), not dropped.
        app.sendall(b"typed-while-down")
        os.write(pty_fd, b"pty-while-down")
        assert await get_property(bus, DEMO, GUEST, "State") == "reconnecting"
        assert await get_property(bus, SERIAL, CONSOLE, "OpenCount") == 2

        # A new gateway at the same socket: found again by itself, in bounded time.
        mark = signals.mark()
        started = time.monotonic()
        gateway.start()
        await signals.wait_property(DEMO, GUEST, "State", "connected", since=mark)
        await signals.wait_property(SERIAL, CONSOLE, "Available", True, since=mark)
        assert time.monotonic() - started < RECONNECT_BOUND
        # What was typed while it was down reaches the guest; its echo both clients.
        for reader in (fd_seen, pty_seen):
            await reader.until(b"typed-while-down")
            await reader.until(b"pty-while-down")
        app.sendall(b"after-fault")
        os.write(pty_fd, b"pty-after-fault")
        for reader in (fd_seen, pty_seen):
            await reader.until(b"after-fault")
            await reader.until(b"pty-after-fault")
        # In order, each once: nothing replayed twice, nothing skipped.
        for seen in (fd_seen.seen, pty_seen.seen):
            for word in (BANNER, b"before-fault", b"typed-while-down", b"pty-after-fault"):
                assert seen.count(word) == 1, (word, seen)
            assert seen.index(b"before-fault") < seen.index(b"typed-while-down")
            assert seen.index(b"typed-while-down") < seen.index(b"pty-after-fault")
        # The service's ring spans the fault.
        (history,) = ok(await call(bus, SERIAL, CONSOLE, "ReadHistory", "a{sv}", [{}]))
        history = bytes(history)
        assert BANNER in history
        assert history.index(b"before-fault") < history.index(b"pty-after-fault")
        assert history.count(b"before-fault") == 1
        # Write works again.
        ok(await call(bus, SERIAL, CONSOLE, "Write", "aya{sv}", [b"written-again", {}]))
        await fd_seen.until(b"written-again")
    finally:
        if app is not None:
            app.close()
        if pty_fd is not None:
            os.close(pty_fd)
        bus.disconnect()


async def test_qemu_restarted_behind_the_gateway(
    session: Session, guest: QemuGuest, gateway: GatewayProcess
) -> None:
    bus = await session.client()
    signals = await Signals(bus).start()
    app = None
    restarted: QemuGuest | None = None
    try:
        ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway.address, {}]))
        await signals.wait_property(SERIAL, CONSOLE, "Available", True)
        app = await open_fd(bus, SERIAL)
        reader = Reader(app.fileno())
        await reader.until(BANNER)
        app.sendall(b"first-life")
        await reader.until(b"first-life")

        mark = signals.mark()
        assert guest.pid is not None
        os.kill(guest.pid, signal.SIGKILL)
        await guest.stop()
        await signals.wait_property(DEMO, GUEST, "State", "reconnecting", since=mark)
        # The same machine again at the same sockets. It runs once the service is
        # back and the gateway's chardev has found it again (output the gateway
        # got while the service was reconnecting would reach it too, by stream
        # positions: see the tests below).
        restarted = QemuGuest(GuestConfig(workdir=guest.workdir, start_paused=True))
        await restarted.start(timeout=TIMEOUT)
        await signals.wait_property(DEMO, GUEST, "State", "connected", since=mark)
        await signals.wait_property(SERIAL, CONSOLE, "Available", True, since=mark)
        await run_once_serial_attached(restarted)
        # The open fd works again: the new boot's banner, then an echo.
        boot = reader.seen.index(b"first-life")
        await reader.until(BANNER, after=boot)
        app.sendall(b"second-life")
        await reader.until(b"second-life")
        assert reader.seen.count(b"first-life") == 1
        assert await get_property(bus, SERIAL, CONSOLE, "OpenCount") == 1
    finally:
        if app is not None:
            app.close()
        bus.disconnect()
        if restarted is not None:
            await restarted.stop()


async def test_output_while_reconnecting_is_replayed(
    session: Session, guest: QemuGuest, gateway: GatewayProcess
) -> None:
    """A new gateway attaches to QEMU's monitor before the service finds it, and
    QEMU greets it at once: that greeting is in the new gateway's history (a new
    stream), and reaches the fd that stayed open, once."""
    monitor = f"{DEMO}/consoles/monitor"
    greeting = b"monitor - type 'help'"
    bus = await session.client()
    signals = await Signals(bus).start()
    app = None
    # The new gateway listens elsewhere until QEMU has greeted it, then its socket
    # is moved to the path the service knows: the order is certain.
    replacement = GatewayProcess(guest.workdir, gateway.socket_path.with_name("gw2.sock"))
    try:
        ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway.address, {}]))
        await signals.wait_property(monitor, CONSOLE, "Available", True)
        app = await open_fd(bus, monitor)
        reader = Reader(app.fileno())
        await reader.until(greeting)
        mark = signals.mark()
        gateway.kill()
        await signals.wait_property(DEMO, GUEST, "State", "reconnecting", since=mark)
        replacement.start()
        await chardev_attached(guest, "compat_monitor0")
        os.rename(replacement.socket_path, gateway.socket_path)
        await signals.wait_property(monitor, CONSOLE, "Available", True, since=mark)
        # Output comes in order: by the answer to a command typed now, any replay
        # of the new gateway's history has come.
        app.sendall(b"after-reconnect\n")
        await reader.until(b"unknown command: 'after-reconnect'")
        assert reader.seen.count(greeting) == 2, reader.seen
    finally:
        replacement.kill()
        if app is not None:
            app.close()
        bus.disconnect()


class CuttingRelay:
    """A Unix-socket relay between the service and a gateway, to cut the
    service's connection at will while the gateway stays: a fault no real peer
    makes on demand. It passes bytes through untouched; `cut()` aborts every
    connection through it at both ends; while `held`, new connections wait
    unanswered (the service's handshake waits with them) until `release()`."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path = path
        self.upstream = upstream
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._closed = False

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accepted, str(self.path))

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await self._open.wait()
        if self._closed:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        self._pairs.append((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        sink.transport.abort()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def cut(self) -> None:
        pairs, self._pairs = self._pairs, []
        assert pairs, "nothing to cut: the service is not connected through the relay"
        for ours, theirs in pairs:
            ours.transport.abort()
            theirs.transport.abort()

    async def close(self) -> None:
        self._closed = True
        self._open.set()
        if self._server is not None:
            self._server.close()
        for ours, theirs in self._pairs:
            ours.transport.abort()
            theirs.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Typist:
    """A viewer of our own on the gateway (not through the service) that types
    numbered words into serial0 one at a time and reads the guest's echo: the
    guest keeps printing, whoever else is connected."""

    def __init__(self, client: RfbClient, consoles: Consoles) -> None:
        self.client = client
        self.consoles = consoles
        self.echo = b""
        self.typed: list[bytes] = []
        #: Words typed whose echo came back.
        self.echoed = 0
        self.stop = asyncio.Event()

    @classmethod
    async def connect(cls, gateway: GatewayProcess) -> Typist:
        consoles = Consoles()
        client = await connect(gateway.address, extensions=[consoles], timeout=TIMEOUT)
        typist = cls(client, consoles)
        async with asyncio.timeout(TIMEOUT):
            while not consoles.announced:
                await client.next_event()
            consoles.open(typist.console_id, history=False)
            client.flush()
            while not isinstance(await client.next_event(), ConsoleOpened):
                pass
        return typist

    @property
    def console_id(self) -> int:
        info = self.consoles.by_name("serial0")
        assert info is not None, self.consoles.consoles
        return info.console_id

    async def run(self) -> None:
        """Type the next word once the last one came back, until told to stop."""
        while not self.stop.is_set():
            word = b"<%04d>" % len(self.typed)
            self.typed.append(word)
            self.consoles.write(self.console_id, word)
            self.client.flush()
            async with asyncio.timeout(TIMEOUT):
                while not self.echo.endswith(word):
                    event = await self.client.next_event()
                    if isinstance(event, ConsoleData):
                        self.echo += event.data
                    self.client.flush()
            self.echoed += 1
            await asyncio.sleep(0.01)

    async def until_typed(self, count: int, typing: asyncio.Task[None]) -> None:
        """Wait until `count` words came back (`typing` runs `run()`)."""
        async with asyncio.timeout(TIMEOUT):
            while self.echoed < count:
                if typing.done():
                    typing.result()  # its error, if it failed
                    raise AssertionError("the typist stopped")
                await asyncio.sleep(0.02)


async def test_output_while_the_connection_was_cut_comes_once(
    session: Session, workdir: Path, gateway: GatewayProcess
) -> None:
    """The same gateway stays; only the service's connection to it is cut, and
    the guest keeps printing before, while the service is away and after: the
    app's fd gets every byte the guest printed exactly once, in order."""
    bus = await session.client()
    signals = await Signals(bus).start()
    relay = CuttingRelay(workdir / "relay.sock", gateway.socket_path)
    await relay.start()
    app = None
    typist = await Typist.connect(gateway)
    typing: asyncio.Task[None] | None = None
    try:
        ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", relay.address, {}]))
        await signals.wait_property(SERIAL, CONSOLE, "Available", True)
        app = await open_fd(bus, SERIAL)
        reader = Reader(app.fileno())
        await reader.until(BANNER)
        typing = asyncio.get_running_loop().create_task(typist.run())
        assert typing is not None
        await typist.until_typed(20, typing)
        await reader.until(typist.typed[19])

        # Cut the service off; it cannot come back until the guest has printed more.
        mark = signals.mark()
        relay.hold()
        relay.cut()
        await signals.wait_property(DEMO, GUEST, "State", "reconnecting", since=mark)
        away_from = len(typist.typed)
        await typist.until_typed(away_from + 30, typing)
        assert relay.accepted >= 1  # the service is trying: held, unanswered
        relay.release()
        await signals.wait_property(DEMO, GUEST, "State", "connected", since=mark)
        back_at = len(typist.typed)
        await typist.until_typed(back_at + 20, typing)
        typist.stop.set()
        await typing
        typing = None

        last = typist.typed[-1]
        await reader.until(last)
        printed = b"".join(typist.typed)
        assert typist.echo.endswith(printed)  # the guest echoed every word, once
        got = reader.seen[reader.seen.index(typist.typed[0]) :]
        # Every word, the 30 or more printed while the service was away among
        # them, once each and in order: nothing lost, nothing repeated.
        assert got == printed, (away_from, back_at, got)
        # The service's ring holds the same.
        (history,) = ok(await call(bus, SERIAL, CONSOLE, "ReadHistory", "a{sv}", [{}]))
        assert bytes(history).endswith(printed)
    finally:
        typist.stop.set()
        if typing is not None:
            typing.cancel()
        await typist.client.close()
        if app is not None:
            app.close()
        bus.disconnect()
        await relay.close()
