"""A GDBus client of the service, run by Debian's system Python (python3-gi).

Not a test module: tests/dbus/test_gio.py runs it as `/usr/bin/python3
gio_client.py BUS_ADDRESS` and reads what it saw, one JSON object a line on
stdout. It holds a `Gio.DBusObjectManagerClient` on the service's root and
reports each object added or removed (with its interfaces and the properties
GDBus cached from the signals); when a console named serial0 appears it opens
it with `Console.Open`, receiving the fd through a `Gio.UnixFDList`, and
reports what it read from it. It exits 0 once the guest it saw is removed
again, 1 on a timeout. It imports nothing of the project: it is the other side.
"""

import json
import os
import select
import sys
import time

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "org.resourced.Resourced1"
ROOT = "/org/resourced/Resourced1"
CONSOLE = "org.resourced.Resourced1.Console"
TIMEOUT = 60
WANTED = b"resourced demo guest"


def report(**fields):
    print(json.dumps(fields), flush=True)


def describe(obj):
    interfaces = {}
    for proxy in obj.get_interfaces():
        name = proxy.get_interface_name()
        interfaces[name] = {
            prop: proxy.get_cached_property(prop).unpack()
            for prop in proxy.get_cached_property_names()
        }
    return interfaces


def read_banner(fd):
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    while WANTED not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
    return seen


def main():
    (address,) = sys.argv[1:]
    connection = Gio.DBusConnection.new_for_address_sync(
        address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None,
        None,
    )
    manager = Gio.DBusObjectManagerClient.new_sync(
        connection, Gio.DBusObjectManagerClientFlags.NONE, BUS_NAME, ROOT, None, None, None
    )
    loop = GLib.MainLoop()
    state = {"guest": None, "status": 1}

    def added(_manager, obj):
        path = obj.get_object_path()
        interfaces = describe(obj)
        report(event="object-added", path=path, interfaces=interfaces)
        if "org.resourced.Resourced1.Guest" in interfaces:
            state["guest"] = path
        console = obj.get_interface(CONSOLE)
        if console is not None and console.get_cached_property("Name").unpack() == "serial0":
            result, fds = console.call_with_unix_fd_list_sync(
                "Open",
                GLib.Variant("(a{sv})", ({},)),
                Gio.DBusCallFlags.NONE,
                TIMEOUT * 1000,
                None,
                None,
            )
            (index,) = result.unpack()
            fd = fds.get(index)  # a duplicate of the fd the message carried: ours to close
            try:
                seen = read_banner(fd)
            finally:
                os.close(fd)
            report(event="opened", path=path, fds=fds.get_length(), read=seen.decode("latin-1"))

    def removed(_manager, obj):
        path = obj.get_object_path()
        report(event="object-removed", path=path)
        if path == state["guest"]:
            state["status"] = 0
            loop.quit()

    def timed_out():
        report(event="timeout")
        loop.quit()
        return False

    manager.connect("object-added", added)
    manager.connect("object-removed", removed)
    report(
        event="ready",
        owner=manager.get_name_owner(),
        objects=sorted(o.get_object_path() for o in manager.get_objects()),
    )
    GLib.timeout_add_seconds(TIMEOUT, timed_out)
    loop.run()
    return state["status"]


if __name__ == "__main__":
    sys.exit(main())
