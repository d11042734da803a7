"""The resourced D-Bus service: activation to the first console byte, and many guests.

Run from the repository root:

    .venv/bin/python -m bench.service_bench [--quick] [--json]

It measures, in one run:

1. **Activation to the first console byte.** A real demo guest (TCG QEMU)
   behind a gateway process on a Unix socket; for each run, a fresh private
   bus (`bench.bus`) on which the service is not running, so the first call
   starts it by D-Bus activation. Two ways an app gets there, alternated run
   by run:

   - `AddGuest`: the app adds the guest (the call activates the service), waits
     for the console's `InterfacesAdded`, calls `Console.Open` and reads the fd;
   - `config.toml`: the guest is in the service's config file; the app calls
     `GetManagedObjects` (which activates it), takes the console from the reply
     or waits for its `InterfacesAdded`, then `Open` and read.

   Each run is timed from the first call to the first byte read from the fd
   (the console's history: the guest's banner), with the phases in between,
   and then one echo through the fd. The first start compiles the package's
   bytecode (into a cache of the run's own) and is reported apart.
2. **Many guests.** `--guests` (100) in-process gateways (`Gateway`), each in
   front of a small echoing Unix socket peer as its one console's chardev and
   of one fake VNC server (our `ServerConnection`: no QEMU at all). The
   service is activated, every guest added and one `Console.Open` fd per
   guest held open (each checked with an echo); then, after a settling pause,
   the service's resident memory (`/proc/PID/status` VmRSS, and VmHWM, its
   peak) and the CPU it uses over `--idle` seconds of nothing happening
   (`/proc/PID/stat` utime + stime), against the same figures with no guest.

It prints the figures with the targets (PASS/MISS), or one JSON object with
`--json`. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from bench.bus import (
    MANAGER,
    OBJECT_MANAGER,
    ROOT,
    PrivateBus,
    add_guest,
    call,
    checked,
    console_path,
    cpu_seconds,
    memory_kib,
    open_console,
    published_consoles,
    wait_consoles,
)
from bench.console_bench import GatewayProcess, machine_info
from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.server import ClientInitReceived, ServerConnection, ServerSecurity

# Targets from the issue.
ACTIVATION_TARGET_MS = 300.0
RSS_TARGET_MB = 150.0
IDLE_CPU_TARGET = 1.0  # percent of one core

ADD_GUEST = "AddGuest"
CONFIG = "config.toml"
GUEST = "demo"


class BenchError(Exception):
    """Something could not be set up, or misbehaved."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    #: Counted activation runs per way (after one uncounted cold start).
    runs: int = 10
    guests: int = 100
    #: Seconds of idleness over which the service's CPU is measured.
    idle: float = 10.0
    #: Seconds to let the service settle before measuring.
    settle: float = 2.0
    activation: bool = True
    many: bool = True
    timeout: float = 60.0
    keep_workdir: bool = False


# ---------------------------------------------------------------------------
# 1. Activation to the first console byte
# ---------------------------------------------------------------------------


@dataclass
class ActivationRun:
    """One run's times in ms from the first call (None: that step does not apply)."""

    way: str
    reply_ms: float  # the activating call answered
    console_ms: float  # the console's object known to the app
    open_ms: float  # Console.Open answered with the fd
    first_byte_ms: float  # the first byte read from the fd
    echo_ms: float  # then one byte written and its echo read back
    #: What the service spent importing its code (its own `-X importtime`).
    imports_ms: float


@dataclass
class ActivationResults:
    cold: ActivationRun | None = None
    runs: list[ActivationRun] = field(default_factory=list)
    #: `python -c pass` on this machine, ms, one after each run (p50).
    interpreter_ms: float = 0.0

    def of(self, way: str) -> list[ActivationRun]:
        return [run for run in self.runs if run.way == way]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for way in (ADD_GUEST, CONFIG):
            runs = self.of(way)
            if not runs:
                continue
            out[way] = {
                "n": len(runs),
                **{
                    f"{step}_p50_ms": round(_p50([getattr(r, step) for r in runs]), 1)
                    for step in (
                        "imports_ms",
                        "reply_ms",
                        "console_ms",
                        "open_ms",
                        "first_byte_ms",
                        "echo_ms",
                    )
                },
                "first_byte_max_ms": round(max(r.first_byte_ms for r in runs), 1),
                "first_byte_ms": [round(r.first_byte_ms, 1) for r in runs],
            }
        out["interpreter_p50_ms"] = round(self.interpreter_ms, 1)
        if self.cold is not None:
            out["cold_start"] = {
                "way": self.cold.way,
                "first_byte_ms": round(self.cold.first_byte_ms, 1),
            }
        return out


def _p50(values: list[float]) -> float:
    return statistics.median(values)


class ConsoleWatch:
    """Remembers when each console's `InterfacesAdded` came (a bus message handler)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}

    def __call__(self, message: Message) -> None:
        if (
            message.message_type is MessageType.SIGNAL
            and message.interface == OBJECT_MANAGER
            and message.member == "InterfacesAdded"
        ):
            now = time.perf_counter()
            path = message.body[0]
            self.seen.setdefault(path, now)
            waiter = self._waiters.pop(path, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)

    async def wait(self, path: str) -> float:
        if path in self.seen:
            return self.seen[path]
        waiter = self._waiters.setdefault(path, asyncio.get_running_loop().create_future())
        return await waiter


async def watch_consoles(bus: MessageBus) -> ConsoleWatch:
    watch = ConsoleWatch()
    bus.add_message_handler(watch)
    reply = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[
                f"type='signal',interface='{OBJECT_MANAGER}',member='InterfacesAdded',path='{ROOT}'"
            ],
        )
    )
    checked(reply, "AddMatch")
    return watch


async def read_first_byte(sock: socket.socket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        data = await loop.sock_recv(sock, 4096)
    if not data:
        raise BenchError("the fd read EOF before any byte")
    return data


async def echo_once(sock: socket.socket, byte: bytes, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, byte)
    async with asyncio.timeout(timeout):
        while True:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise BenchError("the fd read EOF before the echo")
            if byte in data:
                return


async def activation_run(
    way: str, address: str, directory: Path, cache: Path, options: Options
) -> ActivationRun:
    """One fresh bus, one activation, one first byte (see the module docstring)."""
    bus = PrivateBus(directory, bytecode_cache=cache)
    # The service writes its import times to its stderr, the daemon's log.
    bus.env["PYTHONPROFILEIMPORTTIME"] = "1"
    config = "[service]\nidle-exit = 0\n"
    if way == CONFIG:
        config += f'[[guest]]\nname = "{GUEST}"\naddress = "{address}"\n'
    bus.write_config(config)
    client: MessageBus | None = None
    sock: socket.socket | None = None
    try:
        await bus.start(options.timeout)
        client = await bus.client()
        watch = await watch_consoles(client)
        path = console_path(GUEST, "serial0")
        start = time.perf_counter()
        if way == ADD_GUEST:
            await add_guest(client, GUEST, address, options.timeout)
            replied = time.perf_counter()
            async with asyncio.timeout(options.timeout):
                known = await watch.wait(path)
        else:
            reply = await call(client, ROOT, OBJECT_MANAGER, "GetManagedObjects")
            replied = time.perf_counter()
            if path in checked(reply, "GetManagedObjects")[0]:
                known = replied
            else:
                async with asyncio.timeout(options.timeout):
                    known = await watch.wait(path)
        known = max(known, replied)  # a signal handled first is still used after the reply
        fd = await open_console(client, path, timeout=options.timeout)
        opened = time.perf_counter()
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        await read_first_byte(sock, options.timeout)
        first = time.perf_counter()
        await echo_once(sock, b"@", options.timeout)
        echoed = time.perf_counter()
    except Exception as error:
        raise BenchError(f"activation ({way}) failed: {error}\n{bus.log()}") from error
    finally:
        if sock is not None:
            sock.close()
        if client is not None:
            client.disconnect()
        await bus.stop()

    def ms(t: float) -> float:
        return (t - start) * 1000

    imports = service_imports_ms(bus.log_path)
    return ActivationRun(
        way, ms(replied), ms(known), ms(opened), ms(first), (echoed - first) * 1000, imports
    )


#: What the service imports before it runs: its entry module, then (once the
#: command line is parsed) these two, each a top-level `-X importtime` line
#: whose cumulative time includes all it pulls in.
SERVICE_IMPORTS = ("resourced.dbus.__main__", "resourced.config", "resourced.dbus.service")


def service_imports_ms(log_path: Path) -> float:
    """The service's own import time of its code, from `-X importtime` lines."""
    found: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("import time:"):
            continue
        _, cumulative, name = line.split("|")
        if name.startswith(" ") and name[1:] in SERVICE_IMPORTS:  # top level: no indent
            found.setdefault(name[1:], int(cumulative) / 1000)
    if "resourced.dbus.__main__" not in found:
        raise BenchError(f"no import time for the service in {log_path}")
    return sum(found.values())


async def interpreter_ms(env: dict[str, str]) -> float:
    """ms to run `python -c pass` to its exit."""
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass", env=env)
    if await process.wait() != 0:
        raise BenchError("python -c pass failed")
    return (time.perf_counter() - start) * 1000


async def measure_activation(workdir: Path, options: Options) -> ActivationResults:
    results = ActivationResults()
    guest = QemuGuest(GuestConfig(workdir=workdir / "guest", audio=False, start_paused=True))
    await guest.start(timeout=options.timeout)
    listen = workdir / "gw.sock"
    gateway = GatewayProcess(
        [
            "--vnc",
            f"unix:{guest.vnc_path}",
            "--listen",
            f"unix:{listen}",
            "--console",
            f"serial0=unix:{guest.serial_path}",
        ],
        workdir / "gateway.log",
        None,
    )
    try:
        await gateway.start()
        async with asyncio.timeout(options.timeout):
            while not listen.exists():
                gateway.check()
                await asyncio.sleep(0.02)
        await guest.wait_chardev_connected("serial0", options.timeout)
        await guest.resume()
        address = f"unix:{listen}"
        cache = workdir / "pycache"  # shared by every run: only the first compiles
        log("activation: the first start (compiles bytecode; not counted)")
        cold = workdir / "bus-cold"
        results.cold = await activation_run(ADD_GUEST, address, cold, cache, options)
        env = PrivateBus(workdir / "floor", bytecode_cache=cache).env
        interpreter = []
        for index in range(options.runs * 2):
            way = (ADD_GUEST, CONFIG)[index % 2]
            run = await activation_run(way, address, workdir / f"bus{index}", cache, options)
            log(f"activation {way}: first byte after {run.first_byte_ms:.1f} ms")
            results.runs.append(run)
            interpreter.append(await interpreter_ms(env))
        results.interpreter_ms = _p50(interpreter)
    finally:
        await gateway.stop()
        await guest.stop()
    return results


# ---------------------------------------------------------------------------
# 2. Many guests, one console each
# ---------------------------------------------------------------------------


@dataclass
class ManyResults:
    guests: int
    idle_seconds: float
    base_rss_kib: int = 0
    base_cpu_percent: float = 0.0
    rss_kib: int = 0
    hwm_kib: int = 0
    cpu_percent: float = 0.0
    add_seconds: float = 0.0
    open_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        per_guest = (self.rss_kib - self.base_rss_kib) / max(1, self.guests)
        return {
            "guests": self.guests,
            "idle_seconds": self.idle_seconds,
            "rss_mb_no_guest": round(self.base_rss_kib / 1024, 1),
            "idle_cpu_percent_no_guest": round(self.base_cpu_percent, 3),
            "rss_mb": round(self.rss_kib / 1024, 1),
            "peak_rss_mb": round(self.hwm_kib / 1024, 1),
            "rss_kib_per_guest": round(per_guest, 1),
            "idle_cpu_percent": round(self.cpu_percent, 3),
            "add_all_seconds": round(self.add_seconds, 2),
            "open_all_seconds": round(self.open_seconds, 2),
        }


class SmallServer:
    """A Unix socket server whose connections end on their own once the other side
    closes; `close()` waits for them (cancelled stream handlers log errors)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.ended = asyncio.Event()
        self.ended.set()

    async def serve(self, path: Path) -> None:
        self.server = await asyncio.start_unix_server(self._handler, str(path))

    async def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.ended.clear()
        try:
            with contextlib.suppress(Exception):  # a client leaving is no news here
                await self.talk(reader, writer)
            writer.close()
        finally:
            self.writers.discard(writer)
            if not self.writers:
                self.ended.set()

    async def talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()  # the handler then reads EOF and ends
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.ended.wait()


class FakeVncServer(SmallServer):
    """A VNC server that completes the handshake (security None) and then stays quiet."""

    async def talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = ServerConnection(ServerSecurity(allow_none=True))
        writer.write(server.data_to_send())
        while data := await reader.read(65536):
            server.receive_data(data)
            for event in server.events():
                if isinstance(event, ClientInitReceived):
                    server.send_server_init(64, 48, RGBX8888, "fake")
            writer.write(server.data_to_send())


class EchoPeer(SmallServer):
    """A chardev stand-in: echoes what it is sent."""

    async def talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def idle_cpu_percent(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds * 100


async def measure_many(workdir: Path, options: Options) -> ManyResults:
    results = ManyResults(options.guests, options.idle)
    closers: list[Callable[[], Awaitable[None]]] = []
    sockets: list[socket.socket] = []
    try:
        vnc_path = workdir / "vnc.sock"
        vnc = FakeVncServer()
        await vnc.serve(vnc_path)
        closers.append(vnc.close)
        addresses = []
        log(f"many guests: {options.guests} gateways with an echoing chardev each")
        for index in range(options.guests):
            peer = EchoPeer()
            await peer.serve(workdir / f"peer{index}.sock")
            closers.append(peer.close)
            spec = ConsoleSpec(
                "serial0",
                ConsoleKind.SERIAL,
                Endpoint(EndpointType.UNIX, str(workdir / f"peer{index}.sock")),
            )
            gateway = Gateway(
                GatewayConfig(
                    upstream=f"unix:{vnc_path}",
                    security=ServerSecurity(allow_none=True),
                    consoles=[spec],
                )
            )
            closers.append(gateway.close)
            await gateway.start()
            listen = workdir / f"gw{index}.sock"
            await gateway.listen_unix(str(listen))
            addresses.append(f"unix:{listen}")

        bus = PrivateBus(workdir / "bus", bytecode_cache=workdir / "pycache")
        bus.write_config("[service]\nidle-exit = 0\n")
        closers.append(bus.stop)
        await bus.start(options.timeout)
        client = await bus.client()

        async def disconnect() -> None:
            client.disconnect()

        closers.append(disconnect)
        checked(
            await call(
                client,
                ROOT,
                "org.freedesktop.DBus.Properties",
                "Get",
                "ss",
                [MANAGER, "Version"],
                options.timeout,
            ),
            "Version",
        )
        pid = await bus.service_pid(client)
        await asyncio.sleep(options.settle)
        results.base_rss_kib = memory_kib(pid)["VmRSS"]
        results.base_cpu_percent = await idle_cpu_percent(pid, options.idle)
        log(
            f"many guests: no guest: {results.base_rss_kib / 1024:.1f} MB, "
            f"{results.base_cpu_percent:.2f} % CPU; adding {options.guests}"
        )

        started = time.perf_counter()
        paths = set()
        for index, address in enumerate(addresses):
            await add_guest(client, f"g{index}", address, options.timeout)
            paths.add(console_path(f"g{index}", "serial0"))
        await wait_consoles(client, paths, options.timeout * 3)
        results.add_seconds = time.perf_counter() - started

        started = time.perf_counter()
        for path in sorted(paths):
            fd = await open_console(client, path, timeout=options.timeout)
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            sockets.append(sock)
        for sock in sockets:  # each one works both ways
            await echo_once(sock, b"#", options.timeout)
        results.open_seconds = time.perf_counter() - started
        missing = len(paths - await published_consoles(client))
        if missing:
            raise BenchError(f"{missing} consoles went away")
        log(f"many guests: {len(sockets)} consoles open and echoing; settling, then idle")
        await asyncio.sleep(options.settle)
        results.cpu_percent = await idle_cpu_percent(pid, options.idle)
        memory = memory_kib(pid)
        results.rss_kib, results.hwm_kib = memory["VmRSS"], memory["VmHWM"]
        for sock in sockets:  # still open, still echoing after the idle time
            await echo_once(sock, b"%", options.timeout)
    finally:
        for sock in sockets:
            sock.close()
        while closers:
            with contextlib.suppress(Exception):
                await closers.pop()()
    return results


# ---------------------------------------------------------------------------
# The run and its output
# ---------------------------------------------------------------------------


@dataclass
class Results:
    options: Options
    activation: ActivationResults | None = None
    many: ManyResults | None = None

    def targets(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.activation is not None:
            for way in (ADD_GUEST, CONFIG):
                runs = self.activation.of(way)
                if not runs:
                    continue
                p50 = _p50([r.first_byte_ms for r in runs])
                worst = max(r.first_byte_ms for r in runs)
                out.append(
                    {
                        "target": f"activation to first byte ({way}) <= "
                        f"{ACTIVATION_TARGET_MS:g} ms, p50 (max)",
                        "value": f"{p50:.1f} ({worst:.1f})",
                        "result": "PASS" if p50 <= ACTIVATION_TARGET_MS else "MISS",
                    }
                )
        if self.many is not None:
            rss = self.many.rss_kib / 1024
            out.append(
                {
                    "target": f"RSS with {self.many.guests} guests <= {RSS_TARGET_MB:g} MB",
                    "value": round(rss, 1),
                    "result": "PASS" if rss <= RSS_TARGET_MB else "MISS",
                }
            )
            out.append(
                {
                    "target": f"idle CPU with {self.many.guests} guests < "
                    f"{IDLE_CPU_TARGET:g} % of a core",
                    "value": round(self.many.cpu_percent, 3),
                    "result": "PASS" if self.many.cpu_percent < IDLE_CPU_TARGET else "MISS",
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": machine_info(),
            "options": {
                "runs": self.options.runs,
                "guests": self.options.guests,
                "idle": self.options.idle,
            },
            "activation": None if self.activation is None else self.activation.summary(),
            "many": None if self.many is None else self.many.summary(),
            "targets": self.targets(),
        }


async def run_benchmark(options: Options) -> Results:
    results = Results(options)
    workdir = Path(tempfile.mkdtemp(prefix="rsd-svcbench-", dir="/tmp"))
    try:
        if options.activation:
            results.activation = await measure_activation(workdir / "activation", options)
        if options.many:
            many_dir = workdir / "many"
            many_dir.mkdir()
            results.many = await measure_many(many_dir, options)
    finally:
        if not options.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def format_table(results: Results) -> str:
    info = machine_info()
    lines = [
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"{info['qemu']}; load average at the end {info['loadavg']}"
    ]
    activation = results.activation
    if activation is not None:
        lines.append("")
        head = "activation -> first console byte (ms, p50)"
        lines.append(
            f"{head:<44}{'imports':>8}{'reply':>8}{'console':>9}{'Open':>8}{'1st byte':>10}"
            f"{'max':>8}{'echo':>7}"
        )
        for way, label in (
            (ADD_GUEST, f"AddGuest on a fresh bus (N={len(activation.of(ADD_GUEST))})"),
            (CONFIG, f"guest in config.toml (N={len(activation.of(CONFIG))})"),
        ):
            runs = activation.of(way)
            if not runs:
                continue

            def p50(step: str, runs: list[ActivationRun] = runs) -> float:
                return _p50([getattr(r, step) for r in runs])

            lines.append(
                f"{label:<44}{p50('imports_ms'):>8.1f}{p50('reply_ms'):>8.1f}"
                f"{p50('console_ms'):>9.1f}"
                f"{p50('open_ms'):>8.1f}{p50('first_byte_ms'):>10.1f}"
                f"{max(r.first_byte_ms for r in runs):>8.1f}{p50('echo_ms'):>7.1f}"
            )
        lines.append(
            f"python -c pass, one after each run (p50): {activation.interpreter_ms:.1f} ms"
        )
        if activation.cold is not None:
            lines.append(
                f"first start of all (compiling bytecode, not counted): "
                f"{activation.cold.first_byte_ms:.1f} ms to the first byte"
            )
    many = results.many
    if many is not None:
        s = many.summary()
        lines.append("")
        lines.append(
            f"{many.guests} guests, one Console.Open fd each        RSS MB  peak MB  "
            f"idle CPU % ({many.idle_seconds:g} s)"
        )
        lines.append(
            f"{'no guest':<44}{s['rss_mb_no_guest']:>7.1f}{'':>9}  "
            f"{s['idle_cpu_percent_no_guest']:.3f}"
        )
        lines.append(
            f"{f'{many.guests} guests, {many.guests} fds open':<44}{s['rss_mb']:>7.1f}"
            f"{s['peak_rss_mb']:>9.1f}  {s['idle_cpu_percent']:.3f}"
        )
        lines.append(
            f"per guest: {s['rss_kib_per_guest']} KiB; adding all (published): "
            f"{s['add_all_seconds']} s; opening all and one echo each: "
            f"{s['open_all_seconds']} s"
        )
    lines.append("")
    lines.append("targets")
    for target in results.targets():
        lines.append(f"  {target['result']:<5} {target['target']}: {target['value']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="3 runs each way, 20 guests, 3 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, help="activation runs per way (default 10)")
    parser.add_argument("--guests", type=int, help="guests for the memory and CPU figures")
    parser.add_argument("--idle", type=float, help="seconds of idle CPU measured (default 10)")
    parser.add_argument(
        "--only", choices=("activation", "guests"), help="measure only one of the two"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    options = Options()
    if args.quick:
        options.runs, options.guests, options.idle = 3, 20, 3.0
    if args.runs is not None:
        options.runs = args.runs
    if args.guests is not None:
        options.guests = args.guests
    if args.idle is not None:
        options.idle = args.idle
    options.activation = args.only != "guests"
    options.many = args.only != "activation"
    options.keep_workdir = args.keep
    if options.runs < 1 or options.guests < 1 or not math.isfinite(options.idle):
        raise SystemExit("runs and guests must be positive")
    return options


async def run_until_signal(options: Options) -> Results:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await run_benchmark(options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    try:
        results = asyncio.run(run_until_signal(options))
    except asyncio.CancelledError:
        log("interrupted; everything started was stopped")
        return 130
    except BenchError as error:
        log(f"failed: {error}")
        return 1
    if args.json:
        print(json.dumps(results.to_json(), indent=2))
    else:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
