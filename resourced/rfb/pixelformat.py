"""The RFB PIXEL_FORMAT structure (rfbproto 7.4): parse, serialize, validate.

Only the description of pixels lives here; this module converts no pixels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from resourced.errors import RemoteProtocolError
from resourced.rfb._buffer import Reader

_PIXEL_FORMAT = struct.Struct("!BBBBHHHBBBxxx")


@dataclass(frozen=True, slots=True)
class PixelFormat:
    """How a server encodes one pixel (rfbproto 7.4 "Pixel Format Data Structure")."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    SIZE = 16

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    @property
    def compact_pixel_size(self) -> int:
        """Size of a ZRLE CPIXEL (rfbproto 7.7.6).

        A 32-bit true-colour pixel whose colours fit in 24 bits travels as 3 bytes.
        Tight's TPIXEL has a stricter rule of its own (see `encodings`).
        """
        if (
            self.true_colour
            and self.bits_per_pixel == 32
            and self.depth <= 24
            and self.red_max <= 255
            and self.green_max <= 255
            and self.blue_max <= 255
        ):
            return 3
        return self.bytes_per_pixel

    @classmethod
    def parse(cls, reader: Reader) -> PixelFormat:
        raw = reader.take(cls.SIZE)
        (bpp, depth, big, true, rmax, gmax, bmax, rsh, gsh, bsh) = _PIXEL_FORMAT.unpack(raw)
        if bpp not in (8, 16, 32):
            raise RemoteProtocolError(f"pixel format: bits-per-pixel {bpp} is not 8, 16 or 32")
        if depth == 0 or depth > bpp:
            raise RemoteProtocolError(f"pixel format: depth {depth} does not fit {bpp} bits")
        return cls(bpp, depth, bool(big), bool(true), rmax, gmax, bmax, rsh, gsh, bsh)

    def serialize(self) -> bytes:
        return _PIXEL_FORMAT.pack(
            self.bits_per_pixel,
            self.depth,
            int(self.big_endian),
            int(self.true_colour),
            self.red_max,
            self.green_max,
            self.blue_max,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
        )


#: 32-bit little-endian xRGB, the format QEMU uses natively and most clients ask for.
RGBX8888 = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)
