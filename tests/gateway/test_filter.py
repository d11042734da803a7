"""`filter_encodings`: what of a viewer's SetEncodings the gateway passes on to QEMU.

The gateway frames every server message it relays, so only encodings it can frame
may reach QEMU, plus the JPEG quality (-32..-23, rfbproto 7.8.4) and compression
level (-256..-247, rfbproto 7.8.5) hints, which change nothing about framing, and
the pseudo-encodings that bring messages it frames (Extended Clipboard, xvp). Our
own console pseudo-encoding (-262) is taken out and reported instead. Every
encoding QEMU 7.2's `set_encodings` knows passes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resourced.gateway.session import filter_encodings
from resourced.rfb.encodings import SUPPORTED_ENCODINGS

CONSOLES = -262
XVP = -309
EXTENDED_CLIPBOARD = -1063131698  # 0xC0A1E5CE
MESSAGE_PSEUDO_ENCODINGS = (XVP, EXTENDED_CLIPBOARD)
#: Every encoding and pseudo-encoding QEMU 7.2 `ui/vnc.c` `set_encodings` acts on.
QEMU_ENCODINGS = (
    0, 5, 7, -260, 6, 16, 17,  # Raw, Hextile, Tight, Tight PNG, zlib, ZRLE, ZYWRLE
    -223, -308, -257, -239, -314,  # DesktopSize, ExtendedDesktopSize, pointer type, cursors
    -258, -259, 0x574D5669, -261, XVP, EXTENDED_CLIPBOARD,  # keys, audio, WMVi, LEDs
    *range(-256, -246), *range(-32, -22),  # compression and quality levels
)  # fmt: skip
QUALITY_HINTS = range(-32, -22)  # -32..-23
COMPRESS_HINTS = range(-256, -246)  # -256..-247


def signed(value: int) -> int:
    """A u32 as the s32 SetEncodings carries."""
    return value - (1 << 32) if value >= 1 << 31 else value


def passable(encoding: int) -> bool:
    """Framable by the gateway, or a hint that does not change framing."""
    return (
        encoding in SUPPORTED_ENCODINGS
        or encoding in QUALITY_HINTS
        or encoding in COMPRESS_HINTS
        or encoding in MESSAGE_PSEUDO_ENCODINGS
    )


def test_every_encoding_qemu_knows_passes() -> None:
    """Nothing QEMU supports is stripped: no QEMU feature vanishes behind the gateway."""
    assert filter_encodings(QEMU_ENCODINGS) == (QEMU_ENCODINGS, False)
    assert filter_encodings((*QEMU_ENCODINGS, CONSOLES)) == (QEMU_ENCODINGS, True)


def is_subsequence(short: tuple[int, ...], long: tuple[int, ...]) -> bool:
    items = iter(long)
    return all(any(x == y for y in items) for x in short)


def test_framable_encodings_and_hints_are_kept_in_order() -> None:
    viewer = (16, 5, 7, 6, 2, 1, 0, 4, -32, -23, -256, -247, -239, -240, -314, -308, -223)
    viewer += (-224, -232, -257, -258, -259, -260, -261, 0x574D5669)
    assert filter_encodings(viewer) == (viewer, False)


def test_order_is_the_viewers_not_ours() -> None:
    viewer = (-247, 0, -239, 16, -23, 5)
    assert filter_encodings(viewer) == (viewer, False)


def test_consoles_is_removed_and_reported() -> None:
    assert filter_encodings((16, CONSOLES, -239)) == ((16, -239), True)
    assert filter_encodings((CONSOLES,)) == ((), True)
    assert filter_encodings((CONSOLES, CONSOLES, 0)) == ((0,), True)


def test_without_consoles_nothing_is_reported() -> None:
    assert filter_encodings((16, -239)) == ((16, -239), False)
    assert filter_encodings(()) == ((), False)


@pytest.mark.parametrize(
    "encoding",
    [
        -307,  # DesktopName
        -312,  # Fence
        -313,  # ContinuousUpdates
        -311,  # ClientRedirect
        -305,  # gii
        15,  # TRLE
        50,  # Open H.264
        -22,  # just above the JPEG quality range
        -33,  # just below it
        -246,  # just above the compression level range
        -512,  # TurboVNC fine-grained quality: not a range we pass
        -(2**31),
        2**31 - 1,
    ],
)
def test_unframable_encodings_are_removed(encoding: int) -> None:
    assert encoding not in SUPPORTED_ENCODINGS
    assert filter_encodings((16, encoding, 0)) == ((16, 0), False)
    assert filter_encodings((encoding, CONSOLES)) == ((), True)


def test_extended_clipboard_as_unsigned_is_removed_too() -> None:
    assert filter_encodings((0xC0A1E5CE, 0)) == ((0,), False)


def test_hint_ranges_are_exact() -> None:
    for value in range(-300, 0):
        hint = value in QUALITY_HINTS or value in COMPRESS_HINTS
        kept = filter_encodings((value,))[0] == (value,)
        assert kept == (hint or value in SUPPORTED_ENCODINGS or value == XVP), value
    assert filter_encodings(tuple(QUALITY_HINTS))[0] == tuple(range(-32, -22))
    assert filter_encodings(tuple(COMPRESS_HINTS))[0] == tuple(range(-256, -246))


UNFRAMABLE = [-307, -312, -313, signed(0xC0A1E5CE) + 1, 15, 50, -22, -246, -512, -768]
interesting = st.sampled_from(
    [
        *sorted(SUPPORTED_ENCODINGS),
        *QUALITY_HINTS,
        *COMPRESS_HINTS,
        *MESSAGE_PSEUDO_ENCODINGS,
        CONSOLES,
        *UNFRAMABLE,
    ]
)
encodings = st.lists(st.one_of(interesting, st.integers(-(2**31), 2**31 - 1)), max_size=40).map(
    tuple
)


@settings(max_examples=500, deadline=None, database=None)
@given(encodings)
def test_filter_properties(viewer: tuple[int, ...]) -> None:
    kept, wants_consoles = filter_encodings(viewer)
    assert wants_consoles == (CONSOLES in viewer)
    assert CONSOLES not in kept
    assert set(kept) <= set(viewer)
    assert is_subsequence(kept, viewer)
    assert all(passable(encoding) for encoding in kept)
    # Nothing passable is lost: each appears as often as in the input.
    for encoding in set(viewer):
        if passable(encoding):
            assert kept.count(encoding) == viewer.count(encoding)
    # Filtering is idempotent.
    assert filter_encodings(kept) == (kept, False)
