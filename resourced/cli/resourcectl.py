"""`resourcectl`: the service's command line (a D-Bus client like any other app).

    resourcectl list [--json]
    resourcectl status GUEST [--json]
    resourcectl add NAME ADDRESS [--password-file F] [--tls auto|require|never] [--persist]
    resourcectl remove GUEST
    resourcectl libvirt add|remove URI
    resourcectl connect GUEST | disconnect GUEST
    resourcectl console GUEST [CONSOLE] [--no-history] [--read-only] [--force]
    resourcectl pty GUEST CONSOLE [--idle-timeout S]
    resourcectl history GUEST CONSOLE [--max-bytes N]
    resourcectl write GUEST CONSOLE TEXT
    resourcectl break GUEST CONSOLE
    resourcectl audio GUEST on|off|volume N|mute|unmute|record FILE|stop-recording|status

`console` is a raw terminal on the fd that `Console.Open` returns: `Ctrl-]`
leaves, as in `virsh console`. Each named error of the service prints its
sentence and exits with its own status (see `EXIT_CODES`), so scripts can tell
"no such guest" from "not connected". `audio ... volume N` is linear amplitude
(0.0-1.0, or 0%-100%), as the Audio interface's Volume property.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import termios
import tty
from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from resourced.cli import describe_os_error, run_command

BUS_NAME = "org.resourced.Resourced1"
ROOT = "/org/resourced/Resourced1"
MANAGER = f"{BUS_NAME}.Manager"
GUEST = f"{BUS_NAME}.Guest"
CONSOLE = f"{BUS_NAME}.Console"
AUDIO = f"{BUS_NAME}.Audio"
PROPERTIES = "org.freedesktop.DBus.Properties"
ESCAPE = b"\x1d"  # Ctrl-]

#: Exit status per error: 0 is success, 1 any other failure.
EXIT_CODES = {
    "InvalidArgument": 2,
    "NoSuchGuest": 3,
    "NoSuchConsole": 4,
    "NotConnected": 5,
    "Busy": 6,
    "AccessDenied": 7,
    "AuthenticationFailed": 8,
    "Unsupported": 9,
    "Failed": 1,
}
#: Said when a guest has no consoles at all.
NO_CONSOLES_HINT = (
    " (its VNC server has no console extension: put the resourced gateway in front of it, "
    "or reach it through libvirt)"
)
#: The service cannot be reached (no bus, or it cannot be activated).
EXIT_UNAVAILABLE = 69


class CliError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """A thin client of the service's objects."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            name = reply.error_name or "?"
            text = reply.body[0] if reply.body else name
            short = name.rsplit(".", 1)[-1]
            if name.startswith(BUS_NAME + ".Error."):
                raise CliError(text, EXIT_CODES.get(short, 1))
            if name == "org.freedesktop.DBus.Error.ServiceUnknown":
                raise CliError(f"the resourced service cannot be started: {text}", EXIT_UNAVAILABLE)
            raise CliError(f"{name}: {text}")
        return list(reply.body)

    async def objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        (managed,) = await self.call(
            ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
        )
        return {
            path: {iface: {k: v.value for k, v in props.items()} for iface, props in ifaces.items()}
            for path, ifaces in managed.items()
        }

    async def guest(self, name: str) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
        """The guest's path, properties and its consoles (path -> properties)."""
        objects = await self.objects()
        for path, ifaces in objects.items():
            props = ifaces.get(GUEST)
            if props is not None and props["Name"] == name:
                consoles = {p: objects[p][CONSOLE] for p in props["Consoles"] if p in objects}
                return path, props, consoles
        raise CliError(f"no guest named {name!r} (see resourcectl list)", EXIT_CODES["NoSuchGuest"])

    async def console(self, guest: str, name: str | None) -> str:
        path, _, consoles = await self.guest(guest)
        if not consoles:
            # Consoles are published once the guest has been reached: reach it.
            await self.call(path, GUEST, "Connect", "a{sv}", [{}])
            path, _, consoles = await self.guest(guest)
        if name is None:
            serial = [p for p, c in consoles.items() if c["Kind"] == "serial"]
            choices = sorted(serial) or sorted(consoles)
            if not choices:
                raise CliError(
                    f"guest {guest} has no consoles{NO_CONSOLES_HINT}", EXIT_CODES["NoSuchConsole"]
                )
            return choices[0]
        for path, console in consoles.items():
            if console["Name"] == name:
                return path
        known = ", ".join(sorted(c["Name"] for c in consoles.values()))
        raise CliError(
            f"guest {guest} has no console {name!r}"
            + (f" (its consoles: {known})" if known else f": it has none{NO_CONSOLES_HINT}"),
            EXIT_CODES["NoSuchConsole"],
        )


def _options(**values: Any) -> dict[str, Variant]:
    signatures = {bool: "b", int: "u", str: "s"}
    return {
        k.replace("_", "-"): Variant(signatures[type(v)], v)
        for k, v in values.items()
        if v is not None
    }


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    objects = await client.objects()
    rows = []
    for path, ifaces in sorted(objects.items()):
        guest = ifaces.get(GUEST)
        if guest is None:
            continue
        names = [objects[p][CONSOLE]["Name"] for p in guest["Consoles"] if p in objects]
        rows.append(
            {
                "name": guest["Name"],
                "state": guest["State"],
                "source": guest["Source"],
                "address": guest["Address"],
                "consoles": names,
                "error": guest["LastError"],
                "path": path,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no guests (add one with: resourcectl add NAME ADDRESS)")
        return 0
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        consoles = ",".join(row["consoles"]) or "-"
        print(f"{row['name']:<{width}}  {row['state']:<12} {consoles:<24} {row['address']}")
    return 0


async def cmd_status(client: Client, args: argparse.Namespace) -> int:
    path, props, consoles = await client.guest(args.guest)
    info = {
        "name": props["Name"],
        "path": path,
        "state": props["State"],
        "last-error": props["LastError"],
        "source": props["Source"],
        "address": props["Address"],
        "uuid": props["Uuid"],
        "consoles": [
            {
                "name": c["Name"],
                "kind": c["Kind"],
                "source": c["Source"],
                "available": c["Available"],
                "open-count": c["OpenCount"],
            }
            for c in sorted(consoles.values(), key=lambda c: c["Name"])
        ],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{info['name']}: {info['state']}"
        + (f" ({info['last-error']})" if info["last-error"] else "")
    )
    print(f"  address: {info['address']} ({info['source']})")
    for c in info["consoles"]:
        state = "available" if c["available"] else "not attached"
        print(
            f"  console {c['name']} ({c['kind']}, {c['source']}): {state}, open {c['open-count']}x"
        )
    return 0


def _absolute(path: str | None) -> str | None:
    """The service resolves paths in its own directory: send absolute ones."""
    return os.path.abspath(path) if path else None


async def cmd_add(client: Client, args: argparse.Namespace) -> int:
    options = _options(
        password_file=_absolute(args.password_file),
        tls=args.tls,
        persist=args.persist or None,
    )
    (path,) = await client.call(
        ROOT, MANAGER, "AddGuest", "ssa{sv}", [args.name, args.address, options]
    )
    print(path)
    return 0


async def cmd_libvirt(client: Client, args: argparse.Namespace) -> int:
    if args.action == "add":
        (paths,) = await client.call(ROOT, MANAGER, "AddLibvirt", "sa{sv}", [args.uri, {}])
        for path in paths:
            print(path)
    else:
        await client.call(ROOT, MANAGER, "RemoveLibvirt", "sa{sv}", [args.uri, {}])
    return 0


async def cmd_remove(client: Client, args: argparse.Namespace) -> int:
    path, _, _ = await client.guest(args.guest)
    await client.call(ROOT, MANAGER, "RemoveGuest", "oa{sv}", [path, {}])
    return 0


async def cmd_connect(client: Client, args: argparse.Namespace) -> int:
    path, _, _ = await client.guest(args.guest)
    await client.call(
        path, GUEST, "Connect" if args.command == "connect" else "Disconnect", "a{sv}", [{}]
    )
    return 0


async def cmd_pty(client: Client, args: argparse.Namespace) -> int:
    path = await client.console(args.guest, args.console)
    options = _options(idle_timeout=args.idle_timeout, history=not args.no_history)
    (pty_path,) = await client.call(path, CONSOLE, "OpenPty", "a{sv}", [options])
    print(pty_path)
    return 0


async def cmd_history(client: Client, args: argparse.Namespace) -> int:
    path = await client.console(args.guest, args.console)
    (data,) = await client.call(
        path, CONSOLE, "ReadHistory", "a{sv}", [_options(max_bytes=args.max_bytes)]
    )
    sys.stdout.buffer.write(bytes(data))
    sys.stdout.flush()
    return 0


async def cmd_write(client: Client, args: argparse.Namespace) -> int:
    path = await client.console(args.guest, args.console)
    # The console gets the argument's bytes as the shell passed them, whatever
    # the locale (os.fsencode undoes the decoding of bytes that were not UTF-8).
    data = os.fsencode(args.text) + (b"" if args.no_newline else b"\r")
    await client.call(path, CONSOLE, "Write", "aya{sv}", [data, {}])
    return 0


async def cmd_break(client: Client, args: argparse.Namespace) -> int:
    path = await client.console(args.guest, args.console)
    await client.call(path, CONSOLE, "SendBreak", "a{sv}", [{}])
    return 0


async def cmd_console(client: Client, args: argparse.Namespace) -> int:
    path = await client.console(args.guest, args.console)
    options = _options(
        history=not args.no_history, read_only=args.read_only or None, force=args.force or None
    )
    reply = await client.bus.call(
        Message(
            destination=BUS_NAME,
            path=path,
            interface=CONSOLE,
            member="Open",
            signature="a{sv}",
            body=[options],
        )
    )
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        await client.call(path, CONSOLE, "Open", "a{sv}", [options])  # raises the named error
    fd = reply.unix_fds[reply.body[0]]
    sock = socket.socket(fileno=fd)
    name = path.rsplit("/", 1)[-1]
    if sys.stdin is None or sys.stdout is None:
        sock.close()
        raise CliError("console needs a standard input and output (one of them is closed)")
    if sys.stdin.isatty():
        print(f"Connected to {args.guest} console {name}. Escape character is ^]", file=sys.stderr)
    return await _terminal(sock)


async def _terminal(sock: socket.socket) -> int:
    """Copy stdin to the socket and the socket to stdout until Ctrl-] or EOF."""
    loop = asyncio.get_running_loop()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    done: asyncio.Future[int] = loop.create_future()
    sock.setblocking(False)

    def finish(status: int) -> None:
        if not done.done():
            done.set_result(status)

    def from_stdin() -> bool:
        """Copy one read of stdin; whether there may be more."""
        try:
            data = os.read(stdin, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(stdin)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            return False
        if saved is not None and ESCAPE in data:
            data = data.split(ESCAPE, 1)[0]
            if data:
                with contextlib.suppress(OSError):
                    sock.sendall(data)
            finish(0)
            return False
        try:
            sock.setblocking(True)
            sock.sendall(data)
        except OSError:
            finish(0)
            return False
        finally:
            sock.setblocking(False)
        return True

    def copy_file() -> None:
        if not done.done() and from_stdin():
            loop.call_soon(copy_file)

    def from_console() -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            finish(0)
            return
        os.write(stdout, data)

    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        try:
            loop.add_reader(stdin, from_stdin)
        except PermissionError:
            # A regular file or /dev/null (`console GUEST < FILE`): epoll refuses
            # it, and it never blocks, so it is read in turns with the console.
            loop.call_soon(copy_file)
        loop.add_reader(sock.fileno(), from_console)
        return await done
    finally:
        loop.remove_reader(sock.fileno())
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(stdin)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            print("", file=sys.stderr)
        sock.close()


def _volume(text: str) -> float:
    """A volume as linear amplitude: 0.0-1.0, or a percentage ("50%")."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a volume: {text!r} (0.0-1.0 or 0%-100%)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"volume {text} is outside 0.0-1.0 (0%-100%)")
    return value


async def cmd_audio(client: Client, args: argparse.Namespace) -> int:
    path, _, _ = await client.guest(args.guest)
    action = args.action

    async def set_property(name: str, value: Variant) -> None:
        await client.call(path, PROPERTIES, "Set", "ssv", [AUDIO, name, value])

    if action == "on":
        await client.call(path, AUDIO, "Start", "a{sv}", [{}])
    elif action == "off":
        await client.call(path, AUDIO, "Stop", "a{sv}", [{}])
    elif action == "volume":
        await set_property("Volume", Variant("d", args.volume))
    elif action in ("mute", "unmute"):
        await set_property("Muted", Variant("b", action == "mute"))
    elif action == "record":
        if not args.file:
            raise CliError("give the WAV file to record to", EXIT_CODES["InvalidArgument"])
        target = _absolute(args.file)
        await client.call(path, AUDIO, "Record", "sa{sv}", [target, {}])
        print(target)
    elif action == "stop-recording":
        (written,) = await client.call(path, AUDIO, "StopRecording", "a{sv}", [{}])
        if written:
            print(written)
    else:
        (props,) = await client.call(path, PROPERTIES, "GetAll", "s", [AUDIO])
        values = {k: v.value for k, v in props.items() if k != "Interfaces"}
        if args.json:
            print(json.dumps(values, indent=2))
            return 0
        state = "playing" if values["Playing"] else "not playing"
        if not values["Available"]:
            state += " (its VNC server offers no audio, or it was not reached yet)"
        print(f"{args.guest}: {state}")
        print(f"  volume {values['Volume']:.2f} (linear)" + (", muted" if values["Muted"] else ""))
        print(f"  format {values['Format']}")
        print(f"  latency {values['LatencyUsec'] / 1000:.1f} ms, underruns {values['Underruns']}")
        if values["Recording"]:
            print(f"  recording to {values['Recording']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resourcectl", description="Drive the resourced service.")
    parser.add_argument("--bus", help="bus address (default: the session bus)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("list", help="the guests, their state and consoles")
    p.add_argument("--json", action="store_true")
    p = commands.add_parser("status", help="one guest in detail")
    p.add_argument("guest")
    p.add_argument("--json", action="store_true")
    p = commands.add_parser("add", help="add a guest reached at a VNC address")
    p.add_argument("name")
    p.add_argument("address", help="unix:PATH, HOST:DISPLAY, HOST::PORT or vnc://HOST:PORT")
    p.add_argument("--password-file")
    p.add_argument("--tls", choices=("auto", "require", "never"))
    p.add_argument("--persist", action="store_true", help="remember it across restarts")
    p = commands.add_parser("libvirt", help="follow (add) or stop following (remove) a libvirt URI")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("uri", help="qemu:///system, qemu:///session, qemu+ssh://host/system...")
    p = commands.add_parser("remove", help="forget a guest")
    p.add_argument("guest")
    for name in ("connect", "disconnect"):
        p = commands.add_parser(name, help=f"{name} the guest's VNC connection now")
        p.add_argument("guest")
    p = commands.add_parser("console", help="a raw terminal on a console (Ctrl-] leaves)")
    p.add_argument("guest")
    p.add_argument("console", nargs="?", help="default: the first serial console")
    p.add_argument("--no-history", action="store_true")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--force", action="store_true", help="close everyone else's opens")
    p = commands.add_parser("pty", help="print a PTY path carrying a console")
    p.add_argument("guest")
    p.add_argument("console")
    p.add_argument("--idle-timeout", type=int, help="seconds unused before it goes (0 = never)")
    p.add_argument("--no-history", action="store_true")
    p = commands.add_parser("history", help="print a console's recent output")
    p.add_argument("guest")
    p.add_argument("console")
    p.add_argument("--max-bytes", type=int)
    p = commands.add_parser("write", help="type TEXT (and Enter) on a console")
    p.add_argument("guest")
    p.add_argument("console")
    p.add_argument("text")
    p.add_argument("-n", "--no-newline", action="store_true")
    p = commands.add_parser("break", help="send a serial break")
    p.add_argument("guest")
    p.add_argument("console")
    p = commands.add_parser("audio", help="the guest's sound: on, off, volume, mute, record...")
    p.add_argument("guest", metavar="GUEST")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("on", help="play the guest's sound (connects if need be)")
    actions.add_parser("off", help="stop playing it")
    a = actions.add_parser("volume", help="set the volume: linear amplitude 0.0-1.0 or 0%%-100%%")
    a.add_argument("volume", type=_volume)
    actions.add_parser("mute")
    actions.add_parser("unmute")
    a = actions.add_parser("record", help="record the guest's sound to a WAV file")
    a.add_argument("file")
    actions.add_parser("stop-recording", help="end the recording (prints the file)")
    a = actions.add_parser("status", help="playing, volume, format, latency, underruns")
    a.add_argument("--json", action="store_true")
    return parser


COMMANDS = {
    "list": cmd_list,
    "status": cmd_status,
    "add": cmd_add,
    "remove": cmd_remove,
    "libvirt": cmd_libvirt,
    "connect": cmd_connect,
    "disconnect": cmd_connect,
    "console": cmd_console,
    "pty": cmd_pty,
    "history": cmd_history,
    "write": cmd_write,
    "break": cmd_break,
    "audio": cmd_audio,
}


def _check_text(args: argparse.Namespace) -> None:
    """Refuse an argument D-Bus cannot carry: its strings are UTF-8, and a name or
    path from a terminal or file system in another encoding is not."""
    for name, value in vars(args).items():
        if name == "text" or not isinstance(value, str):
            continue  # TEXT goes as bytes (cmd_write)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CliError(
                f"{os.fsencode(value)!r} is not UTF-8 text, and D-Bus carries only UTF-8",
                EXIT_CODES["InvalidArgument"],
            ) from None


async def _main(args: argparse.Namespace) -> int:
    _check_text(args)
    try:
        bus = await MessageBus(
            bus_address=args.bus, bus_type=BusType.SESSION, negotiate_unix_fd=True
        ).connect()
    except Exception as err:
        # Name the bus tried: "[Errno 2] No such file or directory" alone does not
        # say that the address (from --bus or the environment) is the stale one.
        address = args.bus or os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        where = f"the bus at {address}" if address else "the session bus"
        reason = describe_os_error(err) if isinstance(err, OSError) else str(err)
        raise CliError(f"cannot reach {where}: {reason}", EXIT_UNAVAILABLE) from err
    try:
        return await COMMANDS[args.command](Client(bus), args)
    except DBusError as err:
        raise CliError(str(err)) from err
    finally:
        bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            return asyncio.run(_main(args))
        except CliError as err:
            print(f"resourcectl: {err}", file=sys.stderr)
            return err.status
        except BrokenPipeError:
            return 1

    # Failures of the surroundings (a closed or unusable terminal) in one line;
    # a traceback only for a bug, as every resourced command.
    return run_command("resourcectl", body)


if __name__ == "__main__":
    sys.exit(main())
