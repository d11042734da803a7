"""A console's ring of recent output and the readers taking from it.

`Ring` holds the newest output of one console, addressed by absolute offsets,
so that each reader takes it at its own pace from its own offset and a late
reader can replay history. It decides back-pressure (a reader a whole ring
behind pauses the host end) and when to stop waiting for a reader that holds
the console back. It is pure: no asyncio, no sockets, no clock of its own (the
owner passes `now` to `expire()` and arms its timer from `deadline()`, the way
aioquic's connection offers `get_timer()` / `handle_timer(now)`). It is not the
host end and does not call the readers: `resourced.consoles.hub` does both.

The ring is the list of chunks as they came from the host end (immutable
`bytes` objects, not copied into a buffer), each with the absolute offset just
past it. Trimming drops whole chunks from the front; the oldest chunk still held
may begin before `oldest` (its first bytes are no longer readable, but are not
copied away either). So a chunk costs no copy on its way in, and a reader that
is caught up gets the very chunk object back from `read()`. Runs of tiny chunks
(keystroke echoes) are joined once every reader has had them, so that their
bookkeeping does not cost many times their size.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

from resourced.errors import ResourcedError

DEFAULT_RING_SIZE = 64 * 1024
#: Output kept beyond the ring for readers that are behind, and the most one
#: chunk from a host end should bring: reading pauses once a reader is a ring
#: behind, but the chunk that took it there is already in.
READ_SLACK = 256 * 1024
#: How long a reader a whole ring behind may hold the console back before it is
#: left to overrun (seconds).
DEFAULT_STALL_TIMEOUT = 5.0
#: Chunks dropped from the ring's front are forgotten in batches of at least this
#: many (a list's front cannot be deleted from in O(1)).
_COMPACT_AT = 64
#: Every this many new chunks, if together they are at most `_MERGE_MAX` bytes
#: (keystroke echoes, a slow UART), they are joined into one: a chunk costs some
#: 100 bytes of bookkeeping, and a ring of one-byte chunks should not cost 100
#: times its size. A reader that keeps up has had them by then.
_MERGE_RUN = 64
_MERGE_MAX = 4096

K = TypeVar("K", bound=Hashable)


class Overrun(ResourcedError):
    """A reader asked for output the ring no longer holds."""


class Ring(Generic[K]):
    """Recent output of one console, and where each of its readers is.

    The owner feeds it with `append(chunk)`, lets the readers `read()` and
    `advance()`, then calls `trim()`: the ring keeps at least the newest `size`
    bytes (all of them while fewer came), and beyond that what the slowest reader
    not given up on still needs, up to `size + slack` bytes: `oldest` is exact to
    the byte. In memory it holds those bytes plus the part of its oldest chunk
    that is already before `oldest`, so at most `size + slack` plus one chunk (as
    received, or up to `_MERGE_MAX` bytes of small ones joined).

    Back-pressure: the ring is `paused` (the owner stops reading the host end)
    while a reader not given up on is a whole ring behind, until every such
    reader is less than half a ring behind. A pause that lasts `stall_timeout`
    gives up on the readers still half a ring or more behind: they no longer hold
    the ring, and overrun if they do not catch up. `trim()`, `add_reader()`,
    `remove_reader()` and `advance()` return whether `paused` changed.

    Readers are keys of the owner's choosing (a hub uses its listeners). `label`
    names the ring in errors.
    """

    def __init__(
        self,
        size: int = DEFAULT_RING_SIZE,
        *,
        slack: int = READ_SLACK,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        label: str = "ring",
    ) -> None:
        if size <= 0:
            raise ValueError("ring size must be positive")
        if slack < 0:
            raise ValueError("ring slack must not be negative")
        self.size = size
        #: Half a ring, rounded up (a reader caught up is less than half a ring
        #: behind even in a ring of one byte).
        self._half = (size + 1) // 2
        self.slack = slack
        self.stall_timeout = stall_timeout
        #: What errors call it ("console serial0").
        self.label = label
        #: Absolute offset just past the newest byte ever appended.
        self.total = 0
        # Chunks as received, and the absolute offset just past each. Entries
        # before `_head` were dropped (and set to b"" to free them).
        self._chunks: list[bytes] = []
        self._ends: list[int] = []
        self._head = 0
        self._oldest = 0
        #: Chunks from this index on have not been considered for `_merge()`.
        self._merge_from = 0
        self._positions: dict[K, int] = {}
        self._given_up: set[K] = set()
        #: At most the position of the slowest reader not given up on (any value
        #: when there is none): while the newest ring's worth starts before it,
        #: no reader is a ring behind, and `trim()` need not look at each.
        self._low: float = math.inf
        self._paused = False
        #: When the current pause began, once the owner has said (`expire(now)`).
        self._stall_since: float | None = None

    # --- output, read by offset ------------------------------------------------------

    @property
    def oldest(self) -> int:
        """Absolute offset of the oldest byte still readable."""
        return self._oldest

    @property
    def held(self) -> int:
        """Bytes held in memory (at least `total - oldest`)."""
        return sum(map(len, self._chunks))  # those dropped are b"" until compacted

    @property
    def chunk_count(self) -> int:
        """Chunks held (small ones are joined: a ring of keystrokes is not a chunk a byte)."""
        return len(self._ends) - self._head

    def append(self, data: bytes) -> None:
        """Add a chunk of output, as received: the ring keeps this very object.

        Readers may read it at once; call `trim()` once they have had their turn.
        """
        if type(data) is not bytes:
            data = bytes(data)  # `read()` hands chunks out: they must be immutable
        total = self.total + len(data)
        self.total = total
        self._chunks.append(data)
        self._ends.append(total)

    def read(self, offset: int, limit: int) -> bytes:
        """Up to `limit` bytes from absolute `offset`; `Overrun` if already dropped.

        Costs no copy when the bytes asked for are exactly one chunk as received
        (what a reader that keeps up asks for), one when they lie within a chunk.
        """
        if offset < self._oldest:
            raise Overrun(
                f"{self.label}: output from offset {offset} was dropped "
                f"(the ring of {self.size} bytes now starts at {self._oldest})"
            )
        total = self.total
        if offset >= total or limit <= 0:
            return b""
        chunks = self._chunks
        chunk = chunks[-1]
        start = offset - total + len(chunk)  # `offset` within the newest chunk
        if start >= 0:  # a reader that keeps up: no search
            return chunk[start : start + limit]  # the chunk itself if it is all of it
        ends = self._ends
        first = bisect_right(ends, offset, self._head)  # the chunk holding `offset`
        chunk = chunks[first]
        end = ends[first]
        start = offset - end + len(chunk)
        stop = offset + limit
        if stop <= end:
            return chunk[start : start + limit]  # the chunk itself if it is all of it
        # It spans chunks: one copy, by join.
        count = len(ends)
        last = bisect_left(ends, stop, first + 1)  # the chunk holding the last byte
        if last == count:
            last -= 1
            tail: bytes | memoryview = chunks[last]
        else:
            tail = memoryview(chunks[last])[: stop - ends[last] + len(chunks[last])]
        return b"".join((memoryview(chunk)[start:], *chunks[first + 1 : last], tail))

    def trim(self) -> bool:
        """Drop what no reader needs any more and decide the pause, now that the
        readers have had the newest chunk. Returns whether `paused` changed."""
        total = self.total
        keep_from = total - self.size
        changed = False
        # Only when a reader may be a ring behind (or the ring is paused) is it
        # worth looking at each: with readers that keep up, once a ring's worth.
        if keep_from >= self._low or self._paused:
            # `_slowest()` and `_decide()`, inline: with chunks of a ring or more,
            # this is the hot path.
            positions = self._positions
            if not positions:
                slowest = None
                self._low = math.inf
            elif not self._given_up:
                slowest = self._low = min(positions.values())
            else:
                slowest = self._slowest()
            if slowest is None or total - slowest < self._half:
                if self._paused:
                    changed = self._set_paused(False)
            else:
                if slowest < keep_from:
                    keep_from = max(slowest, keep_from - self.slack)
                if total - slowest >= self.size and not self._paused:
                    changed = self._set_paused(True)
        if keep_from > self._oldest:
            self._oldest = keep_from
            ends = self._ends
            head = self._head
            if ends[head] <= keep_from:  # whole chunks to drop (never the newest)
                chunks = self._chunks
                while ends[head] <= keep_from:
                    chunks[head] = b""
                    head += 1
                if head >= _COMPACT_AT and head * 2 >= len(ends):
                    del chunks[:head]
                    del ends[:head]
                    self._merge_from = max(self._merge_from - head, 0)
                    head = 0
                self._head = head
        if len(self._ends) - self._merge_from >= _MERGE_RUN:
            self._merge()
        return changed

    def _merge(self) -> None:
        """Join the chunks from `_merge_from` on into one, if they are small."""
        chunks = self._chunks
        ends = self._ends
        first = max(self._merge_from, self._head)
        count = len(ends)
        if count - first < 2:
            self._merge_from = first
        elif ends[-1] - ends[first] + len(chunks[first]) <= _MERGE_MAX:
            chunks[first:] = [b"".join(chunks[first:])]
            ends[first:] = [ends[-1]]
            self._merge_from = first + 1
        else:
            self._merge_from = count

    # --- readers and back-pressure -----------------------------------------------------

    @property
    def positions(self) -> Mapping[K, int]:
        """Each reader's position (a read-only view)."""
        return MappingProxyType(self._positions)

    @property
    def given_up(self) -> frozenset[K]:
        """Readers no longer waited for (until they come within half a ring)."""
        return frozenset(self._given_up)

    @property
    def paused(self) -> bool:
        """Whether the owner should stop reading the host end."""
        return self._paused

    def add_reader(self, key: K, position: int) -> bool:
        """Track a reader that will take output from absolute offset `position`."""
        self._positions[key] = position
        return self._decide(self._slowest())

    def remove_reader(self, key: K) -> bool:
        if self._positions.pop(key, None) is None:
            return False
        self._given_up.discard(key)
        return self._decide(self._slowest())

    def advance(self, key: K, position: int) -> bool:
        """A reader has taken output up to absolute offset `position`."""
        positions = self._positions
        if key not in positions:
            return False
        positions[key] = position
        if position < self._low or len(positions) == 1:
            self._low = position  # exact for a reader alone: `trim()` then never looks
        given_up = self._given_up
        if given_up and key in given_up and self.total - position < self._half:
            given_up.discard(key)  # caught up after all
        if self._paused:
            return self._decide(self._slowest())
        return False

    def _slowest(self) -> int | None:
        """The position of the slowest reader not given up on (also the new `_low`)."""
        given_up = self._given_up
        if given_up:
            behind = [p for key, p in self._positions.items() if key not in given_up]
            slowest = min(behind) if behind else None
        else:
            slowest = min(self._positions.values()) if self._positions else None
        self._low = math.inf if slowest is None else slowest
        return slowest

    def _decide(self, slowest: int | None) -> bool:
        """Pause at a ring behind, resume below half; returns whether that changed."""
        if slowest is None or self.total - slowest < self._half:
            return self._set_paused(False)
        if self.total - slowest >= self.size:
            return self._set_paused(True)
        return False

    def _set_paused(self, paused: bool) -> bool:
        if paused == self._paused:
            return False
        self._paused = paused
        self._stall_since = None
        return True

    # --- the stall timeout, on the owner's clock ----------------------------------------

    def deadline(self) -> float | None:
        """When the owner should next call `expire()`: None while not paused.

        A pause begins in calls that take no clock; until the owner has called
        `expire(now)` once since, its deadline is -inf (at once), and that call
        starts the stall's clock at `now`.
        """
        if not self._paused:
            return None
        if self._stall_since is None:
            return -math.inf
        return self._stall_since + self.stall_timeout

    def expire(self, now: float) -> set[K]:
        """Give up on the readers that have held the ring paused for `stall_timeout`
        by `now`; returns them (empty when none is due). The pause then ends
        unless another reader is a ring behind (then its clock starts at `now`)."""
        if not self._paused:
            return set()
        if self._stall_since is None:
            self._stall_since = now
            return set()
        if now < self._stall_since + self.stall_timeout:
            return set()
        half = self._half
        total = self.total
        given_up = self._given_up
        laggards = {
            key for key, p in self._positions.items() if key not in given_up and total - p >= half
        }
        given_up |= laggards
        self._set_paused(False)
        if self._decide(self._slowest()):
            self._stall_since = now
        return laggards
