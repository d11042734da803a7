"""An app that never reads its fd while the guest floods a console, all real: the
demo guest's QEMU monitor prints megabytes (`info mtree`, many times) through a
real gateway into the service. Another reader of the same console, another
console of the guest and another guest's console keep flowing (held back at
most for the hub's stall timeout, 2 s), the service's memory stays bounded (its
RSS from /proc), and the app that does not read is closed as overrun: it reads
what was buffered for it, then EOF.

With a service stall timeout longer than the gateway's own (5 s), the gateway
gives up on the service first and closes the console on it as overrun: the
service opens it again at once, and its other readers go on (they lose what the
gateway dropped, no more)."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from tests.dbus.conftest import (
    BUS_NAME,
    ROOT,
    TIMEOUT,
    GatewayGuest,
    Session,
    call,
    demo_behind_gateway,
    ok,
)
from tests.dbus.signals import Signals, get_property

MANAGER = f"{BUS_NAME}.Manager"
CONSOLE = f"{BUS_NAME}.Console"
DEMO = f"{ROOT}/guests/demo"
MONITOR = f"{DEMO}/consoles/monitor"
SERIAL = f"{DEMO}/consoles/serial0"
OTHER_SERIAL = f"{ROOT}/guests/other/consoles/serial0"
STALL_TIMEOUT = 2.0
#: The gateway's own: how long it waits for a viewer (here the service) a ring behind.
GATEWAY_STALL_TIMEOUT = 5.0
#: How long a console that keeps flowing may go without output during the flood:
#: the stall timeout, plus scheduling on a loaded 2-core machine running two
#: TCG guests, a gateway and the service. Without the timeout it would be for ever.
STALL_BOUND = STALL_TIMEOUT + 6.0
#: `info mtree` prints about 11 KiB here: 2000 of them, some 23 MB in all.
COMMANDS = 2000
DONE = b"unknown command: 'flood-done'"
#: The service's RSS may grow by this much while the flood passes, at most: far
#: below the flood (the ring, its slack and a socket's queue are well under 1 MiB
#: per reader).
RSS_BOUND = 16 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Drain(threading.Thread):
    """Reads a console fd as fast as it comes, timing the gaps, until `until` shows."""

    def __init__(self, fd: int, until: bytes) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.wanted = until
        self.total = 0
        self.longest_gap = 0.0
        self.found = threading.Event()
        self.error: str | None = None
        self.first = 0.0

    def run(self) -> None:
        tail = b""
        deadline = time.monotonic() + 3 * TIMEOUT
        last = 0.0
        while not self.found.is_set():
            if time.monotonic() > deadline:
                self.error = f"no {self.wanted!r} after {self.total} bytes"
                return
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.error = f"EOF after {self.total} bytes"
                return
            now = time.monotonic()
            if last:
                self.longest_gap = max(self.longest_gap, now - last)
            else:
                self.first = now
            last = now
            self.total += len(chunk)
            tail = (tail + chunk)[-len(self.wanted) - 65536 :]
            if self.wanted in tail:
                self.found.set()


async def open_fd(bus: MessageBus, path: str) -> socket.socket:
    reply = await call(bus, path, CONSOLE, "Open", "a{sv}", [{}])
    sock = socket.socket(fileno=reply.unix_fds[ok(reply)[0]])
    sock.setblocking(True)
    return sock


async def echo_latency(sock: socket.socket, word: bytes) -> float:
    """Type `word` on a serial console's fd and time its echo."""

    def exchange() -> float:
        started = time.monotonic()
        sock.sendall(word)
        seen = b""
        while word not in seen:
            assert time.monotonic() - started < TIMEOUT, f"no echo of {word!r}: {seen!r}"
            ready, _, _ = select.select([sock], [], [], 0.5)
            if ready:
                chunk = sock.recv(65536)
                assert chunk, f"EOF waiting for {word!r}"
                seen = (seen + chunk)[-4096:]
        return time.monotonic() - started

    return await asyncio.to_thread(exchange)


@pytest.mark.parametrize("stall_timeout", [STALL_TIMEOUT, GATEWAY_STALL_TIMEOUT + 3])
async def test_an_app_that_never_reads_holds_nobody_back(
    session: Session, gateway_guest: GatewayGuest, stall_timeout: float
) -> None:
    session.write_config(f"[guests]\nstall-timeout = {stall_timeout}\n")
    async with demo_behind_gateway() as other:
        bus = await session.client()
        signals = await Signals(bus).start()
        sockets: list[socket.socket] = []
        try:
            for name, guest in (("demo", gateway_guest), ("other", other)):
                ok(await call(bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", [name, guest.address, {}]))
            for path in (MONITOR, SERIAL, OTHER_SERIAL):
                await signals.wait_property(path, CONSOLE, "Available", True)
            sleeper = await open_fd(bus, MONITOR)  # never read until the end
            reader = await open_fd(bus, MONITOR)
            serial = await open_fd(bus, SERIAL)
            other_serial = await open_fd(bus, OTHER_SERIAL)
            sockets += [sleeper, reader, serial, other_serial]
            assert await get_property(bus, MONITOR, CONSOLE, "OpenCount") == 2
            for sock, word in ((serial, b"warm-a"), (other_serial, b"warm-b")):
                await echo_latency(sock, word)
            pid = session.service_pid()
            assert pid is not None
            before = rss(pid)

            mark = signals.mark()
            drain = Drain(reader.fileno(), DONE)
            drain.start()
            reader.sendall(b"info mtree\n" * COMMANDS + b"flood-done\n")
            peak = before
            latencies: list[float] = []
            probe = 0
            started = time.monotonic()
            while not drain.found.is_set() and drain.error is None:
                assert time.monotonic() - started < 3 * TIMEOUT, f"flood: {drain.total} bytes"
                peak = max(peak, rss(pid))
                probe += 1
                for sock, prefix in ((serial, b"a"), (other_serial, b"b")):
                    latencies.append(await echo_latency(sock, b"%s%d;" % (prefix, probe)))
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
            assert drain.error is None, drain.error
            peak = max(peak, rss(pid))
            drain.join(TIMEOUT)
            print(
                f"flood: {drain.total} bytes in {elapsed:.1f} s, longest gap "
                f"{drain.longest_gap:.2f} s, echo latencies max {max(latencies):.2f} s "
                f"({len(latencies)}), RSS {before} -> peak {peak}"
            )

            # The reader had it (all of it, or all but what the gateway dropped while
            # it waited for the service), with no gap longer than the stall allows.
            assert drain.total > COMMANDS * 10_000, drain.total
            assert drain.longest_gap < stall_timeout + STALL_BOUND - STALL_TIMEOUT, (
                drain.longest_gap,
                elapsed,
            )
            # The other console and the other guest never waited for the sleeper.
            assert max(latencies) < STALL_BOUND, (latencies, elapsed)
            assert probe >= 2, (probe, elapsed)  # they were tried during the flood
            # Bounded memory: far less than what flowed past the sleeper.
            assert peak - before < RSS_BOUND, (before, peak, drain.total)

            # The sleeper was left behind and closed as overrun: OpenCount drops,
            # and it reads what was queued for it, then EOF.
            await signals.wait_property(MONITOR, CONSOLE, "OpenCount", 1, since=mark)

            def read_to_eof() -> int:
                sleeper.settimeout(TIMEOUT)
                total = 0
                while chunk := sleeper.recv(65536):
                    total += len(chunk)
                return total

            buffered = await asyncio.to_thread(read_to_eof)
            assert 0 < buffered < drain.total // 4, (buffered, drain.total)
            log = (session.directory / "daemon.log").read_text(errors="replace")
            # What the service logged: it went on without the sleeper after its
            # stall timeout (or the gateway went on without the service first, and
            # the service opened the console again), and closed it as overrun.
            if stall_timeout < GATEWAY_STALL_TIMEOUT:
                assert f"monitor: 1 reader(s) stalled it for {stall_timeout:g} s" in log, log
            else:
                assert "rfb:demo/monitor: the server closed it" in log, log
                assert "opening it again" in log, log
            assert "console monitor: fd client fell a whole ring behind; closed" in log, log
            # The reader still has the console.
            assert await get_property(bus, MONITOR, CONSOLE, "OpenCount") == 1
            reader.sendall(b"after-flood\n")
            drain = Drain(reader.fileno(), b"unknown command: 'after-flood'")
            await asyncio.to_thread(drain.run)  # the gateway runs on this loop
            assert drain.error is None, drain.error
        finally:
            for sock in sockets:
                sock.close()
            bus.disconnect()
