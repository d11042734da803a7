"""Tests for `resourced.rfb.encodings`: exact, incremental framing of rectangle bodies.

The bodies are built by small encoders written here from the wire layouts of
rfbproto 7.7/7.8 and QEMU's encoders, independently of the framers under test:
they emit bytes element by element, where the framers compute sizes.
"""

from __future__ import annotations

import random
import struct
import time
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resourced.errors import RemoteProtocolError
from resourced.rfb._buffer import NeedData, Reader
from resourced.rfb.constants import (
    MAX_COMPRESSED_RECT_LENGTH,
    MAX_CURSOR_DIMENSION,
    Encoding,
)
from resourced.rfb.encodings import (
    SUPPORTED_ENCODINGS,
    RectangleFramer,
    RectangleHeader,
    framer_for,
    rectangle_body,
)
from resourced.rfb.pixelformat import RGBX8888, PixelFormat

# ---------------------------------------------------------------------------
# Pixel formats, each with its PIXEL and Tight TPIXEL sizes spelled out by hand
# ---------------------------------------------------------------------------

PF8 = PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6)
PF16 = PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0)
PF32 = RGBX8888  # 8-bit components: TPIXEL is 3 bytes R, G, B
PF32_DEEP = PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0)
# 32-bit pixels with 5/6/5-bit components: ZRLE packs them in 3 bytes, Tight does not.
PF32_NARROW = PixelFormat(32, 16, False, True, 31, 63, 31, 11, 5, 0)
PF32_COLOUR_MAP = PixelFormat(32, 8, False, False, 255, 255, 255, 16, 8, 0)


@dataclass(frozen=True)
class Format:
    pf: PixelFormat
    bpp: int  # bytes in a PIXEL
    tpixel: int  # bytes in a Tight TPIXEL


FORMATS = [
    Format(PF8, 1, 1),
    Format(PF16, 2, 2),
    Format(PF32, 4, 3),
    Format(PF32_DEEP, 4, 4),
    Format(PF32_NARROW, 4, 4),
    Format(PF32_COLOUR_MAP, 4, 4),
]
FORMAT_IDS = ["pf8", "pf16", "pf32", "pf32deep", "pf32narrow", "pf32map"]

# ---------------------------------------------------------------------------
# Test-side encoders
# ---------------------------------------------------------------------------


def header(encoding: int, width: int, height: int, x: int = 0, y: int = 0) -> RectangleHeader:
    return RectangleHeader(x, y, width, height, encoding)


def enc_raw(width: int, height: int, bpp: int, rnd: random.Random) -> bytes:
    out = bytearray()
    for _ in range(height):
        for _ in range(width):
            out += rnd.randbytes(bpp)
    return bytes(out)


def enc_rre(count: int, bpp: int, rnd: random.Random, compact: bool = False) -> bytes:
    out = bytearray(struct.pack("!I", count))
    out += rnd.randbytes(bpp)  # background
    for _ in range(count):
        out += rnd.randbytes(bpp)
        if compact:
            out += struct.pack("!BBBB", rnd.randrange(256), 0, 1, 1)
        else:
            out += struct.pack("!HHHH", rnd.randrange(65536), 0, 1, 1)
    return bytes(out)


# A Hextile tile as the test describes it: the subencoding byte, and for non-raw
# tiles the number of subrectangles (used only when AnySubrects is set).
@dataclass(frozen=True)
class Tile:
    mask: int
    subrects: int = 0


def enc_hextile(width: int, height: int, bpp: int, tiles: list[Tile], rnd: random.Random) -> bytes:
    out = bytearray()
    it = iter(tiles)
    for ty in range(0, height, 16):
        th = min(16, height - ty)
        for tx in range(0, width, 16):
            tw = min(16, width - tx)
            tile = next(it)
            out.append(tile.mask)
            if tile.mask & 1:
                out += enc_raw(tw, th, bpp, rnd)
                continue
            if tile.mask & 2:
                out += rnd.randbytes(bpp)
            if tile.mask & 4:
                out += rnd.randbytes(bpp)
            if tile.mask & 8:
                out.append(tile.subrects)
                for _ in range(tile.subrects):
                    if tile.mask & 16:
                        out += rnd.randbytes(bpp)
                    out += bytes([rnd.randrange(256), rnd.randrange(256)])
    assert next(it, None) is None, "more tiles than the rectangle holds"
    return bytes(out)


def hextile_tile_count(width: int, height: int) -> int:
    return len(range(0, width, 16)) * len(range(0, height, 16))


def enc_length_prefixed(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def compact(n: int) -> bytes:
    """Tight compact length, written from the spec's bit table."""
    assert 0 <= n < 1 << 22
    if n < 1 << 7:
        return bytes([n])
    if n < 1 << 14:
        return bytes([0x80 | (n & 0x7F), n >> 7])
    return bytes([0x80 | (n & 0x7F), 0x80 | ((n >> 7) & 0x7F), n >> 14])


def enc_tight(
    width: int,
    height: int,
    tpixel: int,
    method: str,
    rnd: random.Random,
    *,
    resets: int = 0,
    stream: int = 0,
    colours: int = 2,
    image_length: int = 0,
) -> bytes:
    """A Tight body. `method`: fill, jpeg, png, basic (no filter byte), copy,
    palette, gradient."""
    if method == "fill":
        return bytes([0x80 | resets]) + rnd.randbytes(tpixel)
    if method in ("jpeg", "png"):
        nibble = 0x9 if method == "jpeg" else 0xA
        return bytes([nibble << 4 | resets]) + compact(image_length) + rnd.randbytes(image_length)
    out = bytearray()
    if method == "basic":
        out.append(stream << 4 | resets)
        filtered = enc_raw(width, height, tpixel, rnd)
    else:
        out.append((stream | 0x4) << 4 | resets)
        if method == "copy":
            out.append(0)
            filtered = enc_raw(width, height, tpixel, rnd)
        elif method == "gradient":
            out.append(2)
            filtered = enc_raw(width, height, tpixel, rnd)
        elif method == "palette":
            out.append(1)
            out.append(colours - 1)
            for _ in range(colours):
                out += rnd.randbytes(tpixel)
            if colours == 2:
                row = (width + 7) // 8
                filtered = b"".join(rnd.randbytes(row) for _ in range(height))
            else:
                filtered = bytes(rnd.randrange(colours) for _ in range(width * height))
        else:
            raise AssertionError(method)
    if len(filtered) < 12:
        out += filtered
    else:
        deflated = zlib.compress(filtered)
        out += compact(len(deflated)) + deflated
    return bytes(out)


def enc_cursor(width: int, height: int, bpp: int, rnd: random.Random) -> bytes:
    mask = b"".join(rnd.randbytes((width + 7) // 8) for _ in range(height))
    return enc_raw(width, height, bpp, rnd) + mask


def enc_x_cursor(width: int, height: int, rnd: random.Random) -> bytes:
    if width == 0 or height == 0:
        return b""
    colours = rnd.randbytes(6)
    bitmap = b"".join(rnd.randbytes((width + 7) // 8) for _ in range(height))
    bitmask = b"".join(rnd.randbytes((width + 7) // 8) for _ in range(height))
    return colours + bitmap + bitmask


def enc_alpha_cursor(width: int, height: int, rnd: random.Random, inner: int = 0) -> bytes:
    return struct.pack("!i", inner) + enc_raw(width, height, 4, rnd)


def enc_extended_desktop_size(screens: int, rnd: random.Random) -> bytes:
    out = bytearray([screens, 0, 0, 0])
    for i in range(screens):
        out += struct.pack("!IHHHHI", i, 0, 0, rnd.randrange(1, 5000), 600, 0)
    return bytes(out)


# ---------------------------------------------------------------------------
# The table of well-formed bodies every framer is checked against
# ---------------------------------------------------------------------------

Case = tuple[RectangleHeader, PixelFormat, bytes]


def _cases() -> list[tuple[str, RectangleHeader, PixelFormat, bytes]]:
    rnd = random.Random(7)
    cases: list[tuple[str, RectangleHeader, PixelFormat, bytes]] = []

    def add(name: str, hdr: RectangleHeader, pf: PixelFormat, body: bytes) -> None:
        cases.append((name, hdr, pf, body))

    for fmt, fid in zip(FORMATS, FORMAT_IDS, strict=True):
        bpp = fmt.bpp
        add(f"raw-{fid}", header(Encoding.RAW, 13, 7), fmt.pf, enc_raw(13, 7, bpp, rnd))
        add(f"rre-{fid}", header(Encoding.RRE, 9, 5), fmt.pf, enc_rre(6, bpp, rnd))
        add(f"corre-{fid}", header(Encoding.CORRE, 9, 5), fmt.pf, enc_rre(6, bpp, rnd, True))
        tiles = [Tile(1), Tile(2 | 8, 3), Tile(0), Tile(4 | 8, 2), Tile(8 | 16, 5), Tile(0x1F)]
        add(f"hextile-{fid}", header(Encoding.HEXTILE, 40, 20), fmt.pf,
            enc_hextile(40, 20, bpp, tiles, rnd))  # fmt: skip
        add(f"cursor-{fid}", header(Encoding.CURSOR, 11, 9), fmt.pf, enc_cursor(11, 9, bpp, rnd))
        tp = fmt.tpixel
        for method in ("fill", "basic", "copy", "gradient", "palette"):
            add(f"tight-{method}-{fid}", header(Encoding.TIGHT, 10, 6), fmt.pf,
                enc_tight(10, 6, tp, method, rnd, stream=2, resets=5))  # fmt: skip
        add(f"tight-palette16-{fid}", header(Encoding.TIGHT, 10, 6), fmt.pf,
            enc_tight(10, 6, tp, "palette", rnd, colours=16))  # fmt: skip
        add(f"tight-jpeg-{fid}", header(Encoding.TIGHT, 10, 6), fmt.pf,
            enc_tight(10, 6, tp, "jpeg", rnd, image_length=300))  # fmt: skip
        add(f"tightpng-png-{fid}", header(Encoding.TIGHT_PNG, 10, 6), fmt.pf,
            enc_tight(10, 6, tp, "png", rnd, image_length=200))  # fmt: skip
        add(f"tightpng-fill-{fid}", header(Encoding.TIGHT_PNG, 10, 6), fmt.pf,
            enc_tight(10, 6, tp, "fill", rnd))  # fmt: skip

    pf = PF32
    add("copyrect", header(Encoding.COPY_RECT, 50, 50), pf, struct.pack("!HH", 3, 4))
    add("zlib", header(Encoding.ZLIB, 8, 8), pf,
        enc_length_prefixed(zlib.compress(enc_raw(8, 8, 4, rnd))))  # fmt: skip
    add("zrle", header(Encoding.ZRLE, 8, 8), pf, enc_length_prefixed(rnd.randbytes(77)))
    add("zywrle", header(Encoding.ZYWRLE, 8, 8), pf, enc_length_prefixed(rnd.randbytes(55)))
    add("zlib-empty", header(Encoding.ZLIB, 8, 8), pf, enc_length_prefixed(b""))
    for enc in (
        Encoding.DESKTOP_SIZE,
        Encoding.LAST_RECT,
        Encoding.POINTER_POS,
        Encoding.QEMU_POINTER_MOTION_CHANGE,
        Encoding.QEMU_EXTENDED_KEY_EVENT,
        Encoding.QEMU_AUDIO,
    ):
        add(f"empty-{enc.name.lower()}", header(enc, 1024, 768), pf, b"")
    add("led-state", header(Encoding.QEMU_LED_STATE, 0, 0), pf, bytes([0b101]))
    add("x-cursor", header(Encoding.X_CURSOR, 17, 4), pf, enc_x_cursor(17, 4, rnd))
    add("x-cursor-hidden", header(Encoding.X_CURSOR, 0, 0), pf, b"")
    add("cursor-hidden", header(Encoding.CURSOR, 0, 0), pf, b"")
    add("alpha-cursor", header(Encoding.ALPHA_CURSOR, 12, 10), pf, enc_alpha_cursor(12, 10, rnd))
    add("alpha-cursor-16bpp", header(Encoding.ALPHA_CURSOR, 5, 3), PF16,
        enc_alpha_cursor(5, 3, rnd))  # fmt: skip
    add("ext-desktop-size", header(Encoding.EXTENDED_DESKTOP_SIZE, 800, 600), pf,
        enc_extended_desktop_size(3, rnd))  # fmt: skip
    add("ext-desktop-size-0", header(Encoding.EXTENDED_DESKTOP_SIZE, 800, 600), pf,
        enc_extended_desktop_size(0, rnd))  # fmt: skip
    add("wmvi", header(Encoding.WMVI, 0, 0), pf, PF16.serialize())
    add("raw-empty", header(Encoding.RAW, 0, 100), pf, b"")
    add("hextile-empty", header(Encoding.HEXTILE, 100, 0), pf, b"")
    return cases


_ALL = _cases()
CASES = [pytest.param(hdr, pf, body, id=name) for name, hdr, pf, body in _ALL]
NON_EMPTY_CASES = [pytest.param(hdr, pf, body, id=name) for name, hdr, pf, body in _ALL if body]


@pytest.mark.parametrize(("hdr", "pf", "body"), CASES)
def test_whole_body_gives_exact_length(hdr: RectangleHeader, pf: PixelFormat, body: bytes) -> None:
    assert framer_for(hdr, pf).frame(memoryview(body)) == len(body)
    assert rectangle_body(hdr, pf, body) == len(body)


@pytest.mark.parametrize(("hdr", "pf", "body"), CASES)
def test_byte_at_a_time(hdr: RectangleHeader, pf: PixelFormat, body: bytes) -> None:
    framer = framer_for(hdr, pf)
    view = memoryview(body)
    for k in range(len(body)):
        assert framer.frame(view[:k]) is None, f"claimed complete at {k} of {len(body)}"
    assert framer.frame(view) == len(body)
    # Asking again, with more bytes behind the body, changes nothing.
    assert framer.frame(view) == len(body)
    assert framer.frame(memoryview(body + b"\xff" * 9)) == len(body)


@pytest.mark.parametrize(("hdr", "pf", "body"), CASES)
@pytest.mark.parametrize("trailer", [b"\x00", b"\xff" * 40, bytes(range(256))])
def test_trailing_bytes_are_not_counted(
    hdr: RectangleHeader, pf: PixelFormat, body: bytes, trailer: bytes
) -> None:
    assert framer_for(hdr, pf).frame(memoryview(body + trailer)) == len(body)
    assert rectangle_body(hdr, pf, body + trailer) == len(body)


@pytest.mark.parametrize(("hdr", "pf", "body"), NON_EMPTY_CASES)
def test_rectangle_body_rejects_truncated(
    hdr: RectangleHeader, pf: PixelFormat, body: bytes
) -> None:
    with pytest.raises(RemoteProtocolError, match="truncated"):
        rectangle_body(hdr, pf, body[:-1])


# ---------------------------------------------------------------------------
# RectangleHeader
# ---------------------------------------------------------------------------


def test_header_parse_and_serialize() -> None:
    wire = struct.pack("!HHHHi", 1, 2, 300, 400, -314)
    reader = Reader(wire + b"rest")
    hdr = RectangleHeader.parse(reader)
    assert hdr == RectangleHeader(1, 2, 300, 400, -314)
    assert hdr.encoding == Encoding.ALPHA_CURSOR
    assert reader.pos == RectangleHeader.SIZE == 12
    assert hdr.serialize() == wire


def test_header_parse_short_consumes_nothing() -> None:
    reader = Reader(bytes(11))
    with pytest.raises(NeedData):
        RectangleHeader.parse(reader)
    assert reader.pos == 0


@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(-(2**31), 2**31 - 1),
)
def test_header_roundtrip(x: int, y: int, w: int, h: int, enc: int) -> None:
    hdr = RectangleHeader(x, y, w, h, enc)
    wire = hdr.serialize()
    assert len(wire) == RectangleHeader.SIZE
    assert RectangleHeader.parse(Reader(wire)) == hdr


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def test_supported_encodings() -> None:
    expected = {
        Encoding.RAW,
        Encoding.COPY_RECT,
        Encoding.RRE,
        Encoding.CORRE,
        Encoding.HEXTILE,
        Encoding.ZLIB,
        Encoding.TIGHT,
        Encoding.ZRLE,
        Encoding.ZYWRLE,
        Encoding.TIGHT_PNG,
        Encoding.DESKTOP_SIZE,
        Encoding.LAST_RECT,
        Encoding.POINTER_POS,
        Encoding.QEMU_POINTER_MOTION_CHANGE,
        Encoding.QEMU_EXTENDED_KEY_EVENT,
        Encoding.QEMU_AUDIO,
        Encoding.QEMU_LED_STATE,
        Encoding.CURSOR,
        Encoding.X_CURSOR,
        Encoding.ALPHA_CURSOR,
        Encoding.EXTENDED_DESKTOP_SIZE,
        Encoding.WMVI,
    }
    assert expected == SUPPORTED_ENCODINGS
    for enc in SUPPORTED_ENCODINGS:
        framer_for(header(enc, 4, 4), PF32)  # does not raise
        framer_for(header(int(enc), 4, 4), PF32)  # a plain int works as well


@pytest.mark.parametrize(
    "encoding",
    [
        3,
        9,
        Encoding.ZLIBHEX,
        Encoding.TRLE,
        Encoding.XVP,
        Encoding.JPEG_QUALITY_0,
        Encoding.COMPRESS_LEVEL_0,
        -1,
        2**31 - 1,
        -(2**31),
    ],
)
def test_unsupported_encoding(encoding: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        framer_for(header(encoding, 4, 4), PF32)
    assert str(info.value) == f"unsupported encoding {int(encoding)} in rectangle"


# ---------------------------------------------------------------------------
# Malformed and over-limit bodies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("nibble", [0xB, 0xC, 0xD, 0xE, 0xF])
@pytest.mark.parametrize("encoding", [Encoding.TIGHT, Encoding.TIGHT_PNG])
def test_tight_invalid_control_byte(encoding: int, nibble: int) -> None:
    framer = framer_for(header(encoding, 8, 8), PF32)
    with pytest.raises(RemoteProtocolError, match="control byte"):
        framer.frame(memoryview(bytes([nibble << 4 | 0x3, 0, 0, 0])))


def test_tight_png_control_only_in_tight_png() -> None:
    body = bytes([0xA0]) + compact(5) + bytes(5)
    with pytest.raises(RemoteProtocolError, match="control byte 0xa0"):
        rectangle_body(header(Encoding.TIGHT, 8, 8), PF32, body)
    assert rectangle_body(header(Encoding.TIGHT_PNG, 8, 8), PF32, body) == len(body)


@pytest.mark.parametrize("filter_id", [3, 4, 0x7F, 0xFF])
def test_tight_bad_filter(filter_id: int) -> None:
    framer = framer_for(header(Encoding.TIGHT, 8, 8), PF32)
    assert framer.frame(memoryview(bytes([0x40]))) is None  # filter byte not yet here
    with pytest.raises(RemoteProtocolError, match="filter"):
        framer.frame(memoryview(bytes([0x40, filter_id, 0, 0])))


@pytest.mark.parametrize("encoding", [Encoding.ZLIB, Encoding.ZRLE, Encoding.ZYWRLE])
def test_compressed_length_limit(encoding: int) -> None:
    too_long = struct.pack("!I", MAX_COMPRESSED_RECT_LENGTH + 1)
    with pytest.raises(RemoteProtocolError, match="limit"):
        framer_for(header(encoding, 8, 8), PF32).frame(memoryview(too_long))
    with pytest.raises(RemoteProtocolError):
        framer_for(header(encoding, 8, 8), PF32).frame(memoryview(b"\xff" * 4))
    # At the limit it is accepted: the framer waits without allocating anything.
    at_limit = struct.pack("!I", MAX_COMPRESSED_RECT_LENGTH)
    framer = framer_for(header(encoding, 8, 8), PF32)
    assert framer.frame(memoryview(at_limit + bytes(100))) is None


@pytest.mark.parametrize("encoding", [Encoding.CURSOR, Encoding.X_CURSOR, Encoding.ALPHA_CURSOR])
@pytest.mark.parametrize(
    ("width", "height"),
    [(MAX_CURSOR_DIMENSION + 1, 1), (1, MAX_CURSOR_DIMENSION + 1), (0xFFFF, 0xFFFF)],
)
def test_oversize_cursor(encoding: int, width: int, height: int) -> None:
    with pytest.raises(RemoteProtocolError, match="cursor"):
        framer_for(header(encoding, width, height), PF32)


def test_largest_cursors_are_framed() -> None:
    side = MAX_CURSOR_DIMENSION
    rnd = random.Random(1)
    cases = [
        (Encoding.CURSOR, enc_cursor(side, side, 4, rnd)),
        (Encoding.X_CURSOR, enc_x_cursor(side, side, rnd)),
        (Encoding.ALPHA_CURSOR, enc_alpha_cursor(side, side, rnd)),
    ]
    for enc, body in cases:
        assert rectangle_body(header(enc, side, side), PF32, body) == len(body)


@pytest.mark.parametrize(
    "inner", [Encoding.HEXTILE, Encoding.TIGHT, Encoding.ZRLE, Encoding.CURSOR, -1, 2**31 - 1]
)
def test_alpha_cursor_rejects_non_raw_inner_encoding(inner: int) -> None:
    framer = framer_for(header(Encoding.ALPHA_CURSOR, 4, 4), PF32)
    assert framer.frame(memoryview(struct.pack("!i", inner)[:3])) is None
    with pytest.raises(RemoteProtocolError, match="inner encoding"):
        # Refused as soon as the inner encoding is readable, before any pixel.
        framer.frame(memoryview(struct.pack("!i", inner)))


@pytest.mark.parametrize(
    ("encoding", "compact_geometry"), [(Encoding.RRE, False), (Encoding.CORRE, True)]
)
def test_subrect_count_beyond_area(encoding: int, compact_geometry: bool) -> None:
    rnd = random.Random(3)
    hdr = header(encoding, 3, 2)
    ok = enc_rre(6, 4, rnd, compact_geometry)
    assert rectangle_body(hdr, PF32, ok) == len(ok)
    with pytest.raises(RemoteProtocolError, match="subrectangles"):
        framer_for(hdr, PF32).frame(memoryview(struct.pack("!I", 7)))
    with pytest.raises(RemoteProtocolError, match="subrectangles"):
        framer_for(hdr, PF32).frame(memoryview(b"\xff\xff\xff\xff"))


@pytest.mark.parametrize("mask", [0x20, 0x40, 0x80, 0x2A, 0xFE])
def test_hextile_unknown_subencoding_bits(mask: int) -> None:
    rnd = random.Random(5)
    good_first_tile = enc_hextile(16, 16, 4, [Tile(2)], rnd)
    framer = framer_for(header(Encoding.HEXTILE, 32, 16), PF32)
    body = memoryview(good_first_tile + bytes([mask]) + bytes(64))
    with pytest.raises(RemoteProtocolError, match="tile 1"):
        framer.frame(body)
    with pytest.raises(RemoteProtocolError):  # and again: the error is sticky
        framer.frame(body)


@pytest.mark.parametrize("mask", [0x21, 0x41, 0x81, 0xFF])
def test_hextile_raw_bit_overrides_other_bits(mask: int) -> None:
    body = bytes([mask]) + bytes(16 * 16 * 2)
    assert rectangle_body(header(Encoding.HEXTILE, 16, 16), PF16, body) == len(body)


# ---------------------------------------------------------------------------
# Tight details
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 127, 128, 129, 16383, 16384, 16385, 100_000])
@pytest.mark.parametrize("method", ["jpeg", "png"])
def test_tight_compact_length_boundaries(length: int, method: str) -> None:
    enc = Encoding.TIGHT_PNG if method == "png" else Encoding.TIGHT
    body = enc_tight(64, 64, 3, method, random.Random(length), image_length=length)
    assert len(body) == 1 + len(compact(length)) + length
    assert rectangle_body(header(enc, 64, 64), PF32, body) == len(body)
    assert rectangle_body(header(enc, 64, 64), PF32, body + b"\x80\x80\x80") == len(body)


def test_tight_compact_length_maximum() -> None:
    biggest = (1 << 22) - 1
    framer = framer_for(header(Encoding.TIGHT, 2048, 2048), PF32)
    head = bytes([0x90, 0xFF, 0xFF, 0xFF])
    assert framer.frame(memoryview(head[:2])) is None
    assert framer.frame(memoryview(head[:3])) is None
    assert framer.frame(memoryview(head)) is None
    body = head + bytes(biggest)
    assert framer.frame(memoryview(body)) == len(body) == 4 + biggest


def test_tight_non_minimal_compact_length() -> None:
    # 0x80 0x00 spells zero in two bytes; it frames the same as 0x00 would.
    body = bytes([0x90, 0x80, 0x00])
    assert rectangle_body(header(Encoding.TIGHT, 4, 4), PF32, body) == 3


@pytest.mark.parametrize("resets", range(16))
def test_tight_reset_bits_do_not_change_framing(resets: int) -> None:
    rnd = random.Random(resets)
    for method in ("fill", "basic", "copy", "palette", "gradient"):
        body = enc_tight(20, 20, 3, method, rnd, resets=resets, stream=resets % 4)
        assert rectangle_body(header(Encoding.TIGHT, 20, 20), PF32, body) == len(body)


@pytest.mark.parametrize(
    ("width", "height", "tpixel", "compressed"),
    [
        (11, 1, 1, False),  # 11 bytes: sent as is
        (12, 1, 1, True),  # 12 bytes: compressed, with a length
        (3, 1, 3, False),  # 9 bytes of 3-byte TPIXELs
        (4, 1, 3, True),  # 12 bytes
        (5, 1, 2, False),
        (6, 1, 2, True),
    ],
)
def test_tight_compression_threshold(
    width: int, height: int, tpixel: int, compressed: bool
) -> None:
    pf = {1: PF8, 2: PF16, 3: PF32}[tpixel]
    filtered = bytes(range(width * height * tpixel))
    if compressed:
        deflated = zlib.compress(filtered)
        body = bytes([0x00]) + compact(len(deflated)) + deflated
    else:
        body = bytes([0x00]) + filtered
    assert rectangle_body(header(Encoding.TIGHT, width, height), pf, body) == len(body)


def test_tight_mono_palette_threshold() -> None:
    # Two colours pack 8 pixels a byte: 88x1 is 11 bytes (as is), 89x1 is 12.
    rnd = random.Random(9)
    small = enc_tight(88, 1, 3, "palette", rnd, colours=2)
    assert len(small) == 1 + 1 + 1 + 6 + 11  # control, filter, count, palette, 11 bytes
    assert rectangle_body(header(Encoding.TIGHT, 88, 1), PF32, small) == len(small)
    big = enc_tight(89, 1, 3, "palette", rnd, colours=2)
    assert rectangle_body(header(Encoding.TIGHT, 89, 1), PF32, big) == len(big)


@pytest.mark.parametrize(
    ("width", "height", "colours", "index_bytes"),
    [
        (8, 1, 1, 8),  # one colour is not two: a byte a pixel
        (8, 1, 2, 1),  # two colours: a bit a pixel
        (8, 1, 3, 8),
        (9, 1, 2, 2),  # rows are padded to whole bytes
        (3, 3, 2, 3),
        (3, 3, 4, 9),
    ],
)
def test_tight_small_palette_sent_as_is(
    width: int, height: int, colours: int, index_bytes: int
) -> None:
    body = enc_tight(width, height, 2, "palette", random.Random(0), colours=colours)
    assert len(body) == 3 + 2 * colours + index_bytes
    assert rectangle_body(header(Encoding.TIGHT, width, height), PF16, body) == len(body)


@pytest.mark.parametrize("colours", [1, 2, 3, 255, 256])
def test_tight_palette_sizes(colours: int) -> None:
    rnd = random.Random(colours)
    for fmt in FORMATS:
        body = enc_tight(30, 7, fmt.tpixel, "palette", rnd, colours=colours)
        assert rectangle_body(header(Encoding.TIGHT, 30, 7), fmt.pf, body) == len(body)


def test_tight_pixel_is_not_zrle_cpixel() -> None:
    # PF32_NARROW packs into 3-byte ZRLE CPIXELs, but Tight sends it whole.
    assert PF32_NARROW.compact_pixel_size == 3
    fill = bytes([0x80]) + bytes(4)
    assert rectangle_body(header(Encoding.TIGHT, 4, 4), PF32_NARROW, fill) == 5
    assert rectangle_body(header(Encoding.TIGHT, 4, 4), PF32, fill) == 4


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

formats = st.sampled_from(FORMATS)
seeds = st.integers(0, 2**32 - 1)


def check_framing(hdr: RectangleHeader, pf: PixelFormat, body: bytes, cuts: list[int]) -> None:
    """Whole, chunked (at `cuts`) and with a trailer, the framer finds len(body)."""
    assert framer_for(hdr, pf).frame(memoryview(body)) == len(body)
    framer = framer_for(hdr, pf)
    padded = memoryview(body + b"\x5a" * 5)
    for cut in sorted({min(c, len(body)) for c in cuts}):
        expected = len(body) if cut >= len(body) else None
        assert framer.frame(padded[:cut]) == expected
    assert framer.frame(padded) == len(body)


cut_lists = st.lists(st.integers(0, 40_000), max_size=12)


@st.composite
def hextile_bodies(draw: st.DrawFn) -> tuple[RectangleHeader, PixelFormat, bytes]:
    fmt = draw(formats)
    width = draw(st.integers(0, 70))
    height = draw(st.integers(0, 70))
    tile = st.one_of(
        st.integers(0, 0xFF).map(lambda m: Tile(m | 1)),  # raw, any other bits
        st.builds(Tile, st.integers(0, 0x1E).map(lambda m: m & ~1), st.integers(0, 255)),
    )
    tiles = draw(st.lists(tile, min_size=(n := hextile_tile_count(width, height)), max_size=n))
    body = enc_hextile(width, height, fmt.bpp, tiles, random.Random(draw(seeds)))
    return header(Encoding.HEXTILE, width, height), fmt.pf, body


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hextile_bodies(), cut_lists)
def test_property_hextile(case: Case, cuts: list[int]) -> None:
    check_framing(*case, cuts)


@st.composite
def tight_bodies(draw: st.DrawFn) -> tuple[RectangleHeader, PixelFormat, bytes]:
    fmt = draw(formats)
    png = draw(st.booleans())
    methods = ["fill", "jpeg", "basic", "copy", "palette", "gradient"] + (["png"] if png else [])
    method = draw(st.sampled_from(methods))
    width = draw(st.integers(0, 40))
    height = draw(st.integers(0, 40))
    body = enc_tight(
        width,
        height,
        fmt.tpixel,
        method,
        random.Random(draw(seeds)),
        resets=draw(st.integers(0, 15)),
        stream=draw(st.integers(0, 3)),
        colours=draw(st.integers(1, 256)),
        image_length=draw(st.integers(0, 20_000)),
    )
    enc = Encoding.TIGHT_PNG if png else Encoding.TIGHT
    return header(enc, width, height), fmt.pf, body


@settings(deadline=None)
@given(tight_bodies(), cut_lists)
def test_property_tight(case: Case, cuts: list[int]) -> None:
    check_framing(*case, cuts)


@st.composite
def other_bodies(draw: st.DrawFn) -> tuple[RectangleHeader, PixelFormat, bytes]:
    fmt = draw(formats)
    rnd = random.Random(draw(seeds))
    width = draw(st.integers(0, 60))
    height = draw(st.integers(0, 60))
    side = st.integers(0, MAX_CURSOR_DIMENSION)
    kinds = ["raw", "rre", "corre", "zlib", "cursor", "xcursor", "alpha", "eds"]
    kind = draw(st.sampled_from(kinds))
    bpp = fmt.bpp
    if kind == "raw":
        return header(Encoding.RAW, width, height), fmt.pf, enc_raw(width, height, bpp, rnd)
    if kind in ("rre", "corre"):
        count = draw(st.integers(0, min(width * height, 300)))
        enc = Encoding.RRE if kind == "rre" else Encoding.CORRE
        return header(enc, width, height), fmt.pf, enc_rre(count, bpp, rnd, kind == "corre")
    if kind == "zlib":
        enc = draw(st.sampled_from([Encoding.ZLIB, Encoding.ZRLE, Encoding.ZYWRLE]))
        payload = rnd.randbytes(draw(st.integers(0, 30_000)))
        return header(enc, width, height), fmt.pf, enc_length_prefixed(payload)
    if kind == "eds":
        body = enc_extended_desktop_size(draw(st.integers(0, 255)), rnd)
        return header(Encoding.EXTENDED_DESKTOP_SIZE, width, height), fmt.pf, body
    width, height = draw(side), draw(side)
    if kind == "cursor":
        return header(Encoding.CURSOR, width, height), fmt.pf, enc_cursor(width, height, bpp, rnd)
    if kind == "xcursor":
        return header(Encoding.X_CURSOR, width, height), fmt.pf, enc_x_cursor(width, height, rnd)
    body = enc_alpha_cursor(width, height, rnd)
    return header(Encoding.ALPHA_CURSOR, width, height), fmt.pf, body


@settings(deadline=None)
@given(other_bodies(), cut_lists)
def test_property_other_encodings(case: Case, cuts: list[int]) -> None:
    check_framing(*case, cuts)


Outcome = int | None | type[RemoteProtocolError]


def outcome(framer: RectangleFramer, data: memoryview) -> Outcome:
    try:
        return framer.frame(data)
    except RemoteProtocolError:
        return RemoteProtocolError


@settings(deadline=None)
@given(
    st.sampled_from(sorted(SUPPORTED_ENCODINGS)),
    st.integers(0, 40),
    st.integers(0, 40),
    formats,
    st.binary(max_size=3000),
    st.lists(st.integers(0, 3000), max_size=10),
)
def test_property_arbitrary_bytes(
    encoding: int, width: int, height: int, fmt: Format, data: bytes, cuts: list[int]
) -> None:
    """On any bytes a framer answers None, a length within the data, or
    RemoteProtocolError, and feeding the bytes in pieces changes no answer."""
    hdr = header(encoding, width, height)
    view = memoryview(data)
    whole = outcome(framer_for(hdr, fmt.pf), view)
    if isinstance(whole, int):
        assert 0 <= whole <= len(data)

    framer = framer_for(hdr, fmt.pf)
    piece: Outcome = None
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        piece = outcome(framer, view[:cut])
        # Framing depends on the prefix only: a fresh framer agrees with the incremental one.
        assert piece == outcome(framer_for(hdr, fmt.pf), view[:cut])
        if isinstance(whole, int):
            assert piece == (whole if cut >= whole else None)
        elif whole is None:
            assert piece is None
        else:  # refused as a whole: the pieces wait for the deciding bytes, then are refused
            assert piece is None or piece is RemoteProtocolError
    assert piece == whole  # the last piece is all of the data


# ---------------------------------------------------------------------------
# Cost: a big Hextile body fed in chunks is scanned once, not once per chunk
# ---------------------------------------------------------------------------


def test_large_hextile_in_chunks_is_linear() -> None:
    width, height = 1024, 768
    rnd = random.Random(11)
    pattern = [Tile(1), Tile(2), Tile(0), Tile(2 | 8, 40), Tile(8 | 16, 100), Tile(4 | 8, 3)]
    tiles = [pattern[i % len(pattern)] for i in range(hextile_tile_count(width, height))]
    body = enc_hextile(width, height, 4, tiles, rnd)
    assert len(body) > 800_000
    view = memoryview(body)
    framer = framer_for(header(Encoding.HEXTILE, width, height), PF32)
    start = time.perf_counter()
    results = [framer.frame(view[:end]) for end in range(0, len(body), 4096)]
    final = framer.frame(view)
    elapsed = time.perf_counter() - start
    assert all(r is None for r in results)
    assert final == len(body)
    assert elapsed < 5.0, f"framing took {elapsed:.2f} s"
