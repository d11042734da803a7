"""The service's bus connection: dbus-fast's asyncio `MessageBus`, made safe for a service.

Three things dbus-fast 5 does that a long-running service cannot live with
(each checked on this machine), mended here and nowhere else:

- Its writer treats a full socket send buffer (`BlockingIOError` from `send`)
  as fatal and drops the whole bus connection. `ServiceBus` installs a writer
  that waits for the socket to become writable instead.
- It never closes an fd it sends, and the kernel takes its own reference only
  when the message is written. `close_after_sending()` closes our copy once the
  reply carrying it is on the wire (closing earlier would send a closed fd;
  keeping it, the app would never see EOF).
- Its ObjectManager signals come from the child's path, not the manager's.
  `ServiceBus` sends none of its own; `resourced.dbus.objects` emits them from
  the root.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter

from resourced.dbus.errors import UNSUPPORTED

#: Replies with fds remembered in case the bus refuses them (oldest forgotten first).
_MAX_FD_REPLIES = 1024


class _PatientWriter(_MessageWriter):
    """dbus-fast's writer, except that a full socket buffer means "wait", not "die"."""

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        assert sock is not None  # set by connect()
        assert fd is not None
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    data, fds, future = self.messages.popleft()
                    self.buf, self.unix_fds, self.fut = memoryview(data), fds, future
                    self.offset = 0
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        rights = array.array("i", self.unix_fds)
                        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                        self.offset += sock.sendmsg([self.buf[self.offset :]], ancillary)
                        self.unix_fds = None  # they went with the first byte
                    else:
                        self.offset += sock.send(self.buf[self.offset :])
                except BlockingIOError:
                    # The bus is slow to read: go on when the socket is writable.
                    self.loop.add_writer(fd, self.write_callback)
                    return
                if self.offset < len(self.buf):
                    self.loop.add_writer(fd, self.write_callback)
                    return
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except Exception as err:
            if self.fut is not None and not self.fut.done():
                if self.bus._user_disconnect:
                    self.fut.set_result(None)
                else:
                    self.fut.set_exception(err)
            self.bus._finalize(err)


class ServiceBus(MessageBus):
    """A `MessageBus` for the service (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._close_after_sending: set[int] = set()
        #: Our replies that carry fds: serial -> (caller, the call's serial).
        self._fd_replies: dict[int, tuple[str, int]] = {}

    async def connect(self) -> ServiceBus:
        await super().connect()
        # Same state, patient write_callback (the writer was made by connect()).
        self._writer.__class__ = _PatientWriter
        self.add_message_handler(self._reply_refused)
        return self

    def _reply_refused(self, msg: Message) -> bool:
        """The bus refused a reply of ours that carried fds: the caller cannot take
        fds (it did not negotiate them) and would wait for ever. Tell it why."""
        if msg.message_type is not MessageType.ERROR or msg.sender != "org.freedesktop.DBus":
            return False
        call = self._fd_replies.pop(msg.reply_serial, None)
        if call is None:
            return False
        destination, serial = call
        self.send(
            Message(
                message_type=MessageType.ERROR,
                destination=destination,
                reply_serial=serial,
                error_name=UNSUPPORTED,
                signature="s",
                body=[
                    "this call returns a file descriptor, and your connection to the bus "
                    "did not negotiate fd passing; connect with fd support (or use OpenPty)"
                ],
            )
        )
        return True

    def close_after_sending(self, fd: int) -> None:
        """`fd` is ours, returned by a method: close it once the reply carrying it
        has been written (or has failed to be)."""
        self._close_after_sending.add(fd)

    def send(self, msg: Message) -> asyncio.Future[Any]:  # type: ignore[override]
        if not self.connected:
            # The bus is gone (we are stopping, and withdraw our objects): nobody
            # can read it, and dbus-fast would raise from its closed socket.
            for fd in msg.unix_fds:
                if fd in self._close_after_sending:
                    self._close_after_sending.discard(fd)
                    with contextlib.suppress(OSError):
                        os.close(fd)
            dropped: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            dropped.set_result(None)
            return dropped
        future: asyncio.Future[Any] = super().send(msg)
        if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN and msg.destination:
            if len(self._fd_replies) >= _MAX_FD_REPLIES:
                self._fd_replies.pop(next(iter(self._fd_replies)))
            self._fd_replies[msg.serial] = (msg.destination, msg.reply_serial)
        if msg.unix_fds and self._close_after_sending:
            owned = [fd for fd in msg.unix_fds if fd in self._close_after_sending]
            self._close_after_sending.difference_update(owned)
            if owned:

                def close(_future: asyncio.Future[Any]) -> None:
                    for fd in owned:
                        with contextlib.suppress(OSError):
                            os.close(fd)

                future.add_done_callback(close)
        return future

    # dbus-fast's own InterfacesAdded/Removed come from the wrong path: none here.
    def _emit_interface_added(self, path: str, interface: Any) -> None:
        pass

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        pass
