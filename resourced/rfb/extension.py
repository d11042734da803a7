"""The interface every RFB extension implements (QEMU audio, LED state, consoles...).

An extension names the pseudo-encodings it advertises and the QEMU server
submessages (message 255) it parses; the connection routes those to it and gives
it a way to send. This module holds the interface only, no extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from resourced.errors import LocalProtocolError

if TYPE_CHECKING:
    from resourced.rfb._buffer import Reader
    from resourced.rfb.connection import ClientConnection
    from resourced.rfb.messages import Rectangle


class Extension:
    """Base class: override what the extension uses."""

    #: Pseudo-encodings added to SetEncodings; their rectangles come to `on_rectangle`.
    pseudo_encodings: ClassVar[tuple[int, ...]] = ()
    #: Submessage numbers of QEMU server message 255 parsed by `parse_server_message`.
    server_subtypes: ClassVar[tuple[int, ...]] = ()

    _connection: ClientConnection | None = None

    def attach(self, connection: ClientConnection) -> None:
        if self._connection is not None:
            raise LocalProtocolError(f"{type(self).__name__} is already attached to a connection")
        self._connection = connection

    @property
    def connection(self) -> ClientConnection:
        if self._connection is None:
            raise LocalProtocolError(f"{type(self).__name__} is not attached to a connection")
        return self._connection

    def on_connected(self) -> None:
        """The handshake finished and SetEncodings has been queued."""

    def on_rectangle(self, rect: Rectangle) -> list[Any]:
        """A rectangle of one of our pseudo-encodings arrived; return events."""
        return []

    def parse_server_message(self, subtype: int, reader: Reader) -> list[Any]:
        """Parse the rest of a message 255 with one of our submessages; return events.

        The type and submessage bytes are consumed. Raise `NeedData` (via the
        reader) when the message is incomplete, without changing any state.
        """
        return []
