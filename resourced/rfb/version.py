"""The ProtocolVersion exchange (rfbproto 7.1.1), shared by the client and server halves.

Both sides send twelve bytes, `RFB xxx.yyy\\n`; the server first, then the client
answers with the version it will speak, never above the server's. This module
parses those bytes and says which of the three versions that exist (3.3, 3.7,
3.8) two peers speak. It does not read or write anything itself.

What real servers announce beyond the three: RealVNC 4.x/5.x say 4.0, 4.1 or
5.0, Intel AMT 4.0, Apple Remote Desktop 3.889, some UltraVNC versions 3.4 or
3.6. They speak 3.8 (or, below 3.7, 3.3) with a client that answers so, and
noVNC, TigerVNC and libvncclient answer so.
"""

from __future__ import annotations

import re

_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")

#: Twelve bytes, the same length whatever the version.
VERSION_LENGTH = 12


def parse_version(data: bytes) -> tuple[int, int] | None:
    """(major, minor) of a ProtocolVersion message, or None if it is not one."""
    match = _VERSION_RE.fullmatch(data)
    if match is None:
        return None
    return int(match[1]), int(match[2])


def common_minor(major: int, minor: int) -> int | None:
    """The RFB 3.x minor we speak with a peer that announced major.minor.

    3.8 for 3.8 and anything newer (a newer peer speaks 3.8 too; rfbproto 7.1.1
    says the answer is the highest version both know); 3.7 for 3.7; 3.3 for
    3.3 to 3.6 (3.5 and UltraVNC's 3.4/3.6 are 3.3, as rfbproto says). None for
    anything older than 3.3, which is not RFB as we know it (an UltraVNC
    repeater's 0.0, say).
    """
    if (major, minor) < (3, 3):
        return None
    if (major, minor) >= (3, 8):
        return 8
    return 7 if minor == 7 else 3


def version_bytes(minor: int) -> bytes:
    """The ProtocolVersion message for RFB 3.minor."""
    return b"RFB 003.%03d\n" % minor
