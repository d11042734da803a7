"""A console carried by the RFB console extension, as a console hub's source.

`RfbConsoleSource` is the host end of one console of a guest reached through a
server that speaks the console extension (our gateway): it opens the console on
the guest's current RFB connection, feeds the hub with its DATA, writes input
within the server's credit, and turns the hub's back-pressure into credit held
back (the server then stops sending this console only). When the connection
drops the hub is told, and the guest attaches the source again on the next one;
a console the server closed on us as overrun is opened again at once, and one
whose host end went away (backend error) too, after the hub was told why.

Against a server that speaks stream positions (console-extension.md, "Stream
positions") the source counts where in the server's output stream the last byte
it gave the hub was, and every reopen (a new connection, an overrun, a backend
error) asks for what came after it: output the server got meanwhile reaches the
hub once, neither lost nor repeated, as long as the server still holds it. A
new stream (a new gateway process) is replayed whole: it began after the old
one's last byte. A gap the server reports is logged (once, at info level); the
hub gets nothing in its place. Against a server without positions a reopen
replays history only into an empty ring (the guest's choice), so what the
server got while the connection was down is not replayed.

It implements `resourced.consoles.sources.ConsoleSource`; it does no I/O of its
own (the guest's `RfbClient` does).
"""

from __future__ import annotations

import logging

from resourced.consoles.sources import SourceHandler
from resourced.errors import BrokerError
from resourced.rfb.aio import RfbClient
from resourced.rfb.consoles import (
    DEFAULT_WINDOW,
    CloseReason,
    ConsoleClosed,
    ConsoleCredit,
    ConsoleData,
    ConsoleOpened,
    Consoles,
    Resumed,
    StreamPosition,
)

log = logging.getLogger(__name__)


class RfbConsoleSource:
    """One console of the extension, attached to whichever connection is current."""

    def __init__(self, guest_name: str, console_name: str, window: int = DEFAULT_WINDOW) -> None:
        self.description = f"rfb:{guest_name}/{console_name}"
        self.window = window
        self._handler: SourceHandler | None = None
        self._client: RfbClient | None = None
        self._ext: Consoles | None = None
        self.console_id: int | None = None
        self._open = False
        self._paused = False
        self._unacked = 0  # received and handed to the hub, credit not yet returned
        self._pending = bytearray()  # input waiting for the server's credit
        #: Bytes of replayed history still to come after OPENED.
        self.history_left = 0
        # Where the next byte from the server will be in its output stream (0: no
        # stream known, the server has no positions): the hub has every byte of
        # that stream before `_offset` that the server gave us on this or an
        # earlier connection.
        self._stream_id = 0
        self._offset = 0
        #: The resume point the current OPEN asked for.
        self._asked: StreamPosition | None = None
        #: The server never refuses an open in a way that waiting would not mend.
        self.failure: BrokerError | None = None

    # --- ConsoleSource ----------------------------------------------------------

    def start(self, handler: SourceHandler) -> None:
        self._handler = handler

    def write(self, data: bytes) -> None:
        ext, console_id = self._ext, self.console_id
        if not self._pending and self._open and ext is not None and console_id is not None:
            # The usual case: credit for all of it, sent as it came (no copy into
            # `_pending` and out again).
            sent = ext.write(console_id, data)
            self._flush()
            if sent == len(data):
                if self._handler is not None:
                    self._handler.source_drained()
                return
            data = data[sent:]
        self._pending += data
        self._flush_input()

    @property
    def input_backlog(self) -> int:
        return len(self._pending)

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._return_credit(force=True)

    def send_break(self) -> bool:
        if not self._open or self._ext is None or self.console_id is None:
            return False
        self._ext.send_break(self.console_id)
        self._flush()
        return True

    async def close(self) -> None:
        if self._open and self._ext is not None and self.console_id is not None:
            self._ext.close(self.console_id)
            self._flush()
        self.detach("closed")

    # --- driven by the guest ----------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def position(self) -> StreamPosition | None:
        """Just past the last byte given to the hub, in the server's output stream
        (None until a server with stream positions has said which)."""
        return StreamPosition(self._stream_id, self._offset) if self._stream_id else None

    def attach(self, client: RfbClient, ext: Consoles, console_id: int, history: bool) -> None:
        """Open the console on a new connection (OPENED comes as an event).

        With a position known and a server that speaks positions, the server is
        asked for what came after it, whatever `history` says; otherwise
        `history` says whether to replay what the server holds (only into an
        empty hub, or output would show twice).
        """
        self._client, self._ext, self.console_id = client, ext, console_id
        self._open = False
        self._unacked = 0
        self._asked = self.position if ext.positions else None
        ext.open(
            console_id, window=self.window, history=history, auto_credit=False, resume=self._asked
        )
        self._flush()

    def detach(self, reason: str) -> None:
        """The connection (or the console on it) is gone."""
        was_open = self._open
        self._client = self._ext = None
        self.console_id = None
        self._open = False
        self.history_left = 0
        if was_open and self._handler is not None:
            self._handler.source_lost(reason)

    def on_opened(self, event: ConsoleOpened) -> None:
        self._open = True
        self.history_left = event.history_length
        # The replay's first byte follows the last one the hub has (or starts it).
        self._stream_id = event.stream_id
        self._offset = event.replay_from if event.stream_id else 0
        if event.stream_id:
            self._log_resumption(event)
        if self._handler is not None:
            self._handler.source_connected()
        self._flush_input()

    def on_data(self, event: ConsoleData) -> None:
        size = len(event.data)
        if event.history:
            self.history_left = max(0, self.history_left - size)
        self._offset += size
        self._unacked += size
        if self._handler is not None:
            self._handler.source_data(event.data)
        self._return_credit()

    def on_credit(self, event: ConsoleCredit) -> None:
        self._flush_input()

    def on_closed(self, event: ConsoleClosed) -> None:
        reason = event.message or event.reason.name.lower().replace("_", " ")
        client, ext, console_id = self._client, self._ext, self.console_id
        if event.reason is CloseReason.OVERRUN and client is not None and ext is not None:
            # The server went on without us: we held its credit back (for a slow
            # reader of ours) longer than it waits. The console is still there, so
            # open it again at once, with history: after an overrun everything the
            # server still holds is newer than what it sent us, so it fills the
            # gap as far as it can and repeats nothing (with positions, the server
            # says how much is lost).
            assert console_id is not None
            log.warning("%s: the server closed it (%s); opening it again", self.description, reason)
            self.attach(client, ext, console_id, history=True)
            return
        self.detach(f"the server closed the console ({reason})")
        if event.reason is CloseReason.BACKEND_ERROR and client is not None and ext is not None:
            # The console's host end went away at the gateway (the guest stopped,
            # someone forced a libvirt console away): the console is still listed,
            # and the gateway's history stands still until the host end is back,
            # so opening it again now, without history, misses nothing and repeats
            # nothing (with positions, it resumes from our last byte anyway, which
            # also covers a host end that is back before the OPEN arrives);
            # output flows again once the host end returns.
            assert console_id is not None
            log.warning("%s: the server closed it (%s); opening it again", self.description, reason)
            self.attach(client, ext, console_id, history=False)

    # --- internals ----------------------------------------------------------------

    def _log_resumption(self, event: ConsoleOpened) -> None:
        asked = self._asked
        if asked is None or event.resumed is Resumed.EXACT:
            return
        if event.resumed is Resumed.NEW_STREAM:
            log.info(
                "%s: the server's output stream is a new one (a new gateway?): "
                "replaying all %d bytes of it; what the old one got after our last "
                "byte, if anything, is lost",
                self.description,
                event.history_length,
            )
        elif event.stream_id == asked.stream_id:
            log.info(
                "%s: %d bytes of output were lost while we were away "
                "(the server no longer had them); going on from what it has",
                self.description,
                event.replay_from - asked.offset,
            )
        else:
            log.info(
                "%s: the server's output stream is a new one and its first %d bytes "
                "are no longer held: they are lost; going on from what it has",
                self.description,
                event.replay_from,
            )

    def _return_credit(self, force: bool = False) -> None:
        # In halves of the window, so a keystroke's echo costs no CREDIT message.
        if self._paused or not self._open or self._ext is None or self.console_id is None:
            return
        if self._unacked and (force or self._unacked >= self.window // 2):
            amount, self._unacked = self._unacked, 0
            self._ext.grant(self.console_id, amount)
            self._flush()

    def _flush_input(self) -> None:
        ext, console_id = self._ext, self.console_id
        if not self._open or ext is None or console_id is None or not self._pending:
            return
        sent = ext.write(console_id, bytes(self._pending))
        del self._pending[:sent]
        self._flush()
        if not self._pending and self._handler is not None:
            self._handler.source_drained()

    def _flush(self) -> None:
        if self._client is not None:
            self._client.flush()
