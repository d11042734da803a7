"""The ring of a console's output, alone: plain functions, no event loop, the clock
passed in. The hub around it, with real sources, is tested in test_hub.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from resourced.consoles.ring import _MERGE_MAX, _MERGE_RUN, READ_SLACK, Overrun, Ring
from tests.consoles.streams import stream


def feed(ring: Ring[str], sizes: list[int]) -> None:
    """Append the test stream in chunks of `sizes` (no reader takes a turn)."""
    for size in sizes:
        ring.append(stream(ring.total, ring.total + size))
        ring.trim()


def test_keeps_the_newest_bytes() -> None:
    ring: Ring[str] = Ring(16, label="console c")
    feed(ring, [10, 10])
    assert (ring.total, ring.oldest) == (20, 4)
    assert ring.read(4, 100) == stream(4, 20)
    with pytest.raises(Overrun, match="console c: output from offset 0 was dropped"):
        ring.read(0, 4)
    assert ring.read(20, 10) == b""
    assert ring.read(5, 0) == b""


def test_a_reader_that_keeps_up_gets_each_chunk_as_it_came() -> None:
    ring: Ring[str] = Ring(64)
    ring.add_reader("r", 0)
    for size in (1, 1, 5, 100, 1000, 64 * 1024):
        chunk = stream(ring.total, ring.total + size)
        position = ring.total
        ring.append(chunk)
        assert ring.read(position, size) is chunk  # no copy
        assert ring.read(position, 1 << 20) is chunk
        assert not ring.advance("r", ring.total)
        assert not ring.trim()


def test_a_mutable_chunk_is_copied() -> None:
    ring: Ring[str] = Ring(64)
    data = bytearray(b"abc")
    ring.append(data)  # type: ignore[arg-type]
    data[0] = ord("X")
    assert ring.read(0, 3) == b"abc"


def test_reads_spanning_chunks() -> None:
    sizes = [3, 5, 1, 2, 8, 1, 1, 4, 13, 2]
    total = sum(sizes)
    for size in (total + 10, 17):  # everything held; the oldest chunk partly dropped
        ring: Ring[str] = Ring(size)
        feed(ring, sizes)
        assert ring.oldest == max(0, total - size)
        for offset in range(ring.oldest, total + 1):
            for limit in range(total - offset + 3):
                assert ring.read(offset, limit) == stream(offset, min(offset + limit, total))


def test_tiny_chunks_are_joined() -> None:
    ring: Ring[str] = Ring(300)
    ring.add_reader("r", 0)
    for _ in range(1000):  # keystroke echoes, read as they come
        ring.append(stream(ring.total, ring.total + 1))
        ring.advance("r", ring.total)
        ring.trim()
    assert ring.oldest == 1000 - 300  # exact to the byte
    assert ring.chunk_count < 2 * _MERGE_RUN
    assert ring.held <= 300 + _MERGE_MAX
    assert ring.read(ring.oldest, 1000) == stream(700, 1000)


def test_a_reader_a_ring_behind_pauses_it_until_below_half() -> None:
    ring: Ring[str] = Ring(100, slack=50)
    assert not ring.add_reader("slow", 0)
    feed(ring, [60])
    assert not ring.paused
    ring.append(stream(60, 100))
    assert ring.trim()  # a whole ring behind
    assert ring.paused
    assert ring.read(0, 10) == stream(0, 10)  # held for it
    assert not ring.advance("slow", 40)  # 60 behind: not yet below half
    assert ring.advance("slow", 51)  # 49 behind
    assert not ring.paused
    assert ring.oldest == 0  # trimmed with the next chunk, not before
    feed(ring, [10])
    assert ring.oldest == 10


def test_memory_is_bounded_by_ring_and_slack_for_a_reader_behind() -> None:
    ring: Ring[str] = Ring(100, slack=50)
    ring.add_reader("slow", 0)
    feed(ring, [40] * 10)  # the owner goes on reading though paused (a chunk in flight)
    assert ring.paused
    assert ring.oldest == 400 - 150
    with pytest.raises(Overrun):
        ring.read(0, 1)


def test_a_new_reader_from_the_oldest_byte_pauses_it_and_one_at_the_end_does_not() -> None:
    ring: Ring[str] = Ring(100)
    feed(ring, [250])
    assert not ring.add_reader("live", ring.total)
    assert ring.add_reader("history", ring.oldest)  # exactly a ring behind
    assert ring.paused
    assert ring.remove_reader("history")
    assert not ring.paused
    assert not ring.remove_reader("history")  # gone already: nothing changes


def test_a_stall_gives_up_on_the_reader_behind_on_the_owners_clock() -> None:
    ring: Ring[str] = Ring(100, stall_timeout=5.0)
    assert ring.deadline() is None
    assert ring.expire(1000.0) == set()
    ring.add_reader("stuck", 0)
    ring.add_reader("fine", 0)
    ring.append(stream(0, 100))
    ring.advance("fine", 100)
    assert ring.trim()
    # The pause began in a call without a clock: due at once, and the first
    # expire() starts its clock.
    assert ring.deadline() == -math.inf
    assert ring.expire(10.0) == set()
    assert ring.deadline() == 15.0
    assert ring.expire(14.9) == set()
    assert ring.paused
    assert ring.expire(15.0) == {"stuck"}
    assert not ring.paused
    assert ring.deadline() is None
    assert ring.given_up == {"stuck"}
    # Given up on, it no longer holds the ring, nor pauses it.
    for _ in range(2):
        ring.append(stream(ring.total, ring.total + 100))
        ring.advance("fine", ring.total)
        assert not ring.trim()
    assert not ring.paused
    assert ring.oldest == 200
    with pytest.raises(Overrun):
        ring.read(0, 1)
    # Within half a ring of the end again, it is waited for again.
    ring.advance("stuck", 260)
    assert ring.given_up == frozenset()
    ring.append(stream(300, 360))
    ring.advance("fine", 360)
    assert ring.trim()
    assert ring.paused  # "stuck" is 100 behind
    assert ring.deadline() == -math.inf  # a new stall, a new clock


def test_a_stall_that_ends_before_its_deadline_costs_nothing() -> None:
    ring: Ring[str] = Ring(100, stall_timeout=5.0)
    ring.add_reader("r", 0)
    feed(ring, [100])
    ring.expire(0.0)
    assert ring.advance("r", 100)
    assert ring.deadline() is None
    assert ring.expire(100.0) == set()
    assert ring.given_up == frozenset()


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        Ring(0)
    with pytest.raises(ValueError, match="negative"):
        Ring(10, slack=-1)


# --- any interleaving ------------------------------------------------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 200),
    slack=st.one_of(st.integers(0, 400), st.just(READ_SLACK)),
    eager=st.booleans(),
    steps=st.lists(
        st.one_of(
            st.tuples(
                st.just("append"),
                st.one_of(st.integers(1, 4), st.integers(1, 700)),
                st.one_of(st.just(1), st.integers(1, 150)),  # how many chunks of that size
            ),
            st.tuples(st.just("add"), st.booleans()),
            st.tuples(st.just("advance"), st.integers(0, 7), st.integers(0, 800)),
            st.tuples(st.just("remove"), st.integers(0, 7)),
            st.tuples(st.just("time"), st.floats(0, 5)),
            st.tuples(st.just("read"), st.integers(-5, 1000), st.integers(0, 1000)),
        ),
        max_size=120,
    ),
)
def test_any_interleaving_keeps_the_invariants(
    size: int, slack: int, eager: bool, steps: list[tuple[Any, ...]]
) -> None:
    """Chunks of any sizes, readers of any speeds, time passing: the ring keeps
    exactly the newest `size` bytes and beyond them, up to `size + slack`, what
    the slowest reader not given up on still needs; reads give exactly the bytes
    appended or `Overrun`; memory stays within that plus one chunk (as received,
    or small ones joined); the pause follows its rule, and a stall ends at its
    deadline."""
    ring: Ring[int] = Ring(size, slack=slack, stall_timeout=2.0)
    now = 0.0
    positions: dict[int, int] = {}  # the model's readers (the eager one is -1)
    next_key = 0
    largest = 0
    appended = 0
    caught_up = bytearray()  # what the eager reader got
    uncopied: list[bool] = []  # whether each chunk read whole was the chunk itself

    def tick(changed: bool, paused_before: bool) -> None:
        """The owner's part after every call: follow the pause, start its clock."""
        assert changed == (ring.paused != paused_before)
        if changed:
            event("paused" if ring.paused else "resumed")
        if ring.deadline() == -math.inf:
            assert ring.expire(now) == set()
        deadline = ring.deadline()
        assert (deadline is None) == (not ring.paused)
        assert deadline is None or now <= deadline <= now + 2.0

    def check() -> None:
        total = ring.total
        assert ring.oldest <= max(0, total - size)  # at least a ring's worth kept
        assert total - ring.oldest <= size + slack
        assert total - ring.oldest <= ring.held
        assert ring.held <= size + slack + max(largest, _MERGE_MAX)
        behind = [total - p for k, p in ring.positions.items() if k not in ring.given_up]
        if behind and max(behind) >= size:
            assert ring.paused
        if not behind or max(behind) < (size + 1) // 2:
            assert not ring.paused

    if eager:
        ring.add_reader(-1, 0)
    for step in steps:
        kind = step[0]
        paused = ring.paused
        if kind == "append":
            chunk_size = step[1]
            largest = max(largest, chunk_size)
            for _ in range(step[2]):
                paused = ring.paused
                data = stream(ring.total, ring.total + chunk_size)
                before = ring.oldest
                ring.append(data)
                appended += chunk_size
                assert ring.total == appended
                if eager:
                    # Reads all there is, as a session does, the newest chunk whole.
                    position = len(caught_up)
                    if position == ring.total - chunk_size:
                        uncopied.append(ring.read(position, chunk_size) is data)
                    while position < ring.total:
                        piece = ring.read(position, 1 + position % 97)
                        caught_up.extend(piece)
                        position += len(piece)
                    ring.advance(-1, position)
                slowest = [p for k, p in ring.positions.items() if k not in ring.given_up]
                keep_from = ring.total - size
                if slowest and min(slowest) < keep_from:
                    keep_from = max(min(slowest), keep_from - slack)
                tick(ring.trim(), paused)
                assert ring.oldest == max(before, keep_from)  # exact to the byte
                check()
            continue
        if kind == "add" and len(positions) < 8:
            position = ring.oldest if step[1] else ring.total
            positions[next_key] = position
            tick(ring.add_reader(next_key, position), paused)
            next_key += 1
        elif kind == "advance" and positions:
            key = sorted(positions)[step[1] % len(positions)]
            position = positions[key]
            if position < ring.oldest:
                with pytest.raises(Overrun):
                    ring.read(position, 1)
                event("a reader overran")
                position = ring.oldest  # the reader skips what it lost
            piece = ring.read(position, step[2])
            assert piece == stream(position, min(ring.total, position + step[2]))
            positions[key] = position + len(piece)
            tick(ring.advance(key, position + len(piece)), paused)
        elif kind == "remove" and positions:
            key = sorted(positions)[step[1] % len(positions)]
            del positions[key]
            tick(ring.remove_reader(key), paused)
        elif kind == "time":
            now += step[1]
            deadline = ring.deadline()
            behind = {
                k
                for k, p in ring.positions.items()
                if k not in ring.given_up and ring.total - p >= (size + 1) // 2
            }
            given_up = ring.expire(now)
            if deadline is not None and now >= deadline:
                event("stall expired")
                assert given_up == behind
                assert not ring.paused
            else:
                assert given_up == set()
            tick(ring.paused != paused, paused)
        elif kind == "read":
            offset = ring.oldest + step[1] - 5
            if offset < ring.oldest:
                with pytest.raises(Overrun):
                    ring.read(offset, step[2])
            else:
                assert ring.read(offset, step[2]) == stream(
                    offset, min(ring.total, offset + step[2])
                )
        check()
    if eager:
        assert -1 not in ring.given_up  # it keeps up: never given up on
        assert bytes(caught_up) == stream(0, ring.total)
    assert all(uncopied)
