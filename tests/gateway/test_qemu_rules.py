"""The gateway's own checks of viewer messages, as pure functions (QEMU 7.2's rules).

`check_pixel_format` refuses what QEMU's `set_pixel_format` would quietly replace;
`clipboard_refusal` refuses an Extended Clipboard provide that QEMU's
`vnc_client_cut_text_ext` would drop. The same rules against real QEMU are in
tests/integration/test_gateway_qemu_rules.py.
"""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resourced.errors import RemoteProtocolError
from resourced.gateway.session import check_pixel_format, clipboard_refusal
from resourced.rfb import clipboard
from resourced.rfb.constants import ExtendedClipboardFlag
from resourced.rfb.messages import ExtendedClientCutText
from resourced.rfb.pixelformat import RGBX8888, PixelFormat

F = ExtendedClipboardFlag
MIB = 1024 * 1024


@pytest.mark.parametrize(
    "pixel_format",
    [
        RGBX8888,
        PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),
        PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),
        PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0),  # a colour map at 8 bits
    ],
)
def test_formats_qemu_serves_as_asked_pass(pixel_format: PixelFormat) -> None:
    check_pixel_format(pixel_format)


@pytest.mark.parametrize(
    ("pixel_format", "match"),
    [
        (PixelFormat(32, 24, False, False, 255, 255, 255, 16, 8, 0), "colour map at 32"),
        (PixelFormat(16, 16, False, False, 31, 63, 31, 11, 5, 0), "colour map at 16"),
        (PixelFormat(32, 24, False, True, 0, 255, 255, 16, 8, 0), "maximum of 0"),
        (PixelFormat(16, 16, False, True, 31, 0, 31, 11, 5, 0), "maximum of 0"),
        (PixelFormat(8, 8, False, True, 7, 7, 0, 0, 3, 6), "maximum of 0"),
    ],
)
def test_formats_qemu_would_replace_are_refused(pixel_format: PixelFormat, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        check_pixel_format(pixel_format)


def provide(payload: bytes) -> ExtendedClientCutText:
    return ExtendedClientCutText(int(F.PROVIDE | F.TEXT), payload)


def test_provide_qemu_takes_passes() -> None:
    assert clipboard_refusal(provide(clipboard.provide_payload({1: b"text\0"}))) is None
    assert clipboard_refusal(provide(zlib.compress(bytes(MIB)))) is None  # exactly QEMU's 1 MiB


def test_provide_qemu_would_drop_is_refused() -> None:
    refusal = clipboard_refusal(provide(zlib.compress(bytes(MIB + 1))))
    assert refusal is not None
    assert "inflates past QEMU's limit" in refusal
    refusal = clipboard_refusal(provide(b"not zlib at all"))
    assert refusal is not None
    assert "zlib" in refusal


@pytest.mark.parametrize(
    "flags",
    [
        # TigerVNC's caps: every action it supports, provide among them, and a
        # u32 size per format (not zlib).
        F.CAPS | F.REQUEST | F.PEEK | F.NOTIFY | F.PROVIDE | F.TEXT,
        F.NOTIFY | F.TEXT,
        F.REQUEST | F.TEXT,
        F.PEEK,
        F.NOTIFY | F.PROVIDE | F.TEXT,  # QEMU reads this as a notify
    ],
)
def test_other_actions_are_not_inflated(flags: int) -> None:
    assert clipboard_refusal(ExtendedClientCutText(int(flags), bytes(4))) is None


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 2**32 - 1), st.binary(max_size=256))
def test_any_message_gets_an_answer(flags: int, payload: bytes) -> None:
    refusal = clipboard_refusal(ExtendedClientCutText(flags, payload))
    assert refusal is None or refusal
