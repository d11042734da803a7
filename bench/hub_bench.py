"""CPU cost of the console hub's ring per chunk of console output: before and now.

Run from the repository root:

    .venv/bin/python -m bench.hub_bench [--rounds N] [--seconds S]

Each case feeds chunks of one size to a hub with one caught-up reader, the way a
gateway session reads (`read(offset, min(credit, max_data))` until it has all,
then `advance()`), with no sockets and no event loop: only the hub's
`source_data()` and `read()` path (notify, trim, back-pressure check, read). It
does so, interleaved round by round, for

- `BytearrayRing`: the hub's ring as it was (one `bytearray`, `+=` on the
  right and `del` on the left, `read()` returning `bytes(ring[a:b])`), copied
  here for comparison only;
- `ConsoleHub`: the real hub (`resourced.consoles.hub`), its `Ring` a list of
  chunks.

The cases: 1-byte chunks (keystroke echoes: the count of Python operations is
what matters), 64 KiB and 256 KiB chunks (bulk: copies matter). The reader
takes at most 64 KiB a read (the console extension's largest DATA message), so
a 256 KiB chunk is read as four slices; the last row reads it whole. The ring
is the default 64 KiB, filled before timing. The table gives the process's CPU
time per chunk (less disturbed than wall time on a shared machine) and MB/s
(10**6 bytes/s) of the best round of each side, and how many times faster the
hub is now.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Protocol

from resourced.consoles import ConsoleKind, ConsoleSpec, Endpoint, EndpointType
from resourced.consoles.hub import ConsoleHub
from resourced.consoles.ring import DEFAULT_RING_SIZE, READ_SLACK, Overrun

log = logging.getLogger(__name__)

#: `resourced.rfb.consoles.MAX_CONSOLE_DATA`: the most a DATA message carries.
MAX_DATA = 65536


class _Hub(Protocol):
    total: int

    def read(self, offset: int, limit: int) -> bytes: ...
    def advance(self, listener: Callable[[_Hub], None], position: int) -> None: ...
    def source_data(self, data: bytes) -> None: ...


class BytearrayRing:
    """The hub's ring before the chunk list (for comparison only): `_received`
    (here `source_data`), `read` and what they call, as they were, without the
    host end."""

    def __init__(self, ring_size: int = DEFAULT_RING_SIZE) -> None:
        self.name = "baseline"
        self.ring_size = ring_size
        self._ring = bytearray()
        self.total = 0
        self._listeners: set[Callable[[BytearrayRing], None]] = set()
        self._positions: dict[Callable[[BytearrayRing], None], int] = {}
        self._given_up: set[Callable[[BytearrayRing], None]] = set()
        self._paused = False

    @property
    def oldest(self) -> int:
        return self.total - len(self._ring)

    def read(self, offset: int, limit: int) -> bytes:
        if offset < self.oldest:
            raise Overrun(
                f"console {self.name}: output from offset {offset} was dropped "
                f"(the ring of {self.ring_size} bytes now starts at {self.oldest})"
            )
        start = offset - self.oldest
        return bytes(self._ring[start : start + limit])

    def source_data(self, data: bytes) -> None:
        self._ring += data
        self.total += len(data)
        keep = self.ring_size
        slowest = self._slowest()
        if slowest is not None:
            keep = min(max(keep, self.total - slowest), self.ring_size + READ_SLACK)
        if len(self._ring) > keep:
            del self._ring[: len(self._ring) - keep]
        self._notify(self._listeners)
        self._check_pressure()

    def subscribe(self, listener: Callable[[BytearrayRing], None], position: int) -> None:
        self._listeners.add(listener)
        self._positions[listener] = position
        self._check_pressure()

    def advance(self, listener: Callable[[BytearrayRing], None], position: int) -> None:
        if listener in self._positions:
            self._positions[listener] = position
            if listener in self._given_up and self.total - position < self.ring_size // 2:
                self._given_up.discard(listener)
            if self._paused:
                self._check_pressure()

    def _slowest(self) -> int | None:
        behind = [p for listener, p in self._positions.items() if listener not in self._given_up]
        return min(behind) if behind else None

    def _check_pressure(self) -> None:
        slowest = self._slowest()
        if slowest is None or self.total - slowest < self.ring_size // 2:
            self._set_paused(False)
        elif self.total - slowest >= self.ring_size:
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            raise AssertionError("a caught-up reader never pauses the console")

    def _notify(self, listeners: set[Callable[[BytearrayRing], None]]) -> None:
        for listener in list(listeners):
            try:
                listener(self)
            except Exception:
                log.exception("console %s: subscriber failed", self.name)


class Reader:
    """A caught-up reader, as `Session._pump` reads (credit never runs out)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.position = 0
        self.received = 0

    def __call__(self, hub: _Hub) -> None:
        position = self.position
        while position < hub.total:
            chunk = hub.read(position, self.limit)
            position += len(chunk)
        self.received += position - self.position
        self.position = position
        hub.advance(self, position)


def new_hub() -> ConsoleHub:
    spec = ConsoleSpec("bench", ConsoleKind.SERIAL, Endpoint(EndpointType.UNIX, "/nonexistent"))
    return ConsoleHub.from_spec(0, spec)  # never started: fed by hand


def run(make: Callable[[], tuple[_Hub, Reader]], chunks: list[bytes], count: int) -> float:
    """CPU seconds for `count` chunks into a hub whose ring is already full."""
    hub, reader = make()
    received = hub.source_data
    for chunk in chunks * max(1, 2 * DEFAULT_RING_SIZE // sum(map(len, chunks))):
        received(chunk)  # fill the ring first: the steady state is what counts
    before = reader.received
    rounds, rest = divmod(count, len(chunks))
    batch = chunks * rounds + chunks[:rest]
    start = time.process_time()
    for chunk in batch:
        received(chunk)
    elapsed = time.process_time() - start
    if reader.received - before != sum(map(len, batch)) or reader.position != hub.total:
        raise AssertionError("the reader did not get every byte")
    return elapsed


def make_old(limit: int) -> Callable[[], tuple[_Hub, Reader]]:
    def make() -> tuple[_Hub, Reader]:
        hub = BytearrayRing()
        reader = Reader(limit)
        hub.subscribe(reader, 0)
        return hub, reader

    return make


def make_new(limit: int) -> Callable[[], tuple[_Hub, Reader]]:
    def make() -> tuple[_Hub, Reader]:
        hub = new_hub()
        reader = Reader(limit)
        hub.subscribe(reader, 0)
        return hub, reader

    return make


CASES = [
    # name, chunk size, reader's limit
    ("1 B chunks", 1, MAX_DATA),
    ("64 KiB chunks", 64 * 1024, MAX_DATA),
    ("256 KiB chunks", 256 * 1024, MAX_DATA),
    ("256 KiB chunks, read whole", 256 * 1024, 256 * 1024),
]


def chunks_of(size: int) -> list[bytes]:
    """Distinct chunks (fresh objects, as the transport gives), 8 MiB at most."""
    count = 4096 if size == 1 else max(4, 8 * 1024 * 1024 // size)
    return [bytes([i % 251]) * size for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.2, help="per round and side")
    args = parser.parse_args()

    print(
        f"{'case (one caught-up reader, 64 KiB ring)':42} {'old ns':>10} {'new ns':>10}"
        f" {'old MB/s':>10} {'new MB/s':>10} {'speedup':>8}"
    )
    for name, size, limit in CASES:
        chunks = chunks_of(size)
        sides = {"old": make_old(limit), "new": make_new(limit)}
        # Calibrate the count per round to about --seconds on the old side.
        probe = max(16, 20_000 // size)
        count = max(probe, int(args.seconds / (run(sides["old"], chunks, probe) / probe)))
        best = {side: float("inf") for side in sides}
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for side in order:
                best[side] = min(best[side], run(sides[side], chunks, count) / count)
        old, new = best["old"], best["new"]
        print(
            f"{name:42} {old * 1e9:10.0f} {new * 1e9:10.0f}"
            f" {size / old / 1e6:10.1f} {size / new / 1e6:10.1f} {old / new:7.2f}x"
        )


if __name__ == "__main__":
    main()
