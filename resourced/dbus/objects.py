"""The D-Bus face of the broker: objects, interfaces, properties and signals.

Thin by design: each method parses its `a{sv}` options, calls the broker
(`resourced.broker`) and turns what it returns into D-Bus types; domain errors
become named D-Bus errors (`resourced.dbus.errors.translated`). Objects:

- `/org/resourced/Resourced1`: `org.resourced.Resourced1.Manager` and
  `org.freedesktop.DBus.ObjectManager` (whose `InterfacesAdded`/`Removed` are
  sent from here, the manager's path, by `Face`).
- `/org/resourced/Resourced1/guests/NAME`: `...Guest` and `...Audio`.
- `.../guests/NAME/consoles/CONSOLE`: `...Console`.

Every object has an `Interfaces` property listing its interfaces (as QEMU's
D-Bus display does), so clients can check capabilities without introspection.
"""

# No `from __future__ import annotations`: dbus-fast reads the signatures from
# the annotations at class creation.

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Annotated, Any

from dbus_fast import DBusError, Message, Variant
from dbus_fast import introspection as intr
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import (
    ServiceInterface,
    dbus_method,
    dbus_property,
)

from resourced import __version__
from resourced.broker.audio import GuestAudio
from resourced.broker.broker import Broker, BrokerObserver, VncOptions
from resourced.broker.guest import BrokerConsole, Guest, GuestObserver
from resourced.cli import read_password_file
from resourced.dbus.bus import ServiceBus
from resourced.dbus.errors import BUS_NAME, INVALID_ARGUMENT, NO_SUCH_GUEST, translated
from resourced.dbus.options import Option, parse_options
from resourced.errors import ConfigurationError
from resourced.rfb.security import TlsMode

log = logging.getLogger(__name__)

ROOT = "/org/resourced/Resourced1"
MANAGER = f"{BUS_NAME}.Manager"
GUEST = f"{BUS_NAME}.Guest"
AUDIO = f"{BUS_NAME}.Audio"
CONSOLE = f"{BUS_NAME}.Console"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"

Str = Annotated[str, DBusSignature("s")]
Bool = Annotated[bool, DBusSignature("b")]
UInt32 = Annotated[int, DBusSignature("u")]
UInt64 = Annotated[int, DBusSignature("t")]
Double = Annotated[float, DBusSignature("d")]
Path = Annotated[str, DBusSignature("o")]
Paths = Annotated[list[str], DBusSignature("ao")]
Strs = Annotated[list[str], DBusSignature("as")]
Bytes = Annotated[bytes, DBusSignature("ay")]
Fd = Annotated[int, DBusSignature("h")]
Options = Annotated[dict[str, Variant], DBusSignature("a{sv}")]
InterfacesAndProperties = Annotated[dict[str, dict[str, Variant]], DBusSignature("a{sa{sv}}")]

#: Console kinds as the `Kind` property spells them.
KINDS = ("serial", "virtio-console", "parallel", "monitor", "channel", "other")

ADD_GUEST_OPTIONS = {
    "password": Option("s"),
    "password-file": Option("s"),
    "tls": Option("s", "auto"),
    "ca-cert": Option("s"),
    "client-cert": Option("s"),
    "client-key": Option("s"),
    "tls-server-name": Option("s"),
    "persist": Option("b", False),
}
OPEN_OPTIONS = {
    "history": Option("b", True),
    "read-only": Option("b", False),
    "exclusive": Option("b", False),
    "force": Option("b", False),
}
OPEN_PTY_OPTIONS = {**OPEN_OPTIONS, "idle-timeout": Option("u", 60)}
READ_HISTORY_OPTIONS = {"max-bytes": Option("u", 64 * 1024)}
#: Most bytes one `Write` or `ReadHistory` carries: a method call is no bulk channel.
MAX_ONE_SHOT = 1024 * 1024


def escape_path_element(name: str) -> str:
    """`name` as one object path element: [A-Za-z0-9] kept, every other byte `_xx`."""
    if not name:
        return "_"
    out = []
    for byte in name.encode():
        char = chr(byte)
        if char.isascii() and char.isalnum():
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


EMITS_CHANGED = "org.freedesktop.DBus.Property.EmitsChangedSignal"


class _Interface(ServiceInterface):
    """A ServiceInterface whose introspection marks its never-changing properties
    `const` (dbus-fast has no way to say so in the decorator)."""

    #: Properties whose value never changes for the object's lifetime.
    CONST: tuple[str, ...] = ("Interfaces",)

    def introspect(self) -> intr.Interface:
        description = super().introspect()
        for prop in description.properties:
            if prop.name in self.CONST:
                prop.annotations[EMITS_CHANGED] = "const"
        return description


class ManagerInterface(_Interface):
    """`org.resourced.Resourced1.Manager`: the guests, adding and removing them."""

    CONST = ("Version", "Interfaces")

    def __init__(self, face: "Face") -> None:
        super().__init__(MANAGER)
        self.face = face

    @dbus_method()
    @translated
    def AddGuest(self, name: Str, address: Str, options: Options) -> Path:
        """Add a guest reached at a VNC address; its object path.

        Options: password, password-file, tls (auto|require|never), ca-cert,
        client-cert, client-key, tls-server-name (all s), persist (b).
        """
        values = parse_options(options, ADD_GUEST_OPTIONS, "AddGuest")
        if values["persist"] and values["password"] is not None:
            raise DBusError(
                INVALID_ARGUMENT,
                "persist keeps no plain-text password: give password-file instead",
            )
        vnc = vnc_options(values)
        guest = self.face.broker.add_vnc_guest(name, address, vnc, ephemeral=not values["persist"])
        if values["persist"]:
            self.face.persist_guest(name, address, values)
        self.face.discover(guest)
        return self.face.guest_path(guest)

    @dbus_method()
    @translated
    async def AddLibvirt(self, uri: Str, options: Options) -> Paths:
        """Follow a libvirt connection; the paths of the guests it has now.

        Each domain with VNC graphics is a guest from then on, coming and going
        with the domain. `NotConnected` if libvirt cannot be reached (then the
        URI is not followed). A URI the config file does not name is not
        remembered: the service does not exit when idle while it follows one.
        """
        parse_options(options, {}, "AddLibvirt")
        if not uri.strip():
            raise DBusError(INVALID_ARGUMENT, "give a libvirt URI, e.g. qemu:///system")
        guests = await self.face.broker.add_libvirt(uri, ephemeral=True)
        return sorted(self.face.guest_path(guest) for guest in guests)

    @dbus_method()
    @translated
    async def RemoveLibvirt(self, uri: Str, options: Options) -> None:
        """Stop following a libvirt connection; its guests go away."""
        parse_options(options, {}, "RemoveLibvirt")
        if uri not in self.face.broker.libvirt:
            raise DBusError(INVALID_ARGUMENT, f"{uri} is not followed")
        await self.face.broker.remove_libvirt(uri)

    @dbus_method()
    @translated
    async def RemoveGuest(self, guest: Path, options: Options) -> None:
        """Forget a guest: its consoles close (their clients see EOF)."""
        parse_options(options, {}, "RemoveGuest")
        name = self.face.guest_by_path(guest).name
        await self.face.broker.remove_guest(name)
        self.face.forget_guest(name)

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> Str:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Guests(self) -> Paths:
        return sorted(self.face.guest_path(g) for g in self.face.broker.guests.values())

    @dbus_property(access=PropertyAccess.READ)
    def LibvirtConnections(self) -> Strs:
        return sorted(self.face.broker.libvirt)

    @dbus_property(access=PropertyAccess.READ)
    def Interfaces(self) -> Strs:
        return [MANAGER, OBJECT_MANAGER]


class GuestInterface(_Interface):
    """`org.resourced.Resourced1.Guest`: one guest, its state and its consoles."""

    CONST = ("Name", "Uuid", "Source", "Address", "Interfaces")

    def __init__(self, face: "Face", guest: Guest) -> None:
        super().__init__(GUEST)
        self.face = face
        self.guest = guest

    @dbus_method()
    @translated
    async def Connect(self, options: Options) -> None:
        """Connect now instead of on demand (it stays up for the idle timeout)."""
        parse_options(options, {}, "Connect")
        await self.guest.connect()

    @dbus_method()
    @translated
    async def Disconnect(self, options: Options) -> None:
        """Close the connection now; open consoles get EOF."""
        parse_options(options, {}, "Disconnect")
        await self.guest.disconnect()

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> Str:
        return self.guest.name

    @dbus_property(access=PropertyAccess.READ)
    def Uuid(self) -> Str:
        return self.guest.uuid

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> Str:
        return self.guest.source

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> Str:
        return self.guest.address

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> Str:
        return self.guest.state.value

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> Str:
        return self.guest.last_error

    @dbus_property(access=PropertyAccess.READ)
    def Consoles(self) -> Paths:
        return sorted(self.face.console_path(c) for c in self.guest.consoles.values())

    @dbus_property(access=PropertyAccess.READ)
    def Interfaces(self) -> Strs:
        return [GUEST, AUDIO]


class AudioInterface(_Interface):
    """`org.resourced.Resourced1.Audio`: the guest's sound card, played into the
    desktop's sound server (one stream per guest) and recorded on request."""

    #: LatencyUsec changes all the time: read it, it is not signalled.
    UNSIGNALLED = ("LatencyUsec",)

    def __init__(self, face: "Face", guest: Guest) -> None:
        super().__init__(AUDIO)
        self.face = face
        self.guest = guest

    def introspect(self) -> intr.Interface:
        description = super().introspect()
        for prop in description.properties:
            if prop.name in self.UNSIGNALLED:
                prop.annotations[EMITS_CHANGED] = "false"
        return description

    @property
    def _audio(self) -> GuestAudio:
        return self.guest.audio

    @dbus_method()
    @translated
    async def Start(self, options: Options) -> None:
        """Play the guest's sound from now on, connecting if need be (the
        connection stays open until Stop). `Unsupported` if the guest's VNC
        server has no audio or there is no sound server; `NotConnected` if the
        guest cannot be reached."""
        parse_options(options, {}, "Start")
        await self._audio.start()

    @dbus_method()
    @translated
    def Stop(self, options: Options) -> None:
        """Stop playing the guest's sound (a recording goes on)."""
        parse_options(options, {}, "Stop")
        self._audio.stop()

    @dbus_method()
    @translated
    async def Record(self, path: Str, options: Options) -> None:
        """Record the guest's sound into a new WAV file at `path` (an absolute
        path the service can write), connecting if need be, until StopRecording.
        `InvalidArgument` if a recording runs already or the file cannot be made."""
        parse_options(options, {}, "Record")
        target = FsPath(path)
        if not target.is_absolute():
            raise DBusError(INVALID_ARGUMENT, f"give an absolute path, not {path!r}")
        await self._audio.record(target)

    @dbus_method()
    @translated
    def StopRecording(self, options: Options) -> Str:
        """End the recording; the file it was written to ("" if none ran).
        `Failed` if the file could not be written in full (then, or earlier when
        the recording ended by itself), naming the file and the cause."""
        parse_options(options, {}, "StopRecording")
        return self._audio.stop_recording()

    @dbus_property(access=PropertyAccess.READ)
    def Available(self) -> Bool:
        """The guest's VNC server offers its sound (known once connected)."""
        return self._audio.available

    @dbus_property(access=PropertyAccess.READ)
    def Playing(self) -> Bool:
        return self._audio.playing

    @dbus_property()
    def Volume(self) -> Double:
        """The stream's volume as LINEAR AMPLITUDE, 0.0-1.0 (0.5 halves the
        samples; mixers show 0.5 as about 79 %, their scale being cubic)."""
        return self._audio.volume

    @Volume.setter  # type: ignore[no-redef]
    @translated
    def Volume(self, value: Double) -> None:
        self._audio.set_volume(value)

    @dbus_property()
    def Muted(self) -> Bool:
        return self._audio.muted

    @Muted.setter  # type: ignore[no-redef]
    @translated
    def Muted(self, value: Bool) -> None:
        self._audio.set_muted(value)

    @dbus_property(access=PropertyAccess.READ)
    def Format(self) -> Str:
        """The PCM QEMU sends, e.g. "s16 2ch 48000 Hz" (little-endian, interleaved)."""
        return str(self._audio.format)

    @dbus_property(access=PropertyAccess.READ)
    def LatencyUsec(self) -> UInt64:
        """Current playback latency in µs (0 when not playing)."""
        return self._audio.latency_usec

    @dbus_property(access=PropertyAccess.READ)
    def Underruns(self) -> UInt64:
        """Times the stream ran dry while playing, since the service started."""
        return self._audio.underruns

    @dbus_property(access=PropertyAccess.READ)
    def Recording(self) -> Str:
        """The WAV file being recorded ("" when none)."""
        return self._audio.recording

    @dbus_property(access=PropertyAccess.READ)
    def Interfaces(self) -> Strs:
        return [GUEST, AUDIO]


class ConsoleInterface(_Interface):
    """`org.resourced.Resourced1.Console`: one console of a guest."""

    CONST = ("Name", "Kind", "Source", "Guest", "Interfaces")

    def __init__(self, face: "Face", console: BrokerConsole) -> None:
        super().__init__(CONSOLE)
        self.face = face
        self.console = console

    @property
    def _guest(self) -> Guest:
        return self.console.guest

    @dbus_method()
    @translated
    async def Open(self, options: Options) -> Fd:
        """One end of a stream socketpair carrying the console both ways.

        Options: history (b, default true: the ring's recent output first),
        read-only (b: the service reads nothing from the socket; writes fail),
        exclusive (b: `Busy` while others have it open; keeps others out),
        force (b: closes every other open first).
        Who closes what: the service closes its copy of the returned fd once the
        reply is sent; the caller owns the fd it receives and closes it when
        done (the service then closes its end). When the console goes away the
        service closes its end and the caller reads EOF.
        """
        values = parse_options(options, OPEN_OPTIONS, "Open")
        fd = await self._guest.open_stream(
            self.console.name,
            history=values["history"],
            read_only=values["read-only"],
            exclusive=values["exclusive"],
            force=values["force"],
        )
        self.face.bus.close_after_sending(fd)
        return fd

    @dbus_method()
    @translated
    async def OpenPty(self, options: Options) -> Str:
        """A PTY slave path (mode 0600, ours) carrying the console, for scripts.

        Options: as Open, and idle-timeout (u, seconds, default 60, 0 = never):
        the PTY goes away that long after nothing has it open, or at ClosePty.
        """
        values = parse_options(options, OPEN_PTY_OPTIONS, "OpenPty")
        return await self._guest.open_pty(
            self.console.name,
            history=values["history"],
            read_only=values["read-only"],
            exclusive=values["exclusive"],
            force=values["force"],
            idle_timeout=float(values["idle-timeout"]),
        )

    @dbus_method()
    @translated
    def ClosePty(self, path: Str, options: Options) -> None:
        """Close a PTY that OpenPty made for this console."""
        parse_options(options, {}, "ClosePty")
        client = self.console.pty(path)
        if client is None:
            raise DBusError(INVALID_ARGUMENT, f"{path} is not a PTY of console {self.console.name}")
        client.close("ClosePty")

    @dbus_method()
    @translated
    async def Write(self, data: Bytes, options: Options) -> None:
        """Send bytes to the console now (`NotConnected` if its host end is down)."""
        parse_options(options, {}, "Write")
        if len(data) > MAX_ONE_SHOT:
            raise DBusError(
                INVALID_ARGUMENT, f"Write takes at most {MAX_ONE_SHOT} bytes; use Open for more"
            )
        await self._guest.write(self.console.name, bytes(data))

    @dbus_method()
    @translated
    async def ReadHistory(self, options: Options) -> Bytes:
        """The console's recent output (option max-bytes, u, default 65536)."""
        values = parse_options(options, READ_HISTORY_OPTIONS, "ReadHistory")
        limit = min(int(values["max-bytes"]), MAX_ONE_SHOT)
        return await self._guest.read_history(self.console.name, limit)

    @dbus_method()
    @translated
    async def SendBreak(self, options: Options) -> None:
        """A serial break (`Unsupported` where the host end cannot carry one)."""
        parse_options(options, {}, "SendBreak")
        if not await self._guest.send_break(self.console.name):
            raise DBusError(
                f"{BUS_NAME}.Error.Unsupported",
                f"console {self.console.name} cannot carry a break",
            )

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> Str:
        return self.console.name

    @dbus_property(access=PropertyAccess.READ)
    def Kind(self) -> Str:
        return self.console.kind.label

    @dbus_property(access=PropertyAccess.READ)
    def Source(self) -> Str:
        return self.console.origin

    @dbus_property(access=PropertyAccess.READ)
    def Available(self) -> Bool:
        return self.console.available

    @dbus_property(access=PropertyAccess.READ)
    def OpenCount(self) -> UInt32:
        return self.console.open_count

    @dbus_property(access=PropertyAccess.READ)
    def Guest(self) -> Path:
        return self.face.guest_path(self._guest)

    @dbus_property(access=PropertyAccess.READ)
    def Interfaces(self) -> Strs:
        return [CONSOLE]


def vnc_options(values: dict[str, Any]) -> VncOptions:
    """AddGuest's options as the broker's `VncOptions`."""
    password = values["password"]
    if values["password-file"] is not None:
        if password is not None:
            raise ConfigurationError("give password or password-file, not both")
        password = read_password_file(FsPath(values["password-file"]))
    try:
        tls = TlsMode(values["tls"])
    except ValueError:
        raise ConfigurationError(
            f"tls must be auto, require or never, not {values['tls']!r}"
        ) from None

    def path(name: str) -> FsPath | None:
        return None if values[name] is None else FsPath(values[name])

    return VncOptions(
        password=password,
        tls=tls,
        ca_cert=path("ca-cert"),
        client_cert=path("client-cert"),
        client_key=path("client-key"),
        tls_server_name=values["tls-server-name"],
    )


def _properties(interface: ServiceInterface) -> dict[str, Variant]:
    """An interface's properties as `a{sv}` (for InterfacesAdded)."""
    out: dict[str, Variant] = {}
    for prop in ServiceInterface._get_properties(interface):
        if prop.disabled or not prop.access.readable():
            continue
        out[prop.name] = Variant(prop.signature, getattr(interface, prop.prop_getter.__name__))
    return out


class Face(BrokerObserver, GuestObserver):
    """Publishes the broker's guests and consoles as objects, and keeps them current."""

    def __init__(
        self,
        bus: ServiceBus,
        broker: Broker,
        persist: Callable[[str, str, dict[str, Any]], None],
        forget: Callable[[str], None] = lambda _name: None,
    ) -> None:
        self.bus = bus
        self.broker = broker
        self._persist = persist
        self._forget = forget
        self.manager = ManagerInterface(self)
        self._guests: dict[Guest, tuple[str, GuestInterface, AudioInterface]] = {}
        self._consoles: dict[BrokerConsole, tuple[str, ConsoleInterface]] = {}
        self._paths: dict[str, Guest] = {}
        #: The audio properties last signalled, per guest (to signal only changes).
        self._audio_values: dict[Guest, dict[str, Any]] = {}
        bus.export(ROOT, self.manager)
        broker.observers.append(self)
        for guest in broker.guests.values():
            self.guest_added(guest)

    def method_signatures(self) -> dict[tuple[str, str], str]:
        """(interface, member) -> input signature, for the caller guard."""
        out: dict[tuple[str, str], str] = {}
        for interface in (
            self.manager,
            GuestInterface(self, None),  # type: ignore[arg-type]
            AudioInterface(self, None),  # type: ignore[arg-type]
            ConsoleInterface(self, None),  # type: ignore[arg-type]
        ):
            for method in ServiceInterface._get_methods(interface):
                out[(interface.name, method.name)] = method.in_signature
        return out

    def persist_guest(self, name: str, address: str, values: dict[str, Any]) -> None:
        self._persist(name, address, values)

    def forget_guest(self, name: str) -> None:
        self._forget(name)

    @staticmethod
    def discover(guest: Guest) -> None:
        """Connect once in the background, so the guest's consoles get published."""

        async def connect() -> None:
            try:
                await guest.connect()
            except Exception as err:  # shown in State/LastError already
                log.info("guest %s: first connection failed: %s", guest.name, err)

        asyncio.get_running_loop().create_task(connect())

    # --- paths -------------------------------------------------------------------

    def guest_path(self, guest: Guest) -> str:
        entry = self._guests.get(guest)
        if entry is not None:
            return entry[0]
        return f"{ROOT}/guests/{escape_path_element(guest.name)}"

    def console_path(self, console: BrokerConsole) -> str:
        return f"{self.guest_path(console.guest)}/consoles/{escape_path_element(console.name)}"

    def guest_by_path(self, path: str) -> Guest:
        guest = self._paths.get(path)
        if guest is None:
            raise DBusError(NO_SUCH_GUEST, f"no guest at {path}")
        return guest

    # --- BrokerObserver -----------------------------------------------------------

    def guest_added(self, guest: Guest) -> None:
        path = self.guest_path(guest)
        guest_iface, audio = GuestInterface(self, guest), AudioInterface(self, guest)
        self._guests[guest] = (path, guest_iface, audio)
        self._paths[path] = guest
        self.bus.export(path, guest_iface)
        self.bus.export(path, audio)
        guest.observers.append(self)
        self._added(path, guest_iface, audio)
        for console in guest.consoles.values():
            self.console_added(console)
        self.manager.emit_properties_changed({"Guests": self.manager.Guests})

    def guest_removed(self, guest: Guest) -> None:
        for console in [c for c in self._consoles if c.guest is guest]:
            self.console_removed(console)
        entry = self._guests.pop(guest, None)
        if entry is None:
            return
        path = entry[0]
        self._paths.pop(path, None)
        self._audio_values.pop(guest, None)
        self.bus.unexport(path)
        self._signal("InterfacesRemoved", "oas", [path, [GUEST, AUDIO]])
        self.manager.emit_properties_changed({"Guests": self.manager.Guests})

    def libvirt_changed(self) -> None:
        self.manager.emit_properties_changed(
            {"LibvirtConnections": self.manager.LibvirtConnections}
        )

    # --- GuestObserver --------------------------------------------------------------

    def guest_changed(self, guest: Guest) -> None:
        entry = self._guests.get(guest)
        if entry is None:
            return
        iface = entry[1]
        iface.emit_properties_changed(
            {
                "State": iface.State,
                "LastError": iface.LastError,
                "Consoles": iface.Consoles,
                "Address": iface.Address,
            }
        )

    #: Audio properties signalled when they change (LatencyUsec is read, not signalled).
    AUDIO_SIGNALLED = (
        "Available",
        "Playing",
        "Volume",
        "Muted",
        "Format",
        "Underruns",
        "Recording",
    )

    def audio_changed(self, guest: Guest) -> None:
        entry = self._guests.get(guest)
        if entry is None:
            return
        audio = entry[2]
        now = {name: getattr(audio, name) for name in self.AUDIO_SIGNALLED}
        last = self._audio_values.get(guest, {})
        changed = {name: value for name, value in now.items() if last.get(name) != value}
        self._audio_values[guest] = now
        if changed:
            audio.emit_properties_changed(changed)

    def console_added(self, console: BrokerConsole) -> None:
        if console in self._consoles or console.guest not in self._guests:
            return
        path = self.console_path(console)
        iface = ConsoleInterface(self, console)
        self._consoles[console] = (path, iface)
        self.bus.export(path, iface)
        self._added(path, iface)

    def console_removed(self, console: BrokerConsole) -> None:
        entry = self._consoles.pop(console, None)
        if entry is None:
            return
        self.bus.unexport(entry[0])
        self._signal("InterfacesRemoved", "oas", [entry[0], [CONSOLE]])

    def console_changed(self, console: BrokerConsole) -> None:
        entry = self._consoles.get(console)
        if entry is None:
            return
        iface = entry[1]
        iface.emit_properties_changed({"Available": iface.Available, "OpenCount": iface.OpenCount})

    def _added(self, path: str, *interfaces: ServiceInterface) -> None:
        body = {interface.name: _properties(interface) for interface in interfaces}
        self._signal("InterfacesAdded", "oa{sa{sv}}", [path, body])

    def _signal(self, member: str, signature: str, body: list[Any]) -> None:
        """An ObjectManager signal from the root (dbus-fast's come from the child's
        path, and its introspection already lists the interface)."""
        self.bus.send(Message.new_signal(ROOT, OBJECT_MANAGER, member, signature, body))
