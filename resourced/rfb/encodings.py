"""Framing of FramebufferUpdate rectangle bodies: where each rectangle's body ends.

What this module is: sans-IO, incremental *framers* for the body that follows each
rectangle header of a FramebufferUpdate (rfbproto "FramebufferUpdate"), for the encodings of
rfbproto 7.7 and the pseudo-encodings of 7.8 that QEMU's VNC server sends. Given
the rectangle header and the bytes after it, a framer says how long the body is,
so that a client can hand exactly that body to a decoder and a gateway can forward
server messages split exactly at message boundaries. A framer remembers how far it
has scanned, so a body fed in growing chunks costs time in proportion to its size,
not to the number of calls times its size.

What it is not: a decoder. No pixel is converted, nothing is decompressed, no zlib
stream state is kept, and rectangles are not checked against the framebuffer (the
caller does that for `PIXEL_ENCODINGS`). Only what framing needs is checked: lengths
against our limits, and the bytes that decide the layout (Hextile subencodings,
Tight control and filter bytes). It does no I/O.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol

from resourced.errors import RemoteProtocolError
from resourced.rfb._buffer import Reader
from resourced.rfb.constants import (
    MAX_COMPRESSED_RECT_LENGTH,
    MAX_CURSOR_DIMENSION,
    Encoding,
)
from resourced.rfb.pixelformat import PixelFormat

_RECTANGLE_HEADER = struct.Struct("!HHHHi")
_U32 = struct.Struct("!I")
_S32 = struct.Struct("!i")


@dataclass(frozen=True, slots=True)
class RectangleHeader:
    """The 12-byte header before each rectangle of a FramebufferUpdate (rfbproto 7.6).

    `encoding` is the signed 32-bit value off the wire; it need not be an `Encoding`.
    """

    x: int
    y: int
    width: int
    height: int
    encoding: int

    SIZE = 12

    @classmethod
    def parse(cls, reader: Reader) -> RectangleHeader:
        # Ask for the whole header first so that a short buffer leaves the reader
        # where it was, rather than half-way through the fields.
        reader.need(cls.SIZE)
        x = reader.u16()
        y = reader.u16()
        width = reader.u16()
        height = reader.u16()
        return cls(x, y, width, height, reader.s32())

    def serialize(self) -> bytes:
        return _RECTANGLE_HEADER.pack(self.x, self.y, self.width, self.height, self.encoding)


class RectangleFramer(Protocol):
    """Finds the end of one rectangle body, incrementally."""

    def frame(self, data: memoryview) -> int | None:
        """Return the body length once `data` holds all of it, else None.

        `data` starts at the first body byte. Call again with a longer buffer (the
        same bytes, more of them) as bytes arrive; trailing bytes past the body are
        allowed and ignored. Raises `RemoteProtocolError` for a malformed or
        over-limit body.
        """
        ...


# ---------------------------------------------------------------------------
# Framers whose length a short prefix decides
# ---------------------------------------------------------------------------


class _FixedFramer:
    """A body whose length the header alone decides."""

    __slots__ = ("_length",)

    def __init__(self, length: int) -> None:
        self._length = length

    def frame(self, data: memoryview) -> int | None:
        return self._length if len(data) >= self._length else None


class _PrefixFramer(ABC):
    """A body whose total length a few leading bytes decide.

    Once `_measure` has read those bytes the length is remembered, so later calls
    only compare it with the buffer size and never read the prefix again.
    """

    __slots__ = ("_length",)

    def __init__(self) -> None:
        self._length: int | None = None

    def frame(self, data: memoryview) -> int | None:
        length = self._length
        if length is None:
            length = self._measure(data)
            if length is None:
                return None
            self._length = length
        return length if len(data) >= length else None

    @abstractmethod
    def _measure(self, data: memoryview) -> int | None:
        """The total body length, or None while the deciding bytes are missing."""


class _SubrectsFramer(_PrefixFramer):
    """RRE and CoRRE (rfbproto 7.7, "RRE" and "CoRRE"): u32 count, background, count subrects."""

    __slots__ = ("_max_count", "_name", "_pixel_size", "_subrect_size")

    def __init__(self, name: str, pixel_size: int, geometry_size: int, max_count: int) -> None:
        super().__init__()
        self._name = name
        self._pixel_size = pixel_size
        self._subrect_size = pixel_size + geometry_size
        self._max_count = max_count

    def _measure(self, data: memoryview) -> int | None:
        if len(data) < _U32.size:
            return None
        count: int = _U32.unpack_from(data, 0)[0]
        # The count is a u32, so a hostile server could announce tens of gigabytes.
        # Each subrectangle covers at least one pixel, and an encoder that needs more
        # subrectangles than the rectangle has pixels should have sent Raw; refusing
        # more keeps the body within a small multiple of the (caller-bounded) area.
        if count > self._max_count:
            raise RemoteProtocolError(
                f"{self._name} rectangle claims {count} subrectangles, "
                f"more than its {self._max_count} pixels"
            )
        return _U32.size + self._pixel_size + count * self._subrect_size


class _LengthPrefixedFramer(_PrefixFramer):
    """zlib, ZRLE and ZYWRLE (rfbproto 7.7): u32 length, then that many bytes."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def _measure(self, data: memoryview) -> int | None:
        if len(data) < _U32.size:
            return None
        length: int = _U32.unpack_from(data, 0)[0]
        if length > MAX_COMPRESSED_RECT_LENGTH:
            raise RemoteProtocolError(
                f"{self._name} rectangle of {length} bytes exceeds the "
                f"{MAX_COMPRESSED_RECT_LENGTH}-byte limit"
            )
        return _U32.size + length


#: Size of one SCREEN in an ExtendedDesktopSize body (rfbproto 7.8,
#: "ExtendedDesktopSize Pseudo-encoding").
_SCREEN_SIZE = 16
#: number-of-screens (u8) plus 3 bytes of padding.
_EXTENDED_DESKTOP_SIZE_HEADER = 4


class _ExtendedDesktopSizeFramer(_PrefixFramer):
    """ExtendedDesktopSize: u8 number of screens, 3 padding, 16 bytes a screen.

    The count is a u8, so it can never exceed `MAX_SCREENS`; nothing to check.
    """

    __slots__ = ()

    def _measure(self, data: memoryview) -> int | None:
        if not data:
            return None
        return _EXTENDED_DESKTOP_SIZE_HEADER + data[0] * _SCREEN_SIZE


#: QEMU's alpha cursor pixels are 32-bit RGBA whatever the client's pixel format.
_ALPHA_CURSOR_PIXEL_SIZE = 4


class _AlphaCursorFramer(_PrefixFramer):
    """AlphaCursor: s32 inner encoding, then the cursor in that encoding.

    The pseudo-encoding allows any encoding inside, but QEMU (`vnc_cursor_define`)
    only ever sends Raw RGBA. Framing another inner encoding would mean framing
    it with a different pixel format, so we refuse it rather than guess.
    """

    __slots__ = ("_pixels",)

    def __init__(self, width: int, height: int) -> None:
        super().__init__()
        self._pixels = width * height

    def _measure(self, data: memoryview) -> int | None:
        if len(data) < _S32.size:
            return None
        inner: int = _S32.unpack_from(data, 0)[0]
        if inner != Encoding.RAW:
            raise RemoteProtocolError(
                f"alpha cursor with inner encoding {inner}; only Raw is supported"
            )
        return _S32.size + self._pixels * _ALPHA_CURSOR_PIXEL_SIZE


# ---------------------------------------------------------------------------
# Hextile: a scan over tiles that resumes where it stopped
# ---------------------------------------------------------------------------


class _HextileMask(IntFlag):
    """Bits of a Hextile tile's subencoding byte (rfbproto 7.7, "Hextile Encoding")."""

    RAW = 1
    BACKGROUND_SPECIFIED = 2
    FOREGROUND_SPECIFIED = 4
    ANY_SUBRECTS = 8
    SUBRECTS_COLOURED = 16


_HEXTILE_TILE_SIDE = 16
#: A subrectangle's x-and-y-position and width-and-height bytes.
_HEXTILE_SUBRECT_GEOMETRY = 2
# Plain ints for the hot loop: IntFlag arithmetic builds enum members on each use.
_HX_RAW = int(_HextileMask.RAW)
_HX_BACKGROUND = int(_HextileMask.BACKGROUND_SPECIFIED)
_HX_FOREGROUND = int(_HextileMask.FOREGROUND_SPECIFIED)
_HX_ANY_SUBRECTS = int(_HextileMask.ANY_SUBRECTS)
_HX_COLOURED = int(_HextileMask.SUBRECTS_COLOURED)
_HX_UNKNOWN = 0xFF & ~int(
    _HextileMask.RAW
    | _HextileMask.BACKGROUND_SPECIFIED
    | _HextileMask.FOREGROUND_SPECIFIED
    | _HextileMask.ANY_SUBRECTS
    | _HextileMask.SUBRECTS_COLOURED
)


class _HextileFramer:
    """Hextile (rfbproto 7.7, "Hextile Encoding"): 16x16 tiles, each sized by its subencoding byte.

    A Hextile body has no overall length, so the only way to find its end is to walk
    every tile. The walk stops at the first tile that is not complete yet and resumes
    there on the next call; a tile's size is computed from at most its first few
    bytes (never by walking its subrectangles), so each byte is looked at O(1) times.
    """

    __slots__ = (
        "_bpp",
        "_columns",
        "_last_height",
        "_last_row",
        "_last_width",
        "_length",
        "_pos",
        "_tile",
        "_tiles",
    )

    def __init__(self, width: int, height: int, bytes_per_pixel: int) -> None:
        side = _HEXTILE_TILE_SIDE
        self._bpp = bytes_per_pixel
        self._columns = -(-width // side)
        rows = -(-height // side)
        self._tiles = self._columns * rows
        self._last_row = rows - 1
        # Edge tiles are narrower/shorter: the remainder, or a full side if none.
        self._last_width = width - side * (self._columns - 1)
        self._last_height = height - side * (rows - 1)
        self._tile = 0  # index of the first tile not yet known complete
        self._pos = 0  # offset of that tile's subencoding byte
        self._length: int | None = None

    def frame(self, data: memoryview) -> int | None:
        if self._length is not None:
            return self._length if len(data) >= self._length else None
        size_of_data = len(data)
        bpp = self._bpp
        columns = self._columns
        last_column = columns - 1
        last_row = self._last_row
        tiles = self._tiles
        side = _HEXTILE_TILE_SIDE
        tile = self._tile
        pos = self._pos
        while tile < tiles:
            if pos >= size_of_data:
                break
            mask = data[pos]
            if mask & _HX_RAW:
                # Raw cancels every other bit (spec), so their values do not matter.
                row, column = divmod(tile, columns)
                tile_width = self._last_width if column == last_column else side
                tile_height = self._last_height if row == last_row else side
                size = 1 + tile_width * tile_height * bpp
            else:
                if mask & _HX_UNKNOWN:
                    # Bits 32/64 are ZlibHex's; in Hextile they would change the
                    # layout in ways we cannot know, so framing would be a guess.
                    raise RemoteProtocolError(
                        f"Hextile tile {tile} has unknown subencoding bits 0x{mask:02x}"
                    )
                size = 1
                if mask & _HX_BACKGROUND:
                    size += bpp
                if mask & _HX_FOREGROUND:
                    size += bpp
                if mask & _HX_ANY_SUBRECTS:
                    if pos + size >= size_of_data:
                        break
                    count = data[pos + size]
                    subrect = _HEXTILE_SUBRECT_GEOMETRY
                    if mask & _HX_COLOURED:
                        subrect += bpp
                    size += 1 + count * subrect
            if pos + size > size_of_data:
                break
            pos += size
            tile += 1
        self._tile = tile
        self._pos = pos
        if tile < tiles:
            return None
        self._length = pos
        return pos


# ---------------------------------------------------------------------------
# Tight and Tight PNG
# ---------------------------------------------------------------------------


class _TightMethod(IntEnum):
    """High nibble of Tight's compression-control byte (rfbproto "Tight Encoding"; QEMU
    `ui/vnc-enc-tight.h`). 0-7 are BasicCompression; their values are not listed."""

    FILL = 0x8
    JPEG = 0x9
    PNG = 0xA  # Tight PNG only (QEMU's VNC_TIGHT_PNG)


class _TightFilter(IntEnum):
    """Tight BasicCompression filter ids (rfbproto "Tight Encoding")."""

    COPY = 0
    PALETTE = 1
    GRADIENT = 2


#: Highest high nibble that still means BasicCompression (bit 7 clear).
_TIGHT_BASIC_MAX = 0x7
#: In a BasicCompression nibble, this bit says a filter-id byte follows.
_TIGHT_EXPLICIT_FILTER = 0x4
#: Filtered data shorter than this is sent as is, with no length (QEMU's
#: VNC_TIGHT_MIN_TO_COMPRESS; rfbproto "Tight Encoding").
_TIGHT_MIN_TO_COMPRESS = 12
#: A compact length byte carries 7 bits; the top bit says another byte follows.
_COMPACT_MORE = 0x80
_COMPACT_BITS = 0x7F
#: A two-colour palette packs each pixel in one bit, rows padded to whole bytes.
_TIGHT_MONO_COLOURS = 2


def _tight_pixel_size(pixel_format: PixelFormat) -> int:
    """Size of a Tight TPIXEL (rfbproto "Tight Encoding").

    A TPIXEL is three bytes R, G, B when a 32-bit true-colour pixel has 8-bit
    components, else a PIXEL. This is not `PixelFormat.compact_pixel_size`, which
    answers for ZRLE's CPIXEL: that also packs 32-bit pixels whose components are
    *narrower* than 8 bits, which Tight does not. QEMU decides "pixel24" from
    bytes-per-pixel 4 and all three maxima being 255 (`tight_send_framebuffer_update`);
    we follow it and add the spec's true-colour condition, which cannot differ for
    QEMU (it falls back to 8 bits per pixel for colour maps). The spec's "depth 24"
    is not checked, again as QEMU does not.
    """
    if (
        pixel_format.true_colour
        and pixel_format.bits_per_pixel == 32
        and pixel_format.red_max == 0xFF
        and pixel_format.green_max == 0xFF
        and pixel_format.blue_max == 0xFF
    ):
        return 3
    return pixel_format.bytes_per_pixel


def _compact_length(data: memoryview, pos: int) -> tuple[int, int] | None:
    """Read a Tight compact length at `pos`: (value, bytes used), or None if incomplete.

    One to three bytes, little-endian 7+7+8 bits, so at most 2**22 - 1: always
    below `MAX_COMPRESSED_RECT_LENGTH`, which therefore needs no check here.
    Non-minimal forms (e.g. 0x80 0x00 for zero) are accepted: they frame the same.
    """
    end = len(data)
    if pos >= end:
        return None
    byte = data[pos]
    value = byte & _COMPACT_BITS
    if not byte & _COMPACT_MORE:
        return value, 1
    if pos + 1 >= end:
        return None
    byte = data[pos + 1]
    value |= (byte & _COMPACT_BITS) << 7
    if not byte & _COMPACT_MORE:
        return value, 2
    if pos + 2 >= end:
        return None
    # The third byte is all value bits (bits 14-21); it has no continuation flag.
    return value | data[pos + 2] << 14, 3


class _TightFramer(_PrefixFramer):
    """Tight (rfbproto "Tight Encoding") and Tight PNG (QEMU): control byte, then per method.

    The deciding prefix is the control byte, the filter id, the palette size byte
    and the compact length; the palette itself is skipped by arithmetic.
    """

    __slots__ = ("_allow_png", "_height", "_tpixel", "_width")

    def __init__(self, width: int, height: int, tpixel: int, allow_png: bool) -> None:
        super().__init__()
        self._width = width
        self._height = height
        self._tpixel = tpixel
        self._allow_png = allow_png

    def _measure(self, data: memoryview) -> int | None:
        if not data:
            return None
        control = data[0]
        # The low nibble only says which zlib streams to reset: no effect on framing.
        method = control >> 4
        if method == _TightMethod.FILL:
            return 1 + self._tpixel
        if method == _TightMethod.JPEG or (method == _TightMethod.PNG and self._allow_png):
            return self._with_compact_length(data, 1)
        if method > _TIGHT_BASIC_MAX:
            what = "Tight PNG" if self._allow_png else "Tight"
            raise RemoteProtocolError(f"{what} rectangle has invalid control byte 0x{control:02x}")

        pos = 1
        filter_id = _TightFilter.COPY.value
        if method & _TIGHT_EXPLICIT_FILTER:
            if len(data) < 2:
                return None
            filter_id = data[1]
            pos = 2
        width, height = self._width, self._height
        if filter_id in (_TightFilter.COPY, _TightFilter.GRADIENT):
            # The gradient filter replaces each TPIXEL by a same-sized difference;
            # it does not change the data size (spec; QEMU send_gradient_rect).
            data_size = width * height * self._tpixel
        elif filter_id == _TightFilter.PALETTE:
            if len(data) <= pos:
                return None
            colours = data[pos] + 1
            pos += 1 + colours * self._tpixel
            if colours == _TIGHT_MONO_COLOURS:
                data_size = (width + 7) // 8 * height
            else:
                # The spec allows 2..256 colours; a one-colour palette (count byte 0)
                # is tolerated and, not being two colours, uses one byte a pixel.
                data_size = width * height
        else:
            raise RemoteProtocolError(f"Tight rectangle has unknown filter id {filter_id}")
        if data_size < _TIGHT_MIN_TO_COMPRESS:
            return pos + data_size
        return self._with_compact_length(data, pos)

    @staticmethod
    def _with_compact_length(data: memoryview, pos: int) -> int | None:
        got = _compact_length(data, pos)
        if got is None:
            return None
        length, used = got
        return pos + used + length


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def _bitmask_size(width: int, height: int) -> int:
    """Bytes of a one-bit-a-pixel cursor mask or bitmap: rows padded to whole bytes
    (rfbproto 7.8 "Cursor" and "X Cursor" pseudo-encodings)."""
    return (width + 7) // 8 * height


#: The X cursor's primary and secondary colours, 3 bytes (R, G, B) each.
_X_CURSOR_COLOURS = 6
#: The QEMU LED state pseudo-rectangle carries one byte of LED bits.
_LED_STATE_SIZE = 1


def _check_cursor(header: RectangleHeader) -> None:
    if header.width > MAX_CURSOR_DIMENSION or header.height > MAX_CURSOR_DIMENSION:
        raise RemoteProtocolError(
            f"cursor of {header.width}x{header.height} exceeds the "
            f"{MAX_CURSOR_DIMENSION}x{MAX_CURSOR_DIMENSION} limit"
        )


def _raw(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _FixedFramer(header.width * header.height * pf.bytes_per_pixel)


def _copy_rect(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _FixedFramer(4)  # src-x-position, src-y-position: two u16


def _rre(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    # Subrectangle geometry: four u16 (x, y, w, h).
    return _SubrectsFramer("RRE", pf.bytes_per_pixel, 8, header.width * header.height)


def _corre(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    # Subrectangle geometry: four u8 (x, y, w, h).
    return _SubrectsFramer("CoRRE", pf.bytes_per_pixel, 4, header.width * header.height)


def _hextile(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _HextileFramer(header.width, header.height, pf.bytes_per_pixel)


def _zlib(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _LengthPrefixedFramer("zlib")


def _zrle(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _LengthPrefixedFramer("ZRLE")


def _zywrle(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    # ZRLE after a wavelet filter: the same u32 length and zlib data on the wire
    # (QEMU's `vnc_zywrle_send_framebuffer_update` is its ZRLE encoder).
    return _LengthPrefixedFramer("ZYWRLE")


def _tight(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _TightFramer(header.width, header.height, _tight_pixel_size(pf), allow_png=False)


def _tight_png(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _TightFramer(header.width, header.height, _tight_pixel_size(pf), allow_png=True)


def _empty(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _FixedFramer(0)


def _led_state(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _FixedFramer(_LED_STATE_SIZE)


def _cursor(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    _check_cursor(header)
    width, height = header.width, header.height
    return _FixedFramer(width * height * pf.bytes_per_pixel + _bitmask_size(width, height))


def _x_cursor(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    _check_cursor(header)
    width, height = header.width, header.height
    if width * height == 0:
        # An empty X cursor (a hidden pointer) carries no colours either.
        return _FixedFramer(0)
    return _FixedFramer(_X_CURSOR_COLOURS + 2 * _bitmask_size(width, height))


def _alpha_cursor(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    _check_cursor(header)
    return _AlphaCursorFramer(header.width, header.height)


def _extended_desktop_size(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    return _ExtendedDesktopSizeFramer()


def _wmvi(header: RectangleHeader, pf: PixelFormat) -> RectangleFramer:
    # The new pixel format; validating it is the parser's job, not framing's.
    return _FixedFramer(PixelFormat.SIZE)


_FRAMERS: dict[int, Callable[[RectangleHeader, PixelFormat], RectangleFramer]] = {
    Encoding.RAW: _raw,
    Encoding.COPY_RECT: _copy_rect,
    Encoding.RRE: _rre,
    Encoding.CORRE: _corre,
    Encoding.HEXTILE: _hextile,
    Encoding.ZLIB: _zlib,
    Encoding.TIGHT: _tight,
    Encoding.ZRLE: _zrle,
    Encoding.ZYWRLE: _zywrle,
    Encoding.TIGHT_PNG: _tight_png,
    Encoding.DESKTOP_SIZE: _empty,
    Encoding.LAST_RECT: _empty,
    Encoding.POINTER_POS: _empty,
    Encoding.QEMU_POINTER_MOTION_CHANGE: _empty,
    Encoding.QEMU_EXTENDED_KEY_EVENT: _empty,
    Encoding.QEMU_AUDIO: _empty,
    Encoding.QEMU_LED_STATE: _led_state,
    Encoding.CURSOR: _cursor,
    Encoding.X_CURSOR: _x_cursor,
    Encoding.ALPHA_CURSOR: _alpha_cursor,
    Encoding.EXTENDED_DESKTOP_SIZE: _extended_desktop_size,
    Encoding.WMVI: _wmvi,
}

#: Every encoding `framer_for` can frame.
SUPPORTED_ENCODINGS: frozenset[int] = frozenset(_FRAMERS)


def framer_for(header: RectangleHeader, pixel_format: PixelFormat) -> RectangleFramer:
    """A new framer for the body after `header`, in the connection's pixel format.

    Raises `RemoteProtocolError` for an encoding outside `SUPPORTED_ENCODINGS`, and
    for a cursor larger than `MAX_CURSOR_DIMENSION` (the header alone shows that).
    """
    make = _FRAMERS.get(header.encoding)
    if make is None:
        raise RemoteProtocolError(f"unsupported encoding {int(header.encoding)} in rectangle")
    return make(header, pixel_format)


def rectangle_body(header: RectangleHeader, pixel_format: PixelFormat, data: bytes) -> int:
    """Length of the complete body at the start of `data` (trailing bytes allowed).

    Raises `RemoteProtocolError` if `data` ends before the body does.
    """
    length = framer_for(header, pixel_format).frame(memoryview(data))
    if length is None:
        raise RemoteProtocolError(
            f"rectangle body (encoding {int(header.encoding)}) truncated at {len(data)} bytes"
        )
    return length
