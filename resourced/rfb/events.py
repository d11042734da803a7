"""Events the RFB client connection hands to its user.

Plain server messages (`FramebufferUpdate`, `Bell`, `ServerCutText`,
`SetColourMapEntries`) are events as they are; the rest are defined here or by
the extension that produces them (`resourced.rfb.qemu`). Nothing here parses.
"""

from __future__ import annotations

from dataclasses import dataclass

from resourced.rfb.pixelformat import PixelFormat


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake is over: ServerInit arrived (rfbproto 7.3.2)."""

    version: str  # the version we speak, e.g. "3.8"
    security: str  # e.g. "VNC_AUTH", "VENCRYPT/X509_VNC"
    width: int
    height: int
    pixel_format: PixelFormat
    name: str
    tls_version: str | None


@dataclass(frozen=True, slots=True)
class DesktopResized:
    """The framebuffer changed size (DesktopSize / ExtendedDesktopSize pseudo-rectangles)."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class CursorShape:
    """A new cursor image (rich, X or alpha cursor pseudo-rectangle), still encoded."""

    encoding: int
    hotspot_x: int
    hotspot_y: int
    width: int
    height: int
    body: bytes


@dataclass(frozen=True, slots=True)
class PixelFormatChanged:
    """The server switched pixel format (WMVi pseudo-rectangle)."""

    pixel_format: PixelFormat


@dataclass(frozen=True, slots=True)
class ServerClosed:
    """The server closed the connection at a message boundary."""
