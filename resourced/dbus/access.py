"""Who may call the service: only its own user, checked on every call.

dbus-fast does not tell a method who called it, so a message handler sees
every call to the service first. It asks the bus for the sender's Unix uid
(`org.freedesktop.DBus.GetConnectionCredentials`), cached per unique name and
forgotten when the name goes away (`NameOwnerChanged`). A call from our uid
goes on to the exported objects; any other gets `AccessDenied`. While the uid
is being looked up, the call waits and is then dispatched as if just received.

The same handler answers calls that name one of our methods with the wrong
argument types with `InvalidArgument`, and calls to a guest or console path
that does not exist with `NoSuchGuest`/`NoSuchConsole` (dbus-fast would say
UnknownMethod to both), and notes the time of each call for the idle exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping

from dbus_fast import Message, MessageType

from resourced.dbus.bus import ServiceBus
from resourced.dbus.errors import (
    ACCESS_DENIED,
    INVALID_ARGUMENT,
    NO_SUCH_CONSOLE,
    NO_SUCH_GUEST,
)

log = logging.getLogger(__name__)

_DBUS = "org.freedesktop.DBus"


class CallerGuard:
    """The message handler described in the module docstring."""

    def __init__(
        self, bus: ServiceBus, root: str, signatures: Mapping[tuple[str, str], str]
    ) -> None:
        self.bus = bus
        self.root = root
        #: (interface, member) -> the input signature of our methods.
        self.signatures = signatures
        self.uid = os.getuid()
        self._uids: dict[str, int | None] = {}
        self._pending: dict[str, list[Message]] = {}
        self.last_call = time.monotonic()

    async def install(self) -> None:
        """Guard every message from now on (before the first await: a call must
        not slip past while the match rule is being added)."""
        self.bus.add_message_handler(self.handle)
        await self.bus.call(
            Message(
                destination=_DBUS,
                path="/org/freedesktop/DBus",
                interface=_DBUS,
                member="AddMatch",
                signature="s",
                body=[f"type='signal',sender='{_DBUS}',member='NameOwnerChanged'"],
            )
        )

    def _ours(self, msg: Message) -> bool:
        path = msg.path or ""
        return path == self.root or path.startswith(self.root + "/") or path == "/"

    def handle(self, msg: Message) -> bool | Message:
        if msg.message_type is MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == _DBUS and not msg.body[2]:
                self._uids.pop(msg.body[0], None)
            return False
        if msg.message_type is not MessageType.METHOD_CALL or not self._ours(msg):
            return False
        self.last_call = time.monotonic()
        sender = msg.sender or ""
        if sender in self._uids:
            return self._check(msg, self._uids[sender])
        waiting = self._pending.get(sender)
        if waiting is not None:
            waiting.append(msg)
            return True
        self._pending[sender] = [msg]
        asyncio.get_running_loop().create_task(self._look_up(sender))
        return True

    def _check(self, msg: Message, uid: int | None) -> bool | Message:
        if uid != self.uid:
            who = "an unknown user" if uid is None else f"uid {uid}"
            log.warning("refused a call to %s.%s from %s", msg.interface, msg.member, who)
            return Message.new_error(
                msg,
                ACCESS_DENIED,
                f"this service belongs to uid {self.uid}; {who} may not use it",
            )
        path = msg.path or ""
        if (
            path.startswith(self.root + "/")
            and path not in self.bus._path_exports
            and msg.interface != "org.freedesktop.DBus.Introspectable"
        ):
            if "/consoles/" in path:
                name, text = (
                    NO_SUCH_CONSOLE,
                    f"no console at {path} (it went away, or never was)",
                )
            else:
                name, text = NO_SUCH_GUEST, f"no guest at {path}"
            return Message.new_error(msg, name, text)
        expected = self.signatures.get((msg.interface or "", msg.member or ""))
        if expected is not None and expected != msg.signature:
            return Message.new_error(
                msg,
                INVALID_ARGUMENT,
                f"{msg.member} takes arguments of type '{expected}', not '{msg.signature}'",
            )
        return False

    async def _look_up(self, sender: str) -> None:
        uid: int | None = None
        try:
            reply = await self.bus.call(
                Message(
                    destination=_DBUS,
                    path="/org/freedesktop/DBus",
                    interface=_DBUS,
                    member="GetConnectionCredentials",
                    signature="s",
                    body=[sender],
                )
            )
            if reply is not None and reply.message_type is MessageType.METHOD_RETURN:
                found = reply.body[0].get("UnixUserID")
                uid = int(found.value) if found is not None else None
        except Exception as err:  # the caller is gone, or the bus refuses: deny
            log.info("cannot learn who %s is: %s", sender, err)
        self._uids[sender] = uid
        for msg in self._pending.pop(sender, []):
            # As if just received: this handler now knows the uid.
            self.bus._process_message(msg)
