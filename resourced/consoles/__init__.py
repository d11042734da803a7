"""Guest consoles, shared by the gateway and the broker.

- `spec`: what a console is and where its host end lives (`ConsoleSpec`), and
  the gateway's `--console` syntax; re-exported here.
- `ring`: the ring of recent output with its readers, back-pressure and stall
  give-up; pure (no asyncio, no sockets, the clock passed in).
- `sources`: host ends behind one small protocol (`ConsoleSource`): a QEMU
  chardev socket, a PTY.
- `ptylock`: the lock files (libvirt's, `/var/lock/LCK..pts_N`) a PTY is opened under.
- `hub`: `ConsoleHub`, one console's source and ring, fanned out to its readers.

Only `spec` is imported here, so that `from resourced.consoles import ConsoleKind`
(the sans-IO RFB code does) pulls in no asyncio: import the others by their path.
"""

from resourced.consoles.spec import (
    MAX_CONSOLE_NAME,
    ConsoleKind,
    ConsoleSpec,
    Endpoint,
    EndpointType,
    guess_kind,
    parse_console_option,
)

__all__ = [
    "MAX_CONSOLE_NAME",
    "ConsoleKind",
    "ConsoleSpec",
    "Endpoint",
    "EndpointType",
    "guess_kind",
    "parse_console_option",
]
