"""Consoles as the domain sees them: what a guest's console is and where it lives.

A console is a named character stream of a guest (a serial port, a virtio
console, a parallel port, or QEMU's human monitor used as a text console). Its
`ConsoleSpec` says where the host end is: a QEMU chardev Unix socket or a PTY.
This module parses the gateway's `--console NAME=unix:PATH` syntax; it does no
I/O and knows nothing of RFB or libvirt.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from resourced.errors import ConfigurationError

#: Longest console name we carry (the wire allows a u8 length).
MAX_CONSOLE_NAME = 64

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,64}$")


class ConsoleKind(enum.IntEnum):
    """What kind of device a console is (also its number on the wire, see
    docs/protocol/console-extension.md)."""

    SERIAL = 0
    VIRTIO_CONSOLE = 1
    PARALLEL = 2
    MONITOR = 3
    CHANNEL = 4
    OTHER = 255

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class EndpointType(enum.Enum):
    UNIX = "unix"
    PTY = "pty"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The host end of a console: a Unix socket QEMU listens on, or a PTY."""

    type: EndpointType
    path: str

    def __str__(self) -> str:
        return f"{self.type.value}:{self.path}"


@dataclass(frozen=True, slots=True)
class ConsoleSpec:
    """A console to publish: its name, kind and host endpoint."""

    name: str
    kind: ConsoleKind
    endpoint: Endpoint

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigurationError(
                f"bad console name {self.name!r}: 1-{MAX_CONSOLE_NAME} characters of "
                "letters, digits and _.:@+-"
            )


def guess_kind(name: str) -> ConsoleKind:
    """The kind a console name suggests (`serial0` -> SERIAL, `monitor` -> MONITOR...)."""
    lowered = name.lower()
    for prefix, kind in (
        ("serial", ConsoleKind.SERIAL),
        ("ttys", ConsoleKind.SERIAL),
        ("com", ConsoleKind.SERIAL),
        ("virtio", ConsoleKind.VIRTIO_CONSOLE),
        ("hvc", ConsoleKind.VIRTIO_CONSOLE),
        ("console", ConsoleKind.VIRTIO_CONSOLE),
        ("parallel", ConsoleKind.PARALLEL),
        ("lpt", ConsoleKind.PARALLEL),
        ("monitor", ConsoleKind.MONITOR),
        ("hmp", ConsoleKind.MONITOR),
        ("channel", ConsoleKind.CHANNEL),
    ):
        if lowered.startswith(prefix):
            return kind
    return ConsoleKind.OTHER


def parse_console_option(text: str) -> ConsoleSpec:
    """Parse `NAME[:KIND]=unix:PATH` or `NAME[:KIND]=pty:PATH` (or a bare /dev/pts path).

    KIND is one of serial, virtio-console, parallel, monitor, channel, other; without
    it the kind is guessed from the name.
    """
    if "=" not in text:
        raise ConfigurationError(f"--console wants NAME=unix:PATH or NAME=pty:PATH, not {text!r}")
    left, target = text.split("=", 1)
    name, _, kind_text = left.partition(":")
    if kind_text:
        try:
            kind = ConsoleKind[kind_text.upper().replace("-", "_")]
        except KeyError:
            kinds = ", ".join(k.label for k in ConsoleKind)
            raise ConfigurationError(
                f"unknown console kind {kind_text!r} (one of {kinds})"
            ) from None
    else:
        kind = guess_kind(name)
    if target.startswith("unix:"):
        endpoint = Endpoint(EndpointType.UNIX, target[5:])
    elif target.startswith("pty:"):
        endpoint = Endpoint(EndpointType.PTY, target[4:])
    elif target.startswith("/dev/"):
        endpoint = Endpoint(EndpointType.PTY, target)
    else:
        raise ConfigurationError(f"console target must be unix:PATH or pty:PATH, not {target!r}")
    if not endpoint.path:
        raise ConfigurationError(f"empty path in --console {text!r}")
    return ConsoleSpec(name, kind, endpoint)
