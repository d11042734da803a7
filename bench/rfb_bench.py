"""CPU cost of the sans-IO RFB engine on the console hot paths (no sockets, no event loop).

Run from the repository root:

    .venv/bin/python -m bench.rfb_bench [--rounds N] [--seconds S] [--only NAME] [--json]
    .venv/bin/python -m bench.rfb_bench --profile NAME    # cProfile one case instead

Each case drives a `ClientConnection` (with `Consoles`) or a `ServerConnection`
(with the console parser, as the gateway sets it up) that was taken to CONNECTED
by hand-written bytes, then repeats one hot-path operation:

- client-data-1: one 1-byte console DATA per `receive_data` call, events pulled;
- client-data-64k: 64 KiB DATA messages arriving in 256 KiB `receive_data` calls;
- server-write-1: one 1-byte console WRITE per `receive_data` call;
- server-write-64k: 64 KiB WRITE messages arriving in 256 KiB calls;
- server-send-1 / server-send-64k: `send_raw(ConsoleData(...).serialize())` and
  `data_to_send()` per message;
- client-write-1 / client-write-64k: `Consoles.write()` and `data_to_send()`.

The client's console is open with the default window and auto_credit, so its
credit grants (one per half window) are part of the cost, as in real use. Each
case runs `--rounds` rounds of about `--seconds`; the table gives the median and
the best round in messages/s and payload MB/s (10**6 bytes), plus the CPU time
per message of the best round.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from resourced.rfb.connection import ClientConnection
from resourced.rfb.connection import State as ClientState
from resourced.rfb.consoles import ConsoleData, ConsoleOpened, Consoles, parse_client_message
from resourced.rfb.constants import QemuClientSubtype
from resourced.rfb.pixelformat import RGBX8888
from resourced.rfb.server import ServerConnection, ServerSecurity
from resourced.rfb.server import State as ServerState

KIB = 1024
#: Size of each `receive_data` call in the bulk cases (what a transport reads at once).
READ_SIZE = 256 * KIB
BULK = 64 * KIB
CONSOLE_ID = 1

# --- wire bytes, packed by hand (the layouts of docs/protocol/console-extension.md)


def _console(op: int, body: bytes) -> bytes:
    """A console message, either way: QEMU message 255, submessage 2, operation."""
    return struct.pack("!BBB", 255, 2, op) + body


def data_message(payload: bytes) -> bytes:
    """Server DATA (op 4): u32 console id, u32 length, payload."""
    return _console(4, struct.pack("!II", CONSOLE_ID, len(payload)) + payload)


def write_message(payload: bytes) -> bytes:
    """Client DATA (op 2): u32 console id, u32 length, payload."""
    return _console(2, struct.pack("!II", CONSOLE_ID, len(payload)) + payload)


def stream_pieces(message: bytes, count: int, size: int) -> list[bytes]:
    """`count` copies of `message` back to back, cut into pieces of `size` bytes."""
    stream = message * count
    return [stream[i : i + size] for i in range(0, len(stream), size)]


# --- connections taken to CONNECTED


def client_with_open_console() -> tuple[ClientConnection, Consoles]:
    consoles = Consoles()
    conn = ClientConnection(extensions=[consoles])
    pixel_format = bytes.fromhex("20 18 00 01 00ff 00ff 00ff 10 08 00 000000")
    name = b"bench"
    conn.receive_data(
        b"RFB 003.008\n"
        + b"\x01\x01"  # one security type, None
        + struct.pack("!I", 0)  # SecurityResult OK
        + struct.pack("!HH", 640, 480)
        + pixel_format
        + struct.pack("!I", len(name))
        + name
    )
    list(conn.events())
    assert conn.state is ClientState.CONNECTED
    serial = b"serial0"
    hello = struct.pack("!BBHI", 1, 0, 1, BULK)
    hello += struct.pack("!IBBB", CONSOLE_ID, 0, 0, len(serial)) + serial
    conn.receive_data(_console(0, hello))
    list(conn.events())
    consoles.open(CONSOLE_ID)
    conn.receive_data(_console(3, struct.pack("!III", CONSOLE_ID, 0xFFFFFFFF, 0)))
    assert list(conn.events()) == [ConsoleOpened(CONSOLE_ID, 0xFFFFFFFF, 0)]
    conn.data_to_send()
    return conn, consoles


def connected_server() -> ServerConnection:
    server = ServerConnection(
        ServerSecurity(allow_none=True),
        qemu_parsers={QemuClientSubtype.CONSOLE: parse_client_message},
    )
    server.receive_data(b"RFB 003.008\n" + b"\x01" + b"\x01")
    list(server.events())
    server.send_server_init(640, 480, RGBX8888, "bench")
    assert server.state is ServerState.CONNECTED
    server.data_to_send()
    return server


# --- the cases: each returns a function that runs `n` messages


Batch = Callable[[int], None]


def client_data_1() -> Batch:
    conn, _ = client_with_open_console()
    message = data_message(b"x")
    receive, next_event, flush = conn.receive_data, conn.next_event, conn.data_to_send

    def run(n: int) -> None:
        got = 0
        for _ in range(n):
            receive(message)
            while next_event() is not None:
                got += 1
            flush()  # the credit grants
        assert got == n, got

    return run


def client_data_bulk() -> Batch:
    conn, _ = client_with_open_console()
    # 64 messages: 4 MiB cut in 256 KiB reads, messages straddling the cuts.
    per_stream = 64
    pieces = stream_pieces(data_message(bytes(BULK)), per_stream, READ_SIZE)
    receive, next_event, flush = conn.receive_data, conn.next_event, conn.data_to_send

    def run(n: int) -> None:
        got = 0
        for _ in range(n // per_stream):
            for piece in pieces:
                receive(piece)
                while next_event() is not None:
                    got += 1
                flush()
        assert got == n // per_stream * per_stream, got

    return run


def server_write_1() -> Batch:
    server = connected_server()
    message = write_message(b"x")
    receive, next_event = server.receive_data, server.next_event

    def run(n: int) -> None:
        got = 0
        for _ in range(n):
            receive(message)
            while next_event() is not None:
                got += 1
        assert got == n, got

    return run


def server_write_bulk() -> Batch:
    server = connected_server()
    per_stream = 64
    pieces = stream_pieces(write_message(bytes(BULK)), per_stream, READ_SIZE)
    receive, next_event = server.receive_data, server.next_event

    def run(n: int) -> None:
        got = 0
        for _ in range(n // per_stream):
            for piece in pieces:
                receive(piece)
                while next_event() is not None:
                    got += 1
        assert got == n // per_stream * per_stream, got

    return run


def server_send(size: int) -> Callable[[], Batch]:
    def setup() -> Batch:
        server = connected_server()
        chunk = bytes(size)
        send_raw, flush = server.send_raw, server.data_to_send

        def run(n: int) -> None:
            for _ in range(n):
                send_raw(ConsoleData(CONSOLE_ID, chunk).serialize())
                flush()

        return run

    return setup


def client_write(size: int) -> Callable[[], Batch]:
    def setup() -> Batch:
        conn, consoles = client_with_open_console()
        chunk = bytes(size)
        write, flush = consoles.write, conn.data_to_send

        def run(n: int) -> None:
            for _ in range(n):
                write(CONSOLE_ID, chunk)
                flush()
            # Give back what was used (the server's CREDIT), so credit never runs out.
            used = n * size
            while used:
                increment = min(used, 1 << 30)
                conn.receive_data(_console(6, struct.pack("!II", CONSOLE_ID, increment)))
                used -= increment
            list(conn.events())

        return run

    return setup


@dataclass(frozen=True)
class Case:
    name: str
    payload: int  # bytes of console data per message
    setup: Callable[[], Batch]
    granule: int = 1  # batches are multiples of this many messages


CASES = [
    Case("client-data-1", 1, client_data_1),
    Case("client-data-64k", BULK, client_data_bulk, granule=64),
    Case("server-write-1", 1, server_write_1),
    Case("server-write-64k", BULK, server_write_bulk, granule=64),
    Case("server-send-1", 1, server_send(1)),
    Case("server-send-64k", BULK, server_send(BULK)),
    Case("client-write-1", 1, client_write(1)),
    Case("client-write-64k", BULK, client_write(BULK)),
]


@dataclass(frozen=True)
class Result:
    name: str
    payload: int
    rates: list[float]  # messages per second, one per round

    @property
    def best(self) -> float:
        return max(self.rates)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def measure(case: Case, rounds: int, seconds: float) -> Result:
    run = case.setup()
    # Calibrate: grow the batch until it takes a tenth of a round.
    n = case.granule
    while True:
        start = time.process_time()
        run(n)
        took = time.process_time() - start
        if took >= seconds / 10:
            break
        n *= 4
    per_round = max(case.granule, int(n * seconds / took) // case.granule * case.granule)
    rates = []
    for _ in range(rounds):
        start = time.process_time()
        run(per_round)
        rates.append(per_round / (time.process_time() - start))
    return Result(case.name, case.payload, rates)


def report(results: list[Result]) -> None:
    print(
        f"{'case':<18} {'msg/s median':>13} {'msg/s best':>12} {'MB/s median':>12} "
        f"{'MB/s best':>10} {'us/msg best':>12}"
    )
    for r in results:
        print(
            f"{r.name:<18} {r.median:>13,.0f} {r.best:>12,.0f} "
            f"{r.median * r.payload / 1e6:>12,.1f} {r.best * r.payload / 1e6:>10,.1f} "
            f"{1e6 / r.best:>12.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="CPU seconds per round")
    parser.add_argument("--only", action="append", choices=[c.name for c in CASES])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", choices=[c.name for c in CASES])
    args = parser.parse_args(argv)

    if args.profile:
        case = next(c for c in CASES if c.name == args.profile)
        run = case.setup()
        with cProfile.Profile() as profile:
            run(100_000 if case.payload == 1 else 6400)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return 0

    cases = [c for c in CASES if not args.only or c.name in args.only]
    results = [measure(case, args.rounds, args.seconds) for case in cases]
    if args.json:
        json.dump(
            {
                r.name: {
                    "payload": r.payload,
                    "msgs_per_s_median": r.median,
                    "msgs_per_s_best": r.best,
                    "mb_per_s_median": r.median * r.payload / 1e6,
                    "mb_per_s_best": r.best * r.payload / 1e6,
                }
                for r in results
            },
            sys.stdout,
            indent=2,
        )
        print()
    else:
        print(f"python {sys.version.split()[0]}, {args.rounds} rounds of ~{args.seconds} s CPU")
        report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
