"""A GLib/GDBus app against the service: Debian's system Python with python3-gi
runs tests/dbus/gio_client.py (a `Gio.DBusObjectManagerClient` on the private
bus) while this test adds and removes the demo guest (real QEMU behind a real
gateway). GDBus sees the guest and its consoles appear and go (which it only
does for ObjectManager signals sent from the manager's path), and receives the
fd of Console.Open and reads the guest's banner from it."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from tests.dbus.conftest import BUS_NAME, ROOT, TIMEOUT, GatewayGuest, Session

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).with_name("gio_client.py")
MANAGER = f"{BUS_NAME}.Manager"
DEMO = f"{ROOT}/guests/demo"
SERIAL = f"{DEMO}/consoles/serial0"
MONITOR = f"{DEMO}/consoles/monitor"


async def test_gdbus_object_manager_client_and_fd(
    session: Session, gateway_guest: GatewayGuest
) -> None:
    assert shutil.which(SYSTEM_PYTHON), "Debian's python3 (with python3-gi) is not installed"
    # The service runs before the client starts, so the objects reach it through
    # InterfacesAdded rather than a first GetManagedObjects.
    version = session.busctl("get-property", BUS_NAME, ROOT, MANAGER, "Version")
    assert version.returncode == 0, version.stderr
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON,
        str(SCRIPT),
        session.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=session.env,
    )
    events: list[dict[str, Any]] = []
    assert process.stdout is not None
    assert process.stderr is not None

    async def next_event(kind: str, path: str | None = None) -> dict[str, Any]:
        for event in events:
            if event["event"] == kind and path in (None, event.get("path")):
                return event
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = await process.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    error = await process.stderr.read()  # type: ignore[union-attr]
                    raise AssertionError(f"gio_client ended: {events!r}\n{error.decode()}")
                event = json.loads(line)
                events.append(event)
                if event["event"] == kind and path in (None, event.get("path")):
                    return event

    try:
        ready = await next_event("ready")
        assert ready["owner"], ready  # GDBus found the service's unique name
        assert ready["objects"] == [], ready
        added = session.busctl(
            "call",
            BUS_NAME,
            ROOT,
            MANAGER,
            "AddGuest",
            "ssa{sv}",
            "demo",
            gateway_guest.address,
            "0",
        )
        assert added.returncode == 0, added.stderr
        guest = await next_event("object-added", DEMO)
        assert guest["interfaces"][f"{BUS_NAME}.Guest"]["Name"] == "demo"
        assert guest["interfaces"][f"{BUS_NAME}.Guest"]["Address"] == gateway_guest.address
        assert f"{BUS_NAME}.Audio" in guest["interfaces"]
        for path, name in ((SERIAL, "serial0"), (MONITOR, "monitor")):
            console = await next_event("object-added", path)
            properties = console["interfaces"][f"{BUS_NAME}.Console"]
            assert properties["Name"] == name
            assert properties["Guest"] == DEMO
        opened = await next_event("opened", SERIAL)
        assert opened["fds"] == 1
        assert "resourced demo guest" in opened["read"], opened

        removed = session.busctl(
            "call", BUS_NAME, ROOT, MANAGER, "RemoveGuest", "oa{sv}", DEMO, "0"
        )
        assert removed.returncode == 0, removed.stderr
        for path in (SERIAL, MONITOR, DEMO):
            await next_event("object-removed", path)
        async with asyncio.timeout(TIMEOUT):
            assert await process.wait() == 0, events
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
