"""What a D-Bus client of the service sees: every signal it sends, as it came.

`Signals` subscribes a dbus-fast client of the private bus (AddMatch on the
service's object namespace) and keeps each signal in order, so tests can wait
for one ("the guest's State became reconnecting") and look at what came before.
It is a plain recorder: it decides nothing about the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from tests.dbus.conftest import ROOT, TIMEOUT, call, ok

PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class Signals:
    """Every signal from below /org/resourced/Resourced1, oldest first."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.seen: list[Message] = []
        self._arrived = asyncio.Event()

    async def start(self) -> Signals:
        self.bus.add_message_handler(self._received)
        # AddMatch is the bus daemon's: the service need not run yet.
        rule = f"type='signal',path_namespace='{ROOT}'"
        ok(await call_bus(self.bus, "AddMatch", "s", [rule]))
        return self

    def _received(self, message: Message) -> None:
        if message.message_type is MessageType.SIGNAL and message.path.startswith(ROOT):
            self.seen.append(message)
            self._arrived.set()

    def mark(self) -> int:
        """A position: `wait_for(..., since=mark)` looks only at later signals."""
        return len(self.seen)

    async def wait_for(
        self, predicate: Callable[[Message], bool], what: str, since: int = 0
    ) -> Message:
        """The first signal at or after `since` for which `predicate` holds."""
        index = since
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    while index < len(self.seen):
                        if predicate(self.seen[index]):
                            return self.seen[index]
                        index += 1
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(
                f"no signal: {what}; seen since: {describe(self.seen[since:])}"
            ) from None

    async def wait_property(
        self,
        path: str,
        interface: str,
        name: str,
        value: Any,
        since: int = 0,
        approx: float | None = None,
    ) -> Message:
        """The first PropertiesChanged of `path` that sets `name` to `value`
        (a number within `approx` of it, if given)."""

        def matches(message: Message) -> bool:
            changed = properties_changed(message, path, interface)
            if name not in changed:
                return False
            if approx is not None:
                return bool(abs(changed[name] - value) <= approx)
            return bool(changed[name] == value)

        return await self.wait_for(matches, f"{path} {name} = {value!r}", since)

    def property_values(self, path: str, interface: str, name: str, since: int = 0) -> list[Any]:
        """Each value `name` was given in PropertiesChanged, in order."""
        values = []
        for message in self.seen[since:]:
            changed = properties_changed(message, path, interface)
            if name in changed:
                values.append(changed[name])
        return values


def properties_changed(message: Message, path: str, interface: str) -> dict[str, Any]:
    """The changed properties (as plain values) if `message` is a PropertiesChanged
    of `interface` on `path`, else {}."""
    if (
        message.member != "PropertiesChanged"
        or message.interface != PROPERTIES
        or message.path != path
        or message.body[0] != interface
    ):
        return {}
    return {name: unwrap(value) for name, value in message.body[1].items()}


def unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Variant) else value


def describe(messages: list[Message]) -> str:
    return "; ".join(
        f"{m.path} {m.member} {[unwrap(b) for b in m.body]!r}"[:300] for m in messages[-20:]
    )


async def call_bus(bus: MessageBus, member: str, signature: str, body: list[object]) -> Message:
    reply = await asyncio.wait_for(
        bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature=signature,
                body=body,
            )
        ),
        TIMEOUT,
    )
    assert reply is not None
    return reply


async def get_property(bus: MessageBus, path: str, interface: str, name: str) -> Any:
    (value,) = ok(await call(bus, path, PROPERTIES, "Get", "ss", [interface, name]))
    return unwrap(value)
