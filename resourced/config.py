"""The service's settings: `~/.config/resourced/config.toml`, and the guests it remembers.

`config.toml` is the user's own file, read with the standard library's
`tomllib` and never written by the service:

    [service]
    idle-exit = 60            # seconds with nothing connected and no calls; 0 = never

    [guests]
    idle-timeout = 30         # seconds a guest's connection stays up unused
    history = 65536           # bytes of console output kept per console
    stall-timeout = 2         # seconds a console reader a whole ring behind may hold it back

    [libvirt]
    uris = ["qemu:///system"]  # default: qemu:///session and qemu:///system, if they open

    [audio]
    autostart = true          # play a guest's sound whenever its connection is open
    format = "s16"            # what QEMU is asked for: u8 s8 u16 s16 u32 s32
    channels = 2              # 1 or 2
    rate = 48000              # Hz, at most 48000
    server = ""               # PulseAudio/PipeWire server; "" = the desktop's ($PULSE_SERVER...)

    [[guest]]                 # guests reached at a VNC address (a gateway)
    name = "web1"
    address = "unix:/run/vm/web1-gw.sock"
    password-file = "/home/me/.config/resourced/web1.pass"   # also: tls, ca-cert, client-cert,
                                                              # client-key, tls-server-name

Guests added over D-Bus with `persist` go to `guests.toml` beside it (written
with `tomli_w`), so the service never rewrites a file a person keeps comments
in. An unknown key or a value of the wrong type is a `ConfigurationError`
naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from resourced.audio import AudioFormat, SampleFormat
from resourced.broker.audio import DEFAULT_FORMAT, AudioSettings
from resourced.broker.guest import GuestSettings
from resourced.errors import ConfigurationError

#: libvirt connections followed when the config names none (each only if it opens).
DEFAULT_LIBVIRT_URIS = ("qemu:///session", "qemu:///system")
#: Keys a `[[guest]]` table may have besides name and address.
GUEST_OPTION_KEYS = (
    "password-file",
    "tls",
    "ca-cert",
    "client-cert",
    "client-key",
    "tls-server-name",
)


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "resourced"


def runtime_dir() -> Path:
    """`$XDG_RUNTIME_DIR/resourced` (made, mode 0700), or a private one under /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "resourced" if base else Path(f"/tmp/resourced-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@dataclass(frozen=True, slots=True)
class GuestEntry:
    """A remembered guest: reached at `address`, with AddGuest's options."""

    name: str
    address: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    idle_exit: float = 60.0
    guest_settings: GuestSettings = field(default_factory=GuestSettings)
    #: None: the defaults (`DEFAULT_LIBVIRT_URIS`, each only if it can be opened).
    libvirt_uris: tuple[str, ...] | None = None
    guests: tuple[GuestEntry, ...] = ()
    directory: Path = field(default_factory=config_dir)
    audio: AudioSettings = field(default_factory=AudioSettings)
    #: The sound server to play into ("" = libpulse's default: the desktop's).
    sound_server: str = ""


def _number(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigurationError(f"{where}: {key} must be a number of at least 0, not {value!r}")
    return float(value)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})"
        )


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigurationError(f"cannot read {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigurationError(f"{path}: {err}") from err


def _guests(data: dict[str, Any], path: Path) -> list[GuestEntry]:
    entries = data.get("guest", [])
    if not isinstance(entries, list):
        raise ConfigurationError(f"{path}: guest must be an array of tables ([[guest]])")
    out = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: guest {number}"
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where} is not a table")
        _check_keys(entry, {"name", "address", *GUEST_OPTION_KEYS}, where)
        for key, value in entry.items():
            if not isinstance(value, str):
                raise ConfigurationError(f"{where}: {key} must be a string")
        if "name" not in entry or "address" not in entry:
            raise ConfigurationError(f"{where}: name and address are required")
        options = {k: v for k, v in entry.items() if k in GUEST_OPTION_KEYS}
        out.append(GuestEntry(entry["name"], entry["address"], options))
    return out


def load(directory: Path | None = None) -> Config:
    """Read `config.toml` and `guests.toml` from `directory` (default: `config_dir()`)."""
    directory = directory or config_dir()
    path = directory / "config.toml"
    data = _read(path)
    _check_keys(data, {"service", "guests", "libvirt", "guest", "audio"}, str(path))
    service = data.get("service", {})
    guests = data.get("guests", {})
    libvirt = data.get("libvirt", {})
    _check_keys(service, {"idle-exit"}, f"{path} [service]")
    _check_keys(
        guests, {"idle-timeout", "history", "stall-timeout", "connect-timeout"}, f"{path} [guests]"
    )
    _check_keys(libvirt, {"uris"}, f"{path} [libvirt]")
    uris = libvirt.get("uris")
    if uris is not None and (
        not isinstance(uris, list) or not all(isinstance(u, str) for u in uris)
    ):
        raise ConfigurationError(f"{path} [libvirt]: uris must be a list of strings")
    history = int(_number(guests, "history", 64 * 1024, f"{path} [guests]"))
    if history < 1:
        raise ConfigurationError(f"{path} [guests]: history must be at least 1 byte")
    settings = GuestSettings(
        idle_timeout=_number(guests, "idle-timeout", 30, f"{path} [guests]"),
        connect_timeout=_number(guests, "connect-timeout", 20, f"{path} [guests]"),
        history=history,
        stall_timeout=_number(guests, "stall-timeout", 2, f"{path} [guests]"),
    )
    entries = _guests(data, path) + _guests(
        _read(directory / "guests.toml"), directory / "guests.toml"
    )
    audio, sound_server = _audio(data.get("audio", {}), f"{path} [audio]")
    return Config(
        idle_exit=_number(service, "idle-exit", 60, f"{path} [service]"),
        guest_settings=settings,
        libvirt_uris=None if uris is None else tuple(uris),
        guests=tuple(entries),
        directory=directory,
        audio=audio,
        sound_server=sound_server,
    )


def _audio(table: dict[str, Any], where: str) -> tuple[AudioSettings, str]:
    """The `[audio]` table: the settings, and the sound server ("" = default)."""
    _check_keys(table, {"autostart", "format", "channels", "rate", "server"}, where)
    autostart = table.get("autostart", True)
    if not isinstance(autostart, bool):
        raise ConfigurationError(f"{where}: autostart must be true or false")
    names = [f.value for f in SampleFormat]
    sample = table.get("format", DEFAULT_FORMAT.sample_format.value)
    if sample not in names:
        raise ConfigurationError(
            f"{where}: format must be one of {', '.join(names)}, not {sample!r}"
        )
    channels = table.get("channels", DEFAULT_FORMAT.channels)
    rate = table.get("rate", DEFAULT_FORMAT.rate)
    for key, value in (("channels", channels), ("rate", rate)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{where}: {key} must be a whole number, not {value!r}")
    try:
        fmt = AudioFormat(SampleFormat(sample), channels, rate)
    except ValueError as err:
        raise ConfigurationError(f"{where}: {err}") from None
    server = table.get("server", "")
    if not isinstance(server, str):
        raise ConfigurationError(f"{where}: server must be a string")
    return AudioSettings(autostart=autostart, format=fmt), server


def remember_guest(directory: Path, entry: GuestEntry) -> None:
    """Add (or replace) a guest in `guests.toml`, written atomically."""
    path = directory / "guests.toml"
    data = _read(path)
    kept = [g for g in data.get("guest", []) if isinstance(g, dict) and g.get("name") != entry.name]
    kept.append({"name": entry.name, "address": entry.address, **entry.options})
    directory.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".toml.tmp")
    with temporary.open("wb") as file:
        _dump_guests(kept, file)
    os.chmod(temporary, 0o600)
    temporary.replace(path)


def _dump_guests(guests: list[dict[str, Any]], file: BinaryIO) -> None:
    import tomli_w  # here, not at the top: only a persisted AddGuest writes, not every start

    tomli_w.dump({"guest": guests}, file)


def forget_guest(directory: Path, name: str) -> None:
    """Remove a guest from `guests.toml` (nothing if it is not there)."""
    path = directory / "guests.toml"
    data = _read(path)
    guests = data.get("guest", [])
    kept = [g for g in guests if isinstance(g, dict) and g.get("name") != name]
    if len(kept) == len(guests):
        return
    temporary = path.with_suffix(".toml.tmp")
    with temporary.open("wb") as file:
        _dump_guests(kept, file)
    temporary.replace(path)
