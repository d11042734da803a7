"""What one wake-up a chunk costs a process on this machine, before any audio work.

Run from the repository root:

    .venv/bin/python -m bench.wakeup_floor [--seconds S] [--rounds R] [--interval MS]

A guest's VNC audio comes as a chunk every 10 ms (QEMU's audio timer), so a
player wakes at least 100 times a second. This measures what those wake-ups
alone cost, with nothing done with the bytes, for two ways of waiting:

- **blocking recv**: a plain loop of `socket.recv` (what a C player on a
  thread of its own, or gtk-vnc's GLib loop, comes close to);
- **asyncio protocol**: an `asyncio.BufferedProtocol` on the default event
  loop (what our client, `resourced.rfb.aio`, is built on).

A sender process writes a 1772-byte chunk (a QEMU AudioData message of 10 ms
of S16 stereo at 44.1 kHz) every `--interval` ms on a socketpair, paced by the
monotonic clock; the receiver's user plus system CPU time over the run
(`getrusage`) is reported as % of one core. The two receivers take turns,
`--rounds` times each, and the table gives each one's median and range, so
that the machine's load falls on both alike.

It does not measure our RFB parsing or the sound server's side: the audio
benchmark's `resourced-floor` row (`bench/audio_bench.py`) is our client with
its parsing, and its `resourced` row the whole player.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable

CHUNK = 1772  # bytes: an AudioData message holding 10 ms of S16 stereo at 44.1 kHz


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def send_paced(sock: socket.socket, seconds: float, interval: float) -> None:
    """Write a chunk every `interval` s for `seconds` s, then close (in a child)."""
    chunk = b"\x00" * CHUNK
    due = time.monotonic()
    end = due + seconds
    while due < end:
        due += interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendall(chunk)
    sock.close()


def receive_blocking(sock: socket.socket) -> None:
    while sock.recv(65536):
        pass


class _Drain(asyncio.BufferedProtocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self._buffer = bytearray(65536)
        self._done = done

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def eof_received(self) -> bool:
        if not self._done.done():
            self._done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


def receive_asyncio(sock: socket.socket) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_unix_connection(lambda: _Drain(done), sock=sock)
        try:
            await done
        finally:
            transport.close()

    asyncio.run(run())


RECEIVERS: dict[str, Callable[[socket.socket], None]] = {
    "blocking recv": receive_blocking,
    "asyncio protocol": receive_asyncio,
}


def measure(receive: Callable[[socket.socket], None], seconds: float, interval: float) -> float:
    """CPU % of one core that `receive` used while chunks came every `interval` s."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the sender
        try:
            ours.close()
            send_paced(theirs, seconds, interval)
        finally:
            os._exit(0)
    theirs.close()
    try:
        before, started = cpu_seconds(), time.monotonic()
        receive(ours)
        used, elapsed = cpu_seconds() - before, time.monotonic() - started
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return used / elapsed * 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per receiver")
    parser.add_argument("--interval", type=float, default=10.0, help="ms between chunks")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or args.interval <= 0:
        parser.error("--seconds and --interval must be positive, --rounds at least 1")
    figures: dict[str, list[float]] = {name: [] for name in RECEIVERS}
    for round_number in range(args.rounds):
        names = list(RECEIVERS) if round_number % 2 == 0 else list(RECEIVERS)[::-1]
        for name in names:
            value = measure(RECEIVERS[name], args.seconds, args.interval / 1000)
            figures[name].append(value)
            print(f"[wakeup_floor] {name}: {value:.2f} %", file=sys.stderr, flush=True)
    rate = 1000 / args.interval
    print(
        f"{rate:g} chunks a second, {args.rounds} x {args.seconds:g} s each, "
        f"CPU % of one core (median, range)"
    )
    for name, values in figures.items():
        per_wakeup = statistics.median(values) / 100 / rate * 1e6
        print(
            f"  {name:<18} {statistics.median(values):5.2f} %  "
            f"({min(values):.2f}..{max(values):.2f})  ~{per_wakeup:.0f} us a chunk"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
