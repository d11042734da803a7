"""D-Bus error names, and the one place domain errors become them.

Every error a caller can get is `org.resourced.Resourced1.Error.<Name>` with a
sentence meant for a person. `as_dbus_error` maps `resourced.errors`
exceptions (and the few standard ones the core raises) to those names;
anything else is a bug of ours: it is logged with its traceback and the caller
gets `Failed`, never a Python traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from dbus_fast import DBusError

from resourced import errors

log = logging.getLogger(__name__)

BUS_NAME = "org.resourced.Resourced1"
ERROR_PREFIX = f"{BUS_NAME}.Error."

NO_SUCH_GUEST = ERROR_PREFIX + "NoSuchGuest"
NO_SUCH_CONSOLE = ERROR_PREFIX + "NoSuchConsole"
INVALID_ARGUMENT = ERROR_PREFIX + "InvalidArgument"
NOT_CONNECTED = ERROR_PREFIX + "NotConnected"
BUSY = ERROR_PREFIX + "Busy"
ACCESS_DENIED = ERROR_PREFIX + "AccessDenied"
AUTHENTICATION_FAILED = ERROR_PREFIX + "AuthenticationFailed"
UNSUPPORTED = ERROR_PREFIX + "Unsupported"
FAILED = ERROR_PREFIX + "Failed"

#: Most specific first: the first class the exception is an instance of wins.
_MAPPING: tuple[tuple[type[BaseException], str], ...] = (
    (errors.NoSuchGuest, NO_SUCH_GUEST),
    (errors.NoSuchConsole, NO_SUCH_CONSOLE),
    (errors.NotConnected, NOT_CONNECTED),
    (errors.Busy, BUSY),
    (errors.AccessDenied, ACCESS_DENIED),
    (errors.Unsupported, UNSUPPORTED),
    (errors.AuthenticationFailed, AUTHENTICATION_FAILED),
    (errors.ConfigurationError, INVALID_ARGUMENT),
    (errors.ConnectionClosed, NOT_CONNECTED),
    (errors.HandshakeTimeout, NOT_CONNECTED),
    (errors.ResourcedError, FAILED),
)


def as_dbus_error(err: BaseException) -> DBusError:
    """The named error a caller gets for `err` (logged with a traceback if it is a bug)."""
    if isinstance(err, DBusError):
        return err
    for kind, name in _MAPPING:
        if isinstance(err, kind):
            return DBusError(name, str(err) or kind.__name__)
    if isinstance(err, OSError):
        return DBusError(FAILED, err.strerror or str(err))
    log.error("bug: unexpected error answering a D-Bus call", exc_info=err)
    return DBusError(FAILED, f"internal error ({type(err).__name__}); see the service's log")


F = TypeVar("F", bound=Callable[..., Any])


def translated(method: F) -> F:
    """Make a D-Bus method raise only named errors (sync or async methods)."""
    import inspect

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except Exception as err:
                raise as_dbus_error(err) from err

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as err:
            raise as_dbus_error(err) from err

    return wrapper  # type: ignore[return-value]
