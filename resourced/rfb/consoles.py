"""The RFB console extension (ours, provisional): messages, the client half and the
server half's accounting.

Wire format and rules: docs/protocol/console-extension.md. In short: the client
advertises pseudo-encoding -262; a server that knows the extension answers with
HELLO (QEMU server message 255, submessage 2) listing its consoles; only then may
the client send console messages (255/2). Consoles are opened, written, read,
sent a break, and closed; data in each direction is bounded by credit the reader
grants, per console, so a slow reader never stalls anything else. A server that
announces stream positions (HELLO's flag) answers an OPEN that asks for them
with OPENED AT, which says where the console's output stream stands, and
replays from the client's resume point when it still holds it; the client
works out whether that joins what it had (`Resumed`).

This module holds one frozen dataclass per message (server messages double as
the client's events), `Consoles`, the client-side `Extension`, and
`ServedConsole`, the credit of one console a client has open on a server (the
gateway's session does the I/O around it). No I/O.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from resourced.consoles import MAX_CONSOLE_NAME, ConsoleKind
from resourced.errors import LocalProtocolError, RemoteProtocolError
from resourced.rfb._buffer import Reader, u8, u16, u32
from resourced.rfb.constants import (
    ClientMessageType,
    Encoding,
    QemuClientSubtype,
    QemuServerSubtype,
    ServerMessageType,
)
from resourced.rfb.extension import Extension

#: The extension version this module speaks.
VERSION = 1
#: Largest DATA payload either side may announce (`max_data`).
MAX_CONSOLE_DATA = 65536
#: Most consoles a server may announce over a connection's lifetime at once.
MAX_CONSOLES = 256
#: Most consoles announced (HELLO + ADDED) over one connection's lifetime.
MAX_ANNOUNCEMENTS = 65536
#: Longest CLOSED message text.
MAX_CLOSE_MESSAGE = 1024
#: Credit is a u32; the sum granted and not yet used may not exceed it.
MAX_CREDIT = 0xFFFFFFFF
#: Default window a client grants per console.
DEFAULT_WINDOW = 256 * 1024

#: Offsets in a console's output stream are u64s.
MAX_OFFSET = 0xFFFFFFFFFFFFFFFF

HISTORY_FLAG = 0x01
MARKS_FLAG = 0x02
#: OPEN's flag: the client speaks stream positions (a resume point follows the
#: flags; the answer is OPENED AT). Only to a server whose HELLO has `positions`.
POSITIONS_FLAG = 0x04
#: HELLO's flag: the server speaks stream positions (console-extension.md, "Stream positions").
HELLO_POSITIONS_FLAG = 0x01


class ConsoleServerOp(enum.IntEnum):
    """Server operations of message 255/2 (console-extension.md, "Server messages")."""

    HELLO = 0
    ADDED = 1
    REMOVED = 2
    OPENED = 3
    DATA = 4
    CLOSED = 5
    CREDIT = 6
    MARK = 7
    OPENED_AT = 8


class ConsoleClientOp(enum.IntEnum):
    """Client operations of message 255/2 (console-extension.md, "Client messages")."""

    OPEN = 0
    CLOSE = 1
    DATA = 2
    BREAK = 3
    CREDIT = 4


class CloseReason(enum.IntEnum):
    """Why a console closed (console-extension.md, "CLOSED")."""

    REQUESTED = 0
    REMOVED = 1
    NO_SUCH_CONSOLE = 2
    ALREADY_OPEN = 3
    OVERRUN = 4
    BACKEND_ERROR = 5
    SHUTDOWN = 6
    OTHER = 255


def _server_head(op: ConsoleServerOp) -> bytes:
    return u8(ServerMessageType.QEMU) + u8(QemuServerSubtype.CONSOLE) + u8(op)


def _client_head(op: ConsoleClientOp) -> bytes:
    return u8(ClientMessageType.QEMU) + u8(QemuClientSubtype.CONSOLE) + u8(op)


# DATA and CREDIT, both ways, are nearly all of the traffic, so their fixed part
# is packed, and parsed, in one call: the three type bytes, a u32 console id and
# a u32 count (DATA's length, CREDIT's increment). Parsers start after the type bytes.
_HEADER = struct.Struct("!3sII")
_ID_COUNT = struct.Struct("!II")
# OPEN's resume point (stream, offset) and OPENED AT's body.
_RESUME_POINT = struct.Struct("!QQ")
_OPENED_AT = struct.Struct("!IIIQQQ")
_SERVER_DATA = _server_head(ConsoleServerOp.DATA)
_SERVER_CREDIT = _server_head(ConsoleServerOp.CREDIT)
_CLIENT_DATA = _client_head(ConsoleClientOp.DATA)
_CLIENT_CREDIT = _client_head(ConsoleClientOp.CREDIT)


# ---------------------------------------------------------------------------
# Console descriptions
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsoleInfo:
    """One console as announced: id (never reused on a connection), kind, name."""

    console_id: int
    kind: ConsoleKind
    name: str
    history: bool = False  # the server keeps recent output to replay on open

    def serialize(self) -> bytes:
        name = self.name.encode()
        if not 1 <= len(name) <= MAX_CONSOLE_NAME:
            raise LocalProtocolError(f"console name of {len(name)} bytes")
        flags = HISTORY_FLAG if self.history else 0
        return u32(self.console_id) + u8(self.kind) + u8(flags) + u8(len(name)) + name

    @classmethod
    def parse(cls, r: Reader) -> ConsoleInfo:
        console_id, kind, flags, length = r.u32(), r.u8(), r.u8(), r.u8()
        if not 1 <= length <= MAX_CONSOLE_NAME:
            raise RemoteProtocolError(f"console name of {length} bytes (1..{MAX_CONSOLE_NAME})")
        name = r.take(length).decode("utf-8", errors="replace")
        try:
            console_kind = ConsoleKind(kind)
        except ValueError:
            console_kind = ConsoleKind.OTHER  # unknown kinds are shown as "other"
        return cls(console_id, console_kind, name, bool(flags & HISTORY_FLAG))


# ---------------------------------------------------------------------------
# Server -> client messages (also the client's events)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsolesAnnounced:
    """HELLO: the server speaks the extension; its consoles and its `max_data`."""

    version: int
    max_data: int
    consoles: tuple[ConsoleInfo, ...]
    #: The server speaks stream positions: a client may set `positions` in OPEN.
    positions: bool = False

    def serialize(self) -> bytes:
        return (
            _server_head(ConsoleServerOp.HELLO)
            + u8(self.version)
            + u8(HELLO_POSITIONS_FLAG if self.positions else 0)
            + u16(len(self.consoles))
            + u32(self.max_data)
            + b"".join(c.serialize() for c in self.consoles)
        )

    @classmethod
    def parse(cls, r: Reader) -> ConsolesAnnounced:
        version, flags, count, max_data = r.u8(), r.u8(), r.u16(), r.u32()
        if count > MAX_CONSOLES:
            raise RemoteProtocolError(f"HELLO lists {count} consoles (at most {MAX_CONSOLES})")
        _check_max_data(max_data)
        consoles = tuple(ConsoleInfo.parse(r) for _ in range(count))
        return cls(version, max_data, consoles, bool(flags & HELLO_POSITIONS_FLAG))


@dataclass(frozen=True, slots=True)
class ConsoleAdded:
    """A console appeared."""

    info: ConsoleInfo

    def serialize(self) -> bytes:
        return _server_head(ConsoleServerOp.ADDED) + self.info.serialize()

    @classmethod
    def parse(cls, r: Reader) -> ConsoleAdded:
        return cls(ConsoleInfo.parse(r))


@dataclass(frozen=True, slots=True)
class ConsoleRemoved:
    """A console disappeared (after CLOSED for whoever had it open)."""

    console_id: int

    def serialize(self) -> bytes:
        return _server_head(ConsoleServerOp.REMOVED) + u32(self.console_id)

    @classmethod
    def parse(cls, r: Reader) -> ConsoleRemoved:
        return cls(r.u32())


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """A point in a console's output stream, as a server names it: the stream's
    identity (nonzero) and the offset in it, in bytes since the stream began."""

    stream_id: int
    offset: int

    def __post_init__(self) -> None:
        if not 0 < self.stream_id <= MAX_OFFSET or not 0 <= self.offset <= MAX_OFFSET:
            raise LocalProtocolError(f"no such stream position: {self.stream_id}@{self.offset}")


class Resumed(enum.Enum):
    """How the replay after OPENED AT joins the position the client asked to
    resume from (console-extension.md, "Stream positions"). Worked out by the
    client; not on the wire."""

    #: No position was asked for (or the server has no positions).
    NOT_ASKED = "not asked"
    #: The replay starts right after the position asked for: nothing lost or repeated.
    EXACT = "exact"
    #: Another stream (e.g. a new server process), replayed from its beginning:
    #: none of it is missing, but what the old stream had after the position
    #: asked for, if anything, is out of reach.
    NEW_STREAM = "new stream"
    #: Output is missing between the position asked for and the replay: the
    #: server no longer held it (or, on another stream, no longer held that
    #: stream's beginning).
    GAP = "gap"


@dataclass(frozen=True, slots=True)
class ConsoleOpened:
    """Answer to OPEN: `credit` bytes may be written; `history_length` bytes of replay follow.

    On the wire OPENED, or OPENED AT (`stream_id` not 0) for a client that set
    `positions` in OPEN: then the server holds the stream's output from offset
    `start` to `end` (just past its newest byte); the replay is the bytes from
    `replay_from` to `end`, and live output goes on from `end`.
    """

    console_id: int
    credit: int
    history_length: int
    stream_id: int = 0
    start: int = 0
    end: int = 0
    #: Not on the wire: how the replay joins the position asked for (set by `Consoles`).
    resumed: Resumed = Resumed.NOT_ASKED

    @property
    def replay_from(self) -> int:
        """Offset of the first replayed byte (OPENED AT only)."""
        return self.end - self.history_length

    @property
    def position(self) -> StreamPosition | None:
        """Where the replay starts, in the server's stream (None for a plain OPENED)."""
        return StreamPosition(self.stream_id, self.replay_from) if self.stream_id else None

    def serialize(self) -> bytes:
        if self.stream_id:
            if not self.history_length <= self.end - self.start:
                raise LocalProtocolError(
                    f"a replay of {self.history_length} bytes from a history of "
                    f"{self.start}..{self.end}"
                )
            return _server_head(ConsoleServerOp.OPENED_AT) + _OPENED_AT.pack(
                self.console_id,
                self.credit,
                self.history_length,
                self.stream_id,
                self.start,
                self.end,
            )
        return (
            _server_head(ConsoleServerOp.OPENED)
            + u32(self.console_id)
            + u32(self.credit)
            + u32(self.history_length)
        )

    @classmethod
    def parse(cls, r: Reader) -> ConsoleOpened:
        return cls(r.u32(), r.u32(), r.u32())

    @classmethod
    def parse_at(cls, r: Reader) -> ConsoleOpened:
        """OPENED AT (op 8)."""
        console_id, credit, length, stream_id, start, end = r.unpack(_OPENED_AT)
        if stream_id == 0:
            raise RemoteProtocolError("OPENED AT for stream 0")
        if start > end:
            raise RemoteProtocolError(f"OPENED AT: a history from offset {start} to {end}")
        if length > end - start:
            raise RemoteProtocolError(
                f"OPENED AT: a replay of {length} bytes from a history of {end - start}"
            )
        return cls(console_id, credit, length, stream_id, start, end)


@dataclass(frozen=True, slots=True)
class ConsoleData:
    """Output of a console. `history` (not on the wire) marks replayed output."""

    console_id: int
    data: bytes
    history: bool = False

    def serialize(self) -> bytes:
        return self.encode(self.console_id, self.data)

    @staticmethod
    def encode(console_id: int, data: bytes) -> bytes:
        """The wire form, without building the message first (a relay's hot path)."""
        return _HEADER.pack(_SERVER_DATA, console_id, len(data)) + data

    @classmethod
    def parse(cls, r: Reader) -> ConsoleData:
        console_id, length = r.unpack(_ID_COUNT)
        if length > MAX_CONSOLE_DATA:
            raise RemoteProtocolError(
                f"console DATA of {length} bytes (at most {MAX_CONSOLE_DATA})"
            )
        return cls(console_id, r.take(length))


@dataclass(frozen=True, slots=True)
class ConsoleClosed:
    """A console is closed for this connection, with a reason."""

    console_id: int
    reason: CloseReason
    message: str = ""

    def serialize(self) -> bytes:
        # Cut at a character boundary, not in the middle of one.
        text = self.message.encode()[:MAX_CLOSE_MESSAGE].decode(errors="ignore").encode()
        return (
            _server_head(ConsoleServerOp.CLOSED)
            + u32(self.console_id)
            + u8(self.reason)
            + u16(len(text))
            + text
        )

    @classmethod
    def parse(cls, r: Reader) -> ConsoleClosed:
        console_id, reason, length = r.u32(), r.u8(), r.u16()
        if length > MAX_CLOSE_MESSAGE:
            raise RemoteProtocolError(f"CLOSED message of {length} bytes")
        text = r.take(length).decode("utf-8", errors="replace")
        try:
            why = CloseReason(reason)
        except ValueError:
            why = CloseReason.OTHER
        return cls(console_id, why, text)


@dataclass(frozen=True, slots=True)
class ConsoleCredit:
    """The server lets the client write `increment` more bytes to a console."""

    console_id: int
    increment: int

    def serialize(self) -> bytes:
        return _HEADER.pack(_SERVER_CREDIT, self.console_id, self.increment)

    @classmethod
    def parse(cls, r: Reader) -> ConsoleCredit:
        return cls(*r.unpack(_ID_COUNT))


class MarkKind(enum.IntEnum):
    """What a MARK marks (console-extension.md, "MARK")."""

    #: The console's host end attached again: for a guest's console, usually a
    #: restart of the guest (or of QEMU). Output before it is the previous one's.
    REATTACHED = 0
    OTHER = 255


@dataclass(frozen=True, slots=True)
class ConsoleMark:
    """A point in a console's output (between two DATA), for a client that asked."""

    console_id: int
    kind: MarkKind
    message: str = ""

    def serialize(self) -> bytes:
        text = self.message.encode()[:MAX_CLOSE_MESSAGE].decode(errors="ignore").encode()
        return (
            _server_head(ConsoleServerOp.MARK)
            + u32(self.console_id)
            + u8(self.kind)
            + u16(len(text))
            + text
        )

    @classmethod
    def parse(cls, r: Reader) -> ConsoleMark:
        console_id, kind, length = r.u32(), r.u8(), r.u16()
        if length > MAX_CLOSE_MESSAGE:
            raise RemoteProtocolError(f"MARK message of {length} bytes")
        text = r.take(length).decode("utf-8", errors="replace")
        try:
            what = MarkKind(kind)
        except ValueError:
            what = MarkKind.OTHER
        return cls(console_id, what, text)


SERVER_PARSERS: dict[int, Any] = {
    ConsoleServerOp.HELLO: ConsolesAnnounced.parse,
    ConsoleServerOp.ADDED: ConsoleAdded.parse,
    ConsoleServerOp.REMOVED: ConsoleRemoved.parse,
    ConsoleServerOp.OPENED: ConsoleOpened.parse,
    ConsoleServerOp.DATA: ConsoleData.parse,
    ConsoleServerOp.CLOSED: ConsoleClosed.parse,
    ConsoleServerOp.CREDIT: ConsoleCredit.parse,
    ConsoleServerOp.MARK: ConsoleMark.parse,
    ConsoleServerOp.OPENED_AT: ConsoleOpened.parse_at,
}

# ---------------------------------------------------------------------------
# Client -> server messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsoleOpen:
    """Open a console: the server may send `credit` bytes, at most `max_data` a message."""

    console_id: int
    credit: int
    max_data: int
    history: bool = True
    #: The client understands MARK (console-extension.md, "MARK").
    marks: bool = False
    #: The client speaks stream positions: a resume point follows on the wire,
    #: and the answer is OPENED AT (console-extension.md, "Stream positions").
    positions: bool = False
    #: With `positions` and `history`: replay from just after this point if the
    #: server still holds it (None: no point known, replay what it holds).
    resume: StreamPosition | None = None

    def serialize(self) -> bytes:
        flags = (HISTORY_FLAG if self.history else 0) | (MARKS_FLAG if self.marks else 0)
        message = (
            _client_head(ConsoleClientOp.OPEN)
            + u32(self.console_id)
            + u32(self.credit)
            + u32(self.max_data)
        )
        if not self.positions:
            if self.resume is not None:
                raise LocalProtocolError("a resume point needs the positions flag")
            return message + u8(flags)
        resume = self.resume
        point = (0, 0) if resume is None else (resume.stream_id, resume.offset)
        return message + u8(flags | POSITIONS_FLAG) + _RESUME_POINT.pack(*point)

    @classmethod
    def parse(cls, r: Reader) -> ConsoleOpen:
        console_id, credit, max_data, flags = r.u32(), r.u32(), r.u32(), r.u8()
        _check_max_data(max_data)
        history, marks = bool(flags & HISTORY_FLAG), bool(flags & MARKS_FLAG)
        if not flags & POSITIONS_FLAG:
            return cls(console_id, credit, max_data, history, marks)
        stream_id, offset = r.unpack(_RESUME_POINT)
        # Stream 0 names no stream: no resume point (its offset means nothing).
        resume = StreamPosition(stream_id, offset) if stream_id else None
        return cls(console_id, credit, max_data, history, marks, True, resume)


@dataclass(frozen=True, slots=True)
class ConsoleClose:
    console_id: int

    def serialize(self) -> bytes:
        return _client_head(ConsoleClientOp.CLOSE) + u32(self.console_id)

    @classmethod
    def parse(cls, r: Reader) -> ConsoleClose:
        return cls(r.u32())


@dataclass(frozen=True, slots=True)
class ConsoleWrite:
    """Input for a console (typed keys, pasted text...)."""

    console_id: int
    data: bytes

    def serialize(self) -> bytes:
        return _HEADER.pack(_CLIENT_DATA, self.console_id, len(self.data)) + self.data

    @classmethod
    def parse(cls, r: Reader) -> ConsoleWrite:
        console_id, length = r.unpack(_ID_COUNT)
        if length > MAX_CONSOLE_DATA:
            raise RemoteProtocolError(
                f"console DATA of {length} bytes (at most {MAX_CONSOLE_DATA})"
            )
        return cls(console_id, r.take(length))


@dataclass(frozen=True, slots=True)
class ConsoleBreak:
    """Send a serial break (ignored by consoles that have none)."""

    console_id: int

    def serialize(self) -> bytes:
        return _client_head(ConsoleClientOp.BREAK) + u32(self.console_id)

    @classmethod
    def parse(cls, r: Reader) -> ConsoleBreak:
        return cls(r.u32())


@dataclass(frozen=True, slots=True)
class ConsoleGrant:
    """The client lets the server send `increment` more bytes of a console."""

    console_id: int
    increment: int

    def serialize(self) -> bytes:
        return _HEADER.pack(_CLIENT_CREDIT, self.console_id, self.increment)

    @classmethod
    def parse(cls, r: Reader) -> ConsoleGrant:
        return cls(*r.unpack(_ID_COUNT))


ConsoleClientMessage = ConsoleOpen | ConsoleClose | ConsoleWrite | ConsoleBreak | ConsoleGrant

CLIENT_PARSERS: dict[int, Any] = {
    ConsoleClientOp.OPEN: ConsoleOpen.parse,
    ConsoleClientOp.CLOSE: ConsoleClose.parse,
    ConsoleClientOp.DATA: ConsoleWrite.parse,
    ConsoleClientOp.BREAK: ConsoleBreak.parse,
    ConsoleClientOp.CREDIT: ConsoleGrant.parse,
}


def parse_client_message(r: Reader) -> ConsoleClientMessage:
    """Parse a client 255/2 message after its two type bytes (for the server side)."""
    op = r.u8()
    parser = CLIENT_PARSERS.get(op)
    if parser is None:
        raise RemoteProtocolError(f"console extension: unknown client operation {op}")
    message: ConsoleClientMessage = parser(r)
    return message


def parse_server_message(r: Reader) -> Any:
    """Parse a server 255/2 message after its two type bytes."""
    op = r.u8()
    parser = SERVER_PARSERS.get(op)
    if parser is None:
        raise RemoteProtocolError(f"console extension: unknown server operation {op}")
    return parser(r)


def _check_max_data(max_data: int) -> None:
    if not 1 <= max_data <= MAX_CONSOLE_DATA:
        raise RemoteProtocolError(f"max_data {max_data} is outside 1..{MAX_CONSOLE_DATA}")


# ---------------------------------------------------------------------------
# The client half
# ---------------------------------------------------------------------------


class _State(enum.Enum):
    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"


# Looked up once for the checks made on every message: Python 3.11 finds an enum
# member through EnumType.__getattr__, which costs about as much as parsing a field.
_OPEN = _State.OPEN


class _Console:
    __slots__ = (
        "auto_credit",
        "consumed",
        "history_left",
        "info",
        "marks",
        "max_data",
        "positions",
        "receive_credit",
        "resume",
        "send_credit",
        "state",
        "window",
    )

    def __init__(self, info: ConsoleInfo) -> None:
        self.info = info
        self.state = _State.CLOSED
        self.send_credit = 0  # bytes we may still write
        self.receive_credit = 0  # bytes the server may still send us
        self.window = 0
        self.consumed = 0  # received since we last granted credit
        self.history_left = 0
        self.marks = False  # asked for MARK
        self.positions = False  # set `positions` in OPEN: the answer is OPENED AT
        self.resume: StreamPosition | None = None  # the resume point asked for
        self.auto_credit = True
        self.max_data = MAX_CONSOLE_DATA  # largest DATA we said we accept


class Consoles(Extension):
    """Client half of the console extension.

    Events are the server messages above, after checking: `ConsolesAnnounced`,
    `ConsoleAdded`, `ConsoleRemoved`, `ConsoleOpened` (with `resumed` set),
    `ConsoleData` (with `history` set for replayed output), `ConsoleClosed`,
    `ConsoleCredit`. With `auto_credit` (per `open`), credit is granted back as
    soon as data is handed out; otherwise call `grant()` once the data is really
    consumed.

    Against a server that speaks stream positions (`positions`, from HELLO),
    every OPEN asks for them, so each `ConsoleOpened` says where the console's
    stream stands; the caller that keeps counting from there (the replay starts
    at `ConsoleOpened.position`, each DATA byte is one offset further) can ask a
    later connection to `resume` right after the last byte it had.
    """

    pseudo_encodings: ClassVar[tuple[int, ...]] = (Encoding.CONSOLES,)
    server_subtypes: ClassVar[tuple[int, ...]] = (QemuServerSubtype.CONSOLE,)

    def __init__(self) -> None:
        self.announced = False
        self.version = 0
        self.server_max_data = 0
        #: The server speaks stream positions (HELLO's flag).
        self.positions = False
        self._consoles: dict[int, _Console] = {}
        # Ids are never reused on a connection: remember every one (bounded).
        self._announced_ids: set[int] = set()

    # --- queries --------------------------------------------------------------

    @property
    def consoles(self) -> list[ConsoleInfo]:
        return [c.info for c in self._consoles.values()]

    def by_name(self, name: str) -> ConsoleInfo | None:
        for console in self._consoles.values():
            if console.info.name == name:
                return console.info
        return None

    def is_open(self, console_id: int) -> bool:
        console = self._consoles.get(console_id)
        return console is not None and console.state is _State.OPEN

    def writable(self, console_id: int) -> int:
        """How many bytes `write` would accept now."""
        return self._get(console_id).send_credit

    # --- commands -------------------------------------------------------------

    def _get(self, console_id: int) -> _Console:
        if not self.announced:
            raise LocalProtocolError("the server has not announced the console extension")
        console = self._consoles.get(console_id)
        if console is None:
            raise LocalProtocolError(f"no console {console_id}")
        return console

    def open(
        self,
        console_id: int,
        *,
        window: int = DEFAULT_WINDOW,
        max_data: int = MAX_CONSOLE_DATA,
        history: bool = True,
        auto_credit: bool = True,
        marks: bool = False,
        resume: StreamPosition | None = None,
    ) -> None:
        """Open a console. `resume`, against a server that speaks positions, asks
        for the output after that point (a replay, whatever `history` says);
        otherwise only `history` decides whether the server replays what it holds."""
        console = self._get(console_id)
        if console.state is not _State.CLOSED:
            raise LocalProtocolError(f"console {console.info.name} is {console.state.value}")
        if not 1 <= max_data <= MAX_CONSOLE_DATA or not 0 < window <= MAX_CREDIT:
            raise LocalProtocolError("window or max_data out of range")
        console.state = _State.OPENING
        console.window = window
        console.receive_credit = window
        console.consumed = 0
        console.auto_credit = auto_credit
        console.max_data = max_data
        console.marks = marks
        console.positions = positions = self.positions
        console.resume = resume = resume if positions else None
        history = history or resume is not None
        self.connection.send(
            ConsoleOpen(console_id, window, max_data, history, marks, positions, resume)
        )

    def close(self, console_id: int) -> None:
        console = self._get(console_id)
        if console.state not in (_State.OPENING, _State.OPEN):
            raise LocalProtocolError(f"console {console.info.name} is {console.state.value}")
        console.state = _State.CLOSING
        self.connection.send(ConsoleClose(console_id))

    def write(self, console_id: int, data: bytes) -> int:
        """Send as much of `data` as credit allows; return how many bytes went."""
        console = self._get(console_id)
        if console.state is not _OPEN:
            raise LocalProtocolError(f"console {console.info.name} is {console.state.value}")
        sendable = min(len(data), console.send_credit)
        step = self.server_max_data
        send = self.connection.send
        for start in range(0, sendable, step):
            # A slice of all of a bytes object is that object: no copy.
            chunk = data[start : min(start + step, sendable)]
            send(ConsoleWrite(console_id, chunk))
            console.send_credit -= len(chunk)
        return sendable

    def send_break(self, console_id: int) -> None:
        console = self._get(console_id)
        if console.state is not _State.OPEN:
            raise LocalProtocolError(f"console {console.info.name} is {console.state.value}")
        self.connection.send(ConsoleBreak(console_id))

    def grant(self, console_id: int, increment: int | None = None) -> None:
        """Let the server send more: by default, what was consumed since the last grant."""
        console = self._get(console_id)
        if console.state not in (_State.OPENING, _State.OPEN):
            return
        amount = console.consumed if increment is None else increment
        if amount <= 0:
            return
        if console.receive_credit + amount > MAX_CREDIT:
            raise LocalProtocolError("credit would exceed 2**32-1")
        console.receive_credit += amount
        console.consumed = max(0, console.consumed - amount)
        self.connection.send(ConsoleGrant(console_id, amount))

    # --- parsing --------------------------------------------------------------

    def parse_server_message(self, subtype: int, reader: Reader) -> list[Any]:
        # parse_server_message() and then a dispatch on the message's type, in
        # one step: DATA takes this path once per chunk of console output.
        op = reader.u8()
        parse = SERVER_PARSERS.get(op)
        if parse is None:
            raise RemoteProtocolError(f"console extension: unknown server operation {op}")
        message = parse(reader)
        if not self.announced and op != ConsoleServerOp.HELLO:
            raise RemoteProtocolError("console message before HELLO")
        return _HANDLERS[op](self, message)

    def _known(self, console_id: int, what: str) -> _Console:
        console = self._consoles.get(console_id)
        if console is None:
            raise RemoteProtocolError(f"console {what} for unknown console id {console_id}")
        return console

    def _add(self, info: ConsoleInfo) -> None:
        if info.console_id in self._announced_ids:
            raise RemoteProtocolError(f"console id {info.console_id} announced twice")
        if len(self._consoles) >= MAX_CONSOLES:
            raise RemoteProtocolError(f"more than {MAX_CONSOLES} consoles")
        if len(self._announced_ids) >= MAX_ANNOUNCEMENTS:
            raise RemoteProtocolError(f"more than {MAX_ANNOUNCEMENTS} consoles announced")
        self._announced_ids.add(info.console_id)
        self._consoles[info.console_id] = _Console(info)

    def _on_hello(self, message: ConsolesAnnounced) -> list[Any]:
        if self.announced:
            raise RemoteProtocolError("second console HELLO")
        if message.version != VERSION:
            raise RemoteProtocolError(f"console extension version {message.version} (want 1)")
        for info in message.consoles:
            self._add(info)
        self.announced = True
        self.version = message.version
        self.server_max_data = message.max_data
        self.positions = message.positions
        return [message]

    def _on_added(self, message: ConsoleAdded) -> list[Any]:
        self._add(message.info)
        return [message]

    def _on_removed(self, message: ConsoleRemoved) -> list[Any]:
        console = self._known(message.console_id, "REMOVED")
        del self._consoles[message.console_id]
        events: list[Any] = []
        if console.state is not _State.CLOSED:
            # The spec asks for CLOSED first; be forgiving and close it here.
            events.append(ConsoleClosed(message.console_id, CloseReason.REMOVED, ""))
        events.append(message)
        return events

    def _on_opened(self, message: ConsoleOpened) -> list[Any]:
        console = self._known(message.console_id, "OPENED")
        if bool(message.stream_id) is not console.positions:
            # OPENED AT answers exactly the OPENs that set `positions`.
            asked, got = ("OPENED AT", "OPENED") if console.positions else ("OPENED", "OPENED AT")
            raise RemoteProtocolError(f"{got} for console {console.info.name}, not {asked}")
        if console.state is _State.CLOSING:
            console.send_credit = message.credit  # opened just as we closed: ignore
            return []
        if console.state is not _State.OPENING:
            raise RemoteProtocolError(f"OPENED for console {console.info.name}, not being opened")
        console.state = _State.OPEN
        console.send_credit = message.credit
        console.history_left = message.history_length
        if console.resume is not None:
            message = replace(message, resumed=resumed(console.resume, message))
        return [message]

    def _on_data(self, message: ConsoleData) -> list[Any]:
        console = self._known(message.console_id, "DATA")
        is_open = console.state is _OPEN
        if not is_open and console.state is not _State.CLOSING:
            raise RemoteProtocolError(f"DATA for console {console.info.name}, which is not open")
        size = len(message.data)
        if size > console.receive_credit:
            raise RemoteProtocolError(
                f"console {console.info.name}: {size} bytes of DATA beyond the "
                f"{console.receive_credit} bytes of credit granted"
            )
        console.receive_credit -= size
        if not is_open:
            return []  # closing: counted against the credit, then dropped
        if size > console.max_data:
            raise RemoteProtocolError(
                f"console {console.info.name}: DATA of {size} bytes beyond the "
                f"max_data of {console.max_data} we announced"
            )
        console.consumed += size
        events: list[Any] = [message]
        if console.history_left:
            # history_length counts bytes: one DATA may end the replay and start
            # the live output.
            replayed = min(console.history_left, size)
            console.history_left -= replayed
            events = [replace(message, data=message.data[:replayed], history=True)]
            if replayed < size:
                events.append(replace(message, data=message.data[replayed:]))
        if console.auto_credit and console.consumed >= console.window // 2:
            self.grant(message.console_id)
        return events

    def _on_closed(self, message: ConsoleClosed) -> list[Any]:
        console = self._known(message.console_id, "CLOSED")
        if console.state is _State.CLOSED:
            raise RemoteProtocolError(f"CLOSED for console {console.info.name}, which is closed")
        console.state = _State.CLOSED
        console.send_credit = console.receive_credit = 0
        return [message]

    def _on_mark(self, message: ConsoleMark) -> list[Any]:
        console = self._known(message.console_id, "MARK")
        if not console.marks:
            raise RemoteProtocolError(f"MARK for console {console.info.name}, not asked for")
        if console.state is _State.CLOSING:
            return []
        if console.state is not _OPEN:
            raise RemoteProtocolError(f"MARK for console {console.info.name}, which is not open")
        return [message]

    def _on_credit(self, message: ConsoleCredit) -> list[Any]:
        console = self._known(message.console_id, "CREDIT")
        if console.state is _State.CLOSED:
            return []  # raced with a close
        if console.send_credit + message.increment > MAX_CREDIT:
            raise RemoteProtocolError("console credit beyond 2**32-1")
        console.send_credit += message.increment
        return [message] if console.state is _State.OPEN else []


def resumed(asked: StreamPosition, opened: ConsoleOpened) -> Resumed:
    """How the replay announced by OPENED AT joins the resume point asked for;
    `RemoteProtocolError` when the server broke the rules of "Stream positions"
    (its stream went backwards, or it did not replay from a point it holds)."""
    if opened.stream_id != asked.stream_id:
        return Resumed.NEW_STREAM if opened.replay_from == 0 else Resumed.GAP
    if asked.offset > opened.end:
        raise RemoteProtocolError(
            f"stream {opened.stream_id:#x} ends at offset {opened.end}, before "
            f"offset {asked.offset} that the server gave out"
        )
    if asked.offset < opened.start:
        return Resumed.GAP  # it fell out of the server's history
    if opened.replay_from != asked.offset:
        raise RemoteProtocolError(
            f"stream {opened.stream_id:#x}: a replay from offset {opened.replay_from}, "
            f"not from {asked.offset}, which the server holds ({opened.start}..{opened.end})"
        )
    return Resumed.EXACT


#: What the client does with each server operation, once parsed (see SERVER_PARSERS).
_HANDLERS: dict[int, Callable[[Consoles, Any], list[Any]]] = {
    ConsoleServerOp.HELLO: Consoles._on_hello,
    ConsoleServerOp.ADDED: Consoles._on_added,
    ConsoleServerOp.REMOVED: Consoles._on_removed,
    ConsoleServerOp.OPENED: Consoles._on_opened,
    ConsoleServerOp.DATA: Consoles._on_data,
    ConsoleServerOp.CLOSED: Consoles._on_closed,
    ConsoleServerOp.CREDIT: Consoles._on_credit,
    ConsoleServerOp.MARK: Consoles._on_mark,
    ConsoleServerOp.OPENED_AT: Consoles._on_opened,
}


# ---------------------------------------------------------------------------
# The server half: one open console's credit, both ways
# ---------------------------------------------------------------------------

#: Input a client may have in flight per console before the host end takes it
#: (credit goes back in halves as the host end drains: a bulk upload's pipeline).
INPUT_WINDOW = 256 * 1024


class ServedConsole:
    """A console a client has open, as the server accounts for it: how much output
    the client's credit lets the server send (in DATA of at most `max_data`), and
    how much input the client may still write.

    Output: `sendable` is the most the next DATA may carry; `sent(size)` counts
    one. Input: `received(data)` checks a WRITE against the client's credit;
    credit goes back once the host end has taken the input (`drained()`), in
    batches of half the window, so that a keystroke costs no CREDIT message and
    the client always keeps at least half a window to write into.

    Where the client's output starts in the console's stream (the replay it
    asked for, or live output only), and the OPENED or OPENED AT that says so:
    `begin()`.

    No I/O and no console: the server reads its console and writes to the host
    end, and asks this how much and when.
    """

    __slots__ = (
        "console_id",
        "credit",
        "history",
        "input_credit",
        "input_window",
        "marks",
        "max_data",
        "name",
        "positions",
        "resume",
        "returning",
        "sendable",
    )

    def __init__(self, message: ConsoleOpen, name: str, input_window: int = INPUT_WINDOW) -> None:
        if not 0 < input_window <= MAX_CREDIT:
            raise LocalProtocolError("input window out of range")
        self.console_id = message.console_id
        self.name = name
        #: Output bytes the client lets us send.
        self.credit = message.credit
        self.max_data = message.max_data
        #: The client asked for MARK.
        self.marks = message.marks
        #: What the client asked to be replayed (see `begin()`).
        self.history = message.history
        self.positions = message.positions
        self.resume = message.resume
        #: The most the next DATA may carry (0: wait for a GRANT).
        self.sendable = min(self.credit, self.max_data)
        self.input_window = input_window
        #: Input bytes the client may still write.
        self.input_credit = input_window
        #: Input passed on to the host end whose credit has not gone back yet.
        self.returning = 0

    def opened(self, history_length: int) -> ConsoleOpened:
        """The answer to the OPEN: the client's input credit, and the replay to come."""
        return ConsoleOpened(self.console_id, self.input_credit, history_length)

    def begin(self, stream_id: int, oldest: int, total: int) -> tuple[int, ConsoleOpened]:
        """Where the client's output starts, and the answer to its OPEN.

        The console's output stream is `stream_id` (nonzero; the server changes it
        whenever its offsets do not continue those it gave out before), held from
        offset `oldest` to `total` (just past the newest byte). The replay is
        what comes after the client's resume point when it names this stream and
        the point is held; otherwise, if the client asked for history, all that
        is held; else nothing. Returns the offset the client's output starts at
        and OPENED (OPENED AT if the client set `positions`).
        """
        if not 0 < stream_id <= MAX_OFFSET or not 0 <= oldest <= total <= MAX_OFFSET:
            raise LocalProtocolError(f"stream {stream_id} held from {oldest} to {total}")
        oldest = max(oldest, total - MAX_CREDIT)  # history_length is a u32
        resume = self.resume
        if not self.history:
            start = total
        elif resume is not None and resume.stream_id == stream_id and oldest <= resume.offset:
            # Beyond `total` it cannot be ours (the client's mistake): all of it then.
            start = resume.offset if resume.offset <= total else oldest
        else:
            start = oldest
        length = total - start
        if not self.positions:
            return start, ConsoleOpened(self.console_id, self.input_credit, length)
        opened = ConsoleOpened(self.console_id, self.input_credit, length, stream_id, oldest, total)
        return start, opened

    # --- output ------------------------------------------------------------------

    def sent(self, size: int) -> int:
        """A DATA of `size` bytes went out; returns what the next may carry."""
        if size > self.sendable:
            raise LocalProtocolError(
                f"console {self.name}: DATA of {size} bytes beyond the {self.sendable} allowed"
            )
        credit = self.credit - size
        self.credit = credit
        max_data = self.max_data
        self.sendable = sendable = credit if credit < max_data else max_data
        return sendable

    def grant(self, message: ConsoleGrant) -> None:
        """The client lets us send more (GRANT)."""
        credit = self.credit + message.increment
        if credit > MAX_CREDIT:
            raise RemoteProtocolError(f"console {self.name}: credit beyond 2**32-1")
        self.credit = credit
        self.sendable = min(credit, self.max_data)

    # --- input -------------------------------------------------------------------

    def received(self, data: bytes) -> bool:
        """Input from the client (WRITE), to pass on to the host end; returns whether
        credit is due back once the host end has taken it (then call `drained()`)."""
        size = len(data)
        if size > self.input_credit:
            raise RemoteProtocolError(
                f"console {self.name}: {size} bytes of input beyond the "
                f"{self.input_credit} bytes of credit"
            )
        self.input_credit -= size
        self.returning += size
        return self.returning >= self.input_window // 2

    def drained(self) -> ConsoleCredit | None:
        """The host end has taken all input passed on: the CREDIT to send, if due."""
        if self.returning < self.input_window // 2:
            return None
        amount, self.returning = self.returning, 0
        self.input_credit += amount
        return ConsoleCredit(self.console_id, amount)
