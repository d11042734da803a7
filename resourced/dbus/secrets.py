"""VNC passwords from the desktop's Secret Service, where virt-manager keeps them.

virt-manager stores a guest's console password in the Secret Service
(`org.freedesktop.secrets`: GNOME Keyring, KWallet, KeePassXC...) as an item
with the attributes `uuid` (the domain's UUID) and `hvuri` (the libvirt URI).
`console_password` finds that item and reads its secret over a "plain" session
(the Secret Service API, "Transfer of secrets"); the session bus is local to
the user, so nothing crosses a network. A locked item is not unlocked here
(that needs a prompt the service cannot show): it is an `AuthenticationFailed`
saying so. This is how a remote libvirt guest's VNC password is found when
libvirt will not show it.
"""

from __future__ import annotations

import logging

from dbus_fast import Message, MessageType, Variant

from resourced.dbus.bus import ServiceBus
from resourced.errors import AuthenticationFailed

log = logging.getLogger(__name__)

SECRETS = "org.freedesktop.secrets"
SECRETS_PATH = "/org/freedesktop/secrets"
SERVICE = "org.freedesktop.Secret.Service"
#: Longest secret taken as a VNC password (VNC uses 8 bytes; anything huge is not one).
MAX_SECRET = 4096


async def _call(bus: ServiceBus, member: str, signature: str, body: list[object]) -> list[object]:
    reply = await bus.call(
        Message(
            destination=SECRETS,
            path=SECRETS_PATH,
            interface=SERVICE,
            member=member,
            signature=signature,
            body=body,
        )
    )
    if reply is None or reply.message_type is MessageType.ERROR:
        reason = reply.body[0] if reply is not None and reply.body else "no answer"
        raise LookupError(f"{member}: {reply.error_name if reply else ''} {reason}")
    return list(reply.body)


async def console_password(bus: ServiceBus, uuid: str, uri: str) -> str | None:
    """The password virt-manager stored for the guest `uuid` at `uri`, or None.

    None when there is no Secret Service on the bus or no such item; raises
    `AuthenticationFailed` when the item exists but is locked.
    """
    try:
        unlocked, locked = await _call(bus, "SearchItems", "a{ss}", [{"uuid": uuid, "hvuri": uri}])
    except LookupError as err:
        log.info("no Secret Service to ask for %s's password: %s", uuid, err)
        return None
    if not isinstance(unlocked, list) or not isinstance(locked, list):
        return None
    if not unlocked:
        if locked:
            raise AuthenticationFailed(
                f"the VNC password of guest {uuid} is in a locked keyring; unlock it "
                "(e.g. by logging in to the desktop) and connect again"
            )
        return None
    try:
        _output, session = await _call(bus, "OpenSession", "sv", ["plain", Variant("s", "")])
        (secrets,) = await _call(bus, "GetSecrets", "aoo", [[unlocked[0]], session])
    except LookupError as err:
        log.warning("the Secret Service did not give %s's password: %s", uuid, err)
        return None
    if not isinstance(secrets, dict):
        return None
    secret = secrets.get(unlocked[0])
    if secret is None:
        return None
    value = bytes(secret[2])
    if len(value) > MAX_SECRET:
        log.warning(
            "the Secret Service item for %s is %d bytes: not a VNC password", uuid, len(value)
        )
        return None
    return value.decode("utf-8", errors="replace")
