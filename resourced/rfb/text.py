"""How text crosses the RFB wire: which bytes stand for a password, a name, a reason.

RFB never fixed one text encoding (rfbproto "String Encodings"): old servers sent
Latin-1, new ones UTF-8, and rfbproto recommends UTF-8. The peers we stand
between decide the rest: QEMU (`ui/vnc.c`) keys VNC Authentication with the first
8 bytes of the password as given to it over QMP or by libvirt, which are UTF-8,
and gtk-vnc sends the UTF-8 bytes of what the user typed, for VNC Authentication
and VeNCrypt Plain alike. So we send UTF-8 everywhere, and read text as UTF-8,
falling back to Latin-1 for bytes that are not UTF-8 (as TigerVNC does), so no
byte of a peer's text is lost to replacement characters.

This module does no I/O and knows no message layout; the connections use it
where they read or write text.
"""

from __future__ import annotations

import re

#: C0 and C1 control characters and DEL: never printed as they are.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def credential_bytes(text: str) -> bytes:
    """A password or user name as peers put it on the wire: its UTF-8 bytes."""
    return text.encode("utf-8")


def decode_text(data: bytes) -> str:
    """Text from a peer: UTF-8 if it is valid UTF-8, else Latin-1 (which any bytes are)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def printable(text: str) -> str:
    """A peer's text fit for one line of a message or log: the NULs a C server
    leaves at its end dropped (QEMU counts the terminating NUL of its failure
    reason), other control characters shown as escapes (`\\n`, `\\x1b`)."""
    text = text.rstrip("\0")
    return _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)
