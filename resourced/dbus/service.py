"""Running the service: the bus, the name, the guests from the config, idle exit, SIGTERM.

`serve()` adds the guests the config file lists (they start connecting at
once), connects to the session bus (or the one that activated us), exports
the objects (`resourced.dbus.objects`), installs the caller guard and takes
the name `org.resourced.Resourced1`; a moment later (`BACKGROUND_START_DELAY`)
it starts on what the call that activated it does not need: the sound server,
and following libvirt.
It exits as systemd's own on-demand services do: once no guest is connected,
no console is open and no call has come for `idle_exit` seconds, it releases
the name (new calls then queue for the next activation), answers what was
already on its way, and returns. SIGTERM and SIGINT are a normal stop.

`install_user_service()` writes the D-Bus activation file and the systemd user
unit, with the real path of this installation's `resourced` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbus_fast import BusType, Message, MessageType, RequestNameReply
from dbus_fast.constants import NameFlag

from resourced import config as config_module
from resourced.broker.audio import Playback
from resourced.broker.broker import Broker
from resourced.dbus.access import CallerGuard
from resourced.dbus.bus import ServiceBus
from resourced.dbus.errors import BUS_NAME
from resourced.dbus.objects import ROOT, Face, vnc_options
from resourced.dbus.secrets import console_password
from resourced.errors import AudioUnavailable, ResourcedError

if TYPE_CHECKING:
    from resourced.sinks.pulse import PulseServer

log = logging.getLogger(__name__)

#: How often idle exit is considered (seconds).
IDLE_CHECK_INTERVAL = 0.5
#: After releasing the name, how long without a call before we go (seconds).
DRAIN_QUIET = 0.3
#: Seconds after taking the name before the sound server and libvirt are started.
#: Loading libpulse and libvirt holds the loop for tens of ms (imports; a sound
#: server not there makes libpulse collect garbage), which would come between
#: the call that activated us and its answer, or its first console (issue #7:
#: activation to the first console byte in 300 ms). This leaves that time free.
BACKGROUND_START_DELAY = 0.5

DBUS_SERVICE_FILE = "org.resourced.Resourced1.service"
SYSTEMD_UNIT_FILE = "resourced.service"
_DATA = Path(__file__).resolve().parent.parent.parent / "data"


def _bus_address() -> str | None:
    """The bus that activated us, if any (dbus-daemon sets DBUS_STARTER_ADDRESS)."""
    return os.environ.get("DBUS_STARTER_ADDRESS") or os.environ.get("DBUS_SESSION_BUS_ADDRESS")


def run(config: config_module.Config, *, bus_address: str | None = None) -> int:
    """`serve()` on an event loop of its own; the exit status."""
    return asyncio.run(serve(config, bus_address=bus_address))


async def serve(config: config_module.Config, *, bus_address: str | None = None) -> int:
    """Run until idle exit or a signal; the exit status."""
    address = bus_address or _bus_address()
    if not address:
        raise ResourcedError(
            "there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set): run resourced "
            "from a desktop session, by D-Bus activation, or with --bus ADDRESS"
        )
    try:
        bus = ServiceBus(bus_address=address, bus_type=BusType.SESSION, negotiate_unix_fd=True)
    except Exception as err:  # a malformed address
        raise ResourcedError(f"cannot connect to the session bus ({address}): {err}") from err
    config_module.runtime_dir()
    sound = SoundServer(config.sound_server)
    broker = Broker(config.guest_settings, config.audio, sound.playback)
    broker.password_lookup = functools.partial(console_password, bus)
    # The config's guests first: their connections (the VNC handshake, the
    # console list) go on while we reach the bus and take the name.
    for entry in config.guests:
        try:
            values: dict[str, Any] = {"password": None, "password-file": None, "tls": "auto"}
            values |= {k: None for k in ("ca-cert", "client-cert", "client-key", "tls-server-name")}
            values |= entry.options
            Face.discover(broker.add_vnc_guest(entry.name, entry.address, vnc_options(values)))
        except ResourcedError as err:
            log.warning("config: guest %s not added: %s", entry.name, err)
    try:
        guard = await _take_name(bus, broker, config, address)
    except BaseException:
        await broker.close()
        raise
    log.info("resourced %s: serving %s on %s", _version(), BUS_NAME, address or "the session bus")

    loop = asyncio.get_running_loop()
    background = loop.create_task(_start_background(config, broker, sound))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A session service lives as long as its bus: when the bus goes (the session
    # ended, the daemon was killed) nobody can reach us, and open guest
    # connections and consoles would otherwise keep us running for ever.
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    on_bus_lost = functools.partial(_on_bus_lost, stop)
    disconnected.add_done_callback(on_bus_lost)
    try:
        await _run_until_idle(bus, broker, guard, config.idle_exit, stop)
    finally:
        disconnected.remove_done_callback(on_bus_lost)  # our own disconnect() below
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        background.cancel()
        await asyncio.wait([background])  # a failure there is a bug, which asyncio logs
        await broker.close()
        await sound.close()
        bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.wait_for_disconnect(), 2)  # type: ignore[no-untyped-call]
    return 0


def _on_bus_lost(stop: asyncio.Event, disconnected: asyncio.Future[None]) -> None:
    if not disconnected.cancelled():
        error = disconnected.exception()
        log.warning(
            "resourced: the bus connection is gone (%s); stopping", error or "closed by the bus"
        )
    stop.set()


async def _take_name(
    bus: ServiceBus, broker: Broker, config: config_module.Config, address: str
) -> CallerGuard:
    """Connect, publish the broker's objects, guard them, own the name; the guard."""
    try:
        await bus.connect()
    except Exception as err:  # no bus: say so in one line
        raise ResourcedError(f"cannot connect to the session bus ({address}): {err}") from err

    def persist(name: str, address: str, values: dict[str, Any]) -> None:
        options = {k: str(values[k]) for k in config_module.GUEST_OPTION_KEYS if values.get(k)}
        config_module.remember_guest(
            config.directory, config_module.GuestEntry(name, address, options)
        )

    face = Face(
        bus, broker, persist, lambda name: config_module.forget_guest(config.directory, name)
    )
    guard = CallerGuard(bus, ROOT, face.method_signatures())
    # The guard sees every message from its first step on; its match rule and
    # our name are asked for together: one round trip to the bus, not two.
    _, reply = await asyncio.gather(
        guard.install(), bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    )
    if reply is not RequestNameReply.PRIMARY_OWNER:
        bus.disconnect()
        raise ResourcedError(f"{BUS_NAME} is already taken on this bus: is resourced running?")
    return guard


async def _run_until_idle(
    bus: ServiceBus, broker: Broker, guard: CallerGuard, idle_exit: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), IDLE_CHECK_INTERVAL)
        if stop.is_set():
            log.info("resourced: stopping")
            return
        if idle_exit <= 0 or broker.in_use():
            continue
        if time.monotonic() - guard.last_call < idle_exit:
            continue
        log.info("resourced: idle for %g s; releasing %s and exiting", idle_exit, BUS_NAME)
        await bus.release_name(BUS_NAME)
        # Calls already on their way to us are still answered.
        while time.monotonic() - guard.last_call < DRAIN_QUIET or _busy(broker):  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_QUIET / 3)  # polled: calls are counted, not signalled
        return


async def _start_background(
    config: config_module.Config, broker: Broker, sound: SoundServer
) -> None:
    """The sound server and libvirt, `BACKGROUND_START_DELAY` after taking the name."""
    await asyncio.sleep(BACKGROUND_START_DELAY)
    await sound.start()
    configured = config.libvirt_uris is not None
    uris = config.libvirt_uris if configured else config_module.DEFAULT_LIBVIRT_URIS
    for uri in uris or ():
        asyncio.get_running_loop().create_task(_follow_libvirt(broker, uri, keep=configured))


class SoundServer:
    """The desktop's sound server as the guests' playback streams reach it.

    libpulse is loaded, and the server reached, by `start()`, which the service
    calls a little after it has its bus name: loading it takes longer than
    activation should. A playback made before then waits for the server as it
    would for one that is not running yet. When libpulse cannot be loaded at
    all, those playbacks stay silent and `playback()` has none to give (None).
    """

    def __init__(self, server: str) -> None:
        self.server = server
        self._pulse: PulseServer | None = None
        self._unavailable = False

    def _server(self) -> PulseServer:
        if self._pulse is None:
            from resourced.sinks.pulse import PulseServer  # with ctypes: not for every start

            self._pulse = PulseServer(self.server or None)
        return self._pulse

    async def start(self) -> None:
        pulse = self._server()
        try:
            await pulse.start()
        except AudioUnavailable as err:
            log.warning("no sound: %s", err)
            self._unavailable = True
            self._pulse = None
            await pulse.close()

    def playback(self, name: str, on_change: Callable[[], None]) -> Playback | None:
        if self._unavailable:
            return None
        return self._server().playback(name, on_change=on_change)

    async def close(self) -> None:
        pulse, self._pulse = self._pulse, None
        if pulse is not None:
            await pulse.close()


async def _follow_libvirt(broker: Broker, uri: str, *, keep: bool) -> None:
    """Follow a libvirt URI from the config (kept and retried) or a default (dropped
    if it does not open: not every user may open qemu:///system)."""
    try:
        guests = await broker.add_libvirt(uri, keep=keep)
        log.info("libvirt %s: %d guest(s)", uri, len(guests))
    except ResourcedError as err:
        if keep:
            log.warning("libvirt %s: %s; trying again in the background", uri, err)
        else:
            log.info("libvirt %s: %s", uri, err)


def _busy(broker: Broker) -> bool:
    return broker.in_use()


def _version() -> str:
    from resourced import __version__

    return __version__


# --- installing the activation files ---------------------------------------------------


def _command_path() -> Path:
    """This installation's `resourced` command (beside the running interpreter)."""
    import shutil  # here and in _reload: installing is rare, and shutil slows every start

    beside = Path(sys.executable).parent / "resourced"
    if beside.exists():
        return beside.absolute()
    found = shutil.which("resourced")
    if found is None:
        raise ResourcedError("cannot find the resourced command to write into the unit files")
    return Path(found).absolute()


def install_user_service(prefix: Path | None = None) -> list[Path]:
    """Write both files (or neither), with real paths; reload systemd and the bus.

    Without `prefix`: `$XDG_DATA_HOME/dbus-1/services/` and
    `$XDG_CONFIG_HOME/systemd/user/`, where a user's session bus and systemd
    look. With `prefix`: `PREFIX/dbus-1/services/` and `PREFIX/systemd/user/`.
    """
    home = Path.home()
    if prefix is None:
        data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local/share")
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        service_dir = data_home / "dbus-1" / "services"
        unit_dir = config_home / "systemd" / "user"
    else:
        service_dir = prefix / "dbus-1" / "services"
        unit_dir = prefix / "systemd" / "user"
    command = str(_command_path())
    texts = {}
    for source, target in (
        (_DATA / "dbus-1" / "services" / DBUS_SERVICE_FILE, service_dir / DBUS_SERVICE_FILE),
        (_DATA / "systemd-user" / SYSTEMD_UNIT_FILE, unit_dir / SYSTEMD_UNIT_FILE),
    ):
        try:
            template = source.read_text()
        except OSError as err:
            raise ResourcedError(f"cannot read {source}: {err.strerror}") from err
        texts[target] = template.replace("@RESOURCED@", command)
    written: list[Path] = []
    try:
        for target, text in texts.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_suffix(".tmp")
            temporary.write_text(text)
            temporary.replace(target)
            written.append(target)
    except OSError as err:
        for path in written:  # both or neither
            with contextlib.suppress(OSError):
                path.unlink()
        raise ResourcedError(f"cannot write {err.filename}: {err.strerror}") from err
    _reload()
    return written


def _reload() -> None:
    """`systemctl --user daemon-reload` where systemd runs; the bus's ReloadConfig."""
    import shutil

    if shutil.which("systemctl") and os.environ.get("XDG_RUNTIME_DIR"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["systemctl", "--user", "daemon-reload"],
                check=False,
                capture_output=True,
                timeout=30,
            )
    if _bus_address():
        with contextlib.suppress(Exception):
            asyncio.run(_reload_bus())


async def _reload_bus() -> None:
    bus = ServiceBus(bus_address=_bus_address())
    await bus.connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="ReloadConfig",
            )
        )
        if reply is not None and reply.message_type is MessageType.ERROR:
            log.info("the bus did not reload its configuration: %s", reply.body)
    finally:
        bus.disconnect()
