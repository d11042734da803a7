"""Console latency and throughput: resourced's gateway and service against the direct paths.

Run from the repository root (as root for the libvirt rows):

    .venv/bin/python -m bench.console_bench [--quick] [--json]

It measures, in one run and interleaved block by block:

1. the round-trip time of a one-byte echo through the demo guest's COM1 (TCG
   QEMU), by these paths: straight to QEMU's chardev socket (and through socat);
   through the gateway (a separate `python -m resourced.gateway` process, as
   deployed) with our own client; through the resourced D-Bus service, started
   by D-Bus activation on a private bus, with the fd `Console.Open` returned
   (the service in front of a gateway of its own); libvirt's
   `virDomainOpenConsole` stream; `virsh console` under a pty; and a second
   service, following qemu:///system, with the fd `Console.Open` returned for
   a domain with no gateway (the service behind libvirt's console stream).
   Every path has an identical demo guest of its own (a chardev socket takes
   one client and a gateway holds its guest's); the libvirt paths have a
   transient domain each (libvirt gives a console to one session at a time);
2. the throughput of a one-way bulk stream, console to client and client to
   console, with a local socket peer (`bench.peer`) as the chardev, read straight
   from the peer's socket, through the gateway, or through the service's fd.

It prints a table with each figure's ratio to the direct path and the targets
(PASS/MISS), or one JSON object with `--json`. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from bench.bus import (
    ROOT,
    PrivateBus,
    add_guest,
    console_path,
    name_has_owner,
    open_console,
    wait_consoles,
)
from bench.bus import cpu_seconds as process_cpu_seconds
from bench.peer import (
    ACK,
    CHUNK,
    PATTERN,
    RECEIVE,
    RECEIVE_VERIFY,
    SEND,
    pattern_matches,
    request,
)
from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.dbus.objects import escape_path_element
from resourced.demo.bootsector import DEFAULT_BANNER, build_boot_sector
from resourced.demo.qemu import GuestConfig, QemuGuest
from resourced.gateway.gateway import Gateway, GatewayConfig
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.connection import ClientConnection
from resourced.rfb.consoles import (
    ConsoleClosed,
    ConsoleData,
    ConsoleOpened,
    Consoles,
)
from resourced.rfb.server import ServerSecurity

MIB = 1024 * 1024
#: The repository root: the subprocesses run from there (`-m bench.peer`, `-m resourced...`).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SAMPLES = 2000
QUICK_SAMPLES = 200
DEFAULT_BULK = 64 * MIB
QUICK_BULK = 8 * MIB
#: Client window for the bulk console (auto_credit grants it back at half).
BULK_WINDOW = 4 * MIB
#: Bytes a direct bulk client reads per call (the same as our RFB client's READ_SIZE).
DIRECT_READ_SIZE = 256 * 1024
#: Input chunk our client hands `Consoles.write` at a time in the upload.
UPLOAD_CHUNK = 64 * 1024
#: The bytes echoed, in turn: printable, none of them virsh's escape (^]).
ECHO_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789"
SYNC_BYTE = ord("#")
FENCE_BYTE = ord("!")
LIBVIRT_URI = "qemu:///system"
VIRSH_BANNER = b"Escape character is ^]"
VIRSH_ESCAPE = b"\x1d"

# Targets from the issue: the gateway against the direct path.
RTT_TARGET = 1.5
RTT_STRETCH = 1.2
#: The service's fd for a libvirt guest against libvirt's own openConsole stream.
SERVICE_LIBVIRT_TARGET = 1.3
BULK_RATIO_TARGET = 0.5
BULK_ABSOLUTE_TARGET = 100.0  # MB/s

# Row keys, in table order.
DIRECT = "direct"
GATEWAY = "gateway"
RELAY = "relay"
GATEWAY_BLOCKING = "gateway_blocking"
LIBVIRT_STREAM = "libvirt_stream"
VIRSH = "virsh"
SERVICE = "service"
SERVICE_LIBVIRT = "service_libvirt"
#: The guest's name in the service, and its gateway's socket.
SERVICE_GUEST = "bench"


class BenchError(Exception):
    """A path could not be set up or misbehaved (wrong echo, closed console...)."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Options and results
# ---------------------------------------------------------------------------


@dataclass
class Options:
    samples: int = DEFAULT_SAMPLES
    warmup: int = 50
    #: Samples of one path in a row before the next path's turn.
    block: int = 100
    bulk_bytes: int = DEFAULT_BULK
    bulk_rounds: int = 3
    #: Receive window our client opens the bulk console with.
    window: int = BULK_WINDOW
    reverse: bool = True
    libvirt: bool = True
    #: The resourced service rows (D-Bus activated, behind a gateway of its own).
    service: bool = True
    rtt: bool = True
    bulk: bool = True
    #: "subprocess" (as deployed) or "inprocess" (the gateway in this event loop).
    gateway_mode: str = "subprocess"
    #: Check every echoed byte (always) and every bulk byte (only if set).
    verify: bool = False
    #: The gateway's ring per console (`--history`); None: its default (64 KiB).
    gateway_history: int | None = None
    #: Run the gateway subprocess under cProfile, writing this file.
    profile_gateway: Path | None = None
    #: Run the service (started by us, not activated) under cProfile, writing this file.
    profile_service: Path | None = None
    #: Profile this process (our client) with cProfile, writing this file.
    profile_client: Path | None = None
    keep_workdir: bool = False
    timeout: float = 60.0
    #: A bulk run through the gateway slower than this (plus 15 s) has stalled.
    stall_rate: float = 2e6


@dataclass
class RttResult:
    key: str
    label: str
    samples_ns: list[int] = field(default_factory=list)
    stray_bytes: int = 0  # bytes received that were not the expected echo

    def percentile_us(self, fraction: float) -> float:
        ordered = sorted(self.samples_ns)
        rank = max(1, math.ceil(fraction * len(ordered)))  # nearest rank
        return ordered[rank - 1] / 1000

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n": len(self.samples_ns),
            "p50_us": round(self.percentile_us(0.50), 1),
            "p90_us": round(self.percentile_us(0.90), 1),
            "p99_us": round(self.percentile_us(0.99), 1),
            "mean_us": round(statistics.fmean(self.samples_ns) / 1000, 1),
            "min_us": round(min(self.samples_ns) / 1000, 1),
            "max_us": round(max(self.samples_ns) / 1000, 1),
            "stray_bytes": self.stray_bytes,
        }


@dataclass
class BulkResult:
    key: str
    label: str
    direction: str  # "to_client" (console output) or "to_console" (input)
    nbytes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        """Median over the runs, MB = 10^6 bytes."""
        return self.nbytes / statistics.median(self.seconds) / 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "direction": self.direction,
            "bytes": self.nbytes,
            "runs": len(self.seconds),
            "mb_per_s": round(self.mb_per_s, 1),
            "best_mb_per_s": round(self.nbytes / min(self.seconds) / 1e6, 1),
            "seconds": [round(s, 4) for s in self.seconds],
        }


@dataclass
class Results:
    options: Options
    rtt: dict[str, RttResult] = field(default_factory=dict)
    bulk: dict[str, BulkResult] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: CPU the gateway process used: per echo (us) and per bulk MiB (ms).
    gateway_cpu: dict[str, float] = field(default_factory=dict)
    #: The same for the service process (not counting its gateway's).
    service_cpu: dict[str, float] = field(default_factory=dict)

    def targets(self) -> list[dict[str, Any]]:
        """Each target with the measured value and PASS/MISS (and the stretch goal)."""
        out: list[dict[str, Any]] = []
        direct = self.rtt.get(DIRECT)
        for key, who in ((GATEWAY, "gateway"), (GATEWAY_BLOCKING, "gateway, blocking client")):
            gateway = self.rtt.get(key)
            if direct is None or gateway is None:
                continue
            for name, fraction in (("p50", 0.50), ("p99", 0.99)):
                ratio = gateway.percentile_us(fraction) / direct.percentile_us(fraction)
                out.append(
                    {
                        "target": f"echo RTT {name}: {who} <= {RTT_TARGET}x direct "
                        f"(stretch {RTT_STRETCH}x)",
                        "value": round(ratio, 2),
                        "result": "PASS" if ratio <= RTT_TARGET else "MISS",
                        "stretch": "PASS" if ratio <= RTT_STRETCH else "MISS",
                    }
                )
        service, virsh = self.rtt.get(SERVICE), self.rtt.get(VIRSH)
        if service is not None and virsh is not None:
            for name, fraction in (("p50", 0.50), ("p99", 0.99)):
                ratio = service.percentile_us(fraction) / virsh.percentile_us(fraction)
                out.append(
                    {
                        "target": f"echo RTT {name}: service fd <= virsh console",
                        "value": round(ratio, 2),
                        "result": "PASS" if ratio <= 1.0 else "MISS",
                    }
                )
        fallback, stream = self.rtt.get(SERVICE_LIBVIRT), self.rtt.get(LIBVIRT_STREAM)
        if fallback is not None and stream is not None:
            for name, fraction in (("p50", 0.50), ("p99", 0.99)):
                ratio = fallback.percentile_us(fraction) / stream.percentile_us(fraction)
                target = {
                    "target": f"echo RTT {name}: service libvirt fd <= "
                    f"{SERVICE_LIBVIRT_TARGET}x libvirt openConsole stream",
                    "value": round(ratio, 2),
                    "result": "PASS" if ratio <= SERVICE_LIBVIRT_TARGET else "MISS",
                }
                if name == "p99":  # the target is on p50; p99 is reported
                    target["target"] = (
                        "echo RTT p99: service libvirt fd vs libvirt stream (reported)"
                    )
                    target["result"] = "INFO"
                out.append(target)
        for direction in ("to_client", "to_console"):
            failure = self.unavailable.get(f"bulk_{SERVICE}_{direction}")
            s = self.bulk.get(f"{SERVICE}_{direction}")
            if failure is None and s is None:
                continue
            out.append(
                {
                    "target": f"bulk {direction}: service fd >= {BULK_ABSOLUTE_TARGET:g} MB/s",
                    "value": f"failed: {failure}" if s is None else round(s.mb_per_s, 1),
                    "result": "PASS"
                    if s is not None and s.mb_per_s >= BULK_ABSOLUTE_TARGET
                    else "MISS",
                }
            )
        for direction in ("to_client", "to_console"):
            d = self.bulk.get(f"{DIRECT}_{direction}")
            g = self.bulk.get(f"{GATEWAY}_{direction}")
            failure = self.unavailable.get(f"bulk_{GATEWAY}_{direction}")
            if failure is not None:
                out.append(
                    {
                        "target": f"bulk {direction}: gateway >= {BULK_RATIO_TARGET}x direct "
                        f"and >= {BULK_ABSOLUTE_TARGET:g} MB/s",
                        "value": f"failed: {failure}",
                        "result": "MISS",
                    }
                )
                continue
            if d is None or g is None:
                continue
            ratio = g.mb_per_s / d.mb_per_s
            out.append(
                {
                    "target": f"bulk {direction}: gateway >= {BULK_RATIO_TARGET}x direct",
                    "value": round(ratio, 2),
                    "result": "PASS" if ratio >= BULK_RATIO_TARGET else "MISS",
                }
            )
            out.append(
                {
                    "target": f"bulk {direction}: gateway >= {BULK_ABSOLUTE_TARGET:g} MB/s",
                    "value": round(g.mb_per_s, 1),
                    "result": "PASS" if g.mb_per_s >= BULK_ABSOLUTE_TARGET else "MISS",
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "machine": machine_info(),
            "options": {
                "samples": o.samples,
                "warmup": o.warmup,
                "block": o.block,
                "bulk_bytes": o.bulk_bytes,
                "bulk_rounds": o.bulk_rounds,
                "gateway_mode": o.gateway_mode,
                "bulk_window": o.window,
            },
            "rtt": {key: r.summary() for key, r in self.rtt.items()},
            "bulk": {key: b.summary() for key, b in self.bulk.items()},
            "gateway_cpu": self.gateway_cpu,
            "service_cpu": self.service_cpu,
            "unavailable": self.unavailable,
            "targets": self.targets(),
            "notes": self.notes,
        }


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        qemu = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "loadavg": load,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "qemu": qemu,
    }


# ---------------------------------------------------------------------------
# Echo probes: one per path; `sample` times one byte there and back
# ---------------------------------------------------------------------------


class EchoProbe:
    key: str
    label: str

    def __init__(self) -> None:
        self.stray_bytes = 0
        self._closed = False

    async def sample(self, byte: int) -> int:
        """Send `byte`, wait for its echo; the round trip in nanoseconds."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the path (once; later calls do nothing)."""
        if not self._closed:
            self._closed = True
            await self._release()

    async def _release(self) -> None:
        """What `close` does."""

    def _check(self, data: bytes, byte: int) -> bool:
        """Account for `data` received while waiting for `byte`; True once it came."""
        if byte in data:
            self.stray_bytes += len(data) - 1
            return True
        self.stray_bytes += len(data)
        return False


class SocketProbe(EchoProbe):
    """A blocking Unix socket straight to QEMU's chardev (what socat or minicom do)."""

    key = DIRECT
    label = "direct chardev socket"
    #: What reading EOF means on this path.
    ended = "QEMU closed the chardev socket"

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self.sock = sock
        sock.setblocking(True)
        sock.settimeout(timeout)

    async def sample(self, byte: int) -> int:
        sock = self.sock
        out = bytes((byte,))
        start = time.perf_counter_ns()
        sock.sendall(out)
        while True:
            data = sock.recv(4096)
            if not data:
                raise BenchError(self.ended)
            if self._check(data, byte):
                return time.perf_counter_ns() - start

    async def _release(self) -> None:
        self.sock.close()


class RelayProbe(SocketProbe):
    """The same blocking socket, through socat relaying to the chardev: what any one
    extra process in the path costs on this machine, with no protocol at all."""

    key = RELAY
    label = "socat relay (one C process hop)"


class ServiceProbe(SocketProbe):
    """The same blocking socket, on the fd the service's `Console.Open` returned: the
    path an app takes (fd -> service -> RFB -> gateway -> chardev)."""

    key = SERVICE
    label = "resourced fd (service behind gateway)"
    ended = "the service closed the console's fd"


class ServiceLibvirtProbe(SocketProbe):
    """The service's `Console.Open` fd for a libvirt guest (libvirt's console stream)."""

    key = SERVICE_LIBVIRT
    label = "resourced fd (service, libvirt stream)"
    ended = "the service closed the console's fd"


class GatewayProbe(EchoProbe):
    """Our RFB client with `Consoles`, through the gateway."""

    key = GATEWAY

    def __init__(self, client: RfbClient, consoles: Consoles, console_id: int, label: str):
        super().__init__()
        self.client = client
        self.consoles = consoles
        self.console_id = console_id
        self.label = label

    async def sample(self, byte: int) -> int:
        client, console_id = self.client, self.console_id
        start = time.perf_counter_ns()
        if self.consoles.write(console_id, bytes((byte,))) != 1:
            raise BenchError("no console credit left for one byte")
        client.flush()
        while True:
            event = await client.next_event()
            if isinstance(event, ConsoleData) and event.console_id == console_id:
                if self._check(event.data, byte):
                    return time.perf_counter_ns() - start
            elif isinstance(event, ConsoleClosed) and event.console_id == console_id:
                raise BenchError(f"the gateway closed the console: {event.reason.name}")

    async def _release(self) -> None:
        await self.client.close()


class BlockingGatewayProbe(EchoProbe):
    """Our sans-IO client core (`ClientConnection` + `Consoles`) over a blocking
    socket, through the same gateway: timed like the direct socket, so the
    difference is the gateway's alone (the asyncio client adds its own cost)."""

    key = GATEWAY_BLOCKING
    label = "resourced gateway, blocking client"

    def __init__(self, address: Path, console: str, timeout: float) -> None:
        super().__init__()
        self.consoles = Consoles()
        self.connection = ClientConnection(extensions=[self.consoles])
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = memoryview(bytearray(DIRECT_READ_SIZE))
        self.console_id = -1
        self._console = console

    def _send_pending(self) -> None:
        data = self.connection.data_to_send()
        if data:
            self.sock.sendall(data)

    def _next_event(self) -> Any:
        while (event := self.connection.next_event()) is None:
            self._send_pending()
            count = self.sock.recv_into(self.buffer)
            if not count:
                raise BenchError("the gateway closed the connection")
            self.connection.receive_data(self.buffer[:count])
        self._send_pending()
        return event

    def open(self, address: Path) -> None:
        """Handshake, open the console, read the guest's banner (blocking)."""
        self.sock.connect(str(address))
        while not self.consoles.announced:
            self._next_event()
        info = self.consoles.by_name(self._console)
        if info is None:
            raise BenchError(f"the gateway does not announce {self._console}")
        self.console_id = info.console_id
        self.consoles.open(info.console_id)
        seen = b""
        while DEFAULT_BANNER not in seen:
            event = self._next_event()
            if isinstance(event, ConsoleData) and event.console_id == self.console_id:
                seen += event.data
            elif isinstance(event, ConsoleClosed) and event.console_id == self.console_id:
                raise BenchError(f"the gateway closed {self._console}: {event.reason.name}")

    async def sample(self, byte: int) -> int:
        start = time.perf_counter_ns()
        if self.consoles.write(self.console_id, bytes((byte,))) != 1:
            raise BenchError("no console credit left for one byte")
        self._send_pending()
        while True:
            event = self._next_event()
            if isinstance(event, ConsoleData) and event.console_id == self.console_id:
                if self._check(event.data, byte):
                    return time.perf_counter_ns() - start
            elif isinstance(event, ConsoleClosed) and event.console_id == self.console_id:
                raise BenchError(f"the gateway closed the console: {event.reason.name}")

    async def _release(self) -> None:
        self.sock.close()


class LibvirtStreamProbe(EchoProbe):
    """`virDomainOpenConsole` into a blocking `virStream`, used from this thread."""

    key = LIBVIRT_STREAM
    label = "libvirt openConsole stream"

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    async def sample(self, byte: int) -> int:
        stream = self.stream
        out = bytes((byte,))
        start = time.perf_counter_ns()
        stream.send(out)
        while True:
            data = stream.recv(4096)
            if not isinstance(data, bytes) or not data:
                raise BenchError(f"the libvirt console stream ended ({data!r})")
            if self._check(data, byte):
                return time.perf_counter_ns() - start

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.finish()


class VirshProbe(EchoProbe):
    """`virsh console NAME` on a pty: write to its terminal, read the echo from it."""

    key = VIRSH
    label = "virsh console"

    def __init__(self, process: subprocess.Popen[bytes], master: int, timeout: float) -> None:
        super().__init__()
        self.process = process
        self.master = master
        self.timeout = timeout

    async def sample(self, byte: int) -> int:
        master = self.master
        out = bytes((byte,))
        start = time.perf_counter_ns()
        os.write(master, out)
        while True:
            if not select.select([master], [], [], self.timeout)[0]:
                raise BenchError("no echo through virsh console")
            if self._check(os.read(master, 4096), byte):
                return time.perf_counter_ns() - start

    async def _release(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, VIRSH_ESCAPE)  # virsh leaves on its escape character
        try:
            await asyncio.to_thread(self.process.wait, 5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)
        os.close(self.master)


async def measure_rtt(
    probes: list[EchoProbe], samples: int, warmup: int, block: int
) -> dict[str, RttResult]:
    """Warm each path up, then take `samples` from each, `block` at a time in turn.

    The order of the paths rotates every round, so none always follows the same one.
    """
    results = {p.key: RttResult(p.key, p.label) for p in probes}
    counter = 0

    def next_byte() -> int:
        nonlocal counter
        counter += 1
        return ECHO_BYTES[counter % len(ECHO_BYTES)]

    for probe in probes:
        for _ in range(warmup):
            await probe.sample(next_byte())
        probe.stray_bytes = 0
    rounds = math.ceil(samples / block)
    for index in range(rounds):
        shift = index % len(probes)
        for probe in probes[shift:] + probes[:shift]:
            result = results[probe.key]
            for _ in range(min(block, samples - len(result.samples_ns))):
                result.samples_ns.append(await probe.sample(next_byte()))
    for probe in probes:
        results[probe.key].stray_bytes = probe.stray_bytes
    return results


# ---------------------------------------------------------------------------
# Setting the paths up
# ---------------------------------------------------------------------------


async def start_guest(workdir: Path, timeout: float) -> QemuGuest:
    guest = QemuGuest(GuestConfig(workdir=workdir, audio=False, start_paused=True))
    await guest.start(timeout=timeout)
    return guest


async def open_direct(guest: QemuGuest, timeout: float, path: Path | None = None) -> socket.socket:
    """Connect to the paused guest's COM1 socket (or to `path`, which leads to it),
    boot the guest, read its banner."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path or guest.serial_path))
        await guest.wait_chardev_connected("serial0", timeout)
        await guest.resume()
        seen = b""
        async with asyncio.timeout(timeout):
            while DEFAULT_BANNER not in seen:
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    raise BenchError("QEMU closed the chardev socket during boot")
                seen += data
    except BaseException:
        sock.close()
        raise
    return sock


async def open_relay(guest: QemuGuest, workdir: Path, rig: Rig, timeout: float) -> RelayProbe:
    """socat between a Unix socket of ours and the guest's COM1 (it connects on accept)."""
    socat = shutil.which("socat")
    if socat is None:
        raise BenchError("socat is not installed")
    listen = workdir / "relay.sock"
    argv = [socat, f"UNIX-LISTEN:{listen}", f"UNIX-CONNECT:{guest.serial_path}"]
    await start_listener(argv, listen, "socat", rig, timeout, stderr=subprocess.DEVNULL)
    return RelayProbe(await open_direct(guest, timeout, listen), timeout)


class GatewayProcess:
    """The gateway as deployed: `python -m resourced.gateway` in its own process."""

    def __init__(self, argv: list[str], log_path: Path, profile: Path | None) -> None:
        prefix = [sys.executable]
        if profile is not None:
            prefix += ["-m", "cProfile", "-o", str(profile)]
        self.command = [*prefix, "-m", "resourced.gateway", *argv]
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("wb") as output:
            self.process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                cwd=REPO_ROOT,
            )

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time the gateway process has used so far."""
        if self.process is None:
            return None
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            text = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"the gateway exited with {self.process.returncode}: {text}")

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)  # the gateway shuts down cleanly on it
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


class Rig:
    """Everything the run started, stopped in reverse order by `close`."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        first: BaseException | None = None
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception as error:  # keep stopping the rest
                first = first or error
        if first is not None:
            raise first


async def start_listener(
    argv: list[str], path: Path, what: str, rig: Rig, timeout: float, **options: Any
) -> None:
    """Run `argv` until the rig closes; return once it listens on the Unix socket `path`."""
    process = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, **options)

    async def stop() -> None:
        if process.returncode is None:
            process.kill()
        await process.wait()

    rig.on_close(stop)
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(os.path.exists, path):
            if process.returncode is not None:
                raise BenchError(f"{what} exited with status {process.returncode}")
            await asyncio.sleep(0.02)


async def start_peer(path: Path, rig: Rig, timeout: float) -> None:
    argv = [sys.executable, "-m", "bench.peer", str(path)]
    await start_listener(argv, path, "the socket peer", rig, timeout, cwd=REPO_ROOT)


@dataclass
class GatewayHandle:
    address: str
    label: str
    #: CPU seconds the gateway used so far (None in-process: not separable).
    cpu_seconds: Callable[[], float | None]


async def start_gateway(
    guest: QemuGuest,
    peer_path: Path,
    workdir: Path,
    options: Options,
    rig: Rig,
    second: QemuGuest | None = None,
    name: str = "gw",
) -> GatewayHandle:
    """Start the gateway in front of `guest` (serial0) and the peer (bulk0); boot the
    guest once the gateway holds its COM1. It listens on `workdir/NAME.sock`."""
    listen = workdir / f"{name}.sock"
    if options.gateway_mode == "inprocess":
        consoles = [
            ConsoleSpec(
                "serial0", ConsoleKind.SERIAL, Endpoint(EndpointType.UNIX, str(guest.serial_path))
            ),
            ConsoleSpec("bulk0", ConsoleKind.CHANNEL, Endpoint(EndpointType.UNIX, str(peer_path))),
        ]
        if second is not None:
            consoles.append(
                ConsoleSpec(
                    "serial1",
                    ConsoleKind.SERIAL,
                    Endpoint(EndpointType.UNIX, str(second.serial_path)),
                )
            )
        config = GatewayConfig(
            upstream=f"unix:{guest.vnc_path}",
            security=ServerSecurity(allow_none=True),
            consoles=consoles,
        )
        if options.gateway_history is not None:
            config.history = options.gateway_history
        gateway = Gateway(config)
        rig.on_close(gateway.close)
        await gateway.start()
        await gateway.listen_unix(str(listen))
        label = "resourced gateway (in-process)"

        def cpu() -> float | None:
            return None  # one process: the gateway's share cannot be told apart
    elif options.gateway_mode == "subprocess":
        process = GatewayProcess(
            [
                "--vnc",
                f"unix:{guest.vnc_path}",
                "--listen",
                f"unix:{listen}",
                "--console",
                f"serial0=unix:{guest.serial_path}",
                "--console",
                f"bulk0:channel=unix:{peer_path}",
                *([] if second is None else ["--console", f"serial1=unix:{second.serial_path}"]),
                *(
                    []
                    if options.gateway_history is None
                    else ["--history", str(options.gateway_history)]
                ),
            ],
            workdir / f"{name}.log",
            options.profile_gateway,
        )
        rig.on_close(process.stop)
        await process.start()
        async with asyncio.timeout(options.timeout):
            while not await asyncio.to_thread(os.path.exists, listen):
                process.check()
                await asyncio.sleep(0.02)
        label = "resourced gateway (subprocess)"
        cpu = process.cpu_seconds
    else:
        raise BenchError(f"unknown gateway mode {options.gateway_mode!r}")
    for booting in (guest, second):
        if booting is not None:
            await booting.wait_chardev_connected("serial0", options.timeout)
            await booting.resume()
    return GatewayHandle(f"unix:{listen}", label, cpu)


async def open_gateway_console(
    address: str, name: str, timeout: float, **open_options: Any
) -> tuple[RfbClient, Consoles, int]:
    """Connect our client to the gateway and open console `name`."""
    consoles = Consoles()
    client = await connect(address, extensions=[consoles], timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            while not consoles.announced:
                await client.next_event()
            info = consoles.by_name(name)
            if info is None:
                raise BenchError(f"the gateway does not announce {name}")
            consoles.open(info.console_id, **open_options)
            client.flush()
            while True:
                event = await client.next_event()
                if isinstance(event, ConsoleOpened) and event.console_id == info.console_id:
                    break
                if isinstance(event, ConsoleClosed) and event.console_id == info.console_id:
                    raise BenchError(f"the gateway refused to open {name}: {event.reason.name}")
    except BaseException:
        await client.close()
        raise
    return client, consoles, info.console_id


async def open_gateway_probe(address: str, label: str, timeout: float) -> GatewayProbe:
    client, consoles, console_id = await open_gateway_console(address, "serial0", timeout)
    seen = b""
    try:
        async with asyncio.timeout(timeout):  # the banner, from history or live
            while DEFAULT_BANNER not in seen:
                event = await client.next_event()
                if isinstance(event, ConsoleData) and event.console_id == console_id:
                    seen += event.data
    except BaseException:
        await client.close()
        raise
    return GatewayProbe(client, consoles, console_id, label)


# --- the resourced service ----------------------------------------------------------


@dataclass
class ServiceHandle:
    """The service on its private bus with the benchmark's guest added."""

    bus: PrivateBus
    client: MessageBus
    pid: int
    serial: str  # the object path of the guest's serial0
    bulk: str  # ...and of its bulk0 (the socket peer)

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time the service process has used so far."""
        with contextlib.suppress(OSError):
            return process_cpu_seconds(self.pid)
        return None


async def start_service(
    gateway_address: str, workdir: Path, options: Options, rig: Rig
) -> ServiceHandle:
    """A private bus with resourced activatable; `AddGuest` (which starts the service
    by activation) for the gateway at `gateway_address`; its consoles published."""
    bus = PrivateBus(workdir / "bus", bytecode_cache=workdir / "pycache")
    rig.on_close(bus.stop)
    bus.write_config("[service]\nidle-exit = 0\n")
    await bus.start(options.timeout)
    if options.profile_service is not None:
        # Started by us under cProfile; it owns the name before anyone calls, so
        # nothing is activated. SIGTERM (from bus.stop) is a clean stop: the profile
        # is written.
        profile = options.profile_service.absolute()
        command = [sys.executable, "-m", "cProfile", "-o", str(profile)]
        command += ["-m", "resourced.dbus", "run", "--bus", bus.address]
        with (workdir / "service.log").open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=bus.env
            )

        async def stop_profiled() -> None:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await process.wait()

        rig.on_close(stop_profiled)
    client = await bus.client()

    async def disconnect() -> None:
        client.disconnect()

    rig.on_close(disconnect)
    if options.profile_service is not None:
        async with asyncio.timeout(options.timeout):
            while not await name_has_owner(client):  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.05)
    try:
        await add_guest(client, SERVICE_GUEST, gateway_address, options.timeout)
        serial = console_path(SERVICE_GUEST, "serial0")
        bulk = console_path(SERVICE_GUEST, "bulk0")
        await wait_consoles(client, {serial, bulk}, options.timeout)
        pid = await bus.service_pid(client)
    except Exception as error:
        raise BenchError(f"the service did not come up: {error}\n{bus.log()}") from error
    return ServiceHandle(bus, client, pid, serial, bulk)


async def open_service_socket(
    service: ServiceHandle, path: str, timeout: float, **options: Any
) -> socket.socket:
    """`Console.Open` on `path`; the fd it returned as a blocking socket."""
    fd = await open_console(service.client, path, options, timeout)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    sock.settimeout(timeout)
    return sock


async def open_service_probe(service: ServiceHandle, timeout: float) -> ServiceProbe:
    sock = await open_service_socket(service, service.serial, timeout)
    try:
        seen = b""
        deadline = time.monotonic() + timeout
        while DEFAULT_BANNER not in seen:  # from the history, or live if it came later
            if time.monotonic() > deadline:
                raise BenchError(f"no banner through the service's fd: {seen[-200:]!r}")
            data = await asyncio.to_thread(sock.recv, 4096)
            if not data:
                raise BenchError("the service closed the console's fd at once")
            seen += data
    except BaseException:
        sock.close()
        raise
    return ServiceProbe(sock, timeout)


async def service_bulk_run(service: ServiceHandle, direction: str, options: Options) -> float:
    """One bulk run through a fresh `Console.Open` fd (opened outside the timing)."""
    sock = await open_service_socket(
        service, service.bulk, options.timeout, history=Variant("b", False)
    )
    with sock:
        run = direct_download if direction == "to_client" else direct_upload
        # Blocking, as an app's plain read/write loop; the socket's timeout ends a stall.
        return run(sock, options.bulk_bytes, options.verify)


# --- libvirt ---------------------------------------------------------------------


def libvirt_domain_xml(name: str, image: Path) -> str:
    from tests.libvirtd import demo_domain_xml

    return demo_domain_xml(
        name,
        image,
        """\
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>""",
    )


def ensure_libvirt() -> Any:
    """libvirtd up (started as root if need be); an open qemu:///system connection."""
    try:
        import libvirt
    except ImportError as error:
        raise BenchError(f"libvirt-python is missing ({error})") from None
    try:
        from tests.libvirtd import LibvirtdUnavailable, ensure_libvirtd
    except ImportError as error:
        raise BenchError(f"run from the repository root ({error})") from None
    try:
        ensure_libvirtd()
    except LibvirtdUnavailable as error:
        raise BenchError(str(error).splitlines()[0]) from None
    libvirt.registerErrorHandler(lambda *_args: None, None)
    try:
        return libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as error:
        raise BenchError(f"cannot open {LIBVIRT_URI}: {error}") from None


def create_domain(conn: Any, workdir: Path) -> Any:
    """A transient TCG domain booting the demo guest, its COM1 on a pty."""
    workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    workdir.chmod(0o755)
    image = workdir / "boot.img"
    image.write_bytes(build_boot_sector())
    image.chmod(0o644)
    name = f"rsd-bench-{uuid.uuid4().hex[:10]}"
    return conn.createXML(libvirt_domain_xml(name, image), 0)


def sync_stream(stream: Any, timeout: float) -> None:
    """Wait until the guest echoes, then read up to a fence: nothing is left in flight.

    A reader thread blocks in recv while this thread pokes the guest (bytes sent
    before it set its UART up may be lost), so no blocking call can hang forever.
    """
    seen = bytearray()
    done = threading.Event()
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            while FENCE_BYTE not in seen:
                data = stream.recv(4096)
                if not isinstance(data, bytes) or not data:
                    raise BenchError("the libvirt console stream ended during boot")
                seen.extend(data)
        except BaseException as error:
            failure.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while SYNC_BYTE not in seen and not done.is_set():
        if time.monotonic() > deadline:
            stream.abort()
            raise BenchError(f"no echo from the libvirt guest within {timeout:g} s")
        stream.send(bytes((SYNC_BYTE,)))
        time.sleep(0.2)
    if not done.is_set():
        stream.send(bytes((FENCE_BYTE,)))
    if not done.wait(timeout):
        stream.abort()
        raise BenchError("the fence byte did not come back through libvirt")
    thread.join()
    if failure:
        raise failure[0]


async def open_libvirt_stream(conn: Any, domain: Any, timeout: float) -> LibvirtStreamProbe:
    stream = conn.newStream(0)
    domain.openConsole(None, stream, 0)
    try:
        await asyncio.to_thread(sync_stream, stream, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        raise
    return LibvirtStreamProbe(stream)


def sync_pty(master: int, timeout: float) -> None:
    """As `sync_stream`, for virsh's terminal: its banner, an echo, then a fence."""
    seen = b""
    deadline = time.monotonic() + timeout

    def read_some(wait: float) -> None:
        nonlocal seen
        if select.select([master], [], [], wait)[0]:
            data = os.read(master, 4096)
            if not data:
                raise BenchError(f"virsh console ended: {seen[-300:]!r}")
            seen += data

    while VIRSH_BANNER not in seen:
        if time.monotonic() > deadline:
            raise BenchError(f"virsh console did not start: {seen[-300:]!r}")
        read_some(0.2)
    while bytes((SYNC_BYTE,)) not in seen.split(VIRSH_BANNER, 1)[1]:
        if time.monotonic() > deadline:
            raise BenchError("no echo from the libvirt guest through virsh console")
        os.write(master, bytes((SYNC_BYTE,)))
        read_some(0.2)
    os.write(master, bytes((FENCE_BYTE,)))
    while not seen.endswith(bytes((FENCE_BYTE,))):
        if time.monotonic() > deadline:
            raise BenchError("the fence byte did not come back through virsh console")
        read_some(0.2)


def spawn_virsh(domain_name: str) -> tuple[subprocess.Popen[bytes], int]:
    """`virsh console` with a new pty as its terminal; the process and the pty master."""
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo or line editing before virsh sets the terminal up itself
    try:
        process = subprocess.Popen(
            ["virsh", "-c", LIBVIRT_URI, "console", domain_name, "--force"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return process, master


async def open_virsh(domain_name: str, timeout: float) -> VirshProbe:
    process, master = spawn_virsh(domain_name)
    probe = VirshProbe(process, master, timeout)
    try:
        await asyncio.to_thread(sync_pty, master, timeout)
    except BaseException:
        await probe.close()
        raise
    return probe


async def open_libvirt_probes(
    workdir: Path, options: Options, rig: Rig
) -> tuple[list[EchoProbe], str | None, Any]:
    """The openConsole-stream and virsh-console probes, on a domain each, and the
    libvirt connection; or why not."""
    try:
        conn = await asyncio.to_thread(ensure_libvirt)
    except BenchError as error:
        return [], str(error), None
    rig.on_close(lambda: asyncio.to_thread(conn.close))
    probes: list[EchoProbe] = []
    for index, opener in enumerate(("stream", "virsh")):  # their rows run side by side
        domain = await asyncio.to_thread(create_domain, conn, workdir / f"lv{index}")

        async def destroy(domain: Any = domain) -> None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(domain.destroy)

        rig.on_close(destroy)
        if opener == "stream":
            probe: EchoProbe = await open_libvirt_stream(conn, domain, options.timeout)
        else:
            probe = await open_virsh(domain.name(), options.timeout)
        rig.on_close(probe.close)
        probes.append(probe)
    return probes, None, conn


def libvirt_vnc_domain_xml(name: str, image: Path) -> str:
    """`libvirt_domain_xml` plus VNC graphics: the service follows only such domains."""
    from tests.libvirtd import demo_domain_xml

    return demo_domain_xml(
        name,
        image,
        """\
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <graphics type='vnc'>
      <listen type='socket'/>
    </graphics>
    <video>
      <model type='vga'/>
    </video>
    <memballoon model='none'/>""",
    )


def sync_socket(sock: socket.socket, timeout: float) -> None:
    """As `sync_stream`, for a blocking socket: an echo of the sync byte, then a fence.

    Sync bytes go out every 0.2 s until one comes back: the service may still be
    attaching libvirt's stream, or the guest still setting its UART up.
    """
    seen = b""
    deadline = time.monotonic() + timeout

    def read_some(wait: float) -> None:
        nonlocal seen
        if select.select([sock], [], [], wait)[0]:
            data = sock.recv(4096)
            if not data:
                raise BenchError(f"the service closed the console's fd: {seen[-300:]!r}")
            seen += data

    while bytes((SYNC_BYTE,)) not in seen:
        if time.monotonic() > deadline:
            raise BenchError(f"no echo through the service's libvirt console: {seen[-300:]!r}")
        sock.sendall(bytes((SYNC_BYTE,)))
        read_some(0.2)
    sock.sendall(bytes((FENCE_BYTE,)))
    while not seen.endswith(bytes((FENCE_BYTE,))):
        if time.monotonic() > deadline:
            raise BenchError("the fence byte did not come back through the service")
        read_some(0.2)


async def open_service_libvirt_probe(
    conn: Any, workdir: Path, options: Options, rig: Rig
) -> tuple[ServiceLibvirtProbe, int]:
    """A second service, on a private bus of its own, following qemu:///system; a
    domain of its own with VNC graphics (the service's guest); `Console.Open` on its
    serial0, synced. The probe and the service's PID.

    The service takes the domain's console with `virDomainOpenConsole` while the fd
    is open (libvirt allows one session per domain, so this domain is not the
    stream's or virsh's); its guests' idle timeout is short so that it lets go as
    soon as the probe is closed.
    """
    directory = workdir / "lv2"
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.chmod(0o755)
    image = directory / "boot.img"
    image.write_bytes(build_boot_sector())
    image.chmod(0o644)
    name = f"rsd-bench-{uuid.uuid4().hex[:10]}"
    domain = await asyncio.to_thread(conn.createXML, libvirt_vnc_domain_xml(name, image), 0)

    async def destroy() -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(domain.destroy)

    rig.on_close(destroy)
    bus = PrivateBus(workdir / "lvbus", bytecode_cache=workdir / "pycache")
    rig.on_close(bus.stop)
    bus.write_config(
        f'[service]\nidle-exit = 0\n[libvirt]\nuris = ["{LIBVIRT_URI}"]\n'
        "[guests]\nidle-timeout = 0.1\n"
    )
    await bus.start(options.timeout)
    client = await bus.client()

    async def disconnect() -> None:
        client.disconnect()

    rig.on_close(disconnect)
    serial = f"{ROOT}/guests/{escape_path_element(name)}/consoles/serial0"
    try:
        # Any call to the service starts it by activation; its guest appears once
        # the follower has listed the connection's domains.
        await wait_consoles(client, {serial}, options.timeout)
        pid = await bus.service_pid(client)
        sock = socket.socket(fileno=await open_console(client, serial, None, options.timeout))
    except Exception as error:
        raise BenchError(f"the libvirt service did not come up: {error}\n{bus.log()}") from error
    sock.setblocking(True)
    sock.settimeout(options.timeout)
    try:
        await asyncio.to_thread(sync_socket, sock, options.timeout)
    except BaseException:
        sock.close()
        raise
    return ServiceLibvirtProbe(sock, options.timeout), pid


# ---------------------------------------------------------------------------
# Bulk throughput
# ---------------------------------------------------------------------------


def direct_download(sock: socket.socket, nbytes: int, verify: bool) -> float:
    buffer = bytearray(DIRECT_READ_SIZE)
    view = memoryview(buffer)
    start = time.perf_counter()
    sock.sendall(request(SEND, nbytes))
    got = 0
    while got < nbytes:
        size = sock.recv_into(view, min(DIRECT_READ_SIZE, nbytes - got))
        if size == 0:
            raise BenchError("the peer closed the connection")
        if verify and not pattern_matches(view[:size], got):
            raise BenchError(f"wrong bytes from the peer at offset {got}")
        got += size
    return time.perf_counter() - start


def direct_upload(sock: socket.socket, nbytes: int, verify: bool) -> float:
    view = memoryview(PATTERN)
    start = time.perf_counter()
    sock.sendall(request(RECEIVE_VERIFY if verify else RECEIVE, nbytes))
    sent = 0
    while sent < nbytes:
        size = min(CHUNK, nbytes - sent)
        sock.sendall(view[:size])
        sent += size
    answer = sock.recv(1)
    if answer != ACK:
        raise BenchError(f"the peer answered {answer!r} to the upload")
    return time.perf_counter() - start


async def gateway_download(
    client: RfbClient, consoles: Consoles, console_id: int, nbytes: int, verify: bool
) -> float:
    start = time.perf_counter()
    if consoles.write(console_id, request(SEND, nbytes)) != 9:
        raise BenchError("no credit for the request")
    client.flush()
    got = 0
    while got < nbytes:
        event = await client.next_event()
        if isinstance(event, ConsoleData) and event.console_id == console_id:
            if verify and not pattern_matches(event.data, got):
                raise BenchError(f"wrong bytes through the gateway at offset {got}")
            got += len(event.data)
        elif isinstance(event, ConsoleClosed) and event.console_id == console_id:
            rate = got / (time.perf_counter() - start) / 1e6
            raise BenchError(
                f"the gateway closed the console ({event.reason.name}: {event.message}) "
                f"after {got / MIB:.1f} MiB at {rate:.1f} MB/s"
            )
    if got != nbytes:
        raise BenchError(f"{got} bytes came for {nbytes}")
    return time.perf_counter() - start


async def gateway_upload(
    client: RfbClient, consoles: Consoles, console_id: int, nbytes: int, verify: bool
) -> float:
    async def next_console_event() -> Any:
        event = await client.next_event()
        if isinstance(event, ConsoleClosed) and event.console_id == console_id:
            raise BenchError(f"the gateway closed the bulk console: {event.reason.name}")
        return event

    start = time.perf_counter()
    header = request(RECEIVE_VERIFY if verify else RECEIVE, nbytes)
    while header:
        header = header[consoles.write(console_id, header) :]
        client.flush()
        if header:
            await next_console_event()
    sent = 0
    while sent < nbytes:
        if consoles.writable(console_id) == 0:
            await next_console_event()  # a ConsoleCredit, sooner or later
            continue
        phase = sent % 256
        size = min(UPLOAD_CHUNK, nbytes - sent)
        sent += consoles.write(console_id, PATTERN[phase : phase + size])
        await client.drain()
    answer = b""
    while not answer:
        event = await next_console_event()
        if isinstance(event, ConsoleData) and event.console_id == console_id:
            answer = event.data
    if answer != ACK:
        raise BenchError(f"the peer answered {answer!r} to the upload through the gateway")
    return time.perf_counter() - start


async def measure_bulk(
    peer_path: Path,
    gateway_address: str,
    gateway_label: str,
    options: Options,
    service: ServiceHandle | None = None,
) -> tuple[dict[str, BulkResult], dict[str, str]]:
    """Direct, gateway (and service) in turn, `bulk_rounds` times, each direction.

    Each gateway run has a connection of its own, each service run an fd of its
    own (set up outside the timing). A path that fails (stalls, closes the
    console) is not run again in that direction and its reason is returned,
    rather than ending the run.
    """
    nbytes = options.bulk_bytes
    results: dict[str, BulkResult] = {}
    failures: dict[str, str] = {}
    directions = ["to_client"] + (["to_console"] if options.reverse else [])
    for direction in directions:
        results[f"{DIRECT}_{direction}"] = BulkResult(
            DIRECT, "direct socket copy", direction, nbytes
        )
        results[f"{GATEWAY}_{direction}"] = BulkResult(GATEWAY, gateway_label, direction, nbytes)
        if service is not None:
            results[f"{SERVICE}_{direction}"] = BulkResult(
                SERVICE, ServiceProbe.label, direction, nbytes
            )
    paths = [DIRECT, GATEWAY] + ([SERVICE] if service is not None else [])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(options.timeout)
        sock.connect(str(peer_path))
        for index in range(options.bulk_rounds):
            for direction in directions:
                shift = index % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    key = f"{path}_{direction}"
                    if key in failures:
                        continue
                    try:
                        if path == DIRECT:
                            run = direct_download if direction == "to_client" else direct_upload
                            seconds = run(sock, nbytes, options.verify)
                        elif path == SERVICE:
                            assert service is not None
                            seconds = await service_bulk_run(service, direction, options)
                        else:
                            seconds = await gateway_bulk_run(gateway_address, direction, options)
                    except (BenchError, OSError) as error:
                        failures[key] = str(error)
                        log(f"bulk {direction} {path}: FAILED: {error}")
                        if path != DIRECT and direction == "to_client":
                            # The peer is still streaming the rest into the gateway's
                            # hub: let it finish, or the next run starts in that flood.
                            await asyncio.sleep(2 + nbytes / 1e9)
                        continue
                    results[key].seconds.append(seconds)
                    log(f"bulk {direction} {path}: {nbytes / seconds / 1e6:.1f} MB/s")
    return {k: r for k, r in results.items() if r.seconds}, failures


async def gateway_bulk_run(address: str, direction: str, options: Options) -> float:
    """One bulk run through the gateway on a fresh connection; its duration."""
    client, consoles, console_id = await open_gateway_console(
        address, "bulk0", options.timeout, window=options.window, auto_credit=True, history=False
    )
    try:
        run = gateway_download if direction == "to_client" else gateway_upload
        limit = 15 + options.bulk_bytes / options.stall_rate
        async with stall_guard(limit, f"gateway {direction}"):
            return await run(client, consoles, console_id, options.bulk_bytes, options.verify)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def stall_guard(seconds: float, what: str) -> AsyncIterator[None]:
    """Turn a run that takes longer than `seconds` into a BenchError."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise BenchError(f"{what} did not finish within {seconds:.0f} s (stalled)") from None


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def libvirt_cpu_seconds(pid: int | None) -> float | None:
    """The libvirt service's CPU time so far (None: it is not there)."""
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        return process_cpu_seconds(pid)
    return None


async def run_benchmark(options: Options) -> Results:
    """Set every path up, measure, tear everything down; the figures."""
    results = Results(options)
    workdir = Path(tempfile.mkdtemp(prefix="rsd-bench-", dir="/tmp"))
    os.chmod(workdir, 0o755)  # the libvirt domains' QEMU reads its image from here
    rig = Rig()
    try:
        with_service = options.service and options.gateway_mode == "subprocess"
        if options.service and not with_service:
            # Its rows read the fd with blocking calls, which would stop the very loop
            # the gateway in front of the service runs in.
            results.unavailable["service"] = "needs the gateways in their own processes"
        guests = (4 if options.rtt else 2) + with_service
        log(f"work directory {workdir}; starting {guests} demo guests (TCG)")
        started = await asyncio.gather(
            *(start_guest(workdir / name, options.timeout) for name in "abcde"[:guests])
        )
        for guest in started:
            rig.on_close(guest.stop)
        direct_guest, gateway_guest = started[:2]
        peer_path = workdir / "peer.sock"
        await start_peer(peer_path, rig, options.timeout)

        direct = SocketProbe(await open_direct(direct_guest, options.timeout), options.timeout)
        rig.on_close(direct.close)
        handle = await start_gateway(
            gateway_guest,
            peer_path,
            workdir,
            options,
            rig,
            second=started[3] if options.rtt else None,
        )
        gateway = await open_gateway_probe(handle.address, handle.label, options.timeout)
        rig.on_close(gateway.close)
        probes: list[EchoProbe] = [direct, gateway]
        service: ServiceHandle | None = None
        service_gateway: GatewayHandle | None = None
        if with_service:
            # A gateway of its own (its guest's serial0, and bulk0 on the same peer),
            # so that neither the service nor the gateway row sees the other's traffic.
            service_gateway = await start_gateway(
                started[-1], peer_path, workdir, options, rig, name="svcgw"
            )
            log("service: private bus, AddGuest activates resourced")
            service = await start_service(service_gateway.address, workdir, options, rig)
            if options.rtt:
                service_probe = await open_service_probe(service, options.timeout)
                rig.on_close(service_probe.close)
                probes.append(service_probe)
        if service is not None:
            results.notes.append(
                "service: resourced started by D-Bus activation (AddGuest) on a private "
                "dbus-daemon, in front of a gateway process of its own with its own guest; "
                "the Console.Open fd is used with blocking calls, like the direct socket"
            )
        if options.rtt:
            try:
                relay = await open_relay(started[2], workdir, rig, options.timeout)
            except BenchError as err:
                results.unavailable["relay"] = str(err)
            else:
                rig.on_close(relay.close)
                probes.insert(1, relay)
            if options.gateway_mode == "subprocess":
                address = Path(handle.address[5:])
                blocking = BlockingGatewayProbe(address, "serial1", options.timeout)
                rig.on_close(blocking.close)
                await asyncio.to_thread(blocking.open, address)
                probes.insert(len(probes) - 1, blocking)
            else:
                # Its blocking calls would stop the very loop the gateway runs in.
                results.unavailable["blocking client"] = "needs the gateway in its own process"
        results.notes.append(
            "each echo path has a demo guest of its own, all identical (a chardev socket "
            "takes one client; the gateway fronts two, serial0 for the asyncio client and "
            "serial1 for the blocking one); samples are interleaved "
            f"in blocks of {options.block}, after {options.warmup} discarded warm-up samples "
            "per path"
        )
        libvirt_service_pid: int | None = None
        if options.libvirt and options.rtt:
            log("libvirt: starting two transient domains")
            libvirt_probes, reason, conn = await open_libvirt_probes(workdir, options, rig)
            if reason is not None:
                results.unavailable["libvirt"] = reason
                results.unavailable["service libvirt"] = f"no libvirt ({reason})"
                log(f"libvirt: not available ({reason})")
            else:
                probes += libvirt_probes
                results.notes.append(
                    "libvirt paths: one transient TCG domain each (libvirt lets one stream "
                    "have a console at a time), COM1 on a pty; the stream is a blocking "
                    "virStream used from the measuring thread"
                )
            if conn is not None and with_service:
                log("service libvirt: a third domain (VNC), a second service following it")
                try:
                    fallback, libvirt_service_pid = await open_service_libvirt_probe(
                        conn, workdir, options, rig
                    )
                except BenchError as error:
                    results.unavailable["service libvirt"] = str(error)
                    log(f"service libvirt: not available ({error})")
                else:
                    rig.on_close(fallback.close)
                    probes.append(fallback)
                    results.notes.append(
                        "service libvirt: a second resourced service (activated on a "
                        f"private bus of its own) follows {LIBVIRT_URI}; its guest is a third "
                        "transient domain, with VNC graphics and no gateway; the "
                        "Console.Open fd (libvirt's console stream behind the service) is "
                        "used with blocking calls, like the direct socket"
                    )
            elif conn is not None:
                results.unavailable["service libvirt"] = "skipped (the service rows are off)"
        else:
            results.unavailable["libvirt"] = "skipped (--no-libvirt)"
            results.unavailable["service libvirt"] = "skipped (--no-libvirt)"

        if options.rtt:
            log(f"echo RTT: {options.samples} samples per path, paths: {[p.key for p in probes]}")
            cpu_before = handle.cpu_seconds()
            service_before = service.cpu_seconds() if service is not None else None
            libvirt_service_before = libvirt_cpu_seconds(libvirt_service_pid)
            results.rtt = await measure_rtt(probes, options.samples, options.warmup, options.block)
            libvirt_service_after = libvirt_cpu_seconds(libvirt_service_pid)
            if libvirt_service_before is not None and libvirt_service_after is not None:
                echoes = options.samples + options.warmup
                results.service_cpu["libvirt_us_per_echo"] = round(
                    (libvirt_service_after - libvirt_service_before) / echoes * 1e6, 1
                )
            cpu_after = handle.cpu_seconds()
            if cpu_before is not None and cpu_after is not None:
                through_gateway = sum(p.key in (GATEWAY, GATEWAY_BLOCKING) for p in probes)
                echoes = (options.samples + options.warmup) * through_gateway
                results.gateway_cpu["us_per_echo"] = round(
                    (cpu_after - cpu_before) / echoes * 1e6, 1
                )
            service_after = service.cpu_seconds() if service is not None else None
            if service_before is not None and service_after is not None:
                echoes = options.samples + options.warmup
                results.service_cpu["us_per_echo"] = round(
                    (service_after - service_before) / echoes * 1e6, 1
                )
        for probe in probes:  # the RTT paths are done: let them go before the bulk runs
            await probe.close()
        if not options.bulk:
            return results
        log(f"bulk: {options.bulk_bytes / MIB:g} MiB x {options.bulk_rounds} rounds")
        cpu_before = handle.cpu_seconds()
        service_before = service.cpu_seconds() if service is not None else None
        results.bulk, failures = await measure_bulk(
            peer_path, handle.address, handle.label, options, service
        )
        cpu_after = handle.cpu_seconds()
        service_after = service.cpu_seconds() if service is not None else None
        service_bytes = sum(
            b.nbytes * len(b.seconds) for k, b in results.bulk.items() if k.startswith(SERVICE)
        )
        if service_before is not None and service_after is not None and service_bytes:
            results.service_cpu["ms_per_mib"] = round(
                (service_after - service_before) / (service_bytes / MIB) * 1e3, 2
            )
        gateway_bytes = sum(
            b.nbytes * len(b.seconds) for k, b in results.bulk.items() if k.startswith(GATEWAY)
        )
        if cpu_before is not None and cpu_after is not None and gateway_bytes:
            results.gateway_cpu["ms_per_mib"] = round(
                (cpu_after - cpu_before) / (gateway_bytes / MIB) * 1e3, 2
            )
        results.unavailable.update({f"bulk_{key}": why for key, why in failures.items()})
        results.notes.append(
            f"bulk: a local socket peer is the chardev; the gateway client opens it with a "
            f"{options.window / MIB:g} MiB window and auto_credit; the direct client reads "
            f"{DIRECT_READ_SIZE // 1024} KiB per recv; MB/s is 10^6 bytes/s, median of "
            f"{options.bulk_rounds} runs"
        )
    finally:
        await rig.close()
        if not options.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def format_table(results: Results) -> str:
    o = results.options
    lines: list[str] = []
    info = machine_info()
    lines.append(
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"{info['qemu']}; load average at the end {info['loadavg']}"
    )
    head = f"console echo RTT (1 byte, TCG guest, N={o.samples})"
    width = max(48, len(head) + 2)
    lines.append("")
    lines.append(f"{head:<{width}}{'p50 us':>9}{'p99 us':>9}{'mean us':>10}   vs direct p50/p99")
    direct = results.rtt.get(DIRECT)
    rows = (DIRECT, RELAY, GATEWAY_BLOCKING, GATEWAY, SERVICE, LIBVIRT_STREAM, SERVICE_LIBVIRT)
    for key in (*rows, VIRSH):
        r = results.rtt.get(key)
        if r is None:
            continue
        s = r.summary()
        ratio = ""
        if direct is not None:
            ratio = (
                f"{r.percentile_us(0.5) / direct.percentile_us(0.5):.2f} / "
                f"{r.percentile_us(0.99) / direct.percentile_us(0.99):.2f}"
            )
        lines.append(
            f"{r.label:<{width}}{s['p50_us']:>9.1f}{s['p99_us']:>9.1f}{s['mean_us']:>10.1f}"
            f"   {ratio}"
        )
    for what in ("relay", "blocking client", "service", "service libvirt", "libvirt"):
        if what in results.unavailable:
            lines.append(f"{what}: not available ({results.unavailable[what]})")
    for direction, title in (
        ("to_client", "console -> client"),
        ("to_console", "client -> console"),
    ):
        d = results.bulk.get(f"{DIRECT}_{direction}")
        if d is None:
            continue
        lines.append("")
        head = f"bulk throughput {title} ({o.bulk_bytes / MIB:g} MiB, local socket peer)"
        lines.append(f"{head:<{width}}{'MB/s':>9}{'best':>9}{'':>10}   vs direct")
        for key in (DIRECT, GATEWAY, SERVICE):
            failure = results.unavailable.get(f"bulk_{key}_{direction}")
            if failure is not None:
                lines.append(f"{key + ' (a run failed)':<{width}}{failure}")
            b = results.bulk.get(f"{key}_{direction}")
            if b is None:
                continue
            best = b.nbytes / min(b.seconds) / 1e6
            lines.append(
                f"{b.label:<{width}}{b.mb_per_s:>9.1f}{best:>9.1f}{'':>10}   "
                f"{b.mb_per_s / d.mb_per_s:.2f}"
            )
    lines.append("")
    lines.append(
        "targets (gateway vs direct; service vs virsh console and absolute; "
        "service libvirt vs libvirt stream)"
    )
    for target in results.targets():
        stretch = f" (stretch {target['stretch']})" if "stretch" in target else ""
        lines.append(f"  {target['result']:<5} {target['target']}: {target['value']}{stretch}")
    if results.gateway_cpu:
        parts = []
        if "us_per_echo" in results.gateway_cpu:
            parts.append(f"{results.gateway_cpu['us_per_echo']} us per echo")
        if "ms_per_mib" in results.gateway_cpu:
            parts.append(f"{results.gateway_cpu['ms_per_mib']} ms per bulk MiB")
        lines.append(f"gateway process CPU: {', '.join(parts)}")
    if results.service_cpu:
        parts = []
        if "us_per_echo" in results.service_cpu:
            parts.append(f"{results.service_cpu['us_per_echo']} us per echo")
        if "ms_per_mib" in results.service_cpu:
            parts.append(f"{results.service_cpu['ms_per_mib']} ms per bulk MiB")
        lines.append(f"service process CPU: {', '.join(parts)}")
        if "libvirt_us_per_echo" in results.service_cpu:
            lines.append(
                "libvirt service process CPU: "
                f"{results.service_cpu['libvirt_us_per_echo']} us per echo"
            )
    strays = {k: r.stray_bytes for k, r in results.rtt.items() if r.stray_bytes}
    if strays:
        lines.append(f"WARNING: unexpected bytes in the echo streams: {strays}")
    lines.append("")
    lines += [f"note: {note}" for note in results.notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.console_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="200 samples, 8 MiB, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, help="echo samples per path")
    parser.add_argument("--bulk-mib", type=float, help="MiB per bulk run")
    parser.add_argument("--rounds", type=int, help="bulk runs per path and direction")
    parser.add_argument(
        "--window-kib", type=int, help=f"bulk console window (default {BULK_WINDOW // 1024})"
    )
    parser.add_argument("--no-libvirt", action="store_true", help="skip the libvirt paths")
    parser.add_argument("--no-service", action="store_true", help="skip the resourced service")
    parser.add_argument("--no-reverse", action="store_true", help="skip client -> console bulk")
    parser.add_argument(
        "--only", choices=("rtt", "bulk"), help="measure only the echo RTT or only the bulk"
    )
    parser.add_argument(
        "--gateway",
        choices=("subprocess", "inprocess"),
        default="subprocess",
        help="run the gateway as its own process (default, as deployed) or in this one",
    )
    parser.add_argument("--verify", action="store_true", help="check every bulk byte too")
    parser.add_argument(
        "--gateway-history",
        type=int,
        metavar="BYTES",
        help="the gateway's ring per console (its --history; default 64 KiB)",
    )
    parser.add_argument("--profile-gateway", type=Path, metavar="FILE", help="cProfile output")
    parser.add_argument("--profile-client", type=Path, metavar="FILE", help="cProfile output")
    parser.add_argument(
        "--profile-service", type=Path, metavar="FILE", help="cProfile output of the service"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def options_from_args(args: argparse.Namespace) -> Options:
    options = Options()
    if args.quick:
        options.samples, options.bulk_bytes, options.bulk_rounds = QUICK_SAMPLES, QUICK_BULK, 2
        options.block = 50
    if args.samples is not None:
        options.samples = args.samples
    if args.bulk_mib is not None:
        options.bulk_bytes = int(args.bulk_mib * MIB)
    if args.rounds is not None:
        options.bulk_rounds = args.rounds
    options.libvirt = not args.no_libvirt
    options.service = not args.no_service
    options.reverse = not args.no_reverse
    options.rtt = args.only != "bulk"
    options.bulk = args.only != "rtt"
    options.gateway_mode = args.gateway
    options.verify = args.verify
    options.gateway_history = args.gateway_history
    if args.window_kib is not None:
        options.window = args.window_kib * 1024
    options.profile_gateway = args.profile_gateway
    options.profile_client = args.profile_client
    options.profile_service = args.profile_service
    options.keep_workdir = args.keep
    if options.samples < 1 or options.bulk_bytes < 1 or options.bulk_rounds < 1:
        raise SystemExit("samples, bulk size and rounds must be positive")
    return options


async def run_until_signal(options: Options) -> Results:
    """`run_benchmark`, cancelled (and so cleaned up) on SIGTERM or SIGINT."""
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
        if options.profile_client is not None:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            try:
                results = asyncio.run(run_until_signal(options))
            finally:
                profiler.disable()
                profiler.dump_stats(str(options.profile_client))
        else:
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
