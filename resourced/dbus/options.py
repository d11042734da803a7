"""`a{sv}` options: each method's known options, their D-Bus types, their defaults.

Every method of the API takes an `a{sv}` so it can grow without a new
interface version. An unknown option, or a known one of the wrong type, is an
`InvalidArgument` error naming it, never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dbus_fast import DBusError, Variant

from resourced.dbus.errors import INVALID_ARGUMENT


@dataclass(frozen=True, slots=True)
class Option:
    """One option: its D-Bus signature and its default."""

    signature: str
    default: Any = None


def parse_options(
    given: Mapping[str, Variant], known: Mapping[str, Option], method: str
) -> dict[str, Any]:
    """The options as plain values, defaults filled in; `InvalidArgument` otherwise."""
    values = {name: option.default for name, option in known.items()}
    for name, variant in given.items():
        option = known.get(name)
        if option is None:
            allowed = ", ".join(sorted(known)) or "none"
            raise DBusError(
                INVALID_ARGUMENT, f"{method}: unknown option {name!r} (known options: {allowed})"
            )
        if variant.signature != option.signature:
            raise DBusError(
                INVALID_ARGUMENT,
                f"{method}: option {name!r} must be of type '{option.signature}', "
                f"not '{variant.signature}'",
            )
        values[name] = variant.value
    return values
