"""The one error hierarchy of resourced, rooted in `ResourcedError`.

Every error the package raises on purpose derives from `ResourcedError`, so a
caller (the CLI, later the D-Bus face) can turn any of them into a clear message
without catching unrelated exceptions. Protocol-specific errors live here too so
that layers above the RFB core need not import it to name them.
"""

from __future__ import annotations


class ResourcedError(Exception):
    """Root of every error resourced raises on purpose."""


class ProtocolError(ResourcedError):
    """A protocol was broken, by us or by the peer."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (or that exceeds our limits)."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow in this state."""


class ConnectionClosed(ResourcedError):
    """The peer closed the connection (cleanly or not) before we were done."""


class HandshakeTimeout(ResourcedError, TimeoutError):
    """The RFB handshake did not finish within its time limit."""


class SecurityError(ResourcedError):
    """The connection could not be secured or authenticated."""


class SecurityNegotiationFailed(SecurityError):
    """No security type acceptable to both sides (or the server refused us before auth)."""


class AuthenticationFailed(SecurityError):
    """The server rejected our credentials (or we lacked the credentials it asked for)."""


class TlsError(SecurityError):
    """The TLS layer failed: handshake error or an untrusted server certificate."""


class ConfigurationError(ResourcedError, ValueError):
    """A setting, address or file given to resourced is invalid."""


# --- the broker (the D-Bus service's domain core) ------------------------------------
# Each maps to one D-Bus error name in `resourced.dbus.errors`; the messages are
# written for a person reading them in a terminal.


class BrokerError(ResourcedError):
    """A request to the broker could not be carried out."""


class NoSuchGuest(BrokerError, LookupError):
    """No guest by that name (or object path)."""


class NoSuchConsole(BrokerError, LookupError):
    """The guest has no console by that name (now)."""


class NotConnected(BrokerError):
    """The guest's connection (or a console's host end) is down right now."""


class Busy(BrokerError):
    """Someone else holds the resource exclusively."""


class AccessDenied(BrokerError, PermissionError):
    """The caller may not use this service."""


class Unsupported(BrokerError):
    """The guest or the caller cannot do what was asked."""


class RecordingFailed(BrokerError):
    """A recording could not be written (disk full, file system gone...); what was
    written before the failure stays in the file."""


# --- sound -----------------------------------------------------------------------------


class AudioUnavailable(ResourcedError):
    """Sound cannot be played here: the PulseAudio client library is missing."""
