"""The service's signals as a client subscribed on the private bus sees them, with
the demo guest (real QEMU) behind a real gateway: PropertiesChanged for State,
Consoles, OpenCount and Available as they change, and the ObjectManager's
InterfacesAdded/InterfacesRemoved sent from the manager's path with every
property of every interface added."""

from __future__ import annotations

import socket
from collections.abc import Callable

from dbus_fast import Message, MessageType

from tests.dbus.conftest import BUS_NAME, ROOT, GatewayGuest, Session, call, ok
from tests.dbus.signals import (
    OBJECT_MANAGER,
    PROPERTIES,
    Signals,
    call_bus,
    get_property,
    properties_changed,
    unwrap,
)

MANAGER = f"{BUS_NAME}.Manager"
GUEST = f"{BUS_NAME}.Guest"
AUDIO = f"{BUS_NAME}.Audio"
CONSOLE = f"{BUS_NAME}.Console"
DEMO = f"{ROOT}/guests/demo"
SERIAL = f"{DEMO}/consoles/serial0"
MONITOR = f"{DEMO}/consoles/monitor"


def is_interfaces_added(path: str) -> Callable[[Message], bool]:
    return lambda m: m.member == "InterfacesAdded" and m.body[0] == path


def is_interfaces_removed(path: str) -> Callable[[Message], bool]:
    return lambda m: m.member == "InterfacesRemoved" and m.body[0] == path


async def test_object_manager_signals_come_from_the_root_with_every_property(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    bus = await session.client()
    try:
        signals = await Signals(bus).start()
        (path,) = ok(
            await call(
                bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway_guest.address, {}]
            )
        )
        assert path == DEMO
        (owner,) = ok(await call_bus(bus, "GetNameOwner", "s", [BUS_NAME]))
        added = {}
        for object_path in (DEMO, SERIAL, MONITOR):
            added[object_path] = await signals.wait_for(
                is_interfaces_added(object_path), f"InterfacesAdded {object_path}"
            )
        # Every ObjectManager signal: from the manager's path, by the service.
        for message in signals.seen:
            if message.interface == OBJECT_MANAGER:
                assert message.path == ROOT, (message.path, message.member, message.body[0])
                assert message.sender == owner
                assert message.signature == "oa{sa{sv}}" or message.member != "InterfacesAdded"
        assert set(added[DEMO].body[1]) == {GUEST, AUDIO}
        assert set(added[SERIAL].body[1]) == {CONSOLE}
        # Each interface with all its properties, as GetAll names them; those
        # that cannot have changed since, with the same values.
        for object_path, message in added.items():
            for interface, properties in message.body[1].items():
                (everything,) = ok(
                    await call(bus, object_path, PROPERTIES, "GetAll", "s", [interface])
                )
                assert set(properties) == set(everything), (object_path, interface)
                for name in ("Name", "Kind", "Source", "Address", "Uuid", "Guest", "Interfaces"):
                    if name in everything:
                        assert unwrap(properties[name]) == unwrap(everything[name]), name
        serial = {k: unwrap(v) for k, v in added[SERIAL].body[1][CONSOLE].items()}
        assert serial["Name"] == "serial0"
        assert serial["Kind"] == "serial"
        assert serial["Guest"] == DEMO
        assert serial["OpenCount"] == 0
        guest = {k: unwrap(v) for k, v in added[DEMO].body[1][GUEST].items()}
        assert guest["Name"] == "demo"
        assert guest["Address"] == gateway_guest.address
        # The same objects in GetManagedObjects.
        (managed,) = ok(await call(bus, ROOT, OBJECT_MANAGER, "GetManagedObjects"))
        for object_path, message in added.items():
            assert set(message.body[1]) <= set(managed[object_path])

        # RemoveGuest: consoles and guest go, each announced from the root.
        mark = signals.mark()
        ok(await call(bus, ROOT, MANAGER, "RemoveGuest", "oa{sv}", [DEMO, {}]))
        removed = {}
        for object_path in (SERIAL, MONITOR, DEMO):
            removed[object_path] = await signals.wait_for(
                is_interfaces_removed(object_path), f"InterfacesRemoved {object_path}", mark
            )
        for message in removed.values():
            assert message.path == ROOT
            assert message.interface == OBJECT_MANAGER
            assert message.sender == owner
        assert sorted(removed[DEMO].body[1]) == sorted([GUEST, AUDIO])
        assert removed[SERIAL].body[1] == [CONSOLE]
        await signals.wait_property(ROOT, MANAGER, "Guests", [], since=mark)
        (managed,) = ok(await call(bus, ROOT, OBJECT_MANAGER, "GetManagedObjects"))
        assert not [p for p in managed if p.startswith(DEMO)]
    finally:
        bus.disconnect()


async def test_properties_changed_follow_the_guest_and_its_consoles(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    bus = await session.client()
    try:
        signals = await Signals(bus).start()
        ok(
            await call(
                bus, ROOT, MANAGER, "AddGuest", "ssa{sv}", ["demo", gateway_guest.address, {}]
            )
        )
        await signals.wait_property(ROOT, MANAGER, "Guests", [DEMO])
        # First connection (the service connects once to publish the consoles).
        await signals.wait_property(DEMO, GUEST, "State", "connected")
        states = signals.property_values(DEMO, GUEST, "State")
        assert states.index("connecting") < states.index("connected"), states
        await signals.wait_for(
            lambda m: (
                sorted(properties_changed(m, DEMO, GUEST).get("Consoles", [])) == [MONITOR, SERIAL]
            ),
            "Consoles lists both consoles",
        )
        await signals.wait_property(SERIAL, CONSOLE, "Available", True)
        await signals.wait_property(MONITOR, CONSOLE, "Available", True)

        # OpenCount as fds and PTYs come and go.
        mark = signals.mark()
        reply = await call(bus, SERIAL, CONSOLE, "Open", "a{sv}", [{}])
        app = socket.socket(fileno=reply.unix_fds[ok(reply)[0]])
        await signals.wait_property(SERIAL, CONSOLE, "OpenCount", 1, since=mark)
        (pty_path,) = ok(await call(bus, SERIAL, CONSOLE, "OpenPty", "a{sv}", [{}]))
        await signals.wait_property(SERIAL, CONSOLE, "OpenCount", 2, since=mark)
        app.close()
        await signals.wait_property(SERIAL, CONSOLE, "OpenCount", 1, since=mark)
        ok(await call(bus, SERIAL, CONSOLE, "ClosePty", "sa{sv}", [pty_path, {}]))
        await signals.wait_property(SERIAL, CONSOLE, "OpenCount", 0, since=mark)
        assert signals.property_values(SERIAL, CONSOLE, "OpenCount", mark) == [1, 2, 1, 0]
        assert await get_property(bus, SERIAL, CONSOLE, "OpenCount") == 0

        # Disconnect: State idle, the consoles unavailable; Connect: back.
        mark = signals.mark()
        ok(await call(bus, DEMO, GUEST, "Disconnect", "a{sv}", [{}]))
        await signals.wait_property(SERIAL, CONSOLE, "Available", False, since=mark)
        await signals.wait_property(DEMO, GUEST, "State", "idle", since=mark)
        assert await get_property(bus, SERIAL, CONSOLE, "Available") is False
        mark = signals.mark()
        ok(await call(bus, DEMO, GUEST, "Connect", "a{sv}", [{}]))
        await signals.wait_property(DEMO, GUEST, "State", "connected", since=mark)
        await signals.wait_property(SERIAL, CONSOLE, "Available", True, since=mark)
        states = signals.property_values(DEMO, GUEST, "State", mark)
        assert states[0] == "connecting", states
        # A property message carries what the property is now.
        for message in signals.seen:
            for name, value in properties_changed(message, DEMO, GUEST).items():
                assert isinstance(value, str | list), (name, value)
        assert not [m for m in signals.seen if m.message_type is not MessageType.SIGNAL]
    finally:
        bus.disconnect()
