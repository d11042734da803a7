"""The byte engine both sides of RFB share: wire bytes in, events out, bytes out.

`Engine` owns the buffers (raw input, TLS, plaintext, output), runs the handler
of the current state over the plaintext until it needs more bytes, queues the
events they produce, turns unexpected parser failures into the peer's protocol
error, and sends through TLS once it is up. `ClientConnection` and
`ServerConnection` supply the states, the handlers and a few hooks. No I/O.
"""

from __future__ import annotations

import enum
import struct
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

from resourced.errors import LocalProtocolError, RemoteProtocolError, ResourcedError
from resourced.rfb._buffer import NeedData, Reader


class TlsSession(Protocol):
    """What the engine needs of a TLS layer (client or server side)."""

    handshake_done: bool
    #: The peer sent its close_notify: no more data will come.
    peer_closed: bool

    def receive(self, data: bytes) -> bytes: ...

    def send(self, plaintext: bytes) -> None: ...

    def data_to_send(self) -> bytes: ...


class Engine(ABC):
    """Base of the client and server connections (see the module docstring)."""

    #: Who is at the other end, for messages ("server" or "client").
    peer: ClassVar[str]
    #: One handler per state; a handler reads from the `Reader` (raising `NeedData`
    #: before changing anything when the message is incomplete) and returns events.
    handlers: ClassVar[Mapping[Any, Callable[[Any, Reader], list[Any]]]]
    #: The states with no handler: waiting for TLS, and closed.
    TLS_HANDSHAKE: ClassVar[enum.Enum]
    CLOSED: ClassVar[enum.Enum]

    def __init__(self, state: enum.Enum) -> None:
        self.state: Any = state
        self._raw_in = bytearray()  # bytes from the wire for TLS to decrypt
        # Plaintext protocol bytes; the first `_parsed` of them are parsed already.
        # Those are dropped when more bytes arrive, not after each message: dropping
        # the front of a bytearray can copy everything behind it, so a read that
        # held several messages was copied again for each of them.
        self._buf = bytearray()
        self._parsed = 0
        # Bytes for the wire, in the pieces they were queued in: joined only when
        # taken, so a message written and then flushed is never copied here.
        self._out: list[bytes] = []
        self._tls: TlsSession | None = None
        self._tls_starting = False  # a handler accepted TLS: start it after this message
        self._tls_eof_sent = False
        self._tls_closed = False  # the peer's close_notify came: that is its EOF
        self._eof = False
        self._events: deque[Any] = deque()
        self._failed: Exception | None = None
        # The handler of `_handler_state`, kept so that a message costs no lookup
        # in `handlers` (an Enum member hashes in Python).
        self._handler_state: Any = None
        self._handler: Callable[[Any, Reader], list[Any]] | None = None

    # ------------------------------------------------------------------ I/O face

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the wire; b"" means the peer closed.

        The bytes are copied: the caller may reuse its buffer (a transport's
        `recv_into` buffer) as soon as this returns.
        """
        if self._tls_closed:
            return  # after a close_notify TLS allows nothing: what comes is dropped
        if self._eof:
            if data:
                raise LocalProtocolError("data received after EOF")
            return
        if not data:
            self._eof = True
        elif self.state is self.CLOSED:
            pass  # once closed nothing is parsed any more, so nothing need be kept
        elif self._tls is None and not self._tls_starting:
            self._add_plaintext(data)  # no TLS: the wire carries the plaintext itself
        else:
            self._raw_in += data

    @property
    def pending_input(self) -> int:
        """Bytes received and not yet parsed (a transport pauses reading when this grows)."""
        return len(self._raw_in) + len(self._buf) - self._parsed

    def data_to_send(self) -> bytes:
        """Bytes to write to the wire, in order; empties the queue."""
        if self._tls is not None:
            self._queue_wire(self._tls.data_to_send())
        out = self._out
        if not out:
            return b""
        self._out = []
        # join() hands a lone bytes piece back as it is, without a copy.
        return b"".join(out)

    def next_event(self) -> Any | None:
        """The next event, or None when more data is needed.

        Raises `RemoteProtocolError` (or a `SecurityError`, or `ConnectionClosed`)
        when the peer broke the protocol, failed or refused authentication, or
        left; the connection is then closed for good.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._next_event()
        except LocalProtocolError:
            raise
        except ResourcedError as err:
            self._fail(err)
            raise
        except (struct.error, IndexError, ValueError, UnicodeError) as err:
            # A parser met bytes it could not make sense of in a way no explicit
            # check caught; it is still the peer's fault, and still must not leak.
            wrapped = RemoteProtocolError(
                f"malformed data from the {self.peer} ({self.state.value})"
            )
            self._fail(wrapped)
            raise wrapped from err

    def events(self) -> Iterator[Any]:
        """Every event available now."""
        while (event := self.next_event()) is not None:
            yield event

    # ------------------------------------------------------------------ hooks

    @abstractmethod
    def _start_tls(self) -> None:
        """Create `self._tls` (a handler set `_tls_starting`)."""

    @abstractmethod
    def _after_tls_handshake(self) -> None:
        """The TLS handshake finished: move on to the inner authentication."""

    @abstractmethod
    def _eof_in_tls_handshake(self) -> ResourcedError:
        """The error for a peer that closed in the middle of the TLS handshake."""

    @abstractmethod
    def _at_eof(self) -> None:
        """The peer closed and the current state's handler needs more bytes."""

    # ------------------------------------------------------------------ internals

    def _fail(self, err: Exception) -> None:
        self._failed = err
        self.state = self.CLOSED
        # Nothing will be parsed any more; what remains is only a liability.
        self._raw_in.clear()
        self._buf.clear()
        self._parsed = 0

    def _add_plaintext(self, data: bytes | bytearray | memoryview) -> None:
        """Append plaintext for the handlers, first dropping what they have parsed."""
        if self._parsed:
            del self._buf[: self._parsed]
            self._parsed = 0
        self._buf += data

    def _queue_wire(self, data: bytes) -> None:
        """Queue bytes that go to the wire as they are (TLS records, or no TLS)."""
        if data:
            # A piece is kept until taken: it must not change in the meantime.
            self._out.append(data if type(data) is bytes else bytes(data))

    def _write(self, data: bytes) -> None:
        """Queue protocol bytes: through TLS once it is up."""
        if self._tls is not None:
            self._tls.send(data)
            self._queue_wire(self._tls.data_to_send())
        else:
            self._queue_wire(data)

    def _pump_tls(self, tls: TlsSession) -> None:
        """Decrypt what arrived into `_buf`; pass on EOF; queue TLS's answers."""
        if self._raw_in or (self._eof and not self._tls_eof_sent):
            data = bytes(self._raw_in)
            self._raw_in.clear()
            if data:
                self._add_plaintext(tls.receive(data))
            if tls.peer_closed and not self._eof:
                # A close_notify ends the stream as a transport EOF does (QEMU's
                # gnutls reads it as the end, too).
                self._tls_closed = self._eof = self._tls_eof_sent = True
            if self._eof and not self._tls_eof_sent:
                self._tls_eof_sent = True
                self._add_plaintext(tls.receive(b""))
            self._queue_wire(tls.data_to_send())
            if self.state is self.TLS_HANDSHAKE and tls.handshake_done:
                self._after_tls_handshake()

    def _parses_without_bytes(self) -> bool:
        """Whether the current state's handler may produce something from no bytes.

        Most need at least a byte, so with nothing buffered (the usual end of a
        batch) `_next_event` does not call them just to hear `NeedData`.
        """
        return False

    def _next_event(self) -> Any | None:
        events = self._events
        while True:
            if events:
                return events.popleft()
            state = self.state
            if state is self.CLOSED:
                return None
            if self._tls is not None:
                self._pump_tls(self._tls)
                if events:
                    continue
                state = self.state  # the end of the TLS handshake moves it on
            if state is self.TLS_HANDSHAKE:
                if self._eof:
                    raise self._eof_in_tls_handshake()
                return None
            buf = self._buf
            parsed = self._parsed
            if parsed == len(buf) and not self._eof and not self._parses_without_bytes():
                return None
            handler = self._handler
            if handler is None or state is not self._handler_state:
                handler = self._handler = self.handlers[state]
                self._handler_state = state
            reader = Reader(buf, parsed)
            try:
                produced = handler(self, reader)
            except NeedData:
                if self._eof:
                    self._at_eof()
                    continue
                return None
            finally:
                reader.release()
            self._parsed = reader.pos
            events.extend(produced)
            if self._tls_starting:
                self._tls_starting = False
                # Every byte after the acceptance is TLS: what was buffered as
                # plaintext goes back in front of the raw input.
                self._raw_in[:0] = buf[self._parsed :]
                buf.clear()
                self._parsed = 0
                self._start_tls()
