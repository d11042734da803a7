"""One viewer behind the gateway: its handshake, its QEMU connection, its consoles.

A `Session` authenticates the viewer (server side of RFB, `resourced.rfb.server`),
opens its own connection to QEMU's VNC server with the viewer's shared flag, and
then relays messages both ways. It frames every server message it relays, so it
can put console messages between them; it filters the viewer's SetEncodings to
what it can frame (every encoding and pseudo-encoding QEMU 7.2 knows) and strips
its own pseudo-encoding before QEMU sees it. The viewer's console messages are
answered here from the gateway's console hubs, with per-console credit so a
console nobody reads stalls nothing else.

The relay is never looser than QEMU (`ui/vnc.c` `protocol_client_msg`): a viewer
message QEMU would answer by dropping the connection (which would take the
viewer's consoles and audio with it) is not forwarded. A paste over QEMU's 1 MiB,
an xvp or audio message QEMU has not enabled, an xvp version other than 1 and an
Extended Clipboard provide that inflates past QEMU's limit are refused with a
logged reason and the session goes on; a malformed message, or a pixel format
QEMU would silently replace with another (so that nobody could frame what it
sends next), ends the session with a logged reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

from resourced.consoles.hub import ConsoleHub, Overrun
from resourced.errors import RemoteProtocolError, ResourcedError
from resourced.rfb import clipboard
from resourced.rfb.aio import RfbClient, connect
from resourced.rfb.connection import Message
from resourced.rfb.consoles import (
    INPUT_WINDOW,
    MAX_CONSOLE_DATA,
    VERSION,
    CloseReason,
    ConsoleAdded,
    ConsoleBreak,
    ConsoleClose,
    ConsoleClosed,
    ConsoleData,
    ConsoleGrant,
    ConsoleMark,
    ConsoleOpen,
    ConsoleRemoved,
    ConsolesAnnounced,
    ConsoleWrite,
    MarkKind,
    ServedConsole,
    StreamPosition,
    parse_client_message,
)
from resourced.rfb.constants import (
    QEMU_MAX_CLIENT_CUT_TEXT,
    QEMU_MAX_CLIPBOARD_INFLATED,
    XVP_VERSION,
    Encoding,
    ExtendedClipboardFlag,
    QemuAudioServerOp,
    QemuClientSubtype,
    XvpCode,
)
from resourced.rfb.encodings import SUPPORTED_ENCODINGS
from resourced.rfb.events import ServerClosed
from resourced.rfb.messages import (
    Bell,
    ExtendedClientCutText,
    ExtendedServerCutText,
    FramebufferUpdate,
    ServerCutText,
    SetColourMapEntries,
    SetEncodings,
    SetPixelFormat,
    XvpServerMessage,
)
from resourced.rfb.pixelformat import PixelFormat
from resourced.rfb.qemu import (
    AudioBegin,
    AudioData,
    AudioEnd,
    AudioSupported,
    QemuAudio,
    QemuAudioDisable,
    QemuAudioEnable,
    QemuAudioSetFormat,
    audio_server_message,
)
from resourced.rfb.server import (
    ClientClosed,
    ClientCutTextRefused,
    ClientInitReceived,
    ServerConnection,
    XvpMessage,
)
from resourced.rfb.text import printable

if TYPE_CHECKING:
    from resourced.gateway.gateway import Gateway

log = logging.getLogger(__name__)

#: Bytes queued for a viewer before console output waits for it to drain: small,
#: so console output goes to the socket from the hub's chunks, not through
#: another copy into the transport's buffer. Display and audio wait only past
#: the configured `write_high_water`.
CONSOLE_HIGH_WATER = 256 * 1024
#: Unparsed input from a viewer still in its handshake before reading pauses.
MAX_HANDSHAKE_INPUT = 64 * 1024
READ_SIZE = 256 * 1024

#: Pseudo-encodings that change only how the server encodes, never what it frames.
_HINT_ENCODINGS = frozenset(range(-32, -22)) | frozenset(range(-256, -246))
#: Pseudo-encodings that bring messages rather than rectangles; the gateway frames
#: those messages (Extended Clipboard cut text, xvp), so QEMU may send them.
_MESSAGE_ENCODINGS = frozenset({Encoding.EXTENDED_CLIPBOARD, Encoding.XVP})


#: The action bits of an Extended Clipboard flags word. Caps lists the actions a
#: peer supports among its own flags, so only a word whose one action is provide
#: carries clipboard data (QEMU reads caps, then notify, before provide).
_CLIPBOARD_ACTIONS = (
    ExtendedClipboardFlag.CAPS
    | ExtendedClipboardFlag.REQUEST
    | ExtendedClipboardFlag.PEEK
    | ExtendedClipboardFlag.NOTIFY
    | ExtendedClipboardFlag.PROVIDE
)


def filter_encodings(encodings: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """What of a viewer's SetEncodings goes on to QEMU, and whether it asked for consoles.

    Only encodings whose rectangles or messages the gateway can frame survive (plus
    quality and compression hints), in the viewer's order; our own pseudo-encoding
    is removed. Every encoding QEMU 7.2's `set_encodings` knows passes.
    """
    wants_consoles = Encoding.CONSOLES in encodings
    kept = tuple(
        e
        for e in encodings
        if e != Encoding.CONSOLES
        and (e in SUPPORTED_ENCODINGS or e in _HINT_ENCODINGS or e in _MESSAGE_ENCODINGS)
    )
    return kept, wants_consoles


def check_pixel_format(pixel_format: PixelFormat) -> None:
    """Refuse a SetPixelFormat that QEMU would quietly replace with another.

    QEMU (`set_pixel_format`) serves a colour-mapped request at 8 bits per pixel
    whatever it asked for, and a zero colour maximum as 255. Either way QEMU's
    rectangles would no longer be in the format the viewer (and the gateway,
    framing them) expects, so neither is passed on.
    """
    if not pixel_format.true_colour and pixel_format.bits_per_pixel != 8:
        raise RemoteProtocolError(
            f"SetPixelFormat: a colour map at {pixel_format.bits_per_pixel} bits per pixel "
            "(QEMU would send 8)"
        )
    if pixel_format.true_colour and 0 in (
        pixel_format.red_max,
        pixel_format.green_max,
        pixel_format.blue_max,
    ):
        raise RemoteProtocolError(
            "SetPixelFormat: a colour maximum of 0 (QEMU would use 255 instead)"
        )


def clipboard_refusal(message: ExtendedClientCutText) -> str | None:
    """Why QEMU should not get this Extended Clipboard message, or None.

    Only a provide carries data. QEMU inflates it into at most 1 MiB and drops
    what does not fit (or is not zlib) without a word, so the gateway refuses
    those itself, where the log can say so.
    """
    if message.flags & _CLIPBOARD_ACTIONS != ExtendedClipboardFlag.PROVIDE:
        return None
    try:
        inflated = clipboard.inflate(message.payload, QEMU_MAX_CLIPBOARD_INFLATED)
    except RemoteProtocolError as err:
        return str(err)
    if inflated is None:
        return (
            f"the clipboard data inflates past QEMU's limit of {QEMU_MAX_CLIPBOARD_INFLATED} bytes"
        )
    return None


def describe(message: Message) -> str:
    """A message for the log: its name and size on the wire."""
    return f"{type(message).__name__} ({len(message.serialize())} bytes)"


class _QemuClosed(ResourcedError):
    """QEMU closed the connection at a message boundary (the reason says more)."""


#: The text of a MARK for a console whose host end attached again.
_REATTACHED = "the console's host end attached again (the guest restarted?): what follows is new"


class _OpenConsole:
    """A console the viewer has open: where its output comes from and how far it
    got; the credit both ways is `served`'s."""

    __slots__ = ("attached", "hub", "listener", "marked", "marks", "offset", "served")

    def __init__(self, hub: ConsoleHub, offset: int, served: ServedConsole) -> None:
        self.hub = hub
        self.offset = offset  # next absolute hub offset to send
        self.served = served
        self.listener: Any = None
        #: Whether the console's host end was up when last looked at: its going
        #: down closes the console for this viewer (CLOSED, backend error).
        self.attached = hub.connected
        #: The viewer asked for MARK; the offset of the last one it got (or where
        #: it started: a reattachment there has nothing of the viewer's before it).
        self.marks = served.marks
        self.marked = offset


class Session(asyncio.BufferedProtocol):
    """A viewer connection, relayed to QEMU, with consoles added.

    It is the viewer socket's asyncio protocol: once the handshake is done, a
    viewer's message is parsed and passed on (to QEMU, or to a console's host
    end) straight from the socket's read callback, and QEMU's messages and
    console output reach the viewer from theirs, with no task wake-up on the
    way. A task (`run`) holds the lifecycle: handshake, upstream connection,
    then waiting for the end.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.peer = "unknown peer"
        self.server = ServerConnection(
            self.config.security,
            qemu_parsers={QemuClientSubtype.CONSOLE: parse_client_message},
            max_cut_text=QEMU_MAX_CLIENT_CUT_TEXT,
        )
        self.upstream: RfbClient | None = None
        #: The encodings of the last SetEncodings passed to QEMU.
        self._upstream_encodings: frozenset[int] = frozenset()
        #: QEMU has acknowledged audio (it has an audio device for VNC).
        self._qemu_audio = False
        #: QEMU has sent xvp INIT (it runs with power-control=on).
        self._qemu_xvp = False
        #: The last message passed to QEMU, named in the log if QEMU drops us.
        self._last_upstream: Message | None = None
        self.consoles_enabled = False
        self._open: dict[int, _OpenConsole] = {}
        self._transport: asyncio.Transport | None = None
        self._view = memoryview(bytearray(READ_SIZE))  # recv_into: no allocation per read
        loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._input_waiter: asyncio.Future[None] | None = None
        self._viewer_eof = False
        self._relaying = False
        self._write_paused = False  # the viewer's transport is above its high-water mark
        self._upstream_held = False  # ...and above write_high_water: QEMU is not read
        self._slow_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    # --- asyncio.BufferedProtocol (the viewer's socket) ----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not subclasses of asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket peer"
        self._transport.set_write_buffer_limits(
            high=min(CONSOLE_HIGH_WATER, self.config.write_high_water)
        )
        self.gateway.sessions.add(self)
        self._task = asyncio.get_running_loop().create_task(self.run())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.server.receive_data(self._view[:nbytes])
        self._viewer_input()

    def eof_received(self) -> bool:
        self._viewer_eof = True
        self.server.receive_data(b"")
        self._viewer_input()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        if exc is not None:
            self._finish(exc)
        elif not self._viewer_eof:
            self._viewer_eof = True
            self.server.receive_data(b"")
            self._viewer_input()
        self._finish(None)

    def pause_writing(self) -> None:
        """More than `CONSOLE_HIGH_WATER` is queued for the viewer: console output
        waits (it stays in the hubs, not in our buffers)."""
        self._write_paused = True
        self._check_viewer_backlog()

    def _check_viewer_backlog(self) -> None:
        """Past `write_high_water`, stop reading QEMU too, and give the viewer
        `slow_client_timeout` to catch up."""
        if self._upstream_held or self._transport is None:
            return
        if self._transport.get_write_buffer_size() > self.config.write_high_water:
            self._upstream_held = True
            if self.upstream is not None:
                self.upstream.pause_reading()
            loop = asyncio.get_running_loop()
            self._slow_timer = loop.call_later(
                self.config.slow_client_timeout, self._viewer_too_slow
            )

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream_held:
            self._upstream_held = False
            if self._slow_timer is not None:
                self._slow_timer.cancel()
                self._slow_timer = None
            if self.upstream is not None:
                self.upstream.resume_reading()
        for console_id in list(self._open):
            self._pump(console_id)

    def _viewer_too_slow(self) -> None:
        self._slow_timer = None
        queued = self._transport.get_write_buffer_size() if self._transport is not None else 0
        self._finish(
            ResourcedError(
                f"viewer stopped reading ({queued} bytes queued "
                f"for {self.config.slow_client_timeout:g} s)"
            )
        )

    def _viewer_input(self) -> None:
        if self._relaying:
            try:
                self._from_viewer()
            except ResourcedError as err:
                self._finish(err)
            return
        if self.server.pending_input > MAX_HANDSHAKE_INPUT and self._transport is not None:
            self._transport.pause_reading()  # a viewer talking past its handshake waits
        if self._input_waiter is not None and not self._input_waiter.done():
            self._input_waiter.set_result(None)

    # --- lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        try:
            shared = await self._handshake()
            await self._connect_upstream(shared)
            self._start_relay()
            await self._done
        except ResourcedError as err:
            log.warning("viewer %s: %s; disconnected", self.peer, err)
        except OSError as lost:
            log.info("viewer %s: connection lost (%s)", self.peer, lost)
        finally:
            await self._cleanup()

    def _finish(self, error: BaseException | None) -> None:
        """The session ends: `run` logs `error` (if any) and cleans up."""
        if self._done.done():
            return
        if error is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(error)
        if self._input_waiter is not None and not self._input_waiter.done():
            self._input_waiter.set_result(None)

    def shutdown(self) -> None:
        self._finish(None)
        if self._transport is not None:
            self._transport.close()

    async def _cleanup(self) -> None:
        if self._slow_timer is not None:
            self._slow_timer.cancel()
        for console in self._open.values():
            console.hub.unsubscribe(console.listener)
        self._open.clear()
        self._flush()
        if self.upstream is not None:
            await self.upstream.close()
        if self._transport is not None:
            self._transport.close()
            await self._lost
        self.gateway.sessions.discard(self)

    async def _handshake(self) -> bool:
        # Two clocks: `handshake_timeout` for what the viewer does on its own,
        # then, once it may be asking its user (`awaiting_user`), `auth_timeout`
        # (none by default: QEMU waits for a person as long as it takes).
        loop = asyncio.get_running_loop()
        for_user = False
        try:
            async with asyncio.timeout(self.config.handshake_timeout) as deadline:
                while True:
                    try:
                        while (event := self.server.next_event()) is not None:
                            if isinstance(event, ClientInitReceived):
                                return event.shared
                    finally:
                        self._flush()
                    if self._done.done():
                        self._done.result()  # raises the error that ended it
                        raise ResourcedError("closed during the handshake")
                    if self._viewer_eof:
                        raise ResourcedError("the viewer left during the handshake")
                    if not for_user and self.server.awaiting_user:
                        for_user = True
                        limit = self.config.auth_timeout
                        deadline.reschedule(None if limit is None else loop.time() + limit)
                    self._input_waiter = loop.create_future()
                    await self._input_waiter
        except TimeoutError:
            if for_user:
                raise ResourcedError(
                    f"the viewer's user did not answer within {self.config.auth_timeout:g} s "
                    f"({self.server.state.value})"
                ) from None
            raise ResourcedError(
                f"handshake not finished within {self.config.handshake_timeout:g} s "
                f"({self.server.state.value})"
            ) from None
        finally:
            self._input_waiter = None

    async def _connect_upstream(self, shared: bool) -> None:
        # What the viewer sends meanwhile waits in the kernel, not here.
        assert self._transport is not None
        self._transport.pause_reading()
        try:
            self.upstream = await connect(
                self.config.upstream,
                timeout=self.config.handshake_timeout,
                password=self.config.upstream_password,
                shared=shared,
                auto_setup=False,
                extensions=[QemuAudio(auto_enable=False)],
            )
        except ResourcedError as err:
            raise ResourcedError(f"cannot reach QEMU's VNC server: {err}") from err
        conn = self.upstream.connection
        assert conn.pixel_format is not None
        self.server.send_server_init(conn.width, conn.height, conn.pixel_format, conn.name)
        self._flush()
        name = printable(conn.name)  # QEMU's, from -name: no escape sequences into the log
        log.info("viewer %s: connected to %s (%s)", self.peer, self.config.upstream, name)

    def _start_relay(self) -> None:
        assert self.upstream is not None
        assert self._transport is not None
        if self._done.done():
            return
        self._relaying = True
        self.upstream.dispatch_to(self._from_qemu).add_done_callback(self._upstream_ended)
        if self._upstream_held:
            self.upstream.pause_reading()
        if not self._transport.is_closing():
            self._transport.resume_reading()
        self._viewer_input()  # whatever arrived while QEMU was being reached

    def _upstream_ended(self, ended: asyncio.Future[None]) -> None:
        error = ended.exception()
        if error is None:
            self._finish(ResourcedError(self._qemu_closed()))
        elif isinstance(error, _QemuClosed):
            self._finish(error)
        elif isinstance(error, ResourcedError):
            self._finish(
                ResourcedError(f"QEMU's VNC connection failed: {error}; {self._last_sent()}")
            )
        else:
            self._finish(error)

    def _qemu_closed(self) -> str:
        return f"QEMU closed the VNC connection; {self._last_sent()}"

    def _last_sent(self) -> str:
        if self._last_upstream is None:
            return "the gateway had sent it no message"
        return f"the last message the gateway sent it was {describe(self._last_upstream)}"

    # --- output to the viewer -------------------------------------------------

    def _flush(self) -> None:
        data = self.server.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _send(self, message: Message) -> None:
        self.server.send_raw(message.serialize())
        self._flush()

    # --- QEMU -> viewer -----------------------------------------------------------

    def _from_qemu(self, event: Any) -> None:
        if isinstance(
            event,
            FramebufferUpdate
            | SetColourMapEntries
            | Bell
            | ServerCutText
            | ExtendedServerCutText
            | AudioData,
        ):
            self._send(event)
        elif isinstance(event, XvpServerMessage):
            if event.code == XvpCode.INIT:
                self._qemu_xvp = True
            self._send(event)
        elif isinstance(event, AudioSupported):
            self._qemu_audio = True  # its rectangle comes in the FramebufferUpdate
        elif isinstance(event, AudioBegin):
            self.server.send_raw(audio_server_message(QemuAudioServerOp.BEGIN))
            self._flush()
        elif isinstance(event, AudioEnd):
            self.server.send_raw(audio_server_message(QemuAudioServerOp.END))
            self._flush()
        elif isinstance(event, ServerClosed):
            raise _QemuClosed(self._qemu_closed())
        if self._write_paused:
            self._check_viewer_backlog()

    # --- viewer -> QEMU -----------------------------------------------------------

    def _from_viewer(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        server = self.server
        try:
            while (event := server.next_event()) is not None:
                if type(event) is ConsoleWrite:
                    # A keystroke: the common case goes straight to the host end.
                    console = self._open.get(event.console_id)
                    if console is not None:
                        self._console_input(console, event.data)
                    else:
                        self._on_console_message(event)
                elif isinstance(event, ClientClosed):
                    log.info("viewer %s: closed the connection", self.peer)
                    self.shutdown()
                    return
                else:
                    self._on_viewer_message(event)
        finally:
            self._flush()
            upstream.flush()

    def _on_viewer_message(self, message: Any) -> None:
        assert self.upstream is not None
        if isinstance(message, SetEncodings):
            kept, wants_consoles = filter_encodings(message.encodings)
            self._to_qemu(SetEncodings(kept))
            self._upstream_encodings = frozenset(kept)
            if wants_consoles and not self.consoles_enabled:
                self.consoles_enabled = True
                infos = tuple(self._infos())
                self._send(ConsolesAnnounced(VERSION, MAX_CONSOLE_DATA, infos, positions=True))
        elif isinstance(
            message, ConsoleOpen | ConsoleClose | ConsoleWrite | ConsoleBreak | ConsoleGrant
        ):
            self._on_console_message(message)
        elif hasattr(message, "serialize"):
            refusal = self._refusal(message)
            if refusal is None:
                self._to_qemu(message)
            else:
                log.warning(
                    "viewer %s: %s not passed to QEMU: %s", self.peer, describe(message), refusal
                )
        elif isinstance(message, ClientCutTextRefused):
            kind = "an Extended Clipboard" if message.extended else "a"
            log.warning(
                "viewer %s: %s ClientCutText of %d bytes not passed to QEMU: over QEMU's "
                "limit of %d bytes, for which it would drop the connection; the paste is lost",
                self.peer,
                kind,
                message.length,
                message.limit,
            )
        else:  # pragma: no cover - the server connection yields only messages here
            raise RemoteProtocolError(f"unexpected {type(message).__name__} from the viewer")

    def _to_qemu(self, message: Message) -> None:
        assert self.upstream is not None
        self.upstream.connection.send(message)
        self._last_upstream = message

    def _refusal(self, message: Any) -> str | None:
        """Why `message` should not reach QEMU (it would drop the connection, or the data), or None.

        Raises `RemoteProtocolError` for what no session can go on after.
        """
        if isinstance(message, SetPixelFormat):
            check_pixel_format(message.pixel_format)
        elif isinstance(message, XvpMessage):
            if not self._qemu_xvp or Encoding.XVP not in self._upstream_encodings:
                return "QEMU has not enabled xvp for this connection (power-control=off?)"
            if message.version != XVP_VERSION:
                return f"xvp version {message.version}; QEMU takes only {XVP_VERSION}"
        elif isinstance(message, QemuAudioEnable | QemuAudioDisable | QemuAudioSetFormat):
            if not self._qemu_audio or Encoding.QEMU_AUDIO not in self._upstream_encodings:
                return "QEMU has not acknowledged audio for this connection"
        elif isinstance(message, ExtendedClientCutText):
            return clipboard_refusal(message)
        return None

    def _infos(self) -> list[Any]:
        return self.gateway.console_infos()

    # --- consoles -------------------------------------------------------------------

    def _on_console_message(self, message: Any) -> None:
        if not self.consoles_enabled:
            raise RemoteProtocolError("console message from a viewer that never asked for them")
        console_id = message.console_id
        if console_id not in self.gateway.hubs and console_id not in self._open:
            if isinstance(message, ConsoleOpen):
                self._send(
                    ConsoleClosed(console_id, CloseReason.NO_SUCH_CONSOLE, "no such console")
                )
                return
            if isinstance(message, ConsoleWrite | ConsoleGrant | ConsoleBreak | ConsoleClose):
                # A console removed a moment ago may still get messages in flight.
                return
        if isinstance(message, ConsoleOpen):
            self._open_console(message)
            return
        console = self._open.get(console_id)
        if console is None:
            return  # closed by us (overrun, removal) while the viewer's message was in flight
        if isinstance(message, ConsoleClose):
            self._close_console(console_id, CloseReason.REQUESTED, "")
        elif isinstance(message, ConsoleGrant):
            console.served.grant(message)
            self._pump(console_id)
        elif isinstance(message, ConsoleWrite):
            self._console_input(console, message.data)
        elif isinstance(message, ConsoleBreak):
            console.hub.send_break()

    def _open_console(self, message: ConsoleOpen) -> None:
        console_id = message.console_id
        if console_id in self._open:
            self._close_console(console_id, CloseReason.ALREADY_OPEN, "opened twice")
            return
        hub = self.gateway.hubs[console_id]
        served = ServedConsole(message, hub.name, INPUT_WINDOW)
        offset, opened = served.begin(hub.stream_id, hub.oldest, hub.total)
        console = _OpenConsole(hub, offset, served)
        if message.history and message.resume == StreamPosition(hub.stream_id, offset):
            # The viewer has the output before its resume point: a mark at the
            # point itself (the host end attached again just as it left) is news to it.
            console.marked = offset - 1

        def listener(hub: ConsoleHub, console_id: int = console_id) -> None:
            if hub.connected is not console.attached:
                self._host_end_changed(console_id, console)
            else:
                self._pump(console_id)

        console.listener = listener
        self._open[console_id] = console
        hub.subscribe(listener, offset)
        self._send(opened)
        self._pump(console_id)

    def _host_end_changed(self, console_id: int, console: _OpenConsole) -> None:
        """The console's host end came up, or went down: then the viewer is told
        why with CLOSED (backend error), after the output that came before. The
        console stays listed and may be opened again at once: nothing reaches its
        history while the host end is down, and input is held until it is back."""
        hub = console.hub
        console.attached = hub.connected
        self._pump(console_id)
        if not hub.connected and self._open.get(console_id) is console:
            reason = hub.last_error or "unknown reason"
            log.info("viewer %s: console %s lost its host end (%s)", self.peer, hub.name, reason)
            self._close_console(
                console_id, CloseReason.BACKEND_ERROR, f"the console's host end went away: {reason}"
            )

    def _close_console(self, console_id: int, reason: CloseReason, text: str) -> None:
        console = self._open.pop(console_id, None)
        if console is not None:
            console.hub.unsubscribe(console.listener)
        self._send(ConsoleClosed(console_id, reason, text))

    def _pump(self, console_id: int) -> None:
        """Send what the hub has and the viewer's credit allows."""
        console = self._open.get(console_id)
        if console is None or self._write_paused or self._transport is None:
            return  # a viewer that is behind gets more when it catches up (resume_writing)
        if self._transport.is_closing():
            return
        hub = console.hub
        served = console.served
        server = self.server
        try:
            start = console.offset
            sendable = served.sendable
            while sendable > 0 and console.offset < hub.total and not self._write_paused:
                limit = sendable
                if console.marks:
                    mark = next((m for m in hub.reattached if m > console.marked), None)
                    if mark == console.offset:
                        console.marked = mark
                        self._send(ConsoleMark(console_id, MarkKind.REATTACHED, _REATTACHED))
                        continue
                    if mark is not None:
                        limit = min(limit, mark - console.offset)
                chunk = hub.read(console.offset, limit)
                server.send_raw(ConsoleData.encode(console_id, chunk))
                console.offset += len(chunk)
                sendable = served.sent(len(chunk))
                self._flush()  # may pause writing: the rest waits in the hub
            if console.offset != start:
                hub.advance(console.listener, console.offset)
            if console.offset < hub.oldest:
                raise Overrun(f"console {hub.name}: the viewer fell behind by more than the ring")
        except Overrun as err:
            log.warning("viewer %s: %s; console closed", self.peer, err)
            self._close_console(console_id, CloseReason.OVERRUN, str(err))

    def _console_input(self, console: _OpenConsole, data: bytes) -> None:
        credit_due = console.served.received(data)  # checks the viewer's credit
        console.hub.write(data)
        if not credit_due:
            return  # a keystroke costs no CREDIT message, and no drain watch
        console_id = console.hub.console_id

        def drained(_hub: ConsoleHub) -> None:
            if self._open.get(console_id) is not console:
                return  # closed (or reopened) meanwhile
            credit = console.served.drained()
            if credit is not None:
                self._send(credit)

        console.hub.when_drained(drained)

    # --- consoles appearing and going (called by the gateway) -----------------------

    def console_added(self, hub: ConsoleHub) -> None:
        if self.consoles_enabled:
            self._send(ConsoleAdded(self.gateway.info(hub)))

    def console_removed(self, hub: ConsoleHub) -> None:
        if hub.console_id in self._open:
            self._close_console(hub.console_id, CloseReason.REMOVED, "console removed")
        if self.consoles_enabled:
            self._send(ConsoleRemoved(hub.console_id))
